"""Training data: folder scanning, budgets, stratification, splits, sampling, augmentations."""

import math

import numpy as np
import pytest
import torch
from conftest import make_dicom, radiograph_like, save_png8
from PIL import Image

from mmcli.config import CLASS_NAMES, PreprocessConfig
from mmcli.data.transforms import normalize, preprocess
from mmcli.errors import InputError
from mmcli.io.readers import read_radiograph
from mmcli.io.writers import read_mask_png
from mmcli.training.augment import STRONG_OPS, _gamma, _window, site_augment, strong_augment, weak_augment
from mmcli.training.config import SITE_OPS
from mmcli.training.datasets import (
    Sample,
    epoch_batches,
    load_table,
    make_splits,
    scan_folders,
    source_rates,
    stratified_pick,
)


def make_folders(root, n_seg=6, n_cls=8, size=(80, 72)):
    """seg/ with masks for all images, cls/ with alternating normal/pneumonia labels."""
    (root / "seg" / "masks").mkdir(parents=True)
    (root / "cls").mkdir(parents=True)
    for i in range(n_seg):
        img = radiograph_like(*size, seed=i)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / "seg" / f"s{i}.png")
        Image.fromarray(((img < 0.5) * 255).astype(np.uint8)).save(root / "seg" / "masks" / f"s{i}.png")
    rows = ["file,label"]
    for i in range(n_cls):
        img = radiograph_like(*size, seed=100 + i)
        if i % 2:
            img = np.clip(img + 0.3 * np.random.default_rng(i).random(img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / "cls" / f"c{i}.png")
        rows.append(f"c{i}.png,{'pneumonia' if i % 2 else 'normal'}")
    (root / "cls" / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "seg", root / "cls"


def test_scan_roles(tmp_path):
    seg, cls = make_folders(tmp_path, n_seg=3, n_cls=4)
    (seg / "masks" / "s2.png").unlink()
    samples = scan_folders([seg], [cls], CLASS_NAMES)
    assert len(samples) == 7
    by_name = {s.path.name: s for s in samples}
    assert by_name["s0.png"].mask is not None and by_name["s2.png"].mask is None
    assert by_name["s0.png"].label is None and by_name["c1.png"].label == 1 and by_name["c0.png"].label == 0
    # masks come from --seg-data folders only
    assert all(s.mask is None for s in scan_folders([], [seg], CLASS_NAMES))


def test_scan_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        scan_folders([tmp_path / "nope"], [], CLASS_NAMES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="Found 0 images"):
        scan_folders([tmp_path / "empty"], [], CLASS_NAMES)
    _, cls = make_folders(tmp_path / "x", n_seg=1, n_cls=2)
    (cls / "labels.csv").write_text("file,label\nc0.png,covid\n")
    with pytest.raises(InputError, match="covid"):
        scan_folders([], [cls], CLASS_NAMES)


def test_scan_is_recursive_with_keys_relative_to_the_folder(tmp_path):
    seg, cls = make_folders(tmp_path, n_seg=1, n_cls=1)
    (seg / "sub").mkdir()
    (seg / "s0.png").rename(seg / "sub" / "s0.png")  # masks/s0.png no longer names it
    (seg / "masks" / "sub").mkdir()
    (seg / "masks" / "s0.png").rename(seg / "masks" / "sub" / "s0.png")
    (cls / "a" / "b").mkdir(parents=True)
    (cls / "c0.png").rename(cls / "a" / "b" / "c0.png")
    (cls / "labels.csv").write_text("file,label,patient\na/b/c0,pneumonia,P1\n")  # matched without the suffix
    samples = scan_folders([seg], [cls], CLASS_NAMES)
    assert samples == [
        Sample((cls / "a" / "b" / "c0.png").resolve(), str(cls), label=1, patient=f"{cls}::P1"),
        Sample((seg / "sub" / "s0.png").resolve(), str(seg), mask=seg / "masks" / "sub" / "s0.png"),
    ]


def test_folder_in_both_roles_is_scanned_once(tmp_path):
    seg, _ = make_folders(tmp_path, n_seg=2, n_cls=0)
    (seg / "labels.csv").write_text("file,label\ns1.png,normal\n")
    samples = scan_folders([seg], [seg], CLASS_NAMES)
    assert [(s.path.name, s.mask is not None, s.label) for s in samples] == [("s0.png", True, None),
                                                                           ("s1.png", True, 0)]
    assert all(s.label is None for s in scan_folders([seg], [], CLASS_NAMES))  # labels from cls folders only


def test_stratified_pick_keeps_proportions():
    labels = [0] * 30 + [1] * 90
    picks = stratified_pick(labels, 20, np.random.default_rng(0))
    assert len(picks) == 20 and len(set(picks)) == 20
    assert sum(labels[i] == 0 for i in picks) == 5
    assert stratified_pick(labels, 20, np.random.default_rng(0)) == picks
    # largest remainder: 7 of 1:3 -> 1.75 / 5.25 -> 2 / 5
    assert sum(labels[i] == 0 for i in stratified_pick(labels, 7, np.random.default_rng(1))) == 2
    with pytest.raises(InputError):
        stratified_pick(labels, 121, np.random.default_rng(0))


def _samples(n_mask=20, n_norm=25, n_pneu=75):
    out = [Sample(path=f"m{i}", source="seg", mask=f"m{i}.png") for i in range(n_mask)]
    out += [Sample(path=f"n{i}", source="cls", label=0) for i in range(n_norm)]
    out += [Sample(path=f"p{i}", source="cls", label=1) for i in range(n_pneu)]
    return out


def test_splits_budgets_and_roles():
    samples = _samples()
    s = make_splits(samples, seg_labels=10, cls_labels=20, val_fraction=0.2, seed=3)
    assert len(s.val_seg) == 4 and len(s.val_cls) == 20
    assert sum(samples[i].label == 0 for i in s.val_cls) == 5  # stratified validation
    assert len(s.seg_labelled) == 10 and len(s.cls_labelled) == 20
    assert sum(samples[i].label == 0 for i in s.cls_labelled) == 5  # stratified budget
    val = set(s.val_seg) | set(s.val_cls)
    train = set(range(len(samples))) - val
    for pool in (s.seg_labelled, s.seg_unlabelled, s.cls_labelled, s.cls_unlabelled):
        assert not set(pool) & val
    assert set(s.seg_labelled) | set(s.seg_unlabelled) == train
    assert set(s.cls_labelled) | set(s.cls_unlabelled) == train and not set(s.cls_labelled) & set(s.cls_unlabelled)
    # classification images serve as unlabelled segmentation images and vice versa
    assert any(samples[i].label is not None for i in s.seg_unlabelled)
    assert any(samples[i].mask is not None for i in s.cls_unlabelled)
    assert make_splits(samples, seg_labels=10, cls_labels=20, val_fraction=0.2, seed=3) == s
    assert make_splits(samples, seg_labels=10, cls_labels=20, val_fraction=0.2, seed=4) != s
    full = make_splits(samples, seg_labels=None, cls_labels=None, val_fraction=0.2, seed=3)
    assert len(full.seg_labelled) == 16 and len(full.cls_labelled) == 80
    with pytest.raises(InputError, match="only 16"):
        make_splits(samples, seg_labels=17, cls_labels=None, val_fraction=0.2, seed=3)


def test_table_matches_preprocess(tmp_path):
    seg, cls = make_folders(tmp_path, n_seg=2, n_cls=2)
    (cls / "bad.png").write_bytes(b"not a png")
    samples = scan_folders([seg], [cls], CLASS_NAMES)
    table, failures = load_table(samples, 64)
    assert [samples[i].path.name for i, _ in failures] == ["bad.png"]
    pre = PreprocessConfig(image_size=64)
    i = next(k for k, s in enumerate(samples) if s.path.name == "s0.png")
    want = preprocess(read_radiograph(samples[i].path).pixels, pre)
    assert torch.equal(normalize(table.images[i], pre), want)
    assert table.has_mask[i] and set(table.masks[i].unique().tolist()) <= {0, 1} and table.masks[i].sum() > 0


def test_table_reads_masks_with_the_one_mask_reader(tmp_path):
    seg = tmp_path / "seg"
    save_png8(seg / "a.png", 64, 64)
    save_png8(seg / "b.png", 64, 64, seed=1)
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))  # 0, 4, ..., 252 across the image
    (seg / "masks").mkdir()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(seg / "masks" / "a.png")  # RGB: read as grey, lung > 127
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(seg / "masks" / "b.png")  # not the size of its image
    samples = scan_folders([seg], [], CLASS_NAMES)
    table, failures = load_table(samples, 64)
    assert failures == [(1, f"CaseError: {seg / 'masks' / 'b.png'}: the mask is 32x32 but its image is 64x64")]
    want = read_mask_png(seg / "masks" / "a.png")
    assert want[0].tolist() == [x > 127 for x in range(0, 256, 4)]
    assert torch.equal(table.masks[0, 0], torch.from_numpy(want).to(torch.uint8))
    assert table.has_mask.tolist() == [True, False]


