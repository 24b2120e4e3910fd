import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_png8

import mmcli.engines as engines
from mmcli.inference import Predictor
from mmcli.predict import PredictCase, PredictConfig, run_predict
from mmcli.weights import load_checkpoint


@pytest.fixture()
def folder(tmp_path):
    for i in range(5):
        save_png8(tmp_path / "scans" / f"img{i}.png", 70 + i, 60, seed=i)
    save_png8(tmp_path / "scans" / "crash.png", 64, 64)
    return tmp_path / "scans"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers inherit the patched reader")
def test_a_crashing_worker_costs_only_its_file(tmp_path, folder, tiny_weights, monkeypatch):
    real = engines.load_case

    def crashing(file, *args, **kwargs):
        if file.path.name == "crash.png":
            os._exit(3)  # a decoder that takes the whole process down
        return real(file, *args, **kwargs)

    monkeypatch.setattr(engines, "load_case", crashing)
    cfg = PredictConfig(inputs=(str(folder),), out=tmp_path / "r.csv", weights=str(tiny_weights),
                        device="cpu", workers=2, batch_size=3)
    rows = {}
    summary = run_predict(cfg, on_case=lambda row: rows.update({row["case_id"]: row}))
    assert summary.ok == 5 and summary.failed == 1
    assert rows["crash"]["error"] == engines.CRASH_REASON
    assert all(rows[f"img{i}"]["status"] == "ok" for i in range(5))


def test_process_and_loader_engines_agree(tmp_path, folder, tiny_weights):
    files = sorted(p for p in folder.iterdir() if p.name != "crash.png")
    results = {}
    for engine, workers in (("processes", 2), ("loader", 0)):
        # float32: other batchings move the tiny random model's near-zero mask logits in the
        # last bit, which a mixed decoder's bf16 rounding can turn into flipped pixels
        cfg = PredictConfig(inputs=tuple(map(str, files)), out=tmp_path / f"{engine}.csv",
                            weights=str(tiny_weights), device="cpu", workers=workers, precision="fp32")
        rows = []
        run_predict(cfg, on_case=rows.append)
        results[engine] = {r["case_id"]: r for r in rows}
    for case_id, row in results["processes"].items():
        other = results["loader"][case_id]
        assert row["p_pneumonia"] == pytest.approx(other["p_pneumonia"], abs=1e-5)
        assert row["lung_fraction"] == pytest.approx(other["lung_fraction"], abs=2e-3)


def test_bf16_autocast_stays_close_to_fp32(tiny_weights):
    ckpt = load_checkpoint(tiny_weights)
    torch.manual_seed(0)
    x = torch.randn(4, 1, 64, 64)
    fp32 = Predictor(ckpt, device="cpu", precision="fp32").predict(x)
    bf16 = Predictor(ckpt, device="cpu", precision="bf16").predict(x)
    assert bf16.probabilities.dtype == torch.float32
    assert torch.allclose(fp32.probabilities, bf16.probabilities, atol=0.05)
    agree = ((fp32.mask_logits >= 0) == (bf16.mask_logits >= 0)).float().mean()
    assert agree > 0.9


def test_loader_engine_with_decoding_workers(tmp_path, folder, tiny_weights):
    # the GPU path (DataLoader workers decode, the main process predicts), run on the CPU
    from mmcli.io.discover import discover_inputs

    files = [f for f in discover_inputs([folder]) if f.case_id != "crash"]
    files.append(type(files[0])(path=tmp_path / "missing.png", case_id="missing"))
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    task = PredictCase(0.5, tmp_path / "masks", tmp_path, ("normal", "pneumonia"))
    rows = list(engines.iter_rows_loader(predictor, files, task, batch_size=2, workers=2))
    assert [r["case_id"] for r in rows] == [f.case_id for f in files]  # input order kept
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["error"]
    direct = engines.predict_files(predictor, files[:5], task)
    for a, b in zip(rows, direct, strict=False):
        assert a["p_pneumonia"] == pytest.approx(b["p_pneumonia"], abs=1e-5)


def test_spawned_workers_after_cuda_use(tmp_path, folder, tiny_weights, monkeypatch):
    # A process that has used CUDA must not fork model workers (autograd refuses to run in
    # the child): the engine spawns them instead, with the same results.
    files = sorted(p for p in folder.iterdir() if p.name != "crash.png")[:2]
    rows = {}
    for name in ("fork", "spawn"):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda name=name: name == "spawn")
        assert engines._mp_context().get_start_method() == (name if sys.platform.startswith("linux") else "spawn")
        cfg = PredictConfig(inputs=tuple(map(str, files)), out=tmp_path / f"{name}.csv", weights=str(tiny_weights),
                            device="cpu", workers=2, batch_size=1)
        got = []
        run_predict(cfg, on_case=got.append)
        rows[name] = {r["case_id"]: r for r in got}
    assert rows["spawn"].keys() == rows["fork"].keys() and len(rows["spawn"]) == 2
    for case_id, row in rows["spawn"].items():
        assert row["status"] == "ok"
        assert row["p_pneumonia"] == rows["fork"][case_id]["p_pneumonia"]


