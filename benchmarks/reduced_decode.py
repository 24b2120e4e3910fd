"""Reduced-scale JPEG decoding (``read_radiograph(..., min_side=M)``) against full decoding.

The model sees ``S x S`` (the checkpoint's ``preprocess.image_size``); the lung mask is
written at the native size, which needs only the native height and width. Pillow can
decode a JPEG at 1/2, 1/4 or 1/8 scale in the DCT almost for free. For each ``min_side``
this measures, with the given weights (default: the shipped ones) on the CPU in float32,
per image against a full decode of the same file:

* ``|dp|``: the change of p(pneumonia), max and mean over images;
* mask agreement at the native size (:func:`mmcli.data.transforms.mask_to_native`): the
  share of native pixels whose mask value differs, and the Dice between the two masks;
* time of decode + preprocess on ``--threads`` torch threads (default 1, as each
  ``mmcli predict`` worker runs), median of ``--repeats`` per image, full and reduced
  alternating in the same run; the ratio reduced / full is the median over images.

For scale, two context rows move the full decode's model input in other ways: resized
with Pillow ``BILINEAR`` (how the training PNGs were made) instead of mmcli's torch
resize, and rounded to 8 bits after the resize (the training PNGs are 8-bit).

A setting meets the tolerances when every image stays within ``--tol-p`` (2e-3) in
probability and ``--tol-mask`` (0.1 %) in differing mask pixels. Prints markdown.

    python benchmarks/reduced_decode.py --images ../shared/data/native-jpeg
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmcli.data.transforms import mask_to_native, preprocess, resize_to_model
from mmcli.inference import Predictor
from mmcli.io.readers import read_radiograph
from mmcli.weights import load_weights


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def load(path: Path, cfg, min_side: int | None) -> tuple[torch.Tensor, int, int, int]:
    rad = read_radiograph(path, min_side=min_side)
    return preprocess(rad.pixels, cfg), rad.height, rad.width, rad.scale


def outputs(pred: Predictor, image: torch.Tensor, height: int, width: int, k: int) -> tuple[float, np.ndarray]:
    out = pred.predict(image[None])
    mask = mask_to_native(out.mask_logits[0], height, width).numpy()
    return float(out.probabilities[0, k]), mask


def pillow_resized(pixels: np.ndarray, cfg) -> torch.Tensor:
    small = Image.fromarray(pixels, mode="F").resize((cfg.image_size, cfg.image_size), Image.Resampling.BILINEAR)
    return preprocess(np.clip(np.asarray(small), 0.0, 1.0), cfg)


def rounded_8bit(pixels: np.ndarray, cfg) -> torch.Tensor:
    small = resize_to_model(torch.from_numpy(pixels), cfg.image_size).clamp(0.0, 1.0)
    return preprocess(torch.round(small * 255.0) / 255.0, cfg)


CONTEXT = {"full decode, Pillow resize": pillow_resized, "full decode, input rounded to 8 bits": rounded_8bit}


def timed(path: Path, cfg, min_side: int | None) -> float:
    t0 = time.perf_counter()
    load(path, cfg, min_side)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=Path("../shared/data/native-jpeg"), help="folder of JPEGs")
    ap.add_argument("--min-side", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--weights", default=None, help="checkpoint (default: the shipped weights)")
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats per image and setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    ap.add_argument("--tol-p", type=float, default=2e-3)
    ap.add_argument("--tol-mask", type=float, default=1e-3, help="share of native pixels")
    ap.add_argument("--per-image", action="store_true", help="also print one row per image and setting")
    args = ap.parse_args()

    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        ap.error(f"no .jpg/.jpeg files in {args.images}")
    torch.set_num_threads(args.threads)
    ckpt = load_weights(args.weights)
    cfg = ckpt.preprocess
    pred = Predictor(ckpt, device="cpu", precision="fp32")
    k = list(ckpt.class_names).index("pneumonia")
    settings: list[int | None] = [None, *args.min_side]

    rows: dict[int, list[dict]] = {m: [] for m in args.min_side}
    context: dict[str, list[dict]] = {name: [] for name in CONTEXT}
    for path in files:
        image, h, w, _ = load(path, cfg, None)
        p_full, m_full = outputs(pred, image, h, w, k)
        times: dict[int | None, list[float]] = {m: [] for m in settings}
        for _ in range(args.repeats):  # alternate, so drift moves every setting alike
            for m in settings:
                times[m].append(timed(path, cfg, m))
        t_full = statistics.median(times[None])
        pixels = read_radiograph(path).pixels
        for name, fn in CONTEXT.items():
            p, mask = outputs(pred, fn(pixels, cfg), h, w, k)
            context[name].append({"dp": abs(p - p_full), "diff": float((mask != m_full).mean()),
                                  "dice": dice(mask, m_full)})
        for m in args.min_side:
            image, h2, w2, scale = load(path, cfg, m)
            assert (h2, w2) == (h, w), "native size must not change"
            p, mask = outputs(pred, image, h, w, k)
            rows[m].append({
                "file": path.name, "size": f"{w}x{h}", "scale": scale, "p": p_full, "dp": abs(p - p_full),
                "diff": float((mask != m_full).mean()), "dice": dice(mask, m_full),
                "t": statistics.median(times[m]), "t_full": t_full,
            })

    print(f"{len(files)} JPEGs from {args.images}; weights {ckpt.path} ({ckpt.model_name}, "
          f"S = {cfg.image_size}); CPU fp32, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.processor() or platform.machine()}; timing: median of {args.repeats}\n")
    print("| min_side | scales used | max abs dp | mean abs dp | max mask px differing | mean | min Dice |"
          " mean Dice | decode+preprocess full ms | reduced ms | reduced / full | meets tol |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in args.min_side:
        r = rows[m]
        scales = sorted({x["scale"] for x in r})
        counts = ", ".join(f"1/{s}: {sum(x['scale'] == s for x in r)}" for s in scales)
        dp = np.array([x["dp"] for x in r])
        diff = np.array([x["diff"] for x in r])
        dc = np.array([x["dice"] for x in r])
        ratio = statistics.median(x["t"] / x["t_full"] for x in r)
        ok = dp.max() <= args.tol_p and diff.max() <= args.tol_mask
        print(f"| {m} | {counts} | {dp.max():.2e} | {dp.mean():.2e} | {100 * diff.max():.3f} % |"
              f" {100 * diff.mean():.3f} % | {dc.min():.5f} | {dc.mean():.5f} |"
              f" {1e3 * statistics.median(x['t_full'] for x in r):.1f} |"
              f" {1e3 * statistics.median(x['t'] for x in r):.1f} | {ratio:.2f} | {'yes' if ok else 'no'} |")
    for name, r in context.items():
        dp = np.array([x["dp"] for x in r])
        diff = np.array([x["diff"] for x in r])
        dc = np.array([x["dice"] for x in r])
        print(f"| context: {name} | 1/1: {len(r)} | {dp.max():.2e} | {dp.mean():.2e} |"
              f" {100 * diff.max():.3f} % | {100 * diff.mean():.3f} % | {dc.min():.5f} | {dc.mean():.5f} | | | | |")
    if args.per_image:
        print("\n| file | native WxH | p full | min_side | scale | abs dp | mask px differing | Dice |"
              " reduced / full time |")
        print("|---|---|---|---|---|---|---|---|---|")
        for m in args.min_side:
            for x in rows[m]:
                print(f"| {x['file']} | {x['size']} | {x['p']:.4f} | {m} | 1/{x['scale']} | {x['dp']:.2e} |"
                      f" {100 * x['diff']:.3f} % | {x['dice']:.5f} | {x['t'] / x['t_full']:.2f} |")


if __name__ == "__main__":
    main()
