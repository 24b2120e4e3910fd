"""Who an input is, for resume and for privacy: file fingerprints, and anonymised case ids.

* A **fingerprint** (size and modification time, plus the content's sha256 when asked)
  is recorded in the journal with each finished case; a resume keeps a case only while
  its file still has the same fingerprint, so a replaced input is predicted again.
* **Anonymised ids** (``--anonymize-ids FILE``) replace each case id, and so each mask
  name and HDF5 key, by a salted hash of its relative path, for sites whose file names
  carry patient names. The salt and the mapping back to the inputs are kept in ``FILE``,
  which the user keeps apart from the outputs; the same file gives the same ids on a rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmcli.errors import UsageError
from mmcli.io.discover import InputFile
from mmcli.io.writers import write_json

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


def _load_salt(mapping: Path) -> bytes:
    if not mapping.is_file():
        return secrets.token_bytes(16)
    try:
        return bytes.fromhex(json.loads(mapping.read_text(encoding="utf-8"))["salt"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--anonymize-ids {mapping}: not a mapping written by mmcli ({err})") from None


def anonymize(files: Sequence[InputFile], mapping: Path) -> list[InputFile]:
    """The same inputs under salted-hash case ids; writes (or extends) the mapping file first.

    Raises:
        UsageError: ``mapping`` exists but is not a mapping file mmcli wrote.
    """
    mapping = mapping.expanduser().resolve()
    salt = _load_salt(mapping)
    out, known = [], {}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = dict(json.loads(mapping.read_text(encoding="utf-8"))["cases"])
    for file in files:
        digest = hmac.new(salt, file.case_id.encode("utf-8"), hashlib.sha256).hexdigest()[:_ID_DIGITS]
        out.append(InputFile(file.path, digest))
        known[digest] = {"case_id": file.case_id, "source": str(file.path)}
    write_json(mapping, {"salt": salt.hex(), "cases": dict(sorted(known.items()))})
    os.chmod(mapping, 0o600)  # it names the patients' files: for its owner's eyes only
    return out
