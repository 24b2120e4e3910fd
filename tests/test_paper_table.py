"""benchmarks/paper_table.py: the patient-disjoint held-out split and a tiny end-to-end table."""

import json

import numpy as np
import pytest
import torch
from conftest import load_benchmark, radiograph_like, read_rows
from PIL import Image


@pytest.fixture(scope="module")
def paper_table():
    return load_benchmark("paper_table")


def _save(path, seed, mask=False):
    img = radiograph_like(48, 48, seed=seed)
    Image.fromarray(((img < 0.5) * 255 if mask else img * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The shared-data layout: seg-in (masks), cls-in (labels, meta with patients), cross sets."""
    root = tmp_path_factory.mktemp("data")
    for name in ("seg-in", "seg-cross"):
        (root / name / "masks").mkdir(parents=True)
        for i in range(15):
            _save(root / name / f"{name}{i}.png", i)
            _save(root / name / "masks" / f"{name}{i}.png", i, mask=True)
    for name in ("cls-in", "cls-cross"):
        (root / name).mkdir()
        labels, meta = ["file,label"], ["file,label,patient"]
        for p in range(12):  # 12 patients: 4 normal with one film, 8 with pneumonia and two films
            label = "normal" if p < 4 else "pneumonia"
            for k in range(1 if p < 4 else 2):
                f = f"p{p}_{k}.png"
                _save(root / name / f, 100 + 10 * p + k)
                labels.append(f"{f},{label}")
                meta.append(f"{f},{label},P{p}")
        (root / name / "labels.csv").write_text("\n".join(labels) + "\n")
        (root / name / "meta.csv").write_text("\n".join(meta) + "\n")
    return root


def test_rows_and_groups(paper_table):
    names = [r["name"] for r in paper_table.table_rows()]
    assert len(names) == 15 and names[0] == "multimix-all-all" and len(set(names)) == 15
    assert {"unet-10-100", "multimix-50-all", "enc-ssl-10-100"} <= set(names)
    groups = paper_table._groups(paper_table.table_rows(), 8, "multimix-all-all")
    assert groups[0] == ["multimix-all-all"] and len(groups) == 8
    assert sorted(sum(groups, [])) == sorted(names)


def test_holdout_is_patient_disjoint(paper_table, data, tmp_path):
    folders = paper_table.split_holdout(data, tmp_path / "split", seed=0, fraction=0.25)
    rows = read_rows(tmp_path / "split" / "holdout.csv")
    parts = {}
    for r in rows:
        if r["patient"]:
            parts.setdefault(r["patient"], set()).add(r["part"])
    assert len(parts) == 12 and all(len(v) == 1 for v in parts.values())
    test_cls = sorted(p.name for p in folders["cls-in-test"].glob("*.png"))
    train_cls = sorted(p.name for p in folders["cls-in-train"].glob("*.png"))
    assert len(test_cls) + len(train_cls) == 20 and not set(test_cls) & set(train_cls)
    # 1 of 4 normal and 2 of 8 pneumonia patients (two films each) are held out
    labels = [r["label"] for r in read_rows(folders["cls-in-test"] / "labels.csv")]
    assert labels.count("normal") == 1 and labels.count("pneumonia") == 4
    assert len(list(folders["seg-in-test"].glob("*.png"))) == 4  # round(0.25 * 15)
    assert all((folders["seg-in-test"] / "masks" / p.name).is_file() for p in folders["seg-in-test"].glob("*.png"))
    # the training folders still name the patients, so training splits by patient too
    assert (folders["cls-in-train"] / "meta.csv").read_text().count("P") == len(train_cls)
    # a second call reuses the split
    assert paper_table.split_holdout(data, tmp_path / "split", seed=0, fraction=0.25) == folders


def test_tiny_table_end_to_end(paper_table, data, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "table"
    code = paper_table.main(["--data", str(data), "--out", str(out), "--budget", "0.01", "--arch", "tiny",
                             "--image-size", "64", "--steps-per-epoch", "1", "--workers", "0", "--bootstrap", "20",
                             "--test-fraction", "0.25", "--rows", "multimix-all-all"])
    assert code == 0
    result = json.loads((out / "runs" / "multimix-all-all" / "result.json").read_text())
    assert result["epochs_run"] == 1 and set(result["datasets"]) == {"seg-in-test", "seg-cross", "cls-in-test",
                                                                     "cls-cross"}
    assert result["datasets"]["cls-in-test"]["classification"]["n"] == 5
    table = (out / "table.md").read_text()
    assert table.count("| multimix-all-all | 1 |") == 2 and table.count("always pneumonia") == 2
    assert json.loads((out / "table.json").read_text())["rows"][0]["name"] == "multimix-all-all"


def test_missing_dataset_folder_fails_first(paper_table, tmp_path):
    (tmp_path / "seg-in").mkdir()
    with pytest.raises(SystemExit, match="cls-in, seg-cross, cls-cross"):
        paper_table.split_holdout(tmp_path, tmp_path / "split", seed=0, fraction=0.2)
    assert not (tmp_path / "split").exists()
