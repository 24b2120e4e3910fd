"""benchmarks/adult_split.py: the held-out split of every shared set (weights v2, site adaptation)."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark, radiograph_like, read_rows
from PIL import Image

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def adult_split():
    return load_benchmark("adult_split")


def test_committed_list_keeps_v1s_split_and_holds_out_adult_patients():
    v1 = {(r["set"], r["file"]): r["part"] for r in read_rows(ROOT / "docs" / "results" / "holdout.csv")}
    v2 = read_rows(ROOT / "docs" / "results" / "holdout-v2.csv")
    assert {(r["set"], r["file"]): r["part"] for r in v2 if r["set"] in ("seg-in", "cls-in")} == v1
    for name in ("seg-cross", "cls-cross"):
        rows = [r for r in v2 if r["set"] == name]
        parts = {p: {r["patient"] for r in rows if r["part"] == p} for p in ("train", "test")}
        assert parts["train"] and parts["test"] and not parts["train"] & parts["test"]
    assert Counter(r["part"] for r in v2 if r["set"] == "seg-cross") == {"train": 56, "test": 21}
    assert Counter(r["part"] for r in v2 if r["set"] == "cls-cross") == {"train": 74, "test": 32}


def _png(path, seed, mask=False):
    img = radiograph_like(32, 32, seed=seed)
    Image.fromarray(((img < 0.5) * 255 if mask else img * 255).astype(np.uint8)).save(path)


def test_split_writes_patient_disjoint_folders(adult_split, tmp_path):
    data = tmp_path / "data"
    for name in adult_split.SETS:
        (data / name / "masks").mkdir(parents=True)
    listing = ["file,set,patient,part"]
    for i in range(4):
        _png(data / "seg-in" / f"J{i}.png", i)
        _png(data / "seg-in" / "masks" / f"J{i}.png", i, mask=True)
        listing.append(f"J{i}.png,seg-in,,{'test' if i == 0 else 'train'}")
    (data / "cls-in" / "labels.csv").write_text("file,label\n" + "".join(
        f"K{i}.png,{'normal' if i % 2 else 'pneumonia'}\n" for i in range(4)))
    for i in range(4):
        _png(data / "cls-in" / f"K{i}.png", 10 + i)
        listing.append(f"K{i}.png,cls-in,K{i},{'test' if i == 1 else 'train'}")
    (tmp_path / "v1.csv").write_text("\n".join(listing) + "\n")
    meta = ["file,patientid"]
    for i in range(10):  # 5 patients with two films each
        _png(data / "seg-cross" / f"C{i}.png", 20 + i)
        _png(data / "seg-cross" / "masks" / f"C{i}.png", 20 + i, mask=True)
        meta.append(f"C{i}.png,{i // 2}")
    (data / "seg-cross" / "meta.csv").write_text("\n".join(meta) + "\n")
    labels = ["file,label"]
    for i in range(20):
        _png(data / "cls-cross" / f"{i + 1:08d}_000.png", 40 + i)
        labels.append(f"{i + 1:08d}_000.png,{'pneumonia' if i < 5 else 'normal'}")
    (data / "cls-cross" / "labels.csv").write_text("\n".join(labels) + "\n")
    (data / "cls-cross" / "meta.csv").write_text("file,age\n" + "".join(
        f"{i + 1:08d}_000.png,{30 + i}\n" for i in range(20)))
    out = tmp_path / "out"
    folders = adult_split.split(data, out, tmp_path / "list.csv", fraction=0.4, in_domain_list=tmp_path / "v1.csv")

    def pngs(name):
        return sorted(p.name for p in folders[name].glob("*.png"))

    assert pngs("seg-in-test") == ["J0.png"] and pngs("cls-in-test") == ["K1.png"]
    assert len(pngs("seg-cross-test")) == 4 and len(pngs("seg-cross-train")) == 6  # 2 of 5 patients
    test_patients = {int(n[1:-4]) // 2 for n in pngs("seg-cross-test")}
    assert not test_patients & {int(n[1:-4]) // 2 for n in pngs("seg-cross-train")}
    assert (folders["seg-cross-test"] / "masks" / pngs("seg-cross-test")[0]).is_file()
    nih = {r["file"]: r["label"] for r in read_rows(folders["cls-cross-test"] / "labels.csv")}
    assert len(nih) == 8 and Counter(nih.values()) == {"normal": 6, "pneumonia": 2}  # stratified
    meta_rows = read_rows(folders["cls-cross-test"] / "meta.csv")
    assert {r["file"]: r["patient"] for r in meta_rows} == {f: str(int(f[:8])) for f in nih}
    rows = read_rows(tmp_path / "list.csv")
    assert len(rows) == 4 + 4 + 10 + 20 and {r["set"] for r in rows} == set(adult_split.SETS)