def test_table_honours_voi_lut(tmp_path):
    raw = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))
    (tmp_path / "cls").mkdir()
    path = make_dicom(tmp_path / "cls" / "w.dcm", raw, WindowCenter=2048, WindowWidth=1024)
    samples = scan_folders([], [tmp_path / "cls"], CLASS_NAMES)
    for voi_lut in (False, True):
        table, failures = load_table(samples, 64, voi_lut=voi_lut)
        want = torch.from_numpy(read_radiograph(path, voi_lut=voi_lut).pixels)
        assert failures == [] and torch.equal(table.images[0, 0], want)
    assert not torch.equal(load_table(samples, 64)[0].images, table.images)


def test_epoch_batches_cycle_and_seed():
    got = epoch_batches([5, 6, 7], 3, 2, torch.Generator().manual_seed(0))
    assert got.shape == (3, 2) and sorted(got.flatten()[:3].tolist()) == [5, 6, 7]
    assert torch.equal(got, epoch_batches([5, 6, 7], 3, 2, torch.Generator().manual_seed(0)))


def test_weak_augment_moves_masks_with_images():
    x = torch.rand(4, 1, 32, 32)
    out, masks = weak_augment(x, torch.Generator().manual_seed(1), masks=x.clone(), hflip=True)
    assert out.shape == x.shape and torch.equal(out, masks)
    again, _ = weak_augment(x, torch.Generator().manual_seed(1), hflip=True)
    assert torch.equal(out, again)
    assert not torch.equal(out, x)


