"""Write outputs atomically: mask PNGs, CSV and HDF5 reports, JSON files.

Every writer goes through a temporary file in the destination folder and
:func:`os.replace`, so a killed run never leaves a half-written file under the final
name. The state of a run (its folder, lock, journal and ``run.json``) is
:mod:`mmcli.io.runfolder`'s.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


def _read_umask() -> int:
    """The process's umask, read without changing it where the OS allows (no race with threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # what open() would give a new file


_TEMP_NAME_BYTES = 64  # of the final name kept in a temporary name: with the rest, far below NAME_MAX (255)


def _temp_prefix(name: str) -> str:
    """``.<name>.``, the name cut to :data:`_TEMP_NAME_BYTES` bytes (whole characters), so that a
    temporary name fits in 255 bytes whatever the final name's length."""
    kept = os.fsencode(name)[:_TEMP_NAME_BYTES].decode("utf-8", errors="ignore")
    return f".{kept}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The file gets the mode a plain ``open()`` would give it (0666 less the umask), not
    the 0600 of a temporary file. Whatever happens, no temporary file is left behind. An
    ``OSError`` about the temporary file (a full disk, a read-only remount) is raised
    again naming ``path`` itself, with the reason only (one line, no temporary name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as err:
        if err.filename not in (None, tmp, str(path)):
            raise  # about another file (an input read while writing): it names that one
        raise OSError(err.errno, _reason(err).replace(tmp, str(path)), str(path)) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _reason(err: OSError) -> str:
    """The reason of an ``OSError`` in one line (h5py's messages span several, or carry no strerror)."""
    if err.strerror:
        return err.strerror
    if err.errno:
        return os.strerror(err.errno)
    text = " ".join(str(err).split())
    return text or type(err).__name__


def write_mask_png(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a binary mask as a 1-bit PNG (lung white).

    One bit per pixel makes the file several times smaller and faster to write than
    8-bit grey; Pillow and NumPy read it back as bool, most viewers and OpenCV as {0, 255}.

    Args:
        mask: ``(H, W)`` bool or {0, 1} array.
    """
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=bool))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=1)


def read_mask_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a mask PNG back as an ``(H, W)`` bool array (pixel > 127)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > 127


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# Spreadsheets run a cell that starts with one of these as a formula (=, +, -, @) or strip them
# first (tab, carriage return), so a file named "=HYPERLINK(...).png" could act when a report is
# opened. As OWASP recommends, such text cells are written with a leading single quote, which
# spreadsheets show as text; a text cell that itself starts with a quote gets one more, so that
# reading strips exactly one and every cell reads back as it was.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value: Any) -> Any:
    """What :func:`write_csv` writes for ``value``: ``None`` as an empty cell, numbers as they
    are (a logit of -1.2 stays a number), anything else as text, neutralised when it starts like
    a formula (``=1+1`` -> ``'=1+1``). Only text cells are neutralised: which is text is decided
    by the value's type, never by how the text looks."""
    if value is None:
        return ""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return value
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` as CSV with exactly ``columns``, each value as :func:`csv_cell` says, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([csv_cell(col) for col in columns])
        for row in rows:
            writer.writerow([csv_cell(row.get(col)) for col in columns])


def read_csv_rows(path: str | os.PathLike[str], *, exact: bool = False) -> list[dict[str, Any]]:
    """Read a report written by :func:`write_csv` back: empty fields as ``None``, neutralised
    text without its leading quote, numbers as float.

    Args:
        exact: a cell is a number only where writing that number gives the cell again (``64``
            an int, ``0.25`` a float, but ``1.50`` text), so that :func:`write_csv` writes the
            rows read back to the same bytes (``mmcli merge``).
    """
    parse = _exact_field if exact else _parse_field
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [_text(name) for name in next(reader, [])]
        return [{name: parse(cells[i]) if i < len(cells) else None for i, name in enumerate(header)}
                for cells in reader if cells]


_NUMBER = re.compile(r"[-+]?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?0?\.\d+(?:[eE][-+]?\d+)?")


def _text(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


def _parse_field(value: str) -> Any:
    # Only plain decimal numbers become floats: ids such as "007", "1_000" or "nan" stay text
    # (float() would accept the last two). A quoted cell is text whatever it holds.
    if value == "":
        return None
    if value.startswith("'"):
        return value[1:]
    return float(value) if _NUMBER.fullmatch(value) else value


def _exact_field(value: str) -> Any:
    if value == "" or value.startswith("'"):
        return _parse_field(value)
    if not _NUMBER.fullmatch(value):
        return value
    if "." not in value and "e" not in value.lower() and str(int(value)) == value:
        return int(value)
    number = float(value)
    return number if repr(number) == value else value


def write_hdf5(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    masks: Callable[[Mapping[str, Any]], np.ndarray | None] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write the report table, and optionally each case's mask, to HDF5 atomically.

    Layout: ``/cases/<column>`` one 1-D dataset per column (strings as UTF-8, numbers
    as float64 with NaN for missing); ``/masks/<key>`` a ``(H, W)`` uint8 {0, 1} dataset,
    chunked and gzip-compressed, for each case whose mask ``masks(row)`` returns, its key
    :func:`hdf5_key` of the case id (flat, so ``a`` and ``a/b`` never clash) and the case id
    in its ``case_id`` attribute; ``attrs`` (provenance) on the root, non-scalar values as
    JSON strings.
    """
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for key, value in (attrs or {}).items():
            h5.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
        table = h5.create_group("cases")
        for col in columns:
            values = [row.get(col) for row in rows]
            if all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                data = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
                table.create_dataset(col, data=data)
            else:
                strings = ["" if v is None else str(v) for v in values]
                table.create_dataset(col, data=strings, dtype=h5py.string_dtype("utf-8"))
        if masks is None:
            return
        group = h5.create_group("masks")
        for row in rows:
            mask = masks(row)
            if mask is None:
                continue
            chunks = (min(256, mask.shape[0]), min(256, mask.shape[1]))
            dataset = group.create_dataset(
                hdf5_key(str(row["case_id"])), data=mask.astype(np.uint8), chunks=chunks,
                compression="gzip", compression_opts=4, shuffle=True,
            )
            dataset.attrs["case_id"] = str(row["case_id"])


def hdf5_key(case_id: str) -> str:
    """The HDF5 name of a case's dataset: the case id percent-encoded as in URLs, ``/`` too.

    One flat name per case, so ``a`` and ``a/b`` (a file beside a folder of the same stem)
    are two datasets instead of a dataset and a group; ``urllib.parse.unquote(key)`` gives
    the case id back (it is also each dataset's ``case_id`` attribute).
    """
    key = quote(case_id, safe="")
    return key.replace(".", "%2E") if key in (".", "..") else key  # "." names the group itself
