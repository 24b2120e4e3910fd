"""``mmcli report``: the review page of a run, in Python and in a real (headless) browser."""

import csv
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
from conftest import save_png8
from PIL import Image
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.io.writers import write_mask_png
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
