"""``mmcli train`` as a user sees it: in a terminal, in a log file, its options and help."""

import json
import os
import re
import subprocess
import sys

import pytest
from test_train_data import make_folders
from typer.testing import CliRunner

from mmcli.cli import app

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|[\r\x07]")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("data"), n_seg=4, n_cls=6)


def _args(folders, out, *extra):
    seg, cls = folders
    return ["train", "--seg-data", str(seg), "--cls-data", str(cls), "--out", str(out), "--arch", "tiny",
            "--image-size", "64", "--batch-size", "2", "--steps-per-epoch", "2", "--val-fraction", "0.34",
            "--device", "cpu", "-j", "0", *extra]


def _run_in_terminal(cmd, timeout=60):
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal; return (exit code, output without escapes)."""
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_INTERACTIVE",
                                                             "TTY_COMPATIBLE", "COLUMNS", "LINES")}
    env.update(TERM="xterm", COLUMNS="100", LINES="30", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


def test_two_epochs_in_a_terminal(folders, tmp_path):
    code, output = _run_in_terminal([sys.executable, "-m", "mmcli", *_args(folders, tmp_path / "run", "--epochs", "2")])
    assert code == 0, output[-3000:]
    assert "epoch 1/2: loss" in output and "epoch 2/2: loss" in output, output[-3000:]
    assert "ETA" in output and "for the run" in output  # the bar's and the first epoch line's
    assert "2 epoch(s); best epoch" in output and "Traceback" not in output


def test_plain_lines_without_a_terminal(folders, tmp_path):
    res = runner.invoke(app, _args(folders, tmp_path / "run", "--epochs", "2", "--no-calibrate"),
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for epoch in (1, 2):
        assert f"epoch {epoch}/2: step 2/2, loss" in res.output
        assert sum(line.startswith(f"epoch {epoch}/2: loss") for line in lines) == 1
    ends = [line for line in lines if ": loss" in line and ": step" not in line]
    assert ends[0].endswith(" for the run)") and "; ETA " in ends[0]  # the mean epoch time x the epochs left
    assert "ETA" not in ends[1]  # nothing left after the last epoch
    assert "2 epoch(s); best epoch" in lines[-1]
    quiet = runner.invoke(app, _args(folders, tmp_path / "quiet", "--epochs", "1", "--no-calibrate", "-q"))
    assert quiet.exit_code == 0 and "epoch" not in quiet.output


def _threshold(out):
    return json.loads((out / "run.json").read_text())["settings"]["threshold"]


def test_pseudo_threshold_and_its_deprecated_name(folders, tmp_path):
    common = ("--variant", "enc-ssl", "--epochs", "1", "--steps-per-epoch", "1", "--no-calibrate", "-q")
    res = runner.invoke(app, _args(folders, tmp_path / "new", *common, "--pseudo-threshold", "0.9"))
    assert res.exit_code == 0, res.output
    assert _threshold(tmp_path / "new") == 0.9 and "deprecated" not in res.output
    res = runner.invoke(app, _args(folders, tmp_path / "old", *common, "--threshold", "0.8"))
    assert res.exit_code == 0, res.output
    assert _threshold(tmp_path / "old") == 0.8
    warnings = [line for line in res.output.splitlines() if "deprecated" in line]
    assert len(warnings) == 1 and "--pseudo-threshold" in warnings[0]
    res = runner.invoke(app, _args(folders, tmp_path / "both", *common, "--threshold", "0.8",
                                   "--pseudo-threshold", "0.9"))
    assert res.exit_code == 2 and "only --pseudo-threshold" in res.output
    res = runner.invoke(app, _args(folders, tmp_path / "bad", *common, "--threshold", "1.5"))
    assert res.exit_code == 2


def test_mixed_precision_is_refused_with_exit_2(folders, tmp_path):
    res = runner.invoke(app, _args(folders, tmp_path / "run", "--precision", "mixed", "-q"))
    assert res.exit_code == 2
    assert "--precision mixed is for predict, explain and evaluate; training takes auto, fp32, bf16" in res.output
    assert not (tmp_path / "run" / "state.pt").exists()


def test_help_names_every_value():
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for placeholder in ("<int", "<float", "<str>", "<path>", "<list"):
        assert placeholder not in res.output, placeholder
    options = res.output[res.output.index("Options"):]
    assert "--pseudo-threshold" in options and "--threshold" not in options  # hidden: its old name
    assert "--threshold (now --pseudo-threshold)" in res.output  # the help says it is deprecated
    assert "base|tiny" in res.output and "DIR" in res.output


def test_freeze_from_the_command_line(folders, tmp_path):
    first = runner.invoke(app, _args(folders, tmp_path / "a", "--epochs", "1", "--no-calibrate", "-q"))
    assert first.exit_code == 0, first.output
    res = runner.invoke(app, _args(folders, tmp_path / "b", "--epochs", "1", "--no-calibrate", "-q", "--init",
                                   str(tmp_path / "a" / "best.safetensors"), "--freeze", "encoder, classifier"))
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["settings"]["freeze"] == ["encoder", "classifier"] and set(run["frozen"]) == {"encoder", "classifier"}
    bad = runner.invoke(app, _args(folders, tmp_path / "c", "--epochs", "1", "--freeze", "encoder"))
    assert bad.exit_code == 2 and "--freeze keeps weights of the starting checkpoint" in bad.output


def test_label_smoothing_is_recorded_and_checked(folders, tmp_path):
    res = runner.invoke(app, _args(folders, tmp_path / "run", "--epochs", "1", "--no-calibrate", "-q",
                                   "--label-smoothing", "0.2"))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["label_smoothing"] == 0.2
    res = runner.invoke(app, _args(folders, tmp_path / "bad", "--label-smoothing", "1.5"))
    assert res.exit_code == 2 and "--label-smoothing" in res.output
