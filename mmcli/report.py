"""``mmcli report``: one HTML page to review a finished ``predict`` or ``explain`` run.

The page, ``review.html`` in the run's folder, opens from the file system: no server, no
network, its CSS and JavaScript inline, its images relative links into ``review/``::

    results.csv                     the run's report (or results.h5, or <out>/explain.csv)
    results/review.html             the page
    results/review/thumbs/<key>.jpg     the film with the lung outline, 192 px
    results/review/full/<key>.png       the same at native size (at most 2048 px on a side)

``<key>`` is the case id percent-encoded (:func:`mmcli.io.writers.hdf5_key`), one flat
file name whatever the id holds (``/``, ``..``); a very long one is a hash.

Overlays are drawn from the run's outputs alone (the input named in ``source`` and the
mask PNG of the run; an explain run's own Grad-CAM pictures), so no model is needed. A predict
run written as HDF5 (``--out results.h5``) is read from its table ``/cases/<column>``; its masks
are the PNG files in ``results/masks/`` that predict writes for every report format.
The page holds one page of thumbnails at a time, whatever the size of the run; filters
and sorting live in the URL's hash (``#label=pneumonia&flag=inverted&sort=p-desc&page=2``),
so a view can be bookmarked or shared. Every text from the report reaches the page
escaped: through ``textContent`` in the script, or :func:`html.escape` in the markup;
every link is a percent-encoded relative path. A report is not trusted to name files:
a picture it names (mask, Grad-CAM, saliency) is read only from a file inside the run's
folder, the input only from a regular file, and pictures are written only inside the
run's folder; a case that names another file is listed with the reason instead.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageFilter

from mmcli.errors import MMCLIError, UsageError
from mmcli.io.paths import resolves_inside
from mmcli.io.readers import read_radiograph
from mmcli.io.runfolder import REPORT_FORMATS, RUN_JSON, is_hdf5
from mmcli.io.writers import atomic_path, hdf5_key, read_csv_rows, read_mask_png
from mmcli.report_page import PAGE
from mmcli.status import Status

logger = logging.getLogger(__name__)

__all__ = ["PAGE_SIZE", "ReviewCase", "ReviewSummary", "build_review", "find_run", "read_report", "render_page"]

Kind = Literal["predict", "explain"]
THUMB_SIDE = 192
FULL_SIDE = 2048
PAGE_SIZE = 60  # thumbnails in the page at a time
OUTLINE = (255, 140, 0)  # the predicted lung outline, orange as in evaluate's figures


@dataclass(frozen=True)
class Run:
    """A finished run: its report, its folder (where the page goes by default) and its kind."""

    report: Path
    folder: Path
    kind: Kind


@dataclass(frozen=True)
class ReviewCase:
    """One row of the page. ``thumb``/``full``: paths relative to the page, or "" without a picture."""

    case_id: str
    status: str
    p: float | None
    label: str
    flags: tuple[str, ...]
    error: str
    thumb: str = ""
    full: str = ""
    extra: tuple[tuple[str, str], ...] = ()  # further links: (name, path relative to the page)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.case_id, "status": self.status, "p": self.p, "label": self.label,
                "flags": list(self.flags), "error": self.error, "thumb": self.thumb, "full": self.full,
                "links": [list(x) for x in self.extra]}


@dataclass(frozen=True)
class ReviewSummary:
    page: Path
    cases: int
    failed: int
    pictures: int
    missing: int  # ok cases whose picture could not be drawn (their reason is on the page)


def find_run(run: Path) -> Run:
    """The run that ``run`` names: a report file (``results.csv``, ``results.h5``, ``explain.csv``) or a run folder.

    Raises:
        UsageError: no such file, or no report of a predict or explain run there.
    """
    run = run.expanduser().resolve()
    if run.is_dir():
        if (run / "explain.csv").is_file():
            return Run(run / "explain.csv", run, "explain")
        for suffix in REPORT_FORMATS:
            report = run.with_name(run.name + suffix)
            if report.is_file():
                return Run(report, run, "predict")
        raise UsageError(f"{run}: no report of a finished run there (expected explain.csv inside it, "
                         f"or {run.name}.csv or {run.name}.h5 beside it)")
    if not run.is_file():
        raise UsageError(f"{run}: no such file or folder")
    if run.suffix.lower() not in REPORT_FORMATS:
        raise UsageError(f"{run}: give the run's report (results.csv, results.h5 or explain.csv) or its folder")
    if run.name == "explain.csv":
        return Run(run, run.parent, "explain")
    return Run(run, run.with_suffix(""), "predict")


def read_report(report: Path) -> list[dict[str, str]]:
    """The report's rows as text, each cell as it was written (a neutralised ``'-01`` reads ``-01``).

    An HDF5 report (:func:`mmcli.io.writers.write_hdf5`) is read from ``/cases/<column>``:
    a missing number (NaN) reads as an empty cell, a whole number without its ``.0``.

    Raises:
        UsageError: the file cannot be read, or has no ``case_id`` and ``status`` columns.
    """
    if is_hdf5(report):
        return _read_hdf5_report(report)
    try:
        with open(report, newline="", encoding="utf-8") as f:
            columns = set(next(csv.reader(f), ()))
        rows = read_csv_rows(report, exact=True)  # exact: a number reads back as the text it was written as
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{report}: cannot read the report ({err})") from None
    if not {"case_id", "status"} <= columns:
        raise UsageError(f"{report}: not an mmcli report (no case_id and status columns)")
    return [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows]


def _cell(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if np.isnan(number):
            return ""
        return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
    return str(value)


def _read_hdf5_report(report: Path) -> list[dict[str, str]]:
    import h5py

    try:
        with h5py.File(report, "r") as h5:
            table = h5.get("cases")
            if not isinstance(table, h5py.Group) or not {"case_id", "status"} <= set(table):
                raise UsageError(f"{report}: not an mmcli report (no /cases/case_id and /cases/status)")
            columns = {name: data[()] for name, data in table.items() if isinstance(data, h5py.Dataset)}
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{report}: cannot read the report ({err})") from None
    n = len(columns["case_id"])
    if any(np.ndim(values) != 1 or len(values) != n for values in columns.values()):
        raise UsageError(f"{report}: not an mmcli report (columns of different lengths under /cases)")
    return [{name: _cell(values[i]) for name, values in columns.items()} for i in range(n)]


def _outline(mask: Image.Image, width: int) -> np.ndarray:
    """``(H, W)`` bool: the pixels within ``width`` px of the mask's boundary (``mask``: mode L, 0/255)."""
    size = 2 * max(1, width // 2) + 1
    grown = mask.filter(ImageFilter.MaxFilter(size))
    shrunk = mask.filter(ImageFilter.MinFilter(size))
    return np.asarray(grown) != np.asarray(shrunk)


def draw_overlay(pixels: np.ndarray, mask: np.ndarray | None, side: int) -> Image.Image:
    """The film ``(H, W)`` in [0, 1], shrunk to at most ``side`` px on its long side, with the lung outline."""
    film = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    scale = min(1.0, side / max(film.size))
    size = (max(1, round(film.width * scale)), max(1, round(film.height * scale)))
    film = film.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0) if size != film.size else film
    rgb = np.repeat(np.asarray(film)[..., None], 3, axis=2)
    if mask is not None and mask.any() and not mask.all():
        lungs = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        rgb[_outline(lungs, max(2, max(size) // 160))] = OUTLINE
    return Image.fromarray(rgb)


def _up_to_date(path: Path, since: float) -> bool:
    return path.is_file() and path.stat().st_mtime >= since


def picture_name(case_id: str) -> str:
    """A case's picture file name (no suffix): its id percent-encoded, or a hash of a very long id.

    One flat name that cannot climb out of its folder, and no two ids share one (a hash
    starts with ``=``, which percent-encoding never keeps).
    """
    key = hdf5_key(case_id)
    return key if len(key) <= 150 else "=" + hashlib.sha256(case_id.encode("utf-8")).hexdigest()


Made = tuple[str, str, tuple[tuple[str, str], ...], str]  # thumb, full, links (all relative links), why not


class _Pictures:
    """Draws the thumbnails and full-size overlays of one run into ``<folder>/review/``."""

    def __init__(self, run: Run, page_dir: Path, voi_lut: bool) -> None:
        self.run, self.page_dir, self.voi_lut = run, page_dir, voi_lut
        self.root = run.folder / "review"
        self.since = run.report.stat().st_mtime  # pictures older than the report are drawn again

    def rel(self, path: Path) -> str:
        """The page's link to ``path``: its relative POSIX path, percent-encoded (``#``, ``?``, ``%``, ``:``)."""
        return quote(Path(os.path.relpath(path, self.page_dir)).as_posix())

    def _named(self, row: Mapping[str, str], column: str, base: Path) -> Path | str:
        """The file that ``row[column]`` names relative to ``base``, or why it is refused."""
        path = base / row[column]
        if not resolves_inside(path, self.run.folder):
            return f"the {column} file {row[column]!r} is not inside the run's folder {self.run.folder}: refused"
        if not path.is_file():
            return f"the {column} file {row[column]!r} does not exist"
        return path

    def _targets(self, case_id: str) -> tuple[Path, Path] | str:
        """Where a case's thumbnail and full-size picture go, or why they cannot (a link out of the run)."""
        name = picture_name(case_id)
        paths = self.root / "thumbs" / f"{name}.jpg", self.root / "full" / f"{name}.png"
        if not all(resolves_inside(path, self.run.folder) for path in paths):
            return f"{self.root} leads out of the run's folder {self.run.folder}: no picture written"
        return paths

    def make(self, row: Mapping[str, str]) -> Made:
        """``(thumb, full, links, why not)`` of an ok case; a picture that cannot be drawn says why."""
        if self.run.kind == "explain":
            return self._from_explain(row)
        targets = self._targets(row["case_id"])
        if isinstance(targets, str):
            return "", "", (), targets
        thumb, full = targets
        if not (_up_to_date(thumb, self.since) and _up_to_date(full, self.since)):
            source = row.get("source") or ""
            if not source:
                return "", "", (), "no source path in the report (anonymised run)"
            if not Path(source).is_file():
                return "", "", (), f"cannot draw the picture: the input {source} is not a file"
            mask = self._named(row, "mask", self.run.report.parent) if row.get("mask") else None
            if isinstance(mask, str):
                return "", "", (), mask
            try:
                pixels = read_radiograph(source, voi_lut=self.voi_lut, max_pixels=None).pixels
                lungs = read_mask_png(mask) if mask is not None else None
            except (MMCLIError, OSError) as err:
                return "", "", (), f"cannot draw the picture: {err}"
            self._save(draw_overlay(pixels, lungs, FULL_SIDE), full, "PNG")
            self._save(draw_overlay(pixels, lungs, THUMB_SIDE), thumb, "JPEG")
        return self.rel(thumb), self.rel(full), (), ""

    def _from_explain(self, row: Mapping[str, str]) -> Made:
        if not row.get("gradcam_png"):
            return "", "", (), "the run has no Grad-CAM picture of this case"
        pictures = {view: self._named(row, f"{view}_png", self.run.folder) for view in ("gradcam", "saliency")
                    if row.get(f"{view}_png")}
        refused = [why for why in pictures.values() if isinstance(why, str)]
        targets = self._targets(row["case_id"])
        if refused or isinstance(targets, str):
            return "", "", (), "; ".join(refused) if refused else str(targets)
        gradcam, thumb = Path(pictures["gradcam"]), targets[0]
        if not _up_to_date(thumb, self.since):
            with Image.open(gradcam) as img:
                small = img.convert("RGB")
                small.thumbnail((THUMB_SIDE * 2, THUMB_SIDE * 2))
            self._save(small, thumb, "JPEG")
        links = tuple((view, self.rel(Path(path))) for view, path in pictures.items())
        return self.rel(thumb), self.rel(gradcam), links, ""

    @staticmethod
    def _save(img: Image.Image, path: Path, fmt: str) -> None:
        with atomic_path(path) as tmp:
            img.save(tmp, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _settings(run: Run) -> dict[str, Any]:
    try:
        data = json.loads((run.folder / RUN_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def build_review(run_path: Path, out: Path | None = None,
                 on_case: Callable[[str], None] | None = None) -> ReviewSummary:
    """Write the review page of the run ``run_path`` names (see :func:`find_run`) and its pictures.

    Args:
        out: the page's path (default ``<run folder>/review.html``); a folder takes ``review.html``.
        on_case: called with each case id as its picture is done (progress).

    Raises:
        UsageError: no run there, or a report mmcli did not write.
    """
    run = find_run(run_path)
    rows = read_report(run.report)
    page = (out.expanduser().resolve() if out is not None else run.folder / "review.html")
    if page.is_dir() or page.suffix.lower() not in (".html", ".htm"):
        page = page / "review.html"
    settings = _settings(run)
    pictures = _Pictures(run, page.parent, bool(settings.get("settings", {}).get("voi_lut", False)))
    cases: list[ReviewCase] = []
    missing = 0
    for row in rows:
        status = row.get("status") or ""
        thumb = full = why = ""
        links: tuple[tuple[str, str], ...] = ()
        if status == Status.OK:
            thumb, full, links, why = pictures.make(row)
            missing += bool(why)
        if on_case is not None:
            on_case(row["case_id"])
        flags = tuple(f for f in (row.get("qa_flags") or "").split(";") if f)
        cases.append(ReviewCase(row["case_id"], status, _number(row.get("p_pneumonia")), row.get("label") or "",
                                flags, row.get("error") or why, thumb, full, links))
    title = f"mmcli review: {run.report.name} ({run.kind})"
    with atomic_path(page) as tmp:
        tmp.write_text(render_page(cases, title=title, about=_about(run, settings, page.parent)), encoding="utf-8")
    logger.info("wrote %s", page)
    failed = sum(c.status != Status.OK for c in cases)
    return ReviewSummary(page, len(cases), failed, len(cases) - failed - missing, missing)


def _about(run: Run, settings: Mapping[str, Any], page_dir: Path) -> list[tuple[str, str]]:
    """Facts about the run shown above the cases (name, value), as plain text."""
    facts = [("report", Path(os.path.relpath(run.report, page_dir)).as_posix()), ("command", run.kind)]
    cfg = settings.get("settings") or {}
    for key in ("weights", "threshold", "qa", "target"):
        if cfg.get(key) not in (None, ""):
            facts.append((key, str(cfg[key])))
    if settings.get("mmcli_version") or settings.get("version"):
        facts.append(("mmcli", str(settings.get("mmcli_version") or settings.get("version"))))
    return facts


def _json_for_script(data: Any) -> str:
    """JSON that cannot end the ``<script>`` element it sits in, whatever its strings hold."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _failed_rows(cases: Sequence[ReviewCase]) -> Iterator[str]:
    e = html.escape
    for c in cases:
        if c.status != Status.OK or c.error:
            yield f"<tr><td>{e(c.case_id)}</td><td>{e(c.status)}</td><td>{e(c.error)}</td></tr>"


def render_page(cases: Sequence[ReviewCase], *, title: str, about: Sequence[tuple[str, str]] = ()) -> str:
    """The whole page: markup, style, script and the cases as JSON (one pass: no text is read twice)."""
    e = html.escape
    failed = list(_failed_rows(cases))
    fields = {
        "TITLE": e(title),
        "ABOUT": "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in about),
        "LABEL_OPTIONS": _options(sorted({c.label for c in cases if c.label})),
        "FLAG_OPTIONS": _options(sorted({f for c in cases for f in c.flags})),
        "FAILED_COUNT": str(len(failed)),
        "FAILED_ROWS": "".join(failed) or '<tr><td colspan="3">none</td></tr>',
        "PAGE_SIZE": str(PAGE_SIZE),
        "CASES": _json_for_script([c.as_json() for c in cases]),
    }
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: fields[m.group(1)], PAGE)


def _options(values: Sequence[str]) -> str:
    return "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)
