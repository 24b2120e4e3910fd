"""benchmarks/label_noise.py (AUC by co-label, the co-label folders) and adult_few_labels.py's folders and curve."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark, read_rows
from PIL import Image


@pytest.fixture(scope="module")
def ln():
    return load_benchmark("label_noise")


@pytest.fixture(scope="module")
def few():
    return load_benchmark("adult_few_labels")


FIELDS = ("file", "label", "patient", "view", "finding_labels")


def _meta_folder(path: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    path.mkdir(parents=True)
    for name, *_ in rows:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path / name)
    with open(path / "meta.csv", "w", newline="") as f:
        csv.writer(f).writerows([FIELDS, *rows])
    with open(path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *((r[0], r[1]) for r in rows)])


def _adult_rows() -> list[tuple[str, str, str, str, str]]:
    rows = []
    for view, n_normal, alone, backed in (("AP", 6, 2, 4), ("PA", 5, 1, 3)):
        rows += [(f"{view}-n{i}.png", "normal", f"{view}n{i}", view, "No Finding") for i in range(n_normal)]
        rows += [(f"{view}-a{i}.png", "pneumonia", f"{view}a{i}", view, "Pneumonia") for i in range(alone)]
        rows += [(f"{view}-c{i}.png", "pneumonia", f"{view}c{i}", view, "Infiltration|Pneumonia")
                 for i in range(backed)]
    return rows


def test_colabel_folders_keep_backed_pneumonia_labels_and_the_class_balance_within_view(ln, tmp_path):
    _meta_folder(tmp_path / "cls-adult-train-vb-hm", _adult_rows())
    labelled, free = ln.colabel_folders(tmp_path)
    assert (labelled.name, free.name) == ("cls-adult-train-vb-co-hm", "cls-adult-train-vb-alone-hm")
    rows = read_rows(labelled / "labels.csv")
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in labelled.glob("*.png"))
    meta = {r["file"]: r for r in read_rows(labelled / "meta.csv")}
    # every labelled pneumonia film has another finding; Pneumonia alone is gone
    assert {r["file"] for r in rows if r["label"] == "pneumonia"} == {
        "AP-c0.png", "AP-c1.png", "AP-c2.png", "AP-c3.png", "PA-c0.png", "PA-c1.png", "PA-c2.png"}
    for view, normals in (("AP", 4), ("PA", 4)):  # 6 - 2 and 5 - 1 normal films stay labelled
        assert sum(meta[r["file"]]["view"] == view and r["label"] == "normal" for r in rows) == normals
    assert all(r["patient"] == meta[r["file"]]["patient"] for r in rows)
    gone = {p.name for p in free.glob("*.png")}
    assert {n for n in gone if "-a" in n} == {"AP-a0.png", "AP-a1.png", "PA-a0.png"}
    assert sum(n.startswith("AP-n") for n in gone) == 2 and sum(n.startswith("PA-n") for n in gone) == 1
    assert not (free / "labels.csv").exists()  # the unlabelled folder gives no labels
    assert gone.isdisjoint(meta) and len(gone) + len(meta) == len(_adult_rows())
    # the films are the matched folder's own, and a second call keeps what was made
    assert (labelled / "AP-c0.png").resolve() == (tmp_path / "cls-adult-train-vb-hm" / "AP-c0.png").resolve()
    assert ln.colabel_folders(tmp_path) == (labelled, free)
    assert not list(tmp_path.glob("*.part"))


def test_auc_by_co_label_against_every_normal_film(ln, tmp_path):
    findings = {"n0": "No Finding", "n1": "No Finding", "a0": "Pneumonia", "c0": "Effusion|Pneumonia",
                "c1": "Infiltration|Pneumonia"}
    p = {"n0": 0.2, "n1": 0.6, "a0": 0.4, "c0": 0.7, "c1": 0.9}
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "finding_labels"), *((f"{k}.png", v) for k, v in findings.items())])
    (tmp_path / "eval").mkdir()
    with open(tmp_path / "eval" / "per_case.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("dataset", "case_id", "status", "true_label", "p_pneumonia"))
        w.writerows(("cls-adult-test", k, "ok", "normal" if k[0] == "n" else "pneumonia", v) for k, v in p.items())
    assert ln.main(["--eval", str(tmp_path / "eval"), "--meta", str(tmp_path / "meta.csv"),
                    "--json", str(tmp_path / "out.json")]) == 0
    groups = json.loads((tmp_path / "out.json").read_text())["groups"]
    assert groups["all pneumonia"]["value"] == pytest.approx(5 / 6)  # a0 (0.4) is below n1 (0.6)
    assert groups["Pneumonia alone"]["value"] == pytest.approx(0.5)
    assert groups["with co-labels"]["value"] == 1.0
    assert (groups["with Effusion"]["n_pneumonia"], groups["with Effusion"]["n_normal"]) == (1, 2)


def test_budget_folders_draw_every_view_and_class_alike_and_leave_the_rest_unlabelled(few, tmp_path):
    rows = [(f"{v}-{c}{i}.png", c, f"{v}{c}{i}", v, "x") for v in ("AP", "PA") for c in ("normal", "pneumonia")
            for i in range(10)]
    _meta_folder(tmp_path / "cls-adult-train-vb", rows)
    rest = tmp_path / "cls-adult-train-vb-rest"
    rest.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(rest / "extra.png")
    lab, free = few.budget_folders(tmp_path, tmp_path / "out", 8, seed=0)
    picked = read_rows(lab / "labels.csv")
    assert len(picked) == 8
    assert sorted((r["file"][:2], r["label"]) for r in picked) == sorted(
        (v, c) for v in ("AP", "PA") for c in ("normal", "pneumonia") for _ in range(2))
    names = {p.name for p in free.glob("*.png")}
    assert "extra.png" in names and len(names) == 41 - 8 and names.isdisjoint(r["file"] for r in picked)
    again, _ = few.budget_folders(tmp_path, tmp_path / "again", 8, seed=0)
    assert read_rows(again / "labels.csv") == picked  # the same seed draws the same films
    other, _ = few.budget_folders(tmp_path, tmp_path / "other", 8, seed=1)
    assert read_rows(other / "labels.csv") != picked


def test_the_curve_draws_both_arms(few, tmp_path):
    def row(arm, n, value):
        m = {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.05}
        return {"arm": arm, "labels": n, "seed": 0, "datasets": {
            s: {"classification": {"metrics": {"roc_auc": m}}} for s in ("cls-adult-test", "cls-adult-test-hm")}}
    few.write_curve(tmp_path / "curve.png", [row("semi", 25, 0.6), row("semi", 358, 0.7), row("sup", 358, 0.65)])
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size == (960, 408)
        colours = np.asarray(im.convert("RGB")).reshape(-1, 3)
    red, blue = np.array([214, 39, 40]), np.array([31, 119, 180])  # tab:red and tab:blue
    assert (np.abs(colours - red).sum(1) < 30).sum() > 50 and (np.abs(colours - blue).sum(1) < 30).sum() > 50