def test_weak_augment_without_flip_is_a_shift():
    x = torch.zeros(1, 1, 32, 32)
    x[..., 12:20, 5:9] = 1.0
    out, _ = weak_augment(x, torch.Generator().manual_seed(0))
    assert out.sum() == x.sum()  # the block moves by at most 4 pixels, none is mirrored away


@pytest.mark.parametrize("name", sorted(STRONG_OPS))
def test_each_strong_op(name):
    x = torch.rand(1, 1, 16, 16)
    op = STRONG_OPS[name]
    if name in {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}:
        theta = torch.tensor(op(0.0, 1.0))
        assert torch.equal(theta, torch.eye(3)[:2])  # magnitude 0: identity transform
        assert not torch.equal(torch.tensor(op(0.7, -1.0)), theta)
    else:
        y = op(x, 0.7, 1.0)
        assert y.shape == x.shape and torch.isfinite(y).all()
        if name == "identity":
            assert torch.equal(y, x)


def test_strong_augment_seeded_in_range_and_masks_follow():
    x = torch.rand(6, 1, 32, 32)
    a, ma = strong_augment(x, torch.Generator().manual_seed(2), masks=(x > 0.5).float())
    b, _ = strong_augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert set(ma.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a, x)


def test_patient_ids_from_meta_or_labels(tmp_path):
    seg, cls = make_folders(tmp_path, n_seg=2, n_cls=4)
    (seg / "meta.csv").write_text("file,jsrt_case\ns0.png,nodule\n")  # no patient column: ignored
    (cls / "meta.csv").write_text("file,label,Patient\nc0.png,normal,P1\nc1.png,pneumonia,P1\nc2.png,normal,\n")
    by_name = {s.path.name: s for s in scan_folders([seg], [cls], CLASS_NAMES)}
    assert by_name["s0.png"].patient is None and by_name["c2.png"].patient is None
    assert by_name["c0.png"].patient == by_name["c1.png"].patient == f"{cls}::P1"
    # labels.csv is read first when it names patients
    (cls / "labels.csv").write_text("file,label,patient_id\nc0.png,normal,A\nc1.png,pneumonia,B\n")
    by_name = {s.path.name: s for s in scan_folders([seg], [cls], CLASS_NAMES)}
    assert by_name["c0.png"].patient == f"{cls}::A" and by_name["c1.png"].patient == f"{cls}::B"
    (cls / "labels.csv").write_text("file,label,SUBJECT_ID\nc0.png,normal,10001\nc1.png,pneumonia,10001\n")
    by_name = {s.path.name: s for s in scan_folders([seg], [cls], CLASS_NAMES)}
    assert by_name["c0.png"].patient == by_name["c1.png"].patient == f"{cls}::10001"


