"""``mmcli explain`` end to end, and the Adebayo et al. (2018) model-randomisation sanity check."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import radiograph_like, rows_by_case, save_png8
from PIL import Image
from typer.testing import CliRunner

from mmcli import plots
from mmcli.cli import app
from mmcli.config import PreprocessConfig, ReadOptions
from mmcli.data.datasets import load_case
from mmcli.data.transforms import preprocess
from mmcli.explain import mass_inside, readable_saliency
from mmcli.inference import Predictor
from mmcli.io.discover import InputFile
from mmcli.models import create_model, model_kwargs
from mmcli.qa.mask import lung_mask
from mmcli.weights import Checkpoint, load_checkpoint, load_weights, save_checkpoint

runner = CliRunner()


def _run(args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_explain_end_to_end_and_resume(tmp_path, tiny_weights):
    scans = tmp_path / "scans"
    save_png8(scans / "a.png", 64, 64, seed=1)
    save_png8(scans / "sub" / "b.png", 90, 70, seed=2)
    (scans / "bad.png").write_text("not an image")
    out = tmp_path / "why"
    # float32, so that the lungs below are those of a plain float32 forward
    res = _run(["explain", scans, "--out", out, "-w", tiny_weights, "-b", "2", "-q", "--raw-masks",
                "--precision", "fp32"])
    assert res.exit_code == 1  # the bad file fails alone
    rows = rows_by_case(out / "explain.csv")
    assert rows["bad"]["status"] == "error" and "not an image" in rows["bad"]["error"]
    for case_id, (h, w) in {"a": (64, 64), "sub/b": (90, 70)}.items():
        row = rows[case_id]
        # synthetic images: quality control may call them doubtful, and then the label says so
        assert row["status"] == "ok" and row["label"] in ("normal", "pneumonia", "uncertain")
        assert (row["label"] == "uncertain") <= bool(row["qa_flags"])
        assert 0 <= float(row["saliency_in_lungs"]) <= 1 and 0 <= float(row["gradcam_in_lungs"]) <= 1
        for view in ("saliency", "gradcam"):
            with Image.open(out / row[f"{view}_png"]) as img:  # the film grown to 512 px, title and colour bar
                assert img.size == (round(w * 512 / max(h, w)) + 126, round(h * 512 / max(h, w)) + 72)
    # the HDF5 saliency is exactly the tensor the model's forward feeds its decoder
    ckpt = load_checkpoint(tiny_weights)
    model = ckpt.build_model().eval()
    case = load_case(InputFile(scans / "sub" / "b.png", "sub/b"), ckpt.preprocess, ReadOptions())
    with torch.no_grad():
        forward = model(case.image[None])
    with h5py.File(out / "maps.h5") as h5:  # flat, percent-encoded keys with the case id as an attribute
        saliency, cam = h5["saliency/sub%2Fb"][()], h5["gradcam/sub%2Fb"][()]
        assert set(h5["saliency"]) == set(h5["gradcam"]) == {"a", "sub%2Fb"}
        assert h5["saliency/sub%2Fb"].attrs["case_id"] == h5["gradcam/sub%2Fb"].attrs["case_id"] == "sub/b"
    assert saliency.shape == cam.shape == (64, 64) and saliency.dtype == np.float32
    np.testing.assert_allclose(saliency, forward.saliency[0, 0].numpy(), atol=1e-6)
    assert cam.max() == pytest.approx(1.0) and cam.min() >= 0
    lungs = forward.seg_logits[0, 0].numpy() >= 0
    assert float(rows["sub/b"]["saliency_in_lungs"]) == pytest.approx(mass_inside(saliency, lungs), abs=1e-5)
    assert not (out / ".partial").exists()

    before = (out / "saliency" / "a.png").stat().st_mtime_ns
    res = _run(["explain", scans, "--out", out, "-w", tiny_weights, "--raw-masks", "--precision", "fp32"])
    assert res.exit_code == 1 and "(2 resumed)" in res.output
    assert (out / "saliency" / "a.png").stat().st_mtime_ns == before
    with h5py.File(out / "maps.h5") as h5:  # resumed cases keep their maps
        np.testing.assert_array_equal(h5["saliency/sub%2Fb"][()], saliency)


def test_explain_a_file_beside_a_folder_of_its_name(tmp_path, tiny_weights):
    # a.png beside a/b.png: case ids "a" and "a/b", which nested HDF5 keys could not both hold
    save_png8(tmp_path / "s" / "a.png", 64, 64, seed=1)
    save_png8(tmp_path / "s" / "a" / "b.png", 64, 64, seed=2)
    out = tmp_path / "e"
    res = _run(["explain", tmp_path / "s", "--out", out, "-w", tiny_weights, "-j", "0", "-q"])
    assert res.exit_code == 0, res.output
    with h5py.File(out / "maps.h5") as h5:
        for view in ("saliency", "gradcam"):
            assert {k: d.attrs["case_id"] for k, d in h5[view].items()} == {"a": "a", "a%2Fb": "a/b"}
    res = _run(["explain", tmp_path / "s", "--out", out, "-w", tiny_weights, "-j", "0"])
    assert res.exit_code == 0 and "(2 resumed)" in res.output  # the maps of both are found again


def test_explain_usage_errors(tmp_path, tiny_weights):
    save_png8(tmp_path / "x.png", 64, 64)
    res = _run(["explain", tmp_path / "x.png", "--out", tmp_path / "r.csv", "-w", tiny_weights])
    assert res.exit_code == 2 and "folder" in res.output
    kwargs = model_kwargs("multimix_tiny", bridge=False)
    no_bridge = tmp_path / "nobridge.safetensors"
    save_checkpoint(Checkpoint("multimix_tiny", kwargs, create_model("multimix_tiny", **kwargs).state_dict(),
                               preprocess=PreprocessConfig(image_size=64)), no_bridge)
    res = _run(["explain", tmp_path / "x.png", "--out", tmp_path / "r", "-w", no_bridge])
    assert res.exit_code == 2 and "saliency bridge" in res.output


def _rank_correlations(a, b):
    """Spearman correlation of each pair of maps in (B, 1, S, S) batches."""
    def ranks(t):
        return np.argsort(np.argsort(t.ravel().numpy())).astype(float)

    return [np.corrcoef(ranks(a[i]), ranks(b[i]))[0, 1] for i in range(a.shape[0])]


def test_saliency_changes_when_weights_are_randomised(tiny_weights):
    """Adebayo et al. 2018: a map that survives randomising the model explains nothing about it."""
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    model = predictor.model
    x = torch.stack([preprocess(radiograph_like(64, 64, seed), predictor.preprocess) for seed in range(3)])
    trained = predictor.explain(x)
    again = predictor.explain(x)
    assert torch.equal(trained.saliency, again.saliency) and torch.equal(trained.gradcam, again.gradcam)

    torch.manual_seed(123)  # cascading randomisation: the classifier head first, then everything
    for module in model.classifier.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    head = predictor.explain(x)
    assert max(_rank_correlations(trained.saliency, head.saliency)) < 0.6
    assert max(_rank_correlations(trained.gradcam, head.gradcam)) < 0.9
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    everything = predictor.explain(x)
    assert max(_rank_correlations(trained.saliency, everything.saliency)) < 0.6


def test_mass_inside():
    heat = np.array([[1.0, 3.0], [0.0, 0.0]])
    mask = np.array([[True, False], [True, False]])
    assert mass_inside(heat, mask) == pytest.approx(0.25)
    assert np.isnan(mass_inside(np.zeros((2, 2)), mask))


ROOT = Path(__file__).parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples" / "scans").iterdir() if p.suffix in (".jpeg", ".dcm"))


def _capture_figures(monkeypatch):
    """Keep every figure mmcli.plots saves (and still save it)."""
    figures = []
    save = plots._save

    def keep(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_explain_picture_has_title_outline_and_colour_bar(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    image = np.full((200, 300), 0.5, np.float32)
    heat = np.zeros((200, 300), np.float32)
    heat[80:120, 130:170] = 1.0
    lungs = np.zeros((64, 64), bool)
    lungs[16:48, 8:28] = True  # the left lung: x 37.5..131 px, y 50..150 px on the film
    path = plots.explain_figure(tmp_path / "x.png", image, heat, lungs, title="a/b\np(pneumonia) = 0.700\nGrad-CAM "
                                "for pneumonia", scale_label="relative")
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    assert rgb.shape == (200 + 72, 300 + 126, 3)  # the film pixel for pixel, a title band and a colour-bar column
    film = rgb[64:264, 8:308]
    assert (film[100, 150] != film[100, 250]).any() and film[100, 250].tolist() == [128, 128, 128]  # map, bare film
    outline = (film == 255).all(axis=2)
    assert outline[100, 35:41].any() and outline[100, 128:134].any() and not outline[100, 60:110].any()
    bar = rgb[64:264, 308 + 12 + 3]
    assert bar[2, 0] > bar[2, 2] and bar[-3, 2] > bar[-3, 0]  # red at 1 on top, blue at 0 below
    fig = figures[-1]
    assert [t.get_text() for t in fig.texts] == ["a/b\np(pneumonia) = 0.700\nGrad-CAM for pneumonia"]
    assert fig.axes[1].get_ylabel() == "relative"


def test_explain_target_option(tmp_path, tiny_weights, monkeypatch):
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    x = torch.stack([preprocess(radiograph_like(64, 64, seed), predictor.preprocess) for seed in range(3)])
    normal, pneumonia, predicted = (predictor.explain(x, t).gradcam for t in (0, 1, None))
    assert not torch.allclose(normal, pneumonia)
    for k, c in enumerate(predictor.explain(x).probabilities.argmax(1).tolist()):
        assert torch.equal(predicted[k], (normal, pneumonia)[c][k])

    titles = []
    monkeypatch.setattr(plots, "explain_figure", lambda path, *a, title, **kw: titles.append(title) or path)
    save_png8(tmp_path / "s" / "a.png", 64, 64)
    for target in ("normal", "predicted"):
        res = _run(["explain", tmp_path / "s", "--out", tmp_path / target, "-w", tiny_weights, "-j", "0", "-q",
                    "--target", target])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / target / "run.json").read_text())["settings"]["target"] == target
    assert "Grad-CAM for normal" in titles[1]
    assert titles[3].endswith(("Grad-CAM for normal", "Grad-CAM for pneumonia"))
    assert all("a\np(pneumonia) = " in t for t in titles)
    res = _run(["explain", tmp_path / "s", "--out", tmp_path / "o", "-w", tiny_weights, "--target", "lungs"])
    assert res.exit_code == 2 and "--target must be one of pneumonia, normal, predicted" in res.output
    res = _run(["explain", tmp_path / "s", "--out", tmp_path / "normal", "-w", tiny_weights, "-j", "0",
                "--target", "pneumonia"])
    assert res.exit_code == 2 and "target 'normal' -> 'pneumonia'" in res.output  # a resume keeps its target


def test_gradcam_credits_nothing_to_the_padding(tiny_weights):
    """A film of one grey level has nothing to show: all that its features hold is the padding's doing."""
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    cam = predictor.explain(torch.zeros(2, 1, 64, 64), 1).gradcam
    assert cam.abs().max() == 0
    cam = predictor.explain(preprocess(radiograph_like(64, 64), predictor.preprocess)[None], 1).gradcam
    assert cam.max() == pytest.approx(1.0)


