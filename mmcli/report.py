"""``mmcli report``: one HTML page to review a finished ``predict`` or ``explain`` run.

The page, ``review.html`` in the run's folder, opens from the file system: no server, no
network, its CSS and JavaScript inline, its images relative links into ``review/``::

    results.csv                     the run's report (or <out>/explain.csv)
    results/review.html             the page
    results/review/thumbs/<key>.jpg     the film with the lung outline, 192 px
    results/review/full/<key>.png       the same at native size (at most 2048 px on a side)

``<key>`` is the case id percent-encoded (:func:`mmcli.io.writers.hdf5_key`), one flat
file name whatever the id holds (``/``, ``..``); a very long one is a hash.

Overlays are drawn from the run's outputs alone (the input named in ``source`` and the
mask PNG of the run; an explain run's own Grad-CAM pictures), so no model is needed.
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
from mmcli.io.writers import atomic_path, hdf5_key, read_csv_rows, read_mask_png

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
    """The run that ``run`` names: a report file (``results.csv``, ``explain.csv``) or a run folder.

    Raises:
        UsageError: no such file, or no report of a predict or explain run there.
    """
    run = run.expanduser().resolve()
    if run.is_dir():
        if (run / "explain.csv").is_file():
            return Run(run / "explain.csv", run, "explain")
        report = run.with_name(run.name + ".csv")
        if report.is_file():
            return Run(report, run, "predict")
        raise UsageError(f"{run}: no report of a finished run there (expected explain.csv inside it, "
                         f"or {report.name} beside it)")
    if not run.is_file():
        raise UsageError(f"{run}: no such file or folder")
    if run.suffix.lower() != ".csv":
        raise UsageError(f"{run}: give the run's CSV report (results.csv or explain.csv) or its folder")
    if run.name == "explain.csv":
        return Run(run, run.parent, "explain")
    return Run(run, run.with_suffix(""), "predict")


def read_report(report: Path) -> list[dict[str, str]]:
    """The report's rows as text, each cell as it was written (a neutralised ``'-01`` reads ``-01``).

    Raises:
        UsageError: the file cannot be read, or has no ``case_id`` and ``status`` columns.
    """
    try:
        with open(report, newline="", encoding="utf-8") as f:
            columns = set(next(csv.reader(f), ()))
        rows = read_csv_rows(report, exact=True)  # exact: a number reads back as the text it was written as
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{report}: cannot read the report ({err})") from None
    if not {"case_id", "status"} <= columns:
        raise UsageError(f"{report}: not an mmcli report (no case_id and status columns)")
    return [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows]


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
        data = json.loads((run.folder / "run.json").read_text())
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
        if status == "ok":
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
    failed = sum(c.status != "ok" for c in cases)
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
        if c.status != "ok" or c.error:
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
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: fields[m.group(1)], _PAGE)


def _options(values: Sequence[str]) -> str:
    return "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{{TITLE}}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{background:#1d2733;color:#fff;padding:10px 16px}
header h1{font-size:18px;margin:0 0 4px}
dl{display:flex;flex-wrap:wrap;gap:2px 14px;margin:0;font-size:12px;color:#cfd8e3}
dt{font-weight:600}dd{margin:0 8px 0 0}
#bar{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:8px 16px;display:flex;
flex-wrap:wrap;gap:8px 14px;align-items:center;z-index:1}
#bar label{font-size:12px;color:#555}#bar input[type=number]{width:5em}
main{padding:12px 16px}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px}
.case{background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px;font-size:12px}
.case img,.case .none{display:block;width:100%;height:200px;object-fit:contain;background:#000}
.case .none{color:#bbb;display:flex;align-items:center;justify-content:center;text-align:center}
.id{font-weight:600;overflow-wrap:anywhere}
.badge{display:inline-block;border-radius:3px;padding:0 4px;margin:1px 2px 0 0;font-size:11px;background:#ddd}
.pneumonia{background:#c62828;color:#fff}.normal{background:#2e7d32;color:#fff}.uncertain{background:#6d6d6d;color:#fff}
.flag{background:#ffb300}
#pager{margin:12px 0;display:flex;gap:10px;align-items:center}
table{border-collapse:collapse;background:#fff;font-size:12px}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
</style></head>
<body>
<header><h1>{{TITLE}}</h1><dl>{{ABOUT}}</dl></header>
<div id="bar">
<label>label <select id="label"><option value="">any</option>{{LABEL_OPTIONS}}</select></label>
<label>QA flag <select id="flag"><option value="">any or none</option><option value="none">no flag</option>
<option value="any">any flag</option>{{FLAG_OPTIONS}}</select></label>
<label>p(pneumonia) from <input id="pmin" type="number" min="0" max="1" step="0.05"></label>
<label>to <input id="pmax" type="number" min="0" max="1" step="0.05"></label>
<label>case id contains <input id="q" type="search"></label>
<label>sort <select id="sort"><option value="id">case id</option><option value="p-desc">p high first</option>
<option value="p-asc">p low first</option><option value="flags">most flags first</option></select></label>
<span id="count"></span>
</div>
<main>
<noscript><p>The list of cases needs JavaScript; the failed cases are below.</p></noscript>
<div id="grid"></div>
<div id="pager"><button id="prev" type="button">previous</button><span id="pageinfo"></span>
<button id="next" type="button">next</button></div>
<h2 id="failed">Failed cases ({{FAILED_COUNT}})</h2>
<table><thead><tr><th>case</th><th>status</th><th>reason</th></tr></thead><tbody>{{FAILED_ROWS}}</tbody></table>
</main>
<script type="application/json" id="cases">{{CASES}}</script>
<script>
"use strict";
const CASES = JSON.parse(document.getElementById("cases").textContent).filter(c => c.status === "ok");
const PAGE = {{PAGE_SIZE}};
const $ = id => document.getElementById(id);
const KEYS = ["label", "flag", "pmin", "pmax", "q", "sort"];
function state() {
  const h = new URLSearchParams(location.hash.slice(1));
  const s = {page: Math.max(1, parseInt(h.get("page") || "1", 10) || 1)};
  for (const k of KEYS) s[k] = h.get(k) || "";
  return s;
}
function setHash(s) {
  const h = new URLSearchParams();
  for (const k of [...KEYS, "page"]) if (s[k] && !(k === "page" && s[k] === 1)) h.set(k, s[k]);
  location.hash = h.toString();
}
function select(s) {
  const lo = s.pmin === "" ? -1 : Number(s.pmin), hi = s.pmax === "" ? 2 : Number(s.pmax);
  const q = s.q.toLowerCase();
  const out = CASES.filter(c =>
    (!s.label || c.label === s.label) &&
    (!s.flag || (s.flag === "none" ? c.flags.length === 0 : s.flag === "any" ? c.flags.length > 0
                 : c.flags.includes(s.flag))) &&
    ((s.pmin === "" && s.pmax === "") || (c.p !== null && c.p >= lo && c.p <= hi)) &&
    (!q || c.id.toLowerCase().includes(q)));
  const p = c => (c.p === null ? -1 : c.p);
  const byId = (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
  const order = {"p-desc": (a, b) => p(b) - p(a) || byId(a, b), "p-asc": (a, b) => p(a) - p(b) || byId(a, b),
                 "flags": (a, b) => b.flags.length - a.flags.length || byId(a, b)}[s.sort] || byId;
  return out.sort(order);
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function card(c) {
  const d = el("div", "case");
  d.dataset.id = c.id;
  let pic;
  if (c.thumb) {
    pic = el("img");
    pic.loading = "lazy"; pic.decoding = "async"; pic.alt = c.id; pic.src = c.thumb;
  } else pic = el("div", "none", c.error || "no picture");
  if (c.full) {
    const a = el("a"); a.href = c.full; a.target = "_blank"; a.title = "full size"; a.append(pic); pic = a;
  }
  d.append(pic, el("div", "id", c.id));
  const line = el("div");
  line.append(el("span", "badge p", c.p === null ? "p n/a" : "p " + c.p.toFixed(3)));
  if (c.label) line.append(el("span", "badge label " + (["pneumonia", "normal", "uncertain"].includes(c.label)
                                                             ? c.label : ""), c.label));
  for (const f of c.flags) line.append(el("span", "badge flag", f));
  for (const [name, href] of c.links) { const a = el("a", "badge", name); a.href = href; a.target = "_blank";
                                       line.append(a); }
  d.append(line);
  return d;
}
function render() {
  const s = state();
  for (const k of KEYS) if ($(k).value !== s[k]) $(k).value = s[k];
  if (!s.sort) $("sort").value = "id";
  const list = select(s), pages = Math.max(1, Math.ceil(list.length / PAGE)), page = Math.min(s.page, pages);
  $("grid").replaceChildren(...list.slice((page - 1) * PAGE, page * PAGE).map(card));
  $("count").textContent = list.length + " of " + CASES.length + " cases";
  $("pageinfo").textContent = "page " + page + " of " + pages;
  $("prev").disabled = page <= 1; $("next").disabled = page >= pages;
  document.body.dataset.page = page;
}
for (const k of KEYS) $(k).addEventListener("change", () => { const s = state(); s[k] = $(k).value; s.page = 1;
                                                             setHash(s); });
$("prev").addEventListener("click", () => { const s = state(); s.page -= 1; setHash(s); });
$("next").addEventListener("click", () => { const s = state(); s.page += 1; setHash(s); });
window.addEventListener("hashchange", render);
render();
</script>
</body></html>
"""