def _patient_samples():
    """40 masked images of 40 patients; 30 normal patients with one image, 30 pneumonia with three."""
    out = [Sample(path=f"m{i}", source="seg", mask=f"m{i}.png", patient=f"seg::{i}") for i in range(40)]
    out += [Sample(path=f"n{i}", source="cls", label=0, patient=f"cls::n{i}") for i in range(30)]
    out += [Sample(path=f"p{i}-{k}", source="cls", label=1, patient=f"cls::p{i}") for i in range(30) for k in range(3)]
    return out


def test_split_is_patient_disjoint_and_stratified():
    samples = _patient_samples()
    for seed in range(5):
        s = make_splits(samples, seg_labels=None, cls_labels=None, val_fraction=0.2, seed=seed)
        val_patients = {samples[i].patient for i in s.val_seg + s.val_cls}
        train = set(s.cls_labelled) | set(s.cls_unlabelled)
        assert not {samples[i].patient for i in train} & val_patients
        assert len(s.val_seg) == 8
        # 6 of the 30 normal and 6 of the 30 pneumonia patients: 6 + 18 images
        assert sum(samples[i].label == 0 for i in s.val_cls) == 6
        assert sum(samples[i].label == 1 for i in s.val_cls) == 18
        # every film of a validation patient is in validation
        for p in {samples[i].patient for i in s.val_cls}:
            assert {i for i, x in enumerate(samples) if x.patient == p} <= set(s.val_cls)
    # one patient per image: the same split as before patients were known
    alone = [Sample(x.path, x.source, x.mask, x.label) for x in samples]
    s_alone = make_splits(alone, seg_labels=None, cls_labels=None, val_fraction=0.2, seed=0)
    assert len(s_alone.val_cls) == round(0.2 * 120)


def test_split_patient_in_both_tasks_leaves_training():
    # a patient with a masked film and a labelled film: when the masked film is drawn for
    # validation, the labelled film must not be trained on either
    samples = [Sample(path=f"m{i}", source="seg", mask=f"m{i}.png", patient=f"x::{i}") for i in range(10)]
    samples += [Sample(path=f"c{i}", source="cls", label=i % 2, patient=f"x::{i}") for i in range(10)]
    s = make_splits(samples, seg_labels=None, cls_labels=None, val_fraction=0.2, seed=1)
    val_patients = {samples[i].patient for i in s.val_seg + s.val_cls}
    train = set(s.seg_labelled) | set(s.seg_unlabelled)
    assert len(val_patients) == 4
    assert not {samples[i].patient for i in train} & val_patients
    assert len(train) == 20 - 2 * 4


def test_balanced_batches_draw_every_source_at_the_same_rate():
    pool = list(range(100))
    sources = ["big"] * 90 + ["small"] * 10
    got = epoch_batches(pool, 50, 4, torch.Generator().manual_seed(0), sources=sources)
    assert got.shape == (50, 4)
    assert ((got >= 90).sum(1) == 2).all()  # every batch: two of each source
    small = torch.bincount(got[got >= 90] - 90, minlength=10)
    assert (small == 10).all()  # shuffled passes over the small source: each image 10 times
    big = torch.bincount(got[got < 90], minlength=90)
    assert big.min() >= 1 and big.max() <= 2
    assert torch.equal(got, epoch_batches(pool, 50, 4, torch.Generator().manual_seed(0), sources=sources))
    one = epoch_batches(pool, 5, 4, torch.Generator().manual_seed(3), sources=["a"] * 100)
    assert torch.equal(one, epoch_batches(pool, 5, 4, torch.Generator().manual_seed(3)))
    assert source_rates(pool, sources, balanced=True) == {"big": 0.5, "small": 0.5}
    assert source_rates(pool, sources, balanced=False) == {"big": 0.9, "small": 0.1}


def test_site_augment_without_ops_is_the_identity_and_names_are_checked():
    x = torch.rand(3, 1, 16, 16)
    out, masks = site_augment(x, torch.Generator().manual_seed(0), (), masks=x)
    assert out is x and masks is x
    with pytest.raises(ValueError, match="unknown site augmentation"):
        site_augment(x, torch.Generator(), ("sharpen",))


