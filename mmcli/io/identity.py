"""Who an input is, for resume and for privacy: file fingerprints, and anonymised case ids.

* A **fingerprint** (size and modification time, plus the content's sha256 when asked)
  is recorded in the journal with each finished case; a resume keeps a case only while
  its file still has the same fingerprint, so a replaced input is predicted again.
* **Anonymised ids** (``--anonymize-ids FILE``) replace each case id, and so each mask
  name and HDF5 key, by a salted hash of its relative path, for sites whose file names
  carry patient names. The salt and the mapping back to the inputs are kept in ``FILE``,
  which must lie apart from the outputs and is readable by its owner only (0600 from its
  creation); the same file gives the same ids on a rerun, and one that is not a whole
  mapping is refused rather than written over. Shards started at once (GNU parallel, a
  Slurm array) take turns on it through an exclusive lock on ``FILE.lock``: the first
  makes the salt, and every other reads it, so their ids agree and merge accepts them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmcli.errors import UsageError
from mmcli.io.discover import InputFile

try:
    import fcntl
except ImportError:  # not POSIX: shards that share a mapping must then run one after another
    fcntl = None  # type: ignore[assignment]

FINGERPRINT = "_input"
"""Journal key of a case's input fingerprint (not a report column)."""
_ID_DIGITS = 20  # 80 bits of the HMAC: no collision in any realistic batch


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: Path, with_sha256: bool = False) -> dict[str, Any] | None:
    """``{"size", "mtime_ns"[, "sha256"]}`` of a regular file, or None when it cannot be read."""
    try:
        info = os.stat(path)
        if not os.path.isfile(path):
            return None
        fp: dict[str, Any] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
        if with_sha256:
            fp["sha256"] = file_sha256(path)
    except OSError:
        return None
    return fp


def same_input(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> bool:
    """Whether a journal's fingerprint still describes the file.

    With a sha256 on the new side, the content decides (a copied or touched file with the
    same bytes is the same input) and the old side must have one too; otherwise size and
    modification time must match. An unknown side is never the same.
    """
    if not old or not new or old.get("size") != new.get("size"):
        return False
    if "sha256" in new:
        return old.get("sha256") == new["sha256"]
    return old.get("mtime_ns") == new.get("mtime_ns")


def _load_mapping(mapping: Path) -> tuple[bytes, dict[str, Any]]:
    """The salt and the cases of an existing mapping file; a new salt and no cases where there is none.

    Raises:
        UsageError: the file exists but is not a whole mapping written by mmcli (its older
            mappings must not be dropped by writing a new file over it).
    """
    if not os.path.lexists(mapping):
        return secrets.token_bytes(16), {}
    try:
        data = json.loads(mapping.read_text(encoding="utf-8"))
        salt, cases = bytes.fromhex(data["salt"]), data["cases"]
        if len(salt) < 16 or not isinstance(cases, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("case_id"), str) for v in cases.values()):
            raise ValueError("no salt of 16 bytes, or cases that are not {id: {case_id, source}}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        raise UsageError(f"--anonymize-ids {mapping}: not a mapping file written by mmcli ({reason}); it is left as "
                         "it is: restore it, or name a new file") from None
    return salt, cases


def _check_apart(mapping: Path, outputs: Sequence[Path]) -> None:
    for out in outputs:
        out = out.expanduser().resolve()
        if mapping == out or out in mapping.parents:
            raise UsageError(f"--anonymize-ids {mapping}: the mapping names the patients' files, so it must be "
                             f"kept apart from the outputs, not inside {out}: choose a path outside it")


def write_private_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON that only its owner may read, atomically.

    The file is created with mode 0600 (``os.open``), so there is no moment at which others
    could read it, whatever the umask; it then replaces ``path`` in one rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _locked(mapping: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<mapping>.lock`` (created 0600), so processes sharing a mapping take turns."""
    mapping.parent.mkdir(parents=True, exist_ok=True)
    lock = mapping.with_name(mapping.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as err:
        raise UsageError(f"--anonymize-ids {mapping}: cannot create its lock file {lock} ({err.strerror}): "
                         "choose a folder you can write to") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file is closed, also if this process dies
        yield
    finally:
        os.close(fd)


def anonymize(files: Sequence[InputFile], mapping: Path, *, outputs: Sequence[Path] = ()) -> list[InputFile]:
    """The same inputs under salted-hash case ids; writes (or extends) the mapping file first.

    ``outputs``: the run's output folder and files; the mapping may lie in none of them.

    Raises:
        UsageError: ``mapping`` lies among the outputs, or exists but is not a mapping file mmcli wrote.
    """
    mapping = mapping.expanduser().resolve()
    _check_apart(mapping, outputs)
    out = []
    with _locked(mapping):  # one load-extend-write at a time: the first salt is everyone's
        salt, known = _load_mapping(mapping)
        for file in files:
            digest = hmac.new(salt, file.case_id.encode("utf-8"), hashlib.sha256).hexdigest()[:_ID_DIGITS]
            out.append(InputFile(file.path, digest))
            known[digest] = {"case_id": file.case_id, "source": str(file.path)}
        write_private_json(mapping, {"salt": salt.hex(), "cases": dict(sorted(known.items()))})
    return out
