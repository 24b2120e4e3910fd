#!/usr/bin/env bash
# Prepare, on this machine, what the GPU checks need on a bare device machine (which has
# python3 with CUDA PyTorch but no package index): wheels of the dependencies it lacks,
# and the source films of predict_throughput.py, downsized so that they travel (the
# benchmark upscales them to 2048 x 2048 there). Both land in ignored folders.
#
#   bash benchmarks/gpu_prepare.sh [SHARED_DATA]      # then run benchmarks/gpu_check.sh there
set -euo pipefail
data="${1:-../shared/data}"
n="${N:-96}"
mkdir -p bench-data/gpu-src/cls-in .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 \
  -d .whl pydicom==3.0.2 pylibjpeg==2.1.0 pylibjpeg-libjpeg==2.5.0 pylibjpeg-openjpeg==2.6.0 \
  highdicom==0.28.2 pyjpegls==1.5.1
python3 - "$data" "$n" <<'PY'
import sys
from pathlib import Path
from PIL import Image
src, n = Path(sys.argv[1]) / "cls-in", int(sys.argv[2])
files = sorted(src.glob("*.png"))[:n]
if len(files) < n:
    raise SystemExit(f"need {n} PNGs in {src}, found {len(files)}")
for f in files:
    img = Image.open(f)
    img.thumbnail((512, 512))
    img.save(Path("bench-data/gpu-src/cls-in") / f.name)
print(f"{len(files)} films in bench-data/gpu-src/cls-in")
PY
du -sh .whl bench-data/gpu-src
