"""PNG decoding: Pillow (what mmcli uses) against OpenCV, on native-size radiographs.

Writes (once, into ``--workdir``) ``--n`` real radiographs from the shared data upscaled
to ``--size`` x ``--size``, as 8-bit and as 16-bit greyscale PNG (zlib level 6, the
Pillow and OpenCV default), then decodes every file with each decoder, alternating
``--repeats`` times on one thread, and checks that both give the same pixels:

* pillow: ``np.asarray(Image.open(path))``;
* opencv: ``cv2.imread(path, cv2.IMREAD_UNCHANGED)`` (``pip install opencv-python-headless``);
* mmcli: :func:`mmcli.io.readers.read_radiograph` (Pillow, plus header checks, the pixel
  budget and conversion to float32 in [0, 1]).

    python benchmarks/png_decode.py --data ../shared/data --n 12 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmcli.io.readers import read_radiograph


def make_pngs(data: Path, folder: Path, n: int, size: int) -> dict[str, list[Path]]:
    sources = sorted((data / "cls-in").glob("*.png"))[:n]
    out: dict[str, list[Path]] = {"8-bit": [], "16-bit": []}
    folder.mkdir(parents=True, exist_ok=True)
    for src in sources:
        big = Image.open(src).convert("L").resize((size, size), Image.Resampling.BICUBIC)
        p8 = folder / f"{src.stem}-8.png"
        p16 = folder / f"{src.stem}-16.png"
        if not p8.is_file():
            big.save(p8)
        if not p16.is_file():
            wide = np.asarray(big, dtype=np.uint16) * 257 + np.random.default_rng(0).integers(0, 16, (size, size),
                                                                                              dtype=np.uint16)
            Image.fromarray(wide).save(p16)
        out["8-bit"].append(p8)
        out["16-bit"].append(p16)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--workdir", type=Path, default=Path("bench-data") / "png-decode")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        import cv2
    except ImportError:
        sys.exit("this benchmark needs OpenCV: pip install opencv-python-headless")
    cv2.setNumThreads(1)
    files = make_pngs(args.data, args.workdir / str(args.size), args.n, args.size)
    decoders = {
        "pillow": lambda f: np.asarray(Image.open(f)),
        "opencv": lambda f: cv2.imread(str(f), cv2.IMREAD_UNCHANGED),
        "mmcli": lambda f: read_radiograph(f).pixels,
    }
    for paths in files.values():  # the same pixels from both libraries
        for f in paths:
            a, b = decoders["pillow"](f), decoders["opencv"](f)
            if a.dtype != b.dtype or not np.array_equal(a, b):
                sys.exit(f"{f}: Pillow and OpenCV decode different pixels")
    times: dict[str, dict[str, list[float]]] = {k: {d: [] for d in decoders} for k in files}
    for _ in range(args.repeats):
        for kind, paths in files.items():
            for name, decode in decoders.items():
                start = time.perf_counter()
                for f in paths:
                    decode(f)
                times[kind][name].append((time.perf_counter() - start) / len(paths))
    result: dict[str, object] = {"n": args.n, "size": args.size, "repeats": args.repeats,
                                 "cpu": platform.processor() or platform.machine(),
                                 "pillow": Image.__version__, "opencv": cv2.__version__, "ms_per_image": {}}
    for kind in files:
        med = {name: statistics.median(t) * 1000 for name, t in times[kind].items()}
        result["ms_per_image"][kind] = {k: round(v, 2) for k, v in med.items()}  # type: ignore[index]
        print(f"{kind:6s}  " + "  ".join(f"{k} {v:6.1f} ms" for k, v in med.items())
              + f"  opencv/pillow time {med['opencv'] / med['pillow']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
