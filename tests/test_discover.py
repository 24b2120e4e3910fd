"""Tests for mmcli.io.discover: folders, files, globs, case ids and errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmcli.errors import InputError
from mmcli.io.discover import InputFile, discover_inputs

DICOM_HEAD = b"\0" * 128 + b"DICM" + b"\2\0\0\0"  # enough for the header sniff


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def ids(found: list[InputFile]) -> list[str]:
    case_ids = [f.case_id for f in found]
    assert len(set(case_ids)) == len(case_ids), case_ids
    assert all(f.path.is_absolute() and f.path == f.path.resolve() for f in found)
    return case_ids


@pytest.fixture()
def scans(tmp_path: Path) -> Path:
    root = tmp_path / "scans"
    touch(root / "b" / "x.png")
    touch(root / "a" / "x.png")
    touch(root / "b" / "y.JPG")
    touch(root / "c" / "IM0001", DICOM_HEAD)
    touch(root / "c" / "1.2.3.4", DICOM_HEAD)
    touch(root / "c" / "1.2.3", b"numeric suffix but not DICOM")
    touch(root / "c" / "README", b"no suffix, not DICOM")
    touch(root / "c" / "notes.txt")
    touch(root / "c" / "meta.json")
    touch(root / ".hidden" / "z.png")
    touch(root / "c" / ".h.png")
    return root


EXPECTED = ["a/x", "b/x", "b/y", "c/1.2.3.4", "c/IM0001"]


def test_folder_recursive_sorted_filtered(scans: Path) -> None:
    found = discover_inputs([scans])
    assert ids(found) == EXPECTED
    assert found[0].path == (scans / "a" / "x.png").resolve()
    assert discover_inputs([str(scans)]) == found  # str and Path alike, deterministic


def test_dicom_with_dcm_suffix_in_folder(tmp_path: Path) -> None:
    name = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    touch(tmp_path / "d" / name, b"suffix decides, contents are for the reader")
    assert ids(discover_inputs([tmp_path / "d"])) == [name.removesuffix(".dcm")]


def test_explicit_file_any_suffix(scans: Path) -> None:
    assert ids(discover_inputs([scans / "c" / "notes.txt"])) == ["notes.txt"]
    assert ids(discover_inputs([scans / "a" / "x.png"])) == ["x"]
    assert ids(discover_inputs([scans / "c" / ".h.png"])) == [".h"]


def test_files_from_two_folders(scans: Path) -> None:
    found = discover_inputs([scans / "a" / "x.png", scans / "b" / "x.png"])
    assert ids(found) == ["a/x", "b/x"]


def test_multiple_roots(scans: Path) -> None:
    assert ids(discover_inputs([scans / "b", scans / "a"])) == ["b/x", "b/y", "a/x"]


def test_relative_inputs(scans: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(scans.parent)
    assert ids(discover_inputs(["scans/"])) == EXPECTED
    assert ids(discover_inputs(["scans/a", "scans/b/y.JPG"])) == ["a/x", "b/y"]


def test_globs(scans: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(scans.parent)
    assert ids(discover_inputs(["scans/**/*.png"])) == ["a/x", "b/x"]
    assert ids(discover_inputs(["scans/*/x.png"])) == ["a/x", "b/x"]
    assert ids(discover_inputs([str(scans / "c" / "*")])) == ["1.2.3.4", "IM0001"]
    # a glob that matches folders walks them like a folder input
    assert ids(discover_inputs(["scans/*"])) == EXPECTED


def test_case_id_collision_keeps_suffix(tmp_path: Path) -> None:
    for name in ("x.png", "x.dcm", "y.png", "z.tif", "Z.jpg", "w.png", "w.png.dcm", "w.dcm"):
        touch(tmp_path / "s" / name)
    assert ids(discover_inputs([tmp_path / "s"])) == [
        "Z.jpg", "w.dcm", "w.png", "w.png.dcm", "x.dcm", "x.png", "y", "z.tif",
    ]  # fmt: skip


def test_exclude_output_inside_input(scans: Path) -> None:
    touch(scans / "out" / "a" / "x.png")
    touch(scans / "out.png")
    assert "out/a/x" in ids(discover_inputs([scans]))
    found = discover_inputs([scans], exclude=[scans / "out", scans / "out.png"])
    assert ids(found) == EXPECTED


def test_dedupe_keeps_first(scans: Path) -> None:
    found = discover_inputs([scans / "b" / "y.JPG", scans, scans / "a"])
    assert ids(found) == ["b/y", "a/x", "b/x", "c/1.2.3.4", "c/IM0001"]


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_dedupe_symlink_by_resolved_path(scans: Path) -> None:
    (scans / "link.png").symlink_to(scans / "a" / "x.png")
    found = discover_inputs([scans])
    assert ids(found) == EXPECTED


def test_missing_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"No such file, folder or pattern: 'xyz'"):
        discover_inputs(["xyz"])
    with pytest.raises(InputError, match=r"No such file, folder or pattern: 'nothing/\*\.png'"):
        discover_inputs(["nothing/*.png"])


def test_no_images_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    touch(tmp_path / "scans" / "notes.txt")
    touch(tmp_path / "scans" / ".hidden.png")
    message = (
        r"Found 0 images in scans/\. Supported: \.png \.jpg \.jpeg \.tif \.tiff \.dcm \.dicom "
        r"\(DICOM also without suffix\)"
    )
    with pytest.raises(InputError, match=message):
        discover_inputs(["scans/"])
    with pytest.raises(InputError, match="No inputs given"):
        discover_inputs([])


def _hostile_folder(root):
    from conftest import save_png8

    save_png8(root / "good.png", 64, 64)
    os.mkfifo(root / "IM0001")  # a named pipe that looks like a suffix-less DICOM
    os.mkfifo(root / "pipe.png")
    os.symlink(root / "nowhere.png", root / "gone.png")  # dangling
    os.symlink(root / "loop_b.dcm", root / "loop_a.dcm")  # a loop
    os.symlink(root / "loop_a.dcm", root / "loop_b.dcm")
    os.mkfifo(root / "notes")  # no image name at all... but suffix-less names may be DICOM
    (root / "readme.txt").write_text("ignored")
    return root


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_special_files_are_listed_without_being_opened(tmp_path):
    import signal

    root = _hostile_folder(tmp_path / "scans")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("discovery blocked on a special file"))
    signal.alarm(20)
    try:
        files = discover_inputs([root])
    finally:
        signal.alarm(0)
    assert sorted(f.case_id for f in files) == ["IM0001", "gone", "good", "loop_a", "loop_b", "notes", "pipe"]
    by_id = {f.case_id: f.path for f in files}
    assert by_id["gone"].is_symlink()  # kept as named, so the reader can say what it is


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_special_files_get_error_rows(tmp_path, tiny_weights):
    import signal

    from conftest import read_rows
    from typer.testing import CliRunner

    from mmcli.cli import app

    root = _hostile_folder(tmp_path / "scans")
    os.mkfifo(tmp_path / "named.dcm")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the run blocked on a special file"))
    signal.alarm(60)
    try:
        res = CliRunner().invoke(app, ["predict", str(root), str(tmp_path / "named.dcm"), "--out",
                                       str(tmp_path / "r.csv"), "-w", str(tiny_weights), "-q", "-j", "0"])
    finally:
        signal.alarm(0)
    assert res.exit_code == 1
    rows = {r["case_id"].removeprefix("scans/"): r for r in read_rows(tmp_path / "r.csv")}
    assert rows.pop("good")["status"] == "ok"
    expected = {
        "IM0001": "not a regular file (a named pipe)", "pipe": "not a regular file (a named pipe)",
        "notes": "not a regular file (a named pipe)", "named": "not a regular file (a named pipe)",
        "gone": "broken symbolic link (its target does not exist)",
        "loop_a": "symbolic link loop (the link leads back to itself)",
        "loop_b": "symbolic link loop (the link leads back to itself)",
    }
    assert {k: (r["status"], r["error"]) for k, r in rows.items()} == {k: ("error", v) for k, v in expected.items()}


def _mark_run(folder: Path, name: str = "run.json", data: str = '{"provenance": {"mmcli_version": "1"}}') -> None:
    touch(folder / name, data.encode())


def test_folders_that_hold_an_mmcli_run_are_not_searched(scans: Path) -> None:
    touch(scans / "old" / "masks" / "a" / "x.png")  # an earlier predict --out scans/old.csv
    _mark_run(scans / "old")
    touch(scans / "ev" / "roc.png")  # an earlier evaluate --out scans/ev
    _mark_run(scans / "ev", "summary.json", '{"mmcli_version": "1"}')
    touch(scans / "killed" / "masks" / "y.png")  # an earlier run killed before its end: only its journal
    _mark_run(scans / "killed", "journal.jsonl", '{"header": {"weights_sha256": "ab"}}\n{"case_id": "y"}\n')
    touch(scans / "mine" / "z.png")  # a user's own run.json is no mmcli run
    touch(scans / "mine" / "run.json", b'{"experiment": 3}')
    assert ids(discover_inputs([scans])) == ["a/x", "b/x", "b/y", "c/1.2.3.4", "c/IM0001", "mine/z"]
    assert "old/masks/a/x" not in ids(discover_inputs([str(scans / "**" / "*.png")]))
    assert ids(discover_inputs([scans / "old" / "masks" / "a" / "x.png"])) == ["x"]  # named: taken
    with pytest.raises(InputError, match="Found 0 images"):
        discover_inputs([scans / "old"])


def test_input_list_fingerprint_is_ordered_and_unambiguous() -> None:
    from mmcli.io.discover import input_list_sha256

    assert input_list_sha256(["a", "b"]) != input_list_sha256(["b", "a"])
    assert input_list_sha256(["a,b"]) != input_list_sha256(["a", "b"])
    assert input_list_sha256(["a\nb"]) != input_list_sha256(["a", "b"])
    assert len(input_list_sha256([])) == 64
