"""What `mmcli predict` says about inputs that are not upright chest radiographs.

Builds the twelve kinds of non-radiograph a batch job meets (a constant grey image, an
all-black one, a 1x1 pixel, uniform noise, a gradient, a checkerboard, a page of printed
text, a colour photograph, two inverted films, a film rotated 90 degrees and one upside
down) from real films, runs `mmcli predict` on them with the default weights and prints,
for each, its status, label and quality-control flags.

    python benchmarks/qa_catch.py --films ../shared/data/native-jpeg
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(films: list[Path], folder: Path) -> dict[str, str]:
    """Write the inputs into ``folder``; returns {file stem: what it is}."""
    rng = np.random.default_rng(0)
    grey = [np.asarray(Image.open(f).convert("L")) for f in films[:2]]
    kinds: dict[str, tuple[str, Image.Image]] = {
        "constant": ("constant grey image", Image.fromarray(np.full((1024, 1024), 128, np.uint8))),
        "black": ("all-black image", Image.fromarray(np.zeros((1024, 1024), np.uint8))),
        "pixel": ("1 x 1 pixel", Image.fromarray(np.full((1, 1), 200, np.uint8))),
        "noise": ("uniform random noise", Image.fromarray(rng.integers(0, 256, (1024, 1024), dtype=np.uint8))),
        "gradient": ("horizontal gradient", Image.fromarray(np.tile(np.linspace(0, 255, 1024), (1024, 1))
                                                            .astype(np.uint8))),
        "checkerboard": ("checkerboard", Image.fromarray(((np.indices((1024, 1024)) // 64).sum(0) % 2 * 255)
                                                         .astype(np.uint8))),
    }
    page = Image.new("L", (850, 1100), 255)
    draw = ImageDraw.Draw(page)
    for i in range(40):
        draw.text((60, 40 + 25 * i), "Lorem ipsum dolor sit amet, consectetur adipiscing elit " * 2, fill=0)
    kinds["text"] = ("page of printed text", page)
    blobs = np.zeros((768, 1024, 3))
    yy, xx = np.mgrid[0:768, 0:1024]
    for _ in range(12):
        cy, cx, r = rng.uniform(0, 768), rng.uniform(0, 1024), rng.uniform(60, 250)
        blobs += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(0, 1, 3)
    kinds["photo"] = ("colour photograph", Image.fromarray((255 * blobs / blobs.max()).astype(np.uint8)))
    kinds["inverted1"] = ("inverted radiograph", Image.fromarray(255 - grey[0]))
    kinds["inverted2"] = ("inverted radiograph", Image.fromarray(255 - grey[1]))
    kinds["rotated90"] = ("radiograph rotated 90 degrees", Image.fromarray(np.ascontiguousarray(np.rot90(grey[0]))))
    kinds["upsidedown"] = ("radiograph upside down", Image.fromarray(np.ascontiguousarray(grey[1][::-1])))
    for name, (_, img) in kinds.items():
        img.save(folder / f"{name}.{'jpg' if name == 'photo' else 'png'}")
    return {name: what for name, (what, _) in kinds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--films", type=Path, default=ROOT / "examples" / "scans", help="folder of real films (JPEG)")
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()
    films = sorted(p for p in args.films.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "inputs"
        folder.mkdir()
        kinds = make_inputs(films, folder)
        cmd = [sys.executable, "-m", "mmcli", "predict", str(folder), "--out", str(Path(tmp) / "r.csv"), "-q"]
        if args.weights:
            cmd += ["--weights", args.weights]
        subprocess.run(cmd, check=False)
        with open(Path(tmp) / "r.csv", newline="") as f:
            rows = {r["case_id"]: r for r in csv.DictReader(f)}
    print("| input | status | label | qa_flags |\n|---|---|---|---|")
    caught = 0
    for name, what in kinds.items():
        row = rows[name]
        caught += bool(row["qa_flags"]) or row["status"] == "error"
        print(f"| {what} | {row['status']} | {row['label'] or '-'} | {row['qa_flags'] or row['error'] or '-'} |")
    print(f"\n{caught} of {len(kinds)} flagged or refused")


if __name__ == "__main__":
    main()
