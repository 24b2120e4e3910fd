#!/usr/bin/env bash
# The GPU checks, as one command for a device machine: the GPU tests and the end-to-end
# throughput against the naive loop and the decode-only ceiling. Prepare first with
# benchmarks/gpu_prepare.sh, then run with .whl and bench-data/gpu-src carried:
#
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu-tests.log, throughput.json, throughput.log
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-gpu-check}"
mkdir -p "$out"
if ! python3 -c "import pydicom, highdicom, pylibjpeg" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())" >> "$out/gpu.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/predict_throughput.py --data bench-data/gpu-src --n "${N:-96}" --repeats "${REPEATS:-3}" \
  --device "${DEVICE:-cuda}" --ablation --json "$out/throughput.json" 2>&1 | tee "$out/throughput.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench" | tee -a "$out/gpu.txt"
exit $(( tests || bench ))