@pytest.mark.parametrize("size", [(64, 64), (37, 53), (1, 1)])
def test_native_masks_from_the_device_equal_the_cpu_upsampling(tiny_weights, size):
    from mmcli.data.transforms import mask_to_native

    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    pred = predictor.predict(x, [size, (size[1], size[0])])
    for k, (h, w) in enumerate([size, (size[1], size[0])]):
        want = mask_to_native(pred.mask_logits[k], h, w).numpy()
        got = pred.native_mask(k)
        assert got.shape == (h, w) and (got == want).all()
        one = pred.case(k)
        assert (one.native_mask(0) == want).all() and torch.equal(one.probabilities[0], pred.probabilities[k])


def _loader_rows(tmp_path, folder, tiny_weights, name, **kwargs):
    from mmcli.io.discover import discover_inputs

    files = [f for f in discover_inputs([folder]) if f.case_id != "crash"]
    files.insert(2, type(files[0])(path=tmp_path / "missing.png", case_id="missing"))
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    task = PredictCase(0.5, tmp_path / name, tmp_path, ("normal", "pneumonia"))
    rows = list(engines.iter_rows_loader(predictor, files, task, batch_size=2, workers=0, **kwargs))
    assert [r["case_id"] for r in rows] == [f.case_id for f in files]  # input order kept
    return rows


def test_finishing_processes_and_device_masks_give_the_same_rows_and_files(tmp_path, folder, tiny_weights, caplog):
    # the GPU path (masks at native size from the device, cases finished in processes), run on the CPU
    plain = _loader_rows(tmp_path, folder, tiny_weights, "thread")
    pooled = _loader_rows(tmp_path, folder, tiny_weights, "pool", finishers=2, native_masks=True)
    assert "finishing process died" not in caplog.text  # the processes did the work
    for a, b in zip(plain, pooled, strict=True):
        assert {k: v for k, v in a.items() if k != "mask"} == {k: v for k, v in b.items() if k != "mask"}
        if a["status"] == "ok":
            assert (tmp_path / a["mask"]).read_bytes() == (tmp_path / b["mask"]).read_bytes()
    assert [r["status"] for r in pooled].count("error") == 1


class _DiesInChild(PredictCase):
    """Finishing img1 takes its process down, unless it runs in the test's own process."""

    def finish(self, file, item, pred, k):
        if file.case_id == "img1" and os.getpid() != int(os.environ["MMCLI_TEST_PARENT"]):
            os._exit(3)
        return super().finish(file, item, pred, k)


def test_a_dying_finisher_costs_nothing(tmp_path, folder, tiny_weights, monkeypatch, caplog):
    from mmcli.io.discover import discover_inputs

    monkeypatch.setenv("MMCLI_TEST_PARENT", str(os.getpid()))
    files = [f for f in discover_inputs([folder]) if f.case_id != "crash"]
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    task = _DiesInChild(0.5, tmp_path / "masks", tmp_path, ("normal", "pneumonia"))
    rows = list(engines.iter_rows_loader(predictor, files, task, batch_size=2, workers=0, finishers=2))
    assert [r["case_id"] for r in rows] == [f.case_id for f in files]
    assert [r["status"] for r in rows] == ["ok"] * 5
    assert "img1.png: a finishing process died; finishing this case here" in caplog.text


def test_keep_freed_memory_stops_page_faults() -> None:
    """With keep_freed_memory, model calls after the first reuse their buffers: no page faults."""
    import subprocess
    import sys

    from mmcli.runtime import keep_freed_memory

    if not sys.platform.startswith("linux"):
        assert keep_freed_memory() is False
        return
    code = (
        "import resource, statistics, sys, torch\n"
        "from mmcli.runtime import keep_freed_memory\n"
        "from mmcli.models import MultiMix\n"
        "ok = keep_freed_memory() if sys.argv[1] == '1' else None\n"
        "torch.set_num_threads(1); torch.manual_seed(0)\n"
        "m = MultiMix(widths=(8, 16, 32, 64, 128)).eval(); x = torch.rand(2, 1, 256, 256)\n"
        "faults = []\n"
        "for _ in range(13):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    with torch.no_grad(): m(x)\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(ok, statistics.median(faults[4:]))\n"  # after the first calls have grown the heap
    )

    def faults(flag: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, check=True)
        ok, count = out.stdout.split()
        return ok, float(count)

    (ok, kept), (_, default) = faults("1"), faults("0")
    assert ok == "True"
    # page faults per model call: thousands by default, next to none once the buffers are kept (the
    # heap may still grow now and then: a few hundred on a busy machine)
    assert default > 1000 and kept < default / 20


