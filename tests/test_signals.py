"""A batch job's stop signals: SIGTERM and Ctrl-C are clean stops, even with a stopped worker, and no
worker outlives its run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import save_png8

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")


@pytest.fixture()
def many(tmp_path):
    first = save_png8(tmp_path / "scans" / "s000.png", 1600, 1600)
    for i in range(1, 60):  # hard links: distinct inputs, no time spent writing images
        os.link(first, tmp_path / "scans" / f"s{i:03d}.png")
    return tmp_path / "scans"


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.add(int(entry.name))
    return kids


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _start(many, out, weights, *extra):
    cmd = [sys.executable, "-m", "mmcli", "predict", str(many), "--out", str(out), "-w", str(weights),
           "-j", "2", "-b", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = out.with_suffix("") / "journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 4:  # header + 3 cases
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the run should be mid-way with its workers"
    return proc, workers


def _gone_within(pids: set[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pids)


def test_sigterm_stops_cleanly_and_the_rerun_resumes(tmp_path, many, tiny_weights):
    out = tmp_path / "r.csv"
    proc, workers = _start(many, out, tiny_weights)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Stopped by SIGTERM" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert _gone_within(workers, 10)
    assert not out.exists()  # no half-written report
    rerun = subprocess.run([sys.executable, "-m", "mmcli", "predict", str(many), "--out", str(out),
                            "-w", str(tiny_weights), "-j", "2"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = int(rerun.stderr.split(" resumed)")[0].rsplit("(", 1)[1])
    assert resumed >= 3 and "60 ok" in rerun.stderr


def test_no_worker_outlives_a_killed_parent(tmp_path, many, tiny_weights):
    proc, workers = _start(many, tmp_path / "r.csv", tiny_weights)
    proc.kill()  # kill -9: no handler runs in the parent
    proc.communicate(timeout=30)
    assert _gone_within(workers, 10), f"workers still alive: {_alive(workers)}"


def test_two_runs_started_together_into_one_out(tmp_path, many, tiny_weights):
    out = tmp_path / "r.csv"
    procs = [subprocess.Popen([sys.executable, "-m", "mmcli", "predict", str(many), "--out", str(out), "-w",
                               str(tiny_weights), "-j", "1", "--threshold", threshold],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for threshold in ("0.5", "0.6")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "another mmcli run (pid" in refused and "is writing" in refused and "Traceback" not in refused


@pytest.mark.parametrize(("signum", "code", "cause"),
                         [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_stopped_worker_does_not_hold_up_a_stop(tmp_path, many, tiny_weights, signum, code, cause):
    out = tmp_path / "r.csv"
    proc, workers = _start(many, out, tiny_weights)
    stopped = min(workers)
    try:
        os.kill(stopped, signal.SIGSTOP)  # a worker that will never answer
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 10
        assert proc.returncode == code, err
        assert f"Stopped by {cause}" in err and "Traceback" not in err
        assert _gone_within(workers, 10), f"workers still alive: {_alive(workers)}"
    finally:
        for pid in _alive(workers):  # only this test's processes
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    journal = (out.with_suffix("") / "journal.jsonl").read_text().splitlines()
    assert len(journal) >= 4  # the header and the finished cases: a rerun resumes from them


def test_a_stopped_worker_costs_one_case_with_a_time_limit(tmp_path, many, tiny_weights):
    for extra in sorted(many.iterdir())[40:]:  # enough still to do that the stopped worker has a job in hand
        extra.unlink()
    out = tmp_path / "r.csv"
    proc, workers = _start(many, out, tiny_weights, "--case-timeout", "4")
    stopped = min(workers)
    try:
        os.kill(stopped, signal.SIGSTOP)
        _, err = proc.communicate(timeout=120)
    finally:
        if _alive({stopped}):
            os.kill(stopped, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "39 ok" in err and "1 failed" in err
    assert sum("timed out after 4 s" in line for line in err.splitlines()) == 1
    assert not _alive(workers)
