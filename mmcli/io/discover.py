"""Find the radiographs named on the command line: folders, files and glob patterns.

Each input file gets a case id, its path relative to the common parent of all
input roots, so ``scans/a/x.png`` and ``scans/b/x.png`` never collide in outputs.
Folders that hold an mmcli run (its ``run.json``) are never searched: the masks of an
earlier run written inside the inputs are outputs, not radiographs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mmcli.errors import InputError
from mmcli.io.readers import SUPPORTED_SUFFIXES, is_dicom

log = logging.getLogger(__name__)

_GLOB_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class InputFile:
    """One file to process.

    ``path`` is absolute and resolved. ``case_id`` is the posix path relative to
    the common parent of all input roots, without its image suffix (kept when
    dropping it would make two ids equal, ignoring case); ids are unique.
    """

    path: Path
    case_id: str


def discover_inputs(
    inputs: Sequence[str | os.PathLike[str]], *, exclude: Sequence[Path] = ()
) -> list[InputFile]:
    """Expand folders, files and glob patterns into a deduplicated, ordered file list.

    Folders are searched recursively in sorted order for files with a supported
    suffix (any case) and for suffix-less or numeric-suffix files that sniff as
    DICOM; hidden files and folders are skipped. A file named directly is taken
    whatever its suffix (reading it decides). A glob (``scans/**/*.dcm``) is
    expanded recursively and its matches filtered like folder contents. Anything
    under a path in ``exclude`` (e.g. an output folder inside the input) is skipped,
    and so is anything in a folder that holds an mmcli run (:func:`holds_run`).

    Args:
        inputs: command-line inputs, in order.
        exclude: files or folders to leave out.

    Returns:
        One :class:`InputFile` per distinct file (by resolved path), first occurrence first.

    Raises:
        InputError: an input matches nothing, or no image was found at all.
    """
    if not inputs:
        raise InputError("No inputs given: name image files, folders or glob patterns.")
    excluded = [Path(p).resolve() for p in exclude]
    roots: list[Path] = []
    found: list[Path] = []  # absolute, not resolved: case ids follow the names given
    for item in inputs:
        root, files = _expand(os.fspath(item), excluded)
        roots.append(root)
        found.extend(files)

    seen: set[Path] = set()
    unique: list[tuple[Path, Path]] = []  # (logical path, resolved path)
    for path in found:
        # A link that leads nowhere (dangling, or a loop) stays as named: the reader reports it.
        real = Path(os.path.realpath(path)) if os.path.exists(path) else path
        if real not in seen:
            seen.add(real)
            unique.append((path, real))
    if not unique:
        given = ", ".join(os.fspath(i) for i in inputs)
        supported = " ".join(SUPPORTED_SUFFIXES)
        raise InputError(
            f"Found 0 images in {given}. Supported: {supported} (DICOM also without suffix)"
        )

    ids = _case_ids([p for p, _ in unique], _common_parent(roots))
    log.debug("found %d input files in %d inputs", len(unique), len(inputs))
    return [InputFile(real, case_id) for (_, real), case_id in zip(unique, ids, strict=True)]


def _expand(text: str, excluded: list[Path]) -> tuple[Path, list[Path]]:
    """One input's root folder and its files (absolute, sorted)."""
    path = Path(text)
    if path.is_dir():
        root = _absolute(path)
        return root, _walk(root, excluded)
    if os.path.lexists(path):  # a file, or anything else named on purpose: reading decides
        file = _absolute(path)
        return file.parent, [] if _is_excluded(file, excluded) else [file]
    matches = glob.glob(text, recursive=True) if _GLOB_MAGIC.search(text) else []
    if matches:
        files: set[Path] = set()
        for match in matches:
            hit = _absolute(Path(match))
            if hit.is_dir():
                files.update(_walk(hit, excluded))
            elif _is_candidate(hit) and not _is_excluded(hit, excluded):
                files.add(hit)
        root = _glob_root(text)
        return root, _sorted(f for f in files if not _in_run(f, root))
    raise InputError(f"No such file, folder or pattern: {text!r}")