def _crashing_reader(monkeypatch, name):
    """Worker processes forked from here read ``name`` by dying."""
    real = engines.load_case

    def crashing(file, *args, **kwargs):
        if file.path.name == name:
            os._exit(3)  # a decoder that takes the whole process down
        return real(file, *args, **kwargs)

    monkeypatch.setattr(engines, "load_case", crashing)


def _dead(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers inherit the patched reader")
def test_a_hung_case_times_out_and_its_worker_is_replaced(tmp_path, folder, tiny_weights, monkeypatch):
    import multiprocessing
    import time

    real = engines.load_case

    def hanging(file, *args, **kwargs):
        if file.path.name == "crash.png":
            time.sleep(3600)  # a decoder stuck in a loop
        return real(file, *args, **kwargs)

    monkeypatch.setattr(engines, "load_case", hanging)
    cfg = PredictConfig(inputs=(str(folder),), out=tmp_path / "r.csv", weights=str(tiny_weights),
                        device="cpu", workers=2, batch_size=1, case_timeout=3)
    rows = {}
    started = time.monotonic()
    summary = run_predict(cfg, on_case=lambda row: rows.update({row["case_id"]: row}))
    assert time.monotonic() - started < 30
    assert summary.ok == 5 and summary.failed == 1
    assert rows["crash"]["error"] == "timed out after 3 s"
    assert not multiprocessing.active_children()  # the hung worker was killed, the others ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers inherit the patched reader")
def test_a_crash_retried_is_one_warning_line_naming_the_case(tmp_path, folder, tiny_weights, monkeypatch):
    from typer.testing import CliRunner

    from mmcli.cli import app

    _crashing_reader(monkeypatch, "crash.png")
    res = CliRunner().invoke(app, ["predict", str(folder), "--out", str(tmp_path / "r.csv"), "-w",
                                   str(tiny_weights), "-j", "2", "-b", "3", "--device", "cpu"])
    assert res.exit_code == 1, res.output
    named = [line for line in res.output.splitlines() if "crash.png" in line]
    assert len(named) == 1 and named[0].endswith(f"crash.png: {engines.CRASH_REASON}"), res.output
    assert not any("img" in line for line in res.output.splitlines()), res.output  # the others are not blamed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers inherit the patched reader")
def test_weights_replaced_mid_run_stop_it_with_one_line(tmp_path, tiny_weights, monkeypatch):
    import json
    import shutil
    import time

    from conftest import make_checkpoint
    from typer.testing import CliRunner

    from mmcli.cli import app

    for i in range(6):
        save_png8(tmp_path / "scans" / f"s{i}.png", 64, 64, seed=i)
    weights = tmp_path / "w.safetensors"
    shutil.copyfile(tiny_weights, weights)
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    # The worker that reads s0.png replaces the weights file, then crashes (once). The other
    # worker holds its file until that process is dead, so the retry and the files still to do
    # need a fresh worker, which finds other weights.
    real, crashed = engines.load_case, tmp_path / "crashed"

    def reader(file, *args, **kwargs):
        if file.path.name == "s0.png" and not crashed.exists():
            shutil.copyfile(other, tmp_path / "swap")
            os.replace(tmp_path / "swap", weights)  # whole, as an installer would: readers see old or new
            crashed.write_text(str(os.getpid()))
            os._exit(3)
        deadline = time.monotonic() + 60
        while not (crashed.exists() and crashed.read_text() and _dead(int(crashed.read_text()))):
            assert time.monotonic() < deadline, "the crashing worker never ended"
            time.sleep(0.01)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(engines, "load_case", reader)
    out = tmp_path / "r.csv"
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "scans"), "--out", str(out), "-w", str(weights),
                                   "-j", "2", "-b", "1", "--device", "cpu", "-q"])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: a worker process cannot load the weights the run "
                                                   "started with"), res.output
    assert "sha256 mismatch" in lines[0] and "Traceback" not in res.output
    assert not out.exists()
    journal = [json.loads(line) for line in (tmp_path / "r" / "journal.jsonl").read_text().splitlines()[1:]]
    assert all(row["status"] == "ok" for row in journal)  # no case blamed for the weights