def test_site_window_and_gamma_values():
    ramp = torch.linspace(0, 1, 101).view(1, 1, 1, 101)
    got = _window(ramp, 0.2, 0.5)  # 20 % clipped, half at each end
    want = ((ramp - 0.1) / 0.8).clamp(0, 1)
    assert torch.allclose(got, want, atol=1e-6) and got[..., :11].max() == 0 and got[..., 90:].min() > 1 - 1e-6
    assert torch.allclose(_gamma(ramp, math.log(2.0)), ramp**2, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SITE_OPS))
def test_each_site_op_hits_at_its_probability_and_keeps_the_range(name):
    n = 200  # at the model's 256 x 256, where blur and edge radii are defined
    x = torch.rand(n, 1, 256, 256, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    masks = (x > 0.5).float()
    out, m = site_augment(x, torch.Generator().manual_seed(5), (name,), masks=masks)
    changed = (out - x).flatten(1).abs().amax(1) > 1e-4
    p = SITE_OPS[name].p
    assert abs(int(changed.sum()) - n * p) < 4 * math.sqrt(n * p * (1 - p))
    assert out.min() >= 0 and out.max() <= 1
    mask_moved = (m != masks).flatten(1).any(1)
    if SITE_OPS[name].geometric:
        assert set(m.unique().tolist()) <= {0.0, 1.0} and not mask_moved[~changed].any()
    else:
        assert not mask_moved.any()


def test_site_geometry_moves_masks_with_images():
    x = torch.zeros(8, 1, 64, 64)
    x[..., 16:48, 10:30] = 1.0
    out, m = site_augment(x, torch.Generator().manual_seed(1), ("rotate", "scale"), masks=x.clone())
    moved = (m != x).flatten(1).any(1)
    assert moved.any()
    agree = ((out >= 0.5).float() == m).float().mean()
    assert agree > 0.99
    again, _ = site_augment(x, torch.Generator().manual_seed(1), ("rotate", "scale"))
    assert torch.equal(out, again)  # the same draws with or without masks


def test_an_image_with_two_labels_is_refused(tmp_path):
    _, cls = make_folders(tmp_path, n_seg=1, n_cls=3)
    (cls / "labels.csv").write_text("file,label\nc0.png,normal\nc1.png,pneumonia\nc0,pneumonia\nc1.png,pneumonia\n")
    with pytest.raises(InputError, match=r"labels.csv: 'c0' is labelled both 'normal' and 'pneumonia'"):
        scan_folders([], [cls], CLASS_NAMES)
    # the same label twice is harmless
    (cls / "labels.csv").write_text("file,label\nc0.png,normal\nc0,normal\n")
    assert {s.path.name: s.label for s in scan_folders([], [cls], CLASS_NAMES)}["c0.png"] == 0


def test_an_image_labelled_differently_by_two_folders_is_refused(tmp_path):
    _, cls = make_folders(tmp_path, n_seg=1, n_cls=2)
    (cls / "sub").mkdir()
    (cls / "c0.png").rename(cls / "sub" / "c0.png")
    (cls / "labels.csv").write_text("file,label\nsub/c0.png,normal\n")
    (cls / "sub" / "labels.csv").write_text("file,label\nc0.png,pneumonia\n")
    image = (cls / "sub" / "c0.png").resolve()
    with pytest.raises(InputError, match=rf"{image} is labelled 'normal' in .*cls/labels.csv and 'pneumonia' in "
                                         rf".*sub/labels.csv"):
        scan_folders([], [cls, cls / "sub"], CLASS_NAMES)
    (cls / "sub" / "labels.csv").write_text("file,label\nc0.png,normal\n")
    assert len(scan_folders([], [cls, cls / "sub"], CLASS_NAMES)) == 2


def test_cli_train_refuses_conflicting_labels(tmp_path):
    from typer.testing import CliRunner

    from mmcli.cli import app

    _, cls = make_folders(tmp_path, n_seg=1, n_cls=4)
    (cls / "labels.csv").write_text("file,label\nc0.png,normal\nc0.png,pneumonia\n")
    res = CliRunner().invoke(app, ["train", "--cls-data", str(cls), "--variant", "enc", "--arch", "tiny",
                                   "--image-size", "64", "--out", str(tmp_path / "run"), "-q"])
    assert res.exit_code == 2 and "'c0' is labelled both 'normal' and 'pneumonia'" in " ".join(res.output.split())
