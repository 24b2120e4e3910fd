"""benchmarks/brightness_shortcut.py: histogram matching that removes a brightness cue, and its probe folders."""

import csv

import numpy as np
import pytest
from conftest import load_benchmark, radiograph_like, read_rows
from PIL import Image


@pytest.fixture(scope="module")
def bs():
    return load_benchmark("brightness_shortcut")


def _film(seed: int, gain: float) -> np.ndarray:
    return np.clip(radiograph_like(64, 64, seed=seed) * 255 * gain, 0, 255).astype(np.uint8)


def test_match_maps_any_brightness_onto_the_reference_and_keeps_the_order_of_grey_levels(bs):
    ref = np.quantile(_film(0, 1.0), bs.QUANTILES)
    for gain in (0.6, 1.0, 1.3):
        film = _film(1, gain)
        matched = bs.match(film, ref)
        assert abs(float(matched.mean()) - float(_film(0, 1.0).mean())) < 3  # brightness now the reference's
        order = np.argsort(film.ravel(), kind="stable")
        assert np.all(np.diff(matched.ravel()[order].astype(int)) >= 0)  # a darker pixel never ends brighter
        levels = {}
        for a, b in zip(film.ravel(), matched.ravel(), strict=True):
            assert levels.setdefault(a, b) == b  # equal grey levels stay equal
    # a dark and a bright copy of one film match to the same image, up to rounding
    dark, bright = bs.match(_film(2, 0.7), ref).astype(int), bs.match(_film(2, 1.2), ref).astype(int)
    assert np.abs(dark - bright).mean() < 2.0


def _folder(path, films, labels, views=None):
    path.mkdir(parents=True)
    for name, film in films.items():
        Image.fromarray(film).save(path / name)
    with open(path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *labels.items()])
    with open(path / "meta.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "view"), *((n, (views or {}).get(n, "PA")) for n in films)])


def test_make_writes_matched_copies_that_brightness_no_longer_separates(bs, tmp_path):
    # normal films bright and smooth, pneumonia films dark and grainy: either cue alone separates them
    grain = np.random.default_rng(0).integers(-12, 13, (64, 64))
    films = {f"n{i}.png": _film(i, 1.25) for i in range(6)} | {
        f"p{i}.png": np.clip(_film(10 + i, 0.75).astype(int) + grain, 0, 255).astype(np.uint8) for i in range(6)}
    labels = {n: "normal" if n.startswith("n") else "pneumonia" for n in films}
    views = {n: "AP" if int(n[1]) % 2 else "PA" for n in films}
    for name in ("cls-adult-train", *bs.MATCHED):
        if name != "cls-jsrt-test":
            _folder(tmp_path / name, films, labels, views)
    for part, case in (("train", "JPCLN002"), ("test", "JPCNN001")):
        (tmp_path / f"seg-in-{part}").mkdir()
        Image.fromarray(_film(30, 1.0)).save(tmp_path / f"seg-in-{part}" / f"{case}.png")
    before = bs.brightness_auc(tmp_path / "cls-adult-test")
    assert before["auc"]["value"] == 1.0 and before["auc_AP"]["value"] == 1.0
    assert before["contrast_auc"]["value"] == 1.0
    made = bs.make(tmp_path)
    assert set(made) == {f"{n}{s}" for n in bs.MATCHED for s in ("-hm", "-hs")} | {"cls-jsrt-test",
                                                                                         "cls-jsrt-train"}
    after = bs.brightness_auc(tmp_path / "cls-adult-test-hm")
    assert after["n"] == 12 and abs(after["auc"]["value"] - 0.5) < 0.3
    assert abs(after["mean_grey"]["normal"] - after["mean_grey"]["pneumonia"]) < 2
    assert (tmp_path / "cls-adult-test-hm" / "labels.csv").read_text() == (
        tmp_path / "cls-adult-test" / "labels.csv").read_text()
    jsrt = read_rows(tmp_path / "cls-jsrt-test" / "labels.csv")
    assert jsrt == [{"file": "JPCNN001.png", "label": "normal"}]
    assert not list(tmp_path.glob("*.part"))
    # softened: brightness and local contrast both level
    soft = bs.brightness_auc(tmp_path / "cls-adult-test-hs")
    assert abs(soft["mean_grey"]["normal"] - soft["mean_grey"]["pneumonia"]) < 2
    assert soft["mean_contrast"]["pneumonia"] < 1.3 * soft["mean_contrast"]["normal"]
    assert after["mean_contrast"]["pneumonia"] > 1.5 * after["mean_contrast"]["normal"]  # matching alone kept it
    # the picture: one panel per set present (here the adult NIH training and test films), 3 x 2.8 in each
    bs.write_plot(tmp_path / "grey.png", tmp_path)
    with Image.open(tmp_path / "grey.png") as im:
        assert im.size == (720, 336)


def test_select_weights_scores_as_train_does_and_refuses_rows_with_other_validation_films(tmp_path):
    sw = load_benchmark("select_weights")
    per_case = tmp_path / "per_case.csv"
    rows = [("val-seg-in", "a", "ok", "", "0.9"), ("val-seg-adult", "b", "ok", "", "0.8"),
            ("val-cls-in", "c", "ok", "normal", ""), ("val-cls-in", "d", "ok", "pneumonia", ""),
            ("val-cls-adult-hm", "e", "ok", "normal", ""), ("val-cls-adult-hm", "f", "ok", "pneumonia", ""),
            ("val-cls-adult", "e", "ok", "normal", ""), ("val-cls-adult", "f", "ok", "pneumonia", ""),
            ("val-cls-in", "g", "error", "normal", "")]
    p = {"c": 0.1, "d": 0.9, "e": 0.7, "f": 0.6}  # matched: e (normal) above f (pneumonia)
    with open(per_case, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "case_id", "status", "true_label", "dice", "p_pneumonia"])
        w.writerows([d, c, s, t, dice, p.get(c, "")] for d, c, s, t, dice in rows)
    got = sw.score(per_case, sw.SCORED)
    # pooled AUC over c, d, e, f: pairs (normal, pneumonia) ranked right: c<d, c<f, e<d; e>f wrong -> 3/4
    assert got == {"dice": pytest.approx(0.85), "auc": 0.75, "score": pytest.approx(0.8), "n_masks": 2,
                   "n_labels": 4}
    splits = tmp_path / "splits.csv"
    splits.write_text("file,source,split\n/x/a-hm/f1.png,a,val\n/x/a/f2.png,a,train\n")
    assert sw._split_of(splits) == [("f1.png", "val"), ("f2.png", "train")]