def _walk(root: Path, excluded: list[Path]) -> list[Path]:
    """Candidate image files under ``root``, skipping hidden and excluded entries."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_warn_unreadable):
        here = Path(dirpath)
        if _skip_run(here):
            dirnames[:] = []
            continue
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and not _is_excluded(here / d, excluded)
        ]
        for name in filenames:
            path = here / name
            if (
                not name.startswith(".")
                and _is_candidate(path)
                and not _is_excluded(path, excluded)
            ):
                files.append(path)
    return _sorted(files)


def _is_candidate(path: Path) -> bool:
    """A supported suffix, or no / a numeric suffix and a DICOM header (``IM0001``, ``1.2.3.4``).

    Only regular files are opened (to sniff DICOM). Anything else with an input's name (a
    named pipe, socket or device, a dangling link or a link loop) is kept without being
    opened, so that it gets a row saying what it is instead of hanging the run or vanishing.
    """
    suffix = path.suffix.lower()
    named = suffix in SUPPORTED_SUFFIXES
    if not named and not (suffix == "" or suffix[1:].isdigit()):
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a link that leads nowhere
        return os.path.islink(path)
    if stat.S_ISREG(mode):
        return named or is_dicom(path)
    return not stat.S_ISDIR(mode)


RUN_MARKERS = ("run.json", "summary.json", "journal.jsonl")
"""Files by which a folder is known as an mmcli run's: every command writes ``run.json``
(``evaluate`` its ``summary.json``) with ``mmcli_version`` in it or in its ``provenance``;
a run killed before its end left a ``journal.jsonl`` that starts with its header."""


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds the outputs of an mmcli run (a marker file that mmcli wrote)."""
    for name in RUN_MARKERS:
        try:
            with open(folder / name, encoding="utf-8") as f:
                data = json.loads(f.readline()) if name.endswith(".jsonl") else json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and _mmcli_wrote(data):
            return True
    return False


def _mmcli_wrote(data: dict[str, object]) -> bool:
    provenance, header = data.get("provenance"), data.get("header")
    return ("mmcli_version" in data or isinstance(provenance, dict) and "mmcli_version" in provenance
            or isinstance(header, dict) and "weights_sha256" in header)


def _skip_run(folder: Path) -> bool:
    if not holds_run(folder):
        return False
    log.warning("not searching %s for inputs: it holds the outputs of an mmcli run", folder)
    return True


def _in_run(path: Path, root: Path) -> bool:
    """Whether a folder between ``path`` and ``root`` (both included) holds an mmcli run."""
    for folder in path.parents:
        if holds_run(folder):
            return True
        if folder == root or root not in folder.parents:
            return False
    return False


def input_list_sha256(case_ids: Sequence[str]) -> str:
    """Fingerprint of an ordered input list: sha256 of its case ids as a JSON array.

    Case ids, not paths: the nodes of a cluster may mount the same inputs elsewhere.
    JSON keeps it unambiguous whatever characters the names hold.
    """
    data = json.dumps(list(case_ids), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8", errors="surrogateescape")).hexdigest()


def _is_excluded(path: Path, excluded: list[Path]) -> bool:
    if not excluded:
        return False
    real = Path(os.path.realpath(path))
    return any(real == ex or ex in real.parents for ex in excluded)


def _glob_root(pattern: str) -> Path:
    """The folder made of the pattern's leading parts that hold no wildcard."""
    prefix: list[str] = []
    for part in Path(pattern).parts:
        if _GLOB_MAGIC.search(part):
            break
        prefix.append(part)
    return _absolute(Path(*prefix)) if prefix else _absolute(Path("."))


def _absolute(path: Path) -> Path:
    """Absolute and normalised, symlinks kept (so names stay as the user sees them)."""
    return Path(os.path.abspath(path))


def _sorted(files: Iterable[Path]) -> list[Path]:
    """Sorted by path components, so ``a/x`` comes before ``a b/x`` and ``a-b/x``."""
    return sorted(files, key=lambda p: p.parts)


def _common_parent(roots: list[Path]) -> Path:
    try:
        return Path(os.path.commonpath([str(r) for r in roots]))
    except ValueError:  # different drives on Windows: keep full paths
        return Path(roots[0].anchor)


def _case_ids(paths: list[Path], parent: Path) -> list[str]:
    """Relative posix paths without image suffix; colliding ones keep their suffix.

    Collisions are checked ignoring case, since outputs may land on a
    case-insensitive file system. Full relative paths are distinct, so the loop ends.
    """
    full = [_relative(p, parent) for p in paths]
    ids = [_strip_suffix(f) for f in full]
    while True:
        counts = Counter(i.casefold() for i in ids)
        new = [f if counts[i.casefold()] > 1 else i for i, f in zip(ids, full, strict=True)]
        if new == ids:
            return ids
        ids = new


def _relative(path: Path, parent: Path) -> str:
    try:
        return path.relative_to(parent).as_posix()
    except ValueError:
        return path.relative_to(path.anchor).as_posix()


def _strip_suffix(case_id: str) -> str:
    path = PurePosixPath(case_id)
    if path.suffix.lower() in SUPPORTED_SUFFIXES:
        return str(path.with_suffix(""))
    return case_id


def _warn_unreadable(exc: OSError) -> None:
    log.warning("cannot read folder %s: %s", exc.filename, exc.strerror or exc)