def test_case_timeout_must_be_positive(tmp_path, folder, tiny_weights):
    from typer.testing import CliRunner

    from mmcli.cli import app

    res = CliRunner().invoke(app, ["predict", str(folder), "--out", str(tmp_path / "r.csv"), "-w",
                                   str(tiny_weights), "--case-timeout", "0"])
    assert res.exit_code == 2 and "--case-timeout" in res.output
    with pytest.raises(Exception, match="--case-timeout"):
        PredictConfig(inputs=(str(folder),), out=tmp_path / "r.csv", case_timeout=-1)


class _HangsInChild(PredictCase):
    """Finishing img1 hangs its process, unless it runs in the test's own process."""

    def finish(self, file, item, pred, k):
        if file.case_id == "img1" and os.getpid() != int(os.environ["MMCLI_TEST_PARENT"]):
            import time

            time.sleep(3600)
        return {**super().finish(file, item, pred, k), "pid": os.getpid()}


@pytest.mark.slow  # a spawned finisher imports torch, then the limit runs out: about 11 s
def test_a_hung_finisher_costs_its_case_only(tmp_path, folder, tiny_weights, monkeypatch):
    import multiprocessing

    from mmcli.io.discover import discover_inputs

    monkeypatch.setenv("MMCLI_TEST_PARENT", str(os.getpid()))
    files = [f for f in discover_inputs([folder]) if f.case_id != "crash"]
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    task = _HangsInChild(0.5, tmp_path / "masks", tmp_path, ("normal", "pneumonia"))
    rows = list(engines.iter_rows_loader(predictor, files, task, batch_size=2, workers=0, finishers=1,
                                         case_timeout=5))
    assert [r["case_id"] for r in rows] == [f.case_id for f in files]
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok", "ok"]
    assert rows[1]["error"] == "timed out after 5 s"
    # the cases queued behind the hung one ran in the next pool, under the limit, not in this process
    assert all(r["pid"] != os.getpid() for r in rows if r["status"] == "ok")
    assert not multiprocessing.active_children()


class _SlowToStart(PredictCase):
    """A finishing process takes 4 s to unpickle this task: a process start on a busy machine."""

    def __setstate__(self, state):
        if os.getpid() != int(os.environ["MMCLI_TEST_PARENT"]):
            import time

            time.sleep(4)
        object.__setattr__(self, "__dict__", state)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="slow start simulated in a spawned process")
def test_a_finishing_pool_that_starts_slowly_does_not_time_out_its_first_case(tmp_path, folder, tiny_weights,
                                                                               monkeypatch):
    from mmcli.io.discover import discover_inputs

    monkeypatch.setenv("MMCLI_TEST_PARENT", str(os.getpid()))
    files = [f for f in discover_inputs([folder]) if f.case_id != "crash"][:2]
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    task = _SlowToStart(0.5, tmp_path / "masks", tmp_path, ("normal", "pneumonia"))
    rows = list(engines.iter_rows_loader(predictor, files, task, batch_size=2, workers=0, finishers=1,
                                         case_timeout=2))
    assert [r["status"] for r in rows] == ["ok", "ok"]  # the start is not counted against the 2 s of a case


class _FakePrediction:
    def case(self, k):
        return self

    def failure(self, k):
        return None


class _ThreadRecordingTask:
    def finish(self, file, item, pred, k):
        import threading

        return {"case_id": file, "thread": threading.current_thread().name}

    def failed(self, file, reason):
        return {"case_id": file, "error": reason}


def test_cases_of_a_killed_finishing_pool_run_again_in_the_next(monkeypatch):
    import itertools
    from concurrent.futures import Future, ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pools = itertools.count()
    task = _ThreadRecordingTask()
    monkeypatch.setattr(engines._Finisher, "_new_pool",
                        lambda self: ThreadPoolExecutor(1, thread_name_prefix=f"pool{next(pools)}"))
    monkeypatch.setitem(engines._FINISHER, "task", task)
    finisher = engines._Finisher(task, processes=1, timeout=5)
    _, _, queued = finisher.submit("queued", {}, _FakePrediction(), 0)
    _, _, running = finisher.submit("running", {}, _FakePrediction(), 0)
    finisher._kill()  # as when another case of that pool ran past the time limit
    cancelled: Future = Future()
    cancelled.cancel()  # the case waited in the killed pool's queue
    killed: Future = Future()
    killed.set_exception(BrokenProcessPool("terminated abruptly"))  # the case ran beside the hung one
    assert finisher.result("queued", cancelled, queued) == {"case_id": "queued", "thread": "pool1_0"}
    assert finisher.result("running", killed, running) == {"case_id": "running", "thread": "pool1_0"}
    finisher.shutdown()
