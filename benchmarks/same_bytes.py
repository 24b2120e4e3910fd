"""Same bytes: the outputs of this working tree against those of a reference commit.

The rule of a refactor is "behaviour and outputs are unchanged: the same bytes for the
same inputs". This script checks it. It checks out ``--ref`` into a detached
``git worktree`` (removed again at the end, also on error), then runs the same commands
once with the reference tree's code (``PYTHONPATH=<worktree> python -m mmcli ...``) and
once with this working tree's code (``PYTHONPATH=<repo>``), with the same Python, on the
same inputs, single-process on the CPU (``--workers 0 --device cpu``, ``OMP_NUM_THREADS=1``),
from an empty folder so that no other copy of ``mmcli`` is imported (checked before the
runs). Both sides write into the same staging folder, one after the other, so absolute
output paths are the same too; each tree is then moved aside and the two are compared
file by file:

* predict: a CSV report, an HDF5 report, and a CSV report with ``--dicom-seg --dicom-sr
  --dicom-sc`` (DICOM objects for every DICOM input);
* explain: the saliency and Grad-CAM pictures, explain.csv and maps.h5;
* evaluate: only with ``--eval-data`` (dataset folders with masks/ or labels.csv).

A file is *identical* (same bytes), *equal-after-ignoring* (JSON, CSV, HDF5 and DICOM
compared value by value with the short ignore lists below; pictures compared by their
decoded pixels) or *DIFFERENT* (with the first difference). The ignore lists hold only
what differs between two runs of the *same* code (``--self-check --no-ignore`` shows it)
plus the location of the code itself. Exit code 0 when nothing differs, 1 otherwise.

    python benchmarks/same_bytes.py --ref HEAD --inputs examples/ ../shared/data/dicom \\
        --out runs/same-bytes --commands predict explain

``--self-check`` runs this working tree on both sides (no worktree): with ``--no-ignore``
it lists what changes between two runs of the same code.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pydicom
from PIL import Image

# JSON keys (run.json, summary.json, journal lines, JSON in HDF5 attributes) whose values
# change from one run to the next of the same code (found with --self-check --no-ignore):
IGNORED_JSON_KEYS: dict[str, str] = {
    "created": "wall-clock time the run started",
    "seconds": "how long the run took",
}
# DICOM keywords ignored anywhere in a dataset or its file meta. Empty: mmcli derives the
# UIDs from the source's SOPInstanceUID and the weights, and the dates and times from the
# source, so two runs write the same bytes; nothing is generated per run.
IGNORED_DICOM_KEYWORDS: dict[str, str] = {}
# Folders of the code tree whose absolute path the outputs record (run.json: sys.argv[0]
# is <tree>/mmcli/__main__.py, weights_file is <tree>/weights/...). They differ between
# the two checkouts by construction, so "<tree>/<name>/" reads as "<code>/<name>/" on both.
CODE_TREE_FOLDERS: dict[str, str] = {
    "mmcli": "the package run (sys.argv[0] in run.json)",
    "weights": "registered weights resolved inside each tree (weights_file)",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
TEXT_SUFFIXES = {".md", ".html", ".txt", ".svg", ".log"}

@dataclass
class Job:
    """One mmcli command line; "{out}" in argv is the staging folder."""

    name: str
    argv: list[str]


@dataclass
class Side:
    """One code tree to run and how it reads its own paths."""

    name: str
    root: Path
    ignore: bool

    def normalise(self, text: str) -> str:
        if not self.ignore:
            return text
        for folder in CODE_TREE_FOLDERS:
            text = text.replace(f"{self.root}/{folder}/", f"<code>/{folder}/")
        return text


# ---------------------------------------------------------------- git and the runs

def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def add_worktree(repo: Path, commit: str, path: Path) -> None:
    if path.exists():  # left over from an interrupted run
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    git(repo, "worktree", "add", "--detach", str(path), commit)


def remove_worktree(repo: Path, path: Path) -> None:
    subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)


def working_tree_state(repo: Path) -> str:
    """A hash of the tracked changes and the untracked files of the package, to notice edits during a run."""
    digest = hashlib.sha256(git(repo, "diff", "HEAD", "--binary").encode())
    for name in git(repo, "ls-files", "--others", "--exclude-standard", "mmcli").splitlines():
        if (repo / name).is_file():
            digest.update(name.encode() + (repo / name).read_bytes())
    return digest.hexdigest()


def side_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMCLI_")}
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def check_import(side: Side, cwd: Path) -> None:
    code = "import mmcli; print(mmcli.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=side_env(side.root),
                          capture_output=True, text=True, check=True)
    found = Path(done.stdout.strip()).resolve()
    if found != (side.root / "mmcli" / "__init__.py").resolve():
        sys.exit(f"{side.name}: imports {found}, not the package in {side.root}")
    print(f"{side.name}: mmcli from {found}")


def make_jobs(args: argparse.Namespace) -> list[Job]:
    inputs = [str(p.resolve()) for p in args.inputs]
    common = ["--weights", args.weights, "--device", "cpu", "--workers", "0"]
    jobs: list[Job] = []
    if "predict" in args.commands:
        jobs += [Job("predict-csv", ["predict", *inputs, "--out", "{out}/results.csv", *common]),
                 Job("predict-h5", ["predict", *inputs, "--out", "{out}/results.h5", *common]),
                 Job("predict-dicom", ["predict", *inputs, "--out", "{out}/results.csv", *common,
                                       "--dicom-seg", "--dicom-sr", "--dicom-sc"])]
    if "explain" in args.commands:
        jobs.append(Job("explain", ["explain", *inputs, "--out", "{out}/explain", *common]))
    if "evaluate" in args.commands and args.eval_data:
        data = [str(p.resolve()) for p in args.eval_data]
        jobs.append(Job("evaluate", ["evaluate", *data, "--out", "{out}/evaluate", *common]))
    return jobs


def run_job(side: Side, job: Job, out: Path) -> dict[str, Any]:
    """Runs one job into <out>/stage, then moves the result to <out>/trees/<side>/<job>."""
    stage, cwd, dest = out / "stage" / job.name, out / "cwd", out / "trees" / side.name / job.name
    for folder in (stage, dest):
        shutil.rmtree(folder, ignore_errors=True)
    stage.mkdir(parents=True)
    argv = [sys.executable, "-m", "mmcli", *(a.replace("{out}", str(stage)) for a in job.argv)]
    start = time.perf_counter()
    with open(out / "logs" / f"{side.name}-{job.name}.log", "w") as log:
        rc = subprocess.run(argv, cwd=cwd, env=side_env(side.root), stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(stage), str(dest))
    print(f"  {side.name:>4} {job.name:<14} exit {rc}  {seconds:6.1f} s")
    return {"side": side.name, "job": job.name, "exit_code": rc, "seconds": round(seconds, 2)}


# ---------------------------------------------------------------- comparing values

def json_differences(a: Any, b: Any, sides: tuple[Side, Side], where: str = "$") -> Iterator[str]:
    """Every difference between two JSON values, skipping IGNORED_JSON_KEYS at any depth."""
    if isinstance(a, dict) and isinstance(b, dict):
        skip = set(IGNORED_JSON_KEYS) if sides[0].ignore else set()
        for key in sorted(set(a) | set(b), key=str):
            if key in skip:
                continue
            if key not in a or key not in b:
                yield f"{where}.{key}: only in {'work' if key in b else 'ref'}"
            else:
                yield from json_differences(a[key], b[key], sides, f"{where}.{key}")
        order_a, order_b = [k for k in a if k not in skip], [k for k in b if k not in skip]
        if set(order_a) == set(order_b) and order_a != order_b:  # same keys, other bytes
            yield f"{where}: key order {order_a} != {order_b}"
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from json_differences(x, y, sides, f"{where}[{i}]")
    else:
        if isinstance(a, str) and isinstance(b, str):
            a, b = sides[0].normalise(a), sides[1].normalise(b)
        if type(a) is not type(b) or a != b:
            yield f"{where}: {a!r} != {b!r}"


def first_json_difference(a: Any, b: Any, sides: tuple[Side, Side], where: str = "$") -> str | None:
    """The first difference, and how many more there are."""
    found = list(json_differences(a, b, sides, where))
    if not found:
        return None
    more = [d.split(": ", 1)[0] for d in found[1:]]
    return found[0] + (f" (also {', '.join(more[:4])}{', ...' if len(more) > 4 else ''})" if more else "")


def first_array_difference(a: np.ndarray, b: np.ndarray, where: str) -> str | None:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{where}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"
    if a.dtype.kind in "OSU" or a.dtype.names:
        bad = [i for i, (x, y) in enumerate(zip(a.ravel().tolist(), b.ravel().tolist(), strict=True)) if x != y]
    else:  # numbers: bit for bit (-0.0 against 0.0 and NaN payloads count)
        same = (a.view(np.uint8).reshape(a.shape + (-1,)) == b.view(np.uint8).reshape(b.shape + (-1,))).all(-1)
        bad = np.flatnonzero(~same.ravel()).tolist() if a.ndim else ([] if same else [0])
    if not bad:
        return None
    i = np.unravel_index(bad[0], a.shape) if a.ndim else ()
    first = f"{np.asarray(a[i]).tolist()!r} != {np.asarray(b[i]).tolist()!r}"
    return f"{where}: {len(bad)} of {a.size} values differ, first at {list(map(int, i))}: {first}"


def as_text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def first_value_difference(a: Any, b: Any, sides: tuple[Side, Side], where: str) -> str | None:
    """HDF5 attributes and DICOM values: JSON text as JSON, text normalised, arrays bit for bit."""
    a, b = as_text(a), as_text(b)
    if isinstance(a, str) and isinstance(b, str):
        try:
            return first_json_difference(json.loads(a), json.loads(b), sides, where)
        except ValueError:
            a, b = sides[0].normalise(a), sides[1].normalise(b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.dtype.kind in "OS":
            a, b = np.vectorize(as_text, otypes=[object])(a), np.vectorize(as_text, otypes=[object])(b)
        return first_array_difference(a, b, where)
    return None if type(a) is type(b) and bool(np.all(a == b)) else f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------- comparing files

def compare_json(a: Path, b: Path, sides: tuple[Side, Side]) -> str | None:
    return first_json_difference(json.loads(a.read_text()), json.loads(b.read_text()), sides)


def compare_jsonl(a: Path, b: Path, sides: tuple[Side, Side]) -> str | None:
    lines_a, lines_b = a.read_text().splitlines(), b.read_text().splitlines()
    if len(lines_a) != len(lines_b):
        return f"{len(lines_a)} != {len(lines_b)} lines"
    return next((d for n, (x, y) in enumerate(zip(lines_a, lines_b, strict=True), 1)
                 if (d := first_json_difference(json.loads(x), json.loads(y), sides, f"line {n}"))), None)


def compare_csv(a: Path, b: Path, sides: tuple[Side, Side]) -> str | None:
    rows_a = list(csv.reader(io.StringIO(a.read_text())))
    rows_b = list(csv.reader(io.StringIO(b.read_text())))
    if len(rows_a) != len(rows_b):
        return f"{len(rows_a)} != {len(rows_b)} rows"
    header = rows_a[0] if rows_a else []
    for n, (ra, rb) in enumerate(zip(rows_a, rows_b, strict=True)):
        if len(ra) != len(rb):
            return f"row {n}: {len(ra)} != {len(rb)} cells"
        for c, (x, y) in enumerate(zip(ra, rb, strict=True)):
            if sides[0].normalise(x) != sides[1].normalise(y):
                column = header[c] if c < len(header) else c
                return f"row {n}, column {column}: {x!r} != {y!r}"
    return None


def h5_objects(f: h5py.File) -> dict[str, h5py.HLObject]:
    objects: dict[str, h5py.HLObject] = {"/": f}
    f.visititems(lambda name, obj: objects.__setitem__(name, obj))
    return objects


def compare_h5(a: Path, b: Path, sides: tuple[Side, Side]) -> str | None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        oa, ob = h5_objects(fa), h5_objects(fb)
        if set(oa) != set(ob):
            return f"objects only in one file: {sorted(set(oa) ^ set(ob))[:5]}"
        for name in sorted(oa):
            x, y = oa[name], ob[name]
            if set(x.attrs) != set(y.attrs):
                return f"{name}: attributes {sorted(set(x.attrs) ^ set(y.attrs))} in one file only"
            for key in sorted(x.attrs):
                if found := first_value_difference(x.attrs[key], y.attrs[key], sides, f"{name}@{key}"):
                    return found
            if isinstance(x, h5py.Dataset) != isinstance(y, h5py.Dataset):
                return f"{name}: dataset in one file, group in the other"
            if isinstance(x, h5py.Dataset) and (found := first_value_difference(x[()], y[()], sides, name)):
                return found
    return None


def dicom_elements(ds: pydicom.Dataset, ignore: bool) -> dict[Any, pydicom.DataElement]:
    skip = set(IGNORED_DICOM_KEYWORDS) if ignore else set()
    return {e.tag: e for e in ds if e.keyword not in skip}


def first_dicom_difference(a: pydicom.Dataset, b: pydicom.Dataset, sides: tuple[Side, Side],
                           where: str) -> str | None:
    ea, eb = dicom_elements(a, sides[0].ignore), dicom_elements(b, sides[0].ignore)
    for tag in sorted(set(ea) | set(eb)):
        if tag not in ea or tag not in eb:
            return f"{where}{(ea.get(tag) or eb[tag]).keyword or tag}: only in {'work' if tag in eb else 'ref'}"
        x, y = ea[tag], eb[tag]
        name = f"{where}{x.keyword or tag}"
        if x.VR != y.VR:
            return f"{name}: VR {x.VR} != {y.VR}"
        if x.VR == "SQ":
            if len(x.value) != len(y.value):
                return f"{name}: {len(x.value)} != {len(y.value)} items"
            found = next((d for i, (p, q) in enumerate(zip(x.value, y.value, strict=True))
                          if (d := first_dicom_difference(p, q, sides, f"{name}[{i}]."))), None)
        elif isinstance(x.value, bytes):
            found = None if x.value == y.value else f"{name}: {len(x.value)} bytes, contents differ"
        else:
            found = first_value_difference(x.value, y.value, sides, name)
        if found:
            return found
    return None


def compare_dicom(a: Path, b: Path, sides: tuple[Side, Side]) -> str | None:
    da, db = pydicom.dcmread(a), pydicom.dcmread(b)
    found = first_dicom_difference(da.file_meta, db.file_meta, sides, "meta.")
    found = found or first_dicom_difference(da, db, sides, "")
    if found and "PixelData" in found:  # say whether the decoded pixels differ too
        same = np.array_equal(da.pixel_array, db.pixel_array)
        found += "; decoded pixels " + ("equal" if same else "differ")
    return found


def compare_image(a: Path, b: Path, sides: tuple[Side, Side]) -> str | None:
    with Image.open(a) as ia, Image.open(b) as ib:
        if (ia.mode, ia.size) != (ib.mode, ib.size):
            return f"{ia.mode} {ia.size} != {ib.mode} {ib.size}"
        return first_array_difference(np.asarray(ia), np.asarray(ib), "pixels")


def compare_text(a: Path, b: Path, sides: tuple[Side, Side]) -> str | None:
    lines_a, lines_b = a.read_text().splitlines(), b.read_text().splitlines()
    for n, (x, y) in enumerate(zip(lines_a, lines_b, strict=False), 1):
        if sides[0].normalise(x) != sides[1].normalise(y):
            return f"line {n}: {x[:80]!r} != {y[:80]!r}"
    return None if len(lines_a) == len(lines_b) else f"{len(lines_a)} != {len(lines_b)} lines"


def comparer(path: Path) -> Callable[[Path, Path, tuple[Side, Side]], str | None] | None:
    suffix = path.suffix.lower()
    table: dict[str, Callable[[Path, Path, tuple[Side, Side]], str | None]] = {
        ".json": compare_json, ".jsonl": compare_jsonl, ".csv": compare_csv, ".h5": compare_h5,
        ".hdf5": compare_h5, ".dcm": compare_dicom, **{s: compare_image for s in IMAGE_SUFFIXES},
        **{s: compare_text for s in TEXT_SUFFIXES}}
    return table.get(suffix)


def first_byte_difference(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    unequal = np.flatnonzero(np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n))
    at = int(unequal[0]) if unequal.size else n
    return f"bytes differ from offset {at} ({len(a)} against {len(b)} bytes)"


def compare_file(rel: str, ref: Path, work: Path, sides: tuple[Side, Side]) -> dict[str, str]:
    a, b = ref / rel, work / rel
    if not a.is_file() or not b.is_file():
        return {"file": rel, "status": "DIFFERENT", "detail": f"only in {'ref' if a.is_file() else 'work'}"}
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    if raw_a == raw_b:
        return {"file": rel, "status": "identical", "detail": ""}
    compare = comparer(a)
    try:
        found = compare(a, b, sides) if compare else first_byte_difference(raw_a, raw_b)
    except Exception as error:  # an unreadable file is a difference, not a crash
        found = f"cannot compare: {type(error).__name__}: {error}"
    if found:
        return {"file": rel, "status": "DIFFERENT", "detail": found}
    if a.suffix.lower() in IMAGE_SUFFIXES:
        return {"file": rel, "status": "equal-after-ignoring", "detail": "decoded pixels equal, bytes differ"}
    strict = tuple(Side(s.name, s.root, ignore=False) for s in sides)
    ignored = compare(a, b, strict) if compare and sides[0].ignore else None  # what the ignore lists hid
    return {"file": rel, "status": "equal-after-ignoring", "detail": f"bytes differ; ignored {ignored}"}


def files_under(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path.relative_to(root).as_posix()


def compare_trees(ref: Path, work: Path, sides: tuple[Side, Side]) -> list[dict[str, str]]:
    rels = sorted(set(files_under(ref)) | set(files_under(work)))
    return [compare_file(rel, ref, work, sides) for rel in rels]


# ---------------------------------------------------------------- report and main

def exit_code_rows(runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    codes: dict[str, dict[str, int]] = {}
    for run in runs:
        codes.setdefault(run["job"], {})[run["side"]] = run["exit_code"]
    return [{"file": f"{job} (exit code)", "status": "identical" if c["ref"] == c["work"] else "DIFFERENT",
             "detail": f"{c['ref']} against {c['work']}" if c["ref"] != c["work"] else str(c["ref"])}
            for job, c in codes.items()]


def print_table(rows: list[dict[str, str]], verbose: bool) -> dict[str, int]:
    width = max((len(r["file"]) for r in rows), default=4)
    print(f"\n{'file':<{width}}  {'status':<20}  first difference / note")
    for r in rows:
        if verbose or r["status"] != "identical":
            print(f"{r['file']:<{width}}  {r['status']:<20}  {r['detail']}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("identical", "equal-after-ignoring", "DIFFERENT")}
    print(f"\n{len(rows)} entries: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="HEAD", help="git ref whose outputs are the reference")
    p.add_argument("--inputs", type=Path, nargs="+", required=True, help="files or folders for predict/explain")
    p.add_argument("--out", type=Path, default=Path("runs") / "same-bytes")
    p.add_argument("--weights", default="multimix-cxr-v3", help="registered name (resolved in each tree) or file")
    p.add_argument("--commands", nargs="+", choices=("predict", "explain", "evaluate"),
                   default=["predict", "explain", "evaluate"])
    p.add_argument("--eval-data", type=Path, nargs="+", default=[], help="dataset folders for evaluate")
    p.add_argument("--self-check", action="store_true", help="run this working tree on both sides (no worktree)")
    p.add_argument("--no-ignore", action="store_true", help="compare without the ignore lists")
    p.add_argument("--all-rows", action="store_true", help="also print the identical files")
    args = p.parse_args(argv)
    if Path(args.weights).is_file():
        args.weights = str(Path(args.weights).resolve())
    return args


def run_sides(args: argparse.Namespace, repo: Path, out: Path) -> dict[str, Any]:
    """Both sides, then the comparison; the worktree is removed on the way out."""
    tree, ignore = out / "ref-tree", not args.no_ignore
    try:
        ref_commit = git(repo, "rev-parse", "--verify", f"{args.ref}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"--ref {args.ref}: not a commit of {repo}")
    state = working_tree_state(repo)
    if not args.self_check:
        add_worktree(repo, ref_commit, tree)
    try:
        sides = (Side("ref", repo if args.self_check else tree, ignore), Side("work", repo, ignore))
        for side in sides:
            check_import(side, out / "cwd")
        runs = [run_job(side, job, out) for job in make_jobs(args) for side in sides]
    finally:
        if not args.self_check:
            remove_worktree(repo, tree)
    shutil.rmtree(out / "stage", ignore_errors=True)
    changed = working_tree_state(repo) != state
    if changed:
        print("warning: the working tree changed while the commands ran; the work side may mix two versions")
    rows = exit_code_rows(runs) + compare_trees(out / "trees" / "ref", out / "trees" / "work", sides)
    info = {"ref": args.ref, "ref_commit": ref_commit, "work_head": git(repo, "rev-parse", "HEAD"),
            "work_dirty": bool(git(repo, "status", "--porcelain", "--untracked-files=no")),
            "work_changed_during_run": changed, "self_check": args.self_check, "ignore": ignore,
            "runs": runs, "files": rows}
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` too removes the worktree
    repo = Path(__file__).resolve().parents[1]
    out = args.out.resolve()
    for folder in ("cwd", "logs", "trees", "stage"):
        shutil.rmtree(out / folder, ignore_errors=True)
        (out / folder).mkdir(parents=True)
    (out / "same-bytes.json").unlink(missing_ok=True)
    start = time.perf_counter()
    info = run_sides(args, repo, out)
    counts = print_table(info["files"], args.all_rows)
    info.update(counts=counts, seconds=round(time.perf_counter() - start, 1),
                inputs=[str(p.resolve()) for p in args.inputs], weights=args.weights,
                ignored={"json_keys": IGNORED_JSON_KEYS, "dicom_keywords": IGNORED_DICOM_KEYWORDS,
                         "code_tree_folders": CODE_TREE_FOLDERS} if info["ignore"] else {})
    (out / "same-bytes.json").write_text(json.dumps(info, indent=2) + "\n")
    verdict = "DIFFERENT" if counts["DIFFERENT"] else "same"
    print(f"{verdict} ({info['seconds']} s); details in {out / 'same-bytes.json'}")
    return 1 if counts["DIFFERENT"] else 0


if __name__ == "__main__":
    sys.exit(main())
