"""Lung-mask post-processing of :mod:`mmcli.qa.mask` against reference masks.

For each (predicted masks folder, reference masks folder) pair, matched by file stem:
mean Dice before and after :func:`mmcli.qa.mask.anatomical_mask` with a 95 % bootstrap interval
(over images), the share of masks in more than two 8-connected pieces, and the share
:func:`mmcli.qa.mask_flags` calls implausible; then the lung-fraction range of the
reference masks behind ``LUNG_FRACTION_RANGE``, the largest-piece shares behind
``MAX_LARGEST_SHARE``, and the time of ``anatomical_mask`` at 2048 x 2048. Prints markdown.
``--flags-only`` folders (predictions without references) get only the flag rate.

    mmcli predict ../shared/data/seg-in --out /tmp/qa/seg-in.csv -j 2
    python benchmarks/qa_masks.py --pred /tmp/qa/seg-in/masks --ref ../shared/data/seg-in/masks
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from mmcli.qa import mask as qa_mask


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def pieces(m: np.ndarray) -> int:
    return ndi.label(m, structure=np.ones((3, 3), bool))[1]


def largest_share(m: np.ndarray) -> float:
    labels, n = ndi.label(m, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    return float(sizes.max() / sizes.sum()) if n else float("nan")


def boot(values: np.ndarray, n: int, rng: np.random.Generator) -> str:
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return f"{values.mean():.4f} [{lo:.4f}, {hi:.4f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pred", type=Path, nargs="+", required=True, help="predicted mask folders")
    ap.add_argument("--ref", type=Path, nargs="+", required=True, help="reference mask folders, same order")
    ap.add_argument("--flags-only", type=Path, nargs="*", default=[], help="predicted masks without references")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if len(args.pred) != len(args.ref):
        ap.error("give one --ref folder per --pred folder")
    rng = np.random.default_rng(args.seed)

    print("| set | n | Dice before | Dice after | change (min..max) | > 2 pieces before | after |"
          " implausible before | after |\n|---|---|---|---|---|---|---|---|---|")
    refs, raw_shares, sample = [], [], None
    for pred, ref in zip(args.pred, args.ref, strict=True):
        stems = sorted({p.stem for p in pred.glob("*.png")} & {p.stem for p in ref.glob("*.png")})
        before, after, pb, pa, fb, fa = [], [], [], [], [], []
        for stem in stems:
            p, r = load(pred / f"{stem}.png"), load(ref / f"{stem}.png")
            q = qa_mask.anatomical_mask(p)
            before.append(dice(p, r))
            after.append(dice(q, r))
            pb.append(pieces(p) > 2)
            pa.append(pieces(q) > 2)
            fb.append(bool(qa_mask.mask_flags(p)))
            fa.append(bool(qa_mask.mask_flags(q)))
            refs.append(r)
            raw_shares.append(largest_share(p))
            sample = p if sample is None else sample
        b, a = np.array(before), np.array(after)
        name = ref.parent.name if ref.name == "masks" else ref.name
        print(f"| {name} | {len(stems)} | {boot(b, args.bootstrap, rng)} | {boot(a, args.bootstrap, rng)} |"
              f" {np.mean(a - b):+.4f} ({np.min(a - b):+.4f}..{np.max(a - b):+.4f}) |"
              f" {100 * np.mean(pb):.1f} % | {100 * np.mean(pa):.1f} % |"
              f" {100 * np.mean(fb):.1f} % | {100 * np.mean(fa):.1f} % |")

    for folder in args.flags_only:
        masks = [qa_mask.anatomical_mask(load(p)) for p in sorted(folder.glob("*.png"))]
        print(f"| {folder} (no references) | {len(masks)} | | | | |"
              f" {100 * np.mean([pieces(m) > 2 for m in masks]):.1f} % |"
              f" | {100 * np.mean([bool(qa_mask.mask_flags(m)) for m in masks]):.1f} % |")

    fractions = np.array([r.mean() for r in refs])
    lo, hi = np.percentile(fractions, [0.5, 99.5])
    ref_shares = np.array([largest_share(r) for r in refs])
    print(f"\nreference lung fraction ({len(refs)} masks): min {fractions.min():.3f}, 0.5th pct {lo:.3f},"
          f" 99.5th pct {hi:.3f}, max {fractions.max():.3f}; widened by a quarter of the range:"
          f" ({lo - (hi - lo) / 4:.3f}, {hi + (hi - lo) / 4:.3f})")
    print(f"largest piece / mask: references max {np.nanmax(ref_shares):.3f},"
          f" raw predictions max {np.nanmax(raw_shares):.3f}")

    big = np.asarray(Image.fromarray(sample).resize((2048, 2048), Image.NEAREST)).copy()
    big[100:140, 1000:1040] = True  # a speck to drop
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        qa_mask.anatomical_mask(big)
        times.append(1000 * (time.perf_counter() - t0))
    t256 = []
    for _ in range(50):
        t0 = time.perf_counter()
        qa_mask.anatomical_mask(sample)
        t256.append(1000 * (time.perf_counter() - t0))
    print(f"anatomical_mask: 2048 x 2048 median {statistics.median(times):.1f} ms (min {min(times):.1f});"
          f" 256 x 256 median {statistics.median(t256):.2f} ms")


if __name__ == "__main__":
    main()