def _border_to_centre(maps):
    """Mean of each (B, 1, S, S) map in a strip of S/16 along the edges, over its mean in the central half."""
    size = maps.shape[-1]
    strip = torch.ones(size, size, dtype=torch.bool)
    strip[size // 16 : -size // 16, size // 16 : -size // 16] = False
    centre = torch.zeros(size, size, dtype=torch.bool)
    centre[size // 4 : -size // 4, size // 4 : -size // 4] = True
    return [float(m[0][strip].mean() / m[0][centre].mean()) for m in maps]


@pytest.mark.skipif(not (ROOT / "weights" / "multimix-cxr-v2.safetensors").is_file(), reason="no weights v2")
def test_maps_on_the_example_films(one_thread):
    """Measured on the shipped films with weights v2 (the figures are in the changelog)."""
    predictor = Predictor(load_weights("multimix-cxr-v2"), device="cpu", precision="fp32")
    x = torch.stack([load_case(InputFile(p, p.stem), predictor.preprocess, ReadOptions()).image for p in EXAMPLES])
    out = predictor.explain(x, 1)
    lungs = [lung_mask(m[0].numpy() >= 0, False) for m in out.mask_logits]
    # no bright bands along the edges for either class: before, the plain pneumonia map had strips 1.7 to 3.4
    # times the centre, and the map relative to the padded uniform image 5 to 49 times for normal
    assert max(_border_to_centre(out.gradcam)) < 0.7
    assert max(_border_to_centre(predictor.explain(x, 0).gradcam)) < 0.7
    # and the pneumonia map stays on the lungs (0.45 of its mass plain, 0.565 relative to the padded image)
    in_lungs = [mass_inside(c[0].numpy(), lung) for c, lung in zip(out.gradcam, lungs, strict=True)]
    assert np.mean(in_lungs) > 0.65
    raw = [mass_inside(s[0].numpy(), lung) for s, lung in zip(out.saliency, lungs, strict=True)]
    shown = [mass_inside(s[0].numpy(), lung) for s, lung in zip(readable_saliency(out.saliency), lungs, strict=True)]
    assert min(np.subtract(shown, raw)) > 0.1  # the readable map puts more of itself on the lungs


def test_readable_saliency_smooths_and_drops_the_floor():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 0.3, (1, 1, 64, 64)).astype(np.float32)
    raw[0, 0, 20:30, 20:30] += rng.uniform(0, 1, (10, 10))  # a region of large gradients in speckle
    shown = readable_saliency(torch.from_numpy(raw)).numpy()
    assert shown.shape == raw.shape and shown.min() == 0 and np.median(shown) == pytest.approx(0, abs=1e-4)
    region = np.zeros((64, 64), bool)
    region[18:32, 18:32] = True
    assert mass_inside(shown[0, 0], region) > 0.5 > 0.2 > mass_inside(raw[0, 0], region)

    def roughness(m):  # mean jump between neighbours over the mean value
        return float(np.abs(np.diff(m, axis=-1)).mean() / m.mean())

    assert roughness(shown[0, 0, 18:32, 18:32]) < roughness(raw[0, 0, 18:32, 18:32]) / 2


def test_dice_boxplot_title_fits_with_one_dataset(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    plots.dice_boxplot(tmp_path / "d.png", {"jsrt": np.array([0.9, 0.95, 0.97])})
    fig = figures[-1]
    renderer = fig.canvas.get_renderer()
    title = fig.axes[0].title
    assert title.get_text() == "Lung segmentation: Dice per case"
    box = title.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_reliability_diagram_counts_cases_per_bin(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.02, 0.04, 0.97, 0.98, 0.62, 0.45])  # top-class confidence 0.98, 0.96, .97, .98, .62, .55
    plots.reliability_plot(tmp_path / "r.png", {"set": (y, p)}, n_bins=10)
    counts = figures[-1].axes[1]
    assert sorted(b.get_height() for b in counts.patches) == [1, 1, 4]
    assert sorted(t.get_text() for t in counts.texts) == ["1", "1", "4"]
    assert counts.get_ylabel() == "cases per bin"
