"""The per-op site-augmentation study: paired differences and the verdict rule."""

import csv

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def ops():
    return load_benchmark("site_aug_ops")


def _cases(**rows):
    return {k: dict(v) for k, v in rows.items()}


def test_paired_dice_difference_is_exact_when_every_case_moves_alike(ops):
    base = _cases(a={"dice": "0.80"}, b={"dice": "0.90"}, c={"dice": ""})
    other = _cases(a={"dice": "0.85"}, b={"dice": "0.95"}, c={"dice": "0.5"}, d={"dice": "0.1"})
    d = ops.paired_difference(base, other, "dice", n_bootstrap=200)
    assert d["n"] == 2  # only cases both rows scored
    assert [d["value"], d["ci_low"], d["ci_high"]] == pytest.approx([0.05, 0.05, 0.05])


def test_paired_auc_and_accuracy_differences(ops):
    labels = ["normal", "normal", "pneumonia", "pneumonia"]
    base_p, other_p = [0.6, 0.4, 0.5, 0.3], [0.1, 0.2, 0.8, 0.9]
    base = {str(i): {"true_label": y, "p_pneumonia": str(p), "label": "pneumonia" if p >= 0.5 else "normal"}
            for i, (y, p) in enumerate(zip(labels, base_p, strict=True))}
    other = {str(i): {"true_label": y, "p_pneumonia": str(p), "label": "pneumonia" if p >= 0.5 else "normal"}
             for i, (y, p) in enumerate(zip(labels, other_p, strict=True))}
    auc = ops.paired_difference(base, other, "auc", n_bootstrap=200)
    assert auc["value"] == pytest.approx(1.0 - 0.25) and auc["n"] == 4
    acc = ops.paired_difference(base, other, "accuracy", n_bootstrap=200)
    assert acc["value"] == pytest.approx(1.0 - 0.5)  # base: 2 of 4 right
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]


def test_verdict_rule(ops):
    zero = {"value": 0.0, "ci_low": -0.1, "ci_high": 0.1}
    up = {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3}
    down = {"value": -0.2, "ci_low": -0.3, "ci_high": -0.1}
    assert ops.verdict({"a": zero, "b": zero}) == "no difference"
    assert ops.verdict({"a": up, "b": zero}) == "helps"
    assert ops.verdict({"a": up, "b": down}) == "hurts"


def test_compare_reads_each_rows_per_case_csv(ops, tmp_path):
    columns = ["dataset", "case_id", "status", "true_label", "label", "p_pneumonia", "dice"]
    for row, dice in (("none", ["0.90", "0.80"]), ("blur", ["0.91", "0.81"])):
        (tmp_path / row / "eval").mkdir(parents=True)
        with open(tmp_path / row / "eval" / "per_case.csv", "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            for i, d in enumerate(dice):
                w.writerow({"dataset": "seg-cross-test", "case_id": f"c{i}", "status": "ok", "dice": d})
            w.writerow({"dataset": "seg-cross-test", "case_id": "bad", "status": "error", "dice": "0.0"})
    results = ops.compare(tmp_path, [{"row": "none"}, {"row": "blur"}])
    covid = results[1]["vs_none"]["COVID-19 Dice"]
    assert covid["n"] == 2 and covid["value"] == pytest.approx(0.01) and covid["ci_low"] == pytest.approx(0.01)
    assert results[1]["verdict"] == "helps" and "vs_none" not in results[0]


def test_seed_control_is_the_yardstick(ops):
    up = {"value": 0.02, "ci_low": 0.01, "ci_high": 0.03}
    zero = {"value": 0.0, "ci_low": -0.1, "ci_high": 0.1}
    assert ops.verdict({"a": up, "b": zero}, control={"a": {"value": -0.03}, "b": {"value": 0.0}}) == "no difference"
    assert ops.verdict({"a": up, "b": zero}, control={"a": {"value": 0.01}, "b": {"value": 0.0}}) == "helps"


def test_uncertain_labels_count_by_probability_and_patients_resample_together(ops, tmp_path):
    folder = tmp_path / "cls-in-test"
    folder.mkdir()
    (folder / "meta.csv").write_text("file,label,patient\na.png,pneumonia,P1\nb.png,normal,P1\nc.png,normal,P2\n")
    patient_of = ops.patients(tmp_path, "cls-in-test")
    assert patient_of == {"a": "P1", "b": "P1", "c": "P2"}
    base = {"a": {"true_label": "pneumonia", "p_pneumonia": "0.4", "label": "normal"},
            "b": {"true_label": "normal", "p_pneumonia": "0.2", "label": "normal"},
            "c": {"true_label": "normal", "p_pneumonia": "0.1", "label": "normal"}}
    other = {k: dict(v) for k, v in base.items()}
    other["a"] = {"true_label": "pneumonia", "p_pneumonia": "0.7", "label": "uncertain"}  # right by its probability
    d = ops.paired_difference(base, other, "accuracy", patient_of, n_bootstrap=300)
    assert d["value"] == pytest.approx(1 / 3) and d["n"] == 3 and d["patients"] == 2 and d["level"] == 0.99
    # a draw holds P1's two films or none of them: the difference is 1/2 (P1 once), 1/3 (P1 and P2) or 0 (P2 only)
    assert d["ci_low"] == pytest.approx(0.0) and d["ci_high"] == pytest.approx(0.5)
