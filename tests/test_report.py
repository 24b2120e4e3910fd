"""``mmcli report``: the review page of a run, in Python and in a real (headless) browser."""

import csv
import json
import re
import shutil
import subprocess
import time
from urllib.parse import unquote

import numpy as np
import pytest
from conftest import read_rows, save_png8
from PIL import Image
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.io.writers import write_csv, write_mask_png
from mmcli.report import PAGE_SIZE, ReviewCase, build_review, render_page

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
HOSTILE = '<script>alert("x")</script>&amp;'


def _run(args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _predict_run(tmp_path):
    """A predict run as predict writes it: results.csv, results/masks/, with a failed case and an odd name."""
    scans, folder = tmp_path / "scans", tmp_path / "results"
    rows = []
    for i, name in enumerate(["a", "b", "<script>x"]):
        src = save_png8(scans / f"{name}.png", 80, 100, seed=i)
        mask = np.zeros((80, 100), bool)
        mask[20:60, 10 + 5 * i : 40 + 5 * i] = True
        write_mask_png(folder / "masks" / f"{name}.png", mask)
        rows.append({"case_id": name, "source": src, "status": "ok", "error": "", "p_pneumonia": 0.2 + 0.3 * i,
                     "label": "pneumonia" if i else "normal", "qa_flags": "out_of_distribution" if i == 1 else "",
                     "mask": f"results/masks/{name}.png"})
    rows.append({"case_id": "bad", "source": scans / "bad.png", "status": "error", "error": HOSTILE,
                 "p_pneumonia": "", "label": "", "qa_flags": "", "mask": ""})
    _write_report(tmp_path / "results.csv", rows)
    folder.mkdir(exist_ok=True)
    return tmp_path / "results.csv"


def _write_report(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_report_of_a_predict_run(tmp_path):
    report = _predict_run(tmp_path)
    res = _run(["report", report, "-q"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "results" / "review.html").read_text()
    assert "<script>x" not in page and "<script>alert" not in page  # every name and reason escaped
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;amp;" in page  # the failed case's reason
    assert "\\u003cscript\\u003ex" in page  # the case list's JSON cannot close its script element
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network
    review = tmp_path / "results" / "review"
    thumb, full = review / "thumbs" / "a.jpg", review / "full" / "a.png"
    assert '"thumb":"review/thumbs/a.jpg"' in page and '"full":"review/full/a.png"' in page
    with Image.open(full) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape == (80, 100, 3)  # full size
    orange = (rgb == (255, 140, 0)).all(axis=2)
    assert orange[40, 8:13].any() and orange[40, 38:43].any() and not orange[40, 15:35].any() and not orange[5].any()
    with Image.open(thumb) as img:
        assert max(img.size) <= 192
    # a rerun draws nothing again; a folder names the same run; --out puts the page elsewhere with working links
    before = thumb.stat().st_mtime_ns
    assert _run(["report", tmp_path / "results", "-q"]).exit_code == 0
    assert thumb.stat().st_mtime_ns == before
    res = _run(["report", report, "--out", tmp_path / "pages" / "r.html", "-q"])
    assert res.exit_code == 0
    assert '"thumb":"../results/review/thumbs/a.jpg"' in (tmp_path / "pages" / "r.html").read_text()


def test_report_of_an_explain_run_and_errors(tmp_path, tiny_weights):
    save_png8(tmp_path / "s" / "a.png", 64, 64)
    res = _run(["explain", tmp_path / "s", "--out", tmp_path / "ex", "-w", tiny_weights, "-j", "0", "-q"])
    assert res.exit_code == 0, res.output
    res = _run(["report", tmp_path / "ex" / "explain.csv"])
    assert res.exit_code == 0 and "1 cases (0 failed)" in res.output
    page = (tmp_path / "ex" / "review.html").read_text()
    assert '"full":"gradcam/a.png"' in page and '["saliency","saliency/a.png"]' in page
    assert (tmp_path / "ex" / "review" / "thumbs" / "a.jpg").is_file()

    res = _run(["report", tmp_path / "nothing.csv"])
    assert res.exit_code == 2 and "nothing.csv: no such file or folder" in res.output
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    res = _run(["report", tmp_path / "other.csv"])
    assert res.exit_code == 2 and "other.csv: not an mmcli report" in res.output
    res = _run(["report", tmp_path / "s"])
    assert res.exit_code == 2 and "no report of a finished run there" in res.output


def test_report_lists_cases_it_cannot_draw(tmp_path):
    report = _predict_run(tmp_path)
    (tmp_path / "scans" / "b.png").unlink()  # moved since the run
    summary = build_review(report)
    assert (summary.cases, summary.failed, summary.missing) == (4, 1, 1)
    page = summary.page.read_text()
    assert re.search(r"<tr><td>b</td><td>ok</td><td>cannot draw the picture: [^<]*b\.png", page)


def _browser(url, tmp_path, *args):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def _big_page(tmp_path, n=10_000):
    rng = np.random.default_rng(0)
    flags = ["", "out_of_distribution", "inverted", ""]
    cases = [ReviewCase(f"case{i:05d}", "ok", round(float(rng.uniform()), 6), ("normal", "pneumonia")[i % 2],
                        tuple(f for f in [flags[i % 4]] if f), "", f"review/thumbs/case{i:05d}.jpg",
                        f"review/full/case{i:05d}.png") for i in range(n)]
    cases[7] = ReviewCase("<img src=x onerror=alert(1)>", "ok", 0.5, "normal", (), "", "", "")
    cases.append(ReviewCase("gone", "error", None, "", (), "unreadable <b>file</b>"))
    page = tmp_path / "review.html"
    page.write_text(render_page(cases, title="big <run>"))
    return page, cases


@needs_browser
def test_page_in_a_browser_with_ten_thousand_cases(tmp_path):
    page, cases = _big_page(tmp_path)
    start = time.monotonic()
    dom = _browser(page.as_uri() + "#label=pneumonia&flag=out_of_distribution&sort=p-desc&page=2", tmp_path,
                   "--dump-dom")
    seconds = time.monotonic() - start
    ids = re.findall(r'class="case" data-id="([^"]*)"', dom)
    expected = sorted((c for c in cases if c.status == "ok" and c.label == "pneumonia"
                       and "out_of_distribution" in c.flags), key=lambda c: (-c.p, c.case_id))
    assert len(expected) == 2500 and len(ids) == PAGE_SIZE  # one page of thumbnails in the DOM, not 10,000
    assert ids == [c.case_id for c in expected[PAGE_SIZE : 2 * PAGE_SIZE]]  # the second page, highest p first
    assert 'id="count">2500 of 10000 cases' in dom and "page 2 of 42" in dom
    assert dom.count("<img") == PAGE_SIZE and 'loading="lazy"' in dom
    assert seconds < 30  # the page, the JSON of 10,000 cases and the browser's start together

    dom = _browser(page.as_uri() + "#q=onerror&pmin=0.4&pmax=0.6", tmp_path, "--dump-dom")
    assert re.findall(r'class="case" data-id="([^"]*)"', dom) == ["&lt;img src=x onerror=alert(1)&gt;"]
    assert "<img src=x" not in dom and "unreadable &lt;b&gt;file&lt;/b&gt;" in dom


@needs_browser
def test_page_screenshot(tmp_path):
    report = _predict_run(tmp_path)
    page = build_review(report).page
    shot = tmp_path / "shot.png"
    _browser(page.as_uri() + "#sort=p-desc", tmp_path, f"--screenshot={shot}", "--window-size=1280,900")
    with Image.open(shot) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape == (900, 1280, 3)
    assert (rgb == (29, 39, 51)).all(axis=2)[:40].mean() > 0.5  # the header
    assert ((np.abs(rgb.astype(int) - (255, 140, 0)).sum(axis=2)) < 60).sum() > 50  # lung outlines in thumbnails


def _cases(page):
    """The page's case list, as the script reads it."""
    return json.loads(re.search(r'<script type="application/json" id="cases">(.*?)</script>', page, re.S).group(1))


def _files(folder):
    return {p for p in folder.rglob("*") if p.is_file()}


def test_review_links_are_encoded_and_pictures_named_from_the_id(tmp_path):
    scans, folder = tmp_path / "scans", tmp_path / "results"
    ids = ["a#1", "b?x=1", "c%20d", "../../x", "-01", "sub/e"]
    rows = []
    for i, case_id in enumerate(ids):
        src = save_png8(scans / f"s{i}.png", 40, 50, seed=i)
        write_mask_png(folder / "masks" / f"m{i}.png", np.ones((40, 50), bool))
        rows.append({"case_id": case_id, "source": str(src), "status": "ok", "p_pneumonia": 0.5, "label": "normal",
                     "mask": f"results/masks/m{i}.png"})
    write_csv(tmp_path / "results.csv", rows, list(rows[0]))  # as predict writes it: '-01 neutralised
    assert "'-01" in (tmp_path / "results.csv").read_text()
    before = _files(tmp_path)
    summary = build_review(tmp_path / "results.csv")
    assert (summary.cases, summary.pictures, summary.missing) == (len(ids), len(ids), 0)
    cases = _cases(summary.page.read_text())
    assert [c["id"] for c in cases] == ids  # the neutralising quote is not shown
    for c in cases:
        for link in (c["thumb"], c["full"]):
            assert not set("#?:") & set(link) and link.startswith("review/")
            assert (folder / unquote(link)).is_file()  # what a browser opens
            assert (folder / unquote(link)).parent.parent == folder / "review"  # one flat name per case
    written = _files(tmp_path) - before
    assert all(folder / "review" in p.parents for p in written - {summary.page})  # nothing climbed out
    assert (folder / "review" / "thumbs" / "..%2F..%2Fx.jpg").is_file()


def test_review_reads_and_writes_pictures_only_inside_the_run(tmp_path):
    report = _predict_run(tmp_path)
    save_png8(tmp_path / "outside.png", 80, 100)
    rows = read_rows(report)
    rows[0]["mask"] = "outside.png"  # beside the report, not in the run's folder
    rows[1]["source"] = str(tmp_path)  # a folder, not a file
    _write_report(report, rows)
    summary = build_review(report)
    page = summary.page.read_text()
    assert (summary.pictures, summary.missing) == (1, 2)
    assert "the mask file &#x27;outside.png&#x27; is not inside the run&#x27;s folder" in page
    assert "is not a file" in page
    by_id = {c["id"]: c for c in _cases(page)}
    assert by_id["a"]["thumb"] == by_id["b"]["thumb"] == "" and by_id["<script>x"]["thumb"]

    # a review folder that is a link out of the run: nothing is written through it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(tmp_path / "results" / "review")
    (tmp_path / "results" / "review").symlink_to(elsewhere, target_is_directory=True)
    summary = build_review(report)
    assert summary.pictures == 0 and not any(elsewhere.iterdir())
    assert "leads out of the run&#x27;s folder" in summary.page.read_text()


def test_review_of_an_explain_run_links_only_its_own_pictures(tmp_path):
    run = tmp_path / "ex"
    for sub in ("gradcam", "saliency"):
        for name in ("a", "b", "c#1"):
            save_png8(run / sub / f"{name}.png", 32, 32)
    save_png8(tmp_path / "outside.png", 32, 32)
    rows = [{"case_id": "a", "status": "ok", "gradcam_png": "gradcam/a.png", "saliency_png": "javascript:alert(1)"},
            {"case_id": "b", "status": "ok", "gradcam_png": "../outside.png", "saliency_png": "saliency/b.png"},
            {"case_id": "c#1", "status": "ok", "gradcam_png": "gradcam/c#1.png", "saliency_png": "saliency/c#1.png"}]
    _write_report(run / "explain.csv", rows)
    summary = build_review(run)
    page = summary.page.read_text()
    assert (summary.pictures, summary.missing) == (1, 2)
    by_id = {c["id"]: c for c in _cases(page)}
    assert by_id["a"]["links"] == by_id["b"]["links"] == [] and by_id["a"]["full"] == by_id["b"]["full"] == ""
    links = [x for c in by_id.values() for x in (c["thumb"], c["full"], *(href for _, href in c["links"]))]
    assert not any(":" in href for href in links)  # no javascript: (nor any other scheme) in a link
    assert "not inside the run&#x27;s folder" in page
    assert by_id["c#1"]["full"] == "gradcam/c%231.png"
    assert by_id["c#1"]["links"] == [["gradcam", "gradcam/c%231.png"], ["saliency", "saliency/c%231.png"]]
    assert (run / unquote(by_id["c#1"]["thumb"])).is_file()


def test_review_shows_neutralised_cells_as_they_were(tmp_path):
    from mmcli.report import read_report

    rows = [{"case_id": "-01", "status": "ok", "error": "", "label": "=x", "p_pneumonia": 0.25},
            {"case_id": "'q", "status": "error", "error": "@bad", "label": "", "p_pneumonia": None},
            {"case_id": "12", "status": "ok", "error": "", "label": "normal", "p_pneumonia": 1}]
    write_csv(tmp_path / "r.csv", rows, list(rows[0]))
    assert read_report(tmp_path / "r.csv") == [
        {"case_id": "-01", "status": "ok", "error": "", "label": "=x", "p_pneumonia": "0.25"},
        {"case_id": "'q", "status": "error", "error": "@bad", "label": "", "p_pneumonia": ""},
        {"case_id": "12", "status": "ok", "error": "", "label": "normal", "p_pneumonia": "1"}]


def test_report_of_a_predict_run_written_as_hdf5(tmp_path, tiny_weights):
    save_png8(tmp_path / "s" / "a.png", 64, 80, seed=1)
    save_png8(tmp_path / "s" / "sub" / "b.png", 70, 64, seed=2)
    (tmp_path / "s" / "bad.png").write_text("not an image")
    pages = {}
    for out in ("csv/results.csv", "h5/results.h5"):
        _run(["predict", tmp_path / "s", "--out", tmp_path / out, "-w", tiny_weights, "-j", "0", "-q",
              "--precision", "fp32"])
        res = _run(["report", tmp_path / out])
        assert res.exit_code == 0 and "3 cases (1 failed)" in res.output, res.output
        pages[out] = (tmp_path / out).with_suffix("") / "review.html"
    assert not (tmp_path / "h5" / "results.csv").exists()
    csv_cases, h5_cases = (_cases(pages[k].read_text()) for k in pages)
    assert h5_cases == csv_cases  # the same ids, probabilities, labels, flags, reasons and picture links
    assert {c["id"]: bool(c["thumb"]) for c in h5_cases} == {"a": True, "sub/b": True, "bad": False}
    with Image.open(tmp_path / "h5" / "results" / "review" / "full" / "sub%2Fb.png") as img:
        assert img.size == (64, 70)  # the film at native size, its lungs from the run's mask PNG
    assert _run(["report", tmp_path / "h5" / "results", "-q"]).exit_code == 0  # the folder names the same run
