"""Fit and evaluate the image-level QA flags of :mod:`mmcli.qa.image` on real films.

Reads every film of the shared sets with :func:`mmcli.io.readers.read_radiograph`
(real films = negatives), fits the "upright film" logistic model of ``mmcli.qa.image`` (real films
against their inversions ``1 - x``, 90/270/180-degree turns, upside-down flips and
inverted turns) on the films
whose ``sha1("<set>/<file>")`` is not 0 mod 5, and evaluates on the rest. Prints, as
markdown: the thumbnail statistics behind the ``not_radiograph`` limits, the false-flag
rate of each flag on the real films of each set, the catch rate on held-out synthetic
inversions / rotations and on hand-made non-radiographs, and the time of one
``image_flags`` call at 2048 x 2048. Writes the fitted constants, ready to paste into
``mmcli/qa/image.py``, to ``--constants``. Evaluation uses the freshly fitted weights, or the
module's with ``--module-weights``.

    python benchmarks/qa_flags.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from mmcli.io.readers import read_radiograph
from mmcli.qa import flags as qa_flag
from mmcli.qa import image as qa_image

SETS = ("seg-in", "seg-cross", "cls-in", "cls-cross", "native-jpeg")
TURNS = {
    "rot90": lambda x: np.rot90(x, 1), "rot270": lambda x: np.rot90(x, -1),
    "rot180": lambda x: np.rot90(x, 2), "upside_down": lambda x: x[::-1],
}


def load(data: Path) -> list[dict]:
    films = []
    for name in SETS:
        files = sorted(p for p in (data / name).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        for path in files:
            pixels = read_radiograph(path).pixels
            t, x64 = qa_image.film_thumbnails(pixels)
            key = f"{name}/{path.name}"
            films.append({
                "set": name, "path": path, "pixels": pixels if name == "native-jpeg" else None,
                "stats": qa_image.radiograph_stats(t), "x64": x64,
                "held_out": int(hashlib.sha1(key.encode()).hexdigest(), 16) % 5 == 0,
            })
    return films


def fit_logistic(X: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float = 1e-3) -> tuple[float, ...]:
    """Weighted L2 logistic regression by Newton steps; returns (intercept, *coefs) on raw X."""
    mu, sd = X.mean(0), X.std(0) + 1e-9
    A = np.c_[np.ones(len(X)), (X - mu) / sd]
    beta = np.zeros(A.shape[1])
    reg = l2 * w.sum() * np.diag(np.r_[0.0, np.ones(A.shape[1] - 1)])
    for _ in range(100):
        p = 1 / (1 + np.exp(-A @ beta))
        step = np.linalg.solve((A * (w * p * (1 - p))[:, None]).T @ A + reg, A.T @ (w * (p - y)) + reg @ beta)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    coef = beta[1:] / sd
    return (float(beta[0] - coef @ mu), *map(float, coef))


def fit(films: list[dict]) -> tuple[float, ...]:
    """Upright real films (1) against the nine other corrections of each (0), classes weighed alike."""
    X, y, w = [], [], []
    others = len(qa_image._CORRECTIONS) - 1
    for f in films:
        if f["held_out"]:
            continue
        for k, (flags, turn) in enumerate(qa_image._CORRECTIONS):
            x = 1 - f["x64"] if qa_flag.INVERTED in flags else f["x64"]
            X.append(qa_image.upright_features(np.ascontiguousarray(turn(x))))
            y.append(float(k == 0))
            w.append(1.0 if k == 0 else 1 / others)
    return fit_logistic(np.array(X), np.array(y), np.array(w))


def handmade(films: list[dict], n: int = 2048, seed: int = 0) -> dict[str, tuple[np.ndarray, bool, str]]:
    """name -> (pixels, colour, flag expected) for the non-radiographs and the turned films."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    page = Image.new("L", (n, n), 255)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=n // 40)
    for i in range(34):
        line = f"{i:02d} Lorem ipsum dolor sit amet, consectetur adipiscing"
        draw.text((n // 12, n // 20 + i * (n // 36)), line, fill=0, font=font)
    blobs = ndi.zoom(ndi.gaussian_filter(rng.random((64, 64, 3)), (6, 6, 0)), (n / 64, n / 64, 1), order=1)
    blobs = (blobs - blobs.min()) / np.ptp(blobs)
    cases = {
        "constant grey": (np.full((n, n), 0.5, np.float32), False, qa_flag.NOT_RADIOGRAPH),
        "all black": (np.zeros((n, n), np.float32), False, qa_flag.NOT_RADIOGRAPH),
        "1x1": (np.full((1, 1), 0.5, np.float32), False, qa_flag.NOT_RADIOGRAPH),
        "uniform noise": (rng.random((n, n), dtype=np.float32), False, qa_flag.NOT_RADIOGRAPH),
        "uniform noise 256": (rng.random((256, 256), dtype=np.float32), False, qa_flag.NOT_RADIOGRAPH),
        "horizontal gradient": (np.tile(np.linspace(0, 1, n, dtype=np.float32), (n, 1)), False, qa_flag.NOT_RADIOGRAPH),
        "checkerboard": ((((yy // (n // 8)) + (xx // (n // 8))) % 2).astype(np.float32), False, qa_flag.NOT_RADIOGRAPH),
        "text page": (np.asarray(page, np.float32) / 255, False, qa_flag.NOT_RADIOGRAPH),
        "colour photo (colour=True)": ((blobs @ [0.299, 0.587, 0.114]).astype(np.float32), True,
                                       qa_flag.NOT_RADIOGRAPH),
    }
    native = [f for f in films if f["set"] == "native-jpeg"]
    native = [f for f in native if f["held_out"]] or native
    for f in native[:2]:
        cases[f"inverted {f['path'].name}"] = (1 - f["pixels"], False, qa_flag.INVERTED)
    cases[f"rot90 {native[0]['path'].name}"] = (np.rot90(native[0]["pixels"]).copy(), False, qa_flag.ROTATED)
    cases[f"upside down {native[-1]['path'].name}"] = (native[-1]["pixels"][::-1].copy(), False, qa_flag.ROTATED)
    return cases


def flags_of(pixels: np.ndarray, colour: bool = False) -> list[str]:
    return qa_image.image_flags(pixels, height=pixels.shape[0], width=pixels.shape[1], colour=colour)


def pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--constants", type=Path, default=Path("/tmp/qa/qa_constants.py"))
    ap.add_argument("--module-weights", action="store_true", help="evaluate the weights in mmcli/qa/image.py")
    args = ap.parse_args()

    films = load(args.data)
    upright = fit(films)
    lines = [", ".join(f"{v:.5g}" for v in upright[i:i + 8]) for i in range(0, len(upright), 8)]
    text = "UPRIGHT_WEIGHTS = (\n" + "".join(f"    {line},\n" for line in lines) + ")\n"
    args.constants.parent.mkdir(parents=True, exist_ok=True)
    args.constants.write_text(text)
    if not args.module_weights:
        qa_image.UPRIGHT_WEIGHTS = upright
    print(f"fitted on {sum(not f['held_out'] for f in films)} films, held out {sum(f['held_out'] for f in films)};"
          f" constants written to {args.constants};"
          f" evaluating {'module' if args.module_weights else 'fitted'} weights\n")

    print("| set | n | std min | lag1 min | entropy min | laplacian min..max |\n|---|---|---|---|---|---|")
    for name in SETS:
        st = [f["stats"] for f in films if f["set"] == name]
        print(f"| {name} | {len(st)} | {min(s['std'] for s in st):.3f} | {min(s['lag1'] for s in st):.3f} | "
              f"{min(s['entropy'] for s in st):.2f} | {min(s['laplacian'] for s in st):.3f}.."
              f"{max(s['laplacian'] for s in st):.3f} |")

    print("\nFalse flags on real films (all films; held-out films only in brackets)\n")
    print("| set | n | not_radiograph | inverted | rotated | any flag |\n|---|---|---|---|---|---|")
    for name in SETS:
        rows = [(f, flags_of(f["pixels"]) if f["pixels"] is not None else flags_of(read_radiograph(f["path"]).pixels))
                for f in films if f["set"] == name]
        cells = []
        tests = (lambda fl: qa_flag.NOT_RADIOGRAPH in fl, lambda fl: qa_flag.INVERTED in fl,
                 lambda fl: qa_flag.ROTATED in fl, bool)
        for test in tests:
            every = np.mean([test(fl) for _, fl in rows])
            held = [test(fl) for f, fl in rows if f["held_out"]]
            cells.append(f"{pct(every)} ({pct(np.mean(held)) if held else '-'})")
        print(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")

    held = [f for f in films if f["held_out"]]
    print(f"\nCatch rate on held-out synthetic films ({len(held)} films per kind, 64 x 64 thumbnails)\n")
    print("| kind | flagged exactly as expected | any flag |\n|---|---|---|")

    def judge(x64: np.ndarray) -> list[str]:  # image_flags on a thumbnail: same numbers, faster
        return flags_of(x64.astype(np.float32))
    kinds = {"inverted": (lambda x: 1 - x, [qa_flag.INVERTED])} | {k: (t, [qa_flag.ROTATED]) for k, t in TURNS.items()}
    kinds["inverted + rot90"] = (lambda x: 1 - np.rot90(x), [qa_flag.INVERTED, qa_flag.ROTATED])
    for kind, (make, want) in kinds.items():
        got = [judge(np.ascontiguousarray(make(f["x64"]))) for f in held]
        print(f"| {kind} | {pct(np.mean([g == want for g in got]))} | {pct(np.mean([bool(g) for g in got]))} |")

    print("\nHand-made inputs\n\n| input | expected | flags |\n|---|---|---|")
    for name, (pixels, colour, flag) in handmade(films).items():
        got = flags_of(pixels, colour)
        print(f"| {name} | {flag} | {', '.join(got) or '-'} {'ok' if flag in got else 'MISSED'} |")

    film = next(f for f in films if f["set"] == "native-jpeg")
    big = np.asarray(Image.fromarray(film["pixels"]).resize((2048, 2048), Image.BILINEAR), np.float32).clip(0, 1)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        flags_of(big)
        times.append(1000 * (time.perf_counter() - t0))
    print(f"\nimage_flags at 2048 x 2048 (a real film, flags {flags_of(big) or '-'}):"
          f" median {statistics.median(times):.1f} ms,"
          f" min {min(times):.1f} ms over {len(times)} calls")
    print("\n" + text)


if __name__ == "__main__":
    main()
