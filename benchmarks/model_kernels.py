"""mmcli's CPU model kernels against PyTorch's own, in the same run.

One MultiMix forward (saliency bridge included) at ``--batch`` on one thread, as a CPU
predict worker runs it, with the default weights and random model-sized images:

* torch: the network with ``nn.MaxPool2d``, ``F.interpolate`` upsampling and an
  out-of-place ``nn.LeakyReLU`` (what mmcli ran before these kernels);
* mmcli: the shipped blocks (``MaxPool2x2``, ``upsample2x``, in-place LeakyReLU).

Each is timed in ``--procs`` processes at once (2 on a 2-core machine: the workers of a
predict run share the memory bus), alternating torch and mmcli ``--repeats`` times, with
glibc's default allocator settings and with :func:`mmcli.runtime.keep_freed_memory`. It
reports milliseconds per call (median over calls and processes), the ratio of each to
torch with default settings, and checks that the two give the same probabilities and
saliency and masks within 1e-5.

    python benchmarks/model_kernels.py --procs 2 --repeats 5 --json docs/results/model-kernels-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from mmcli.runtime import keep_freed_memory
from mmcli.weights import load_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_throughput import torch_kernels  # noqa: E402


def build(kind: str, weights: str) -> nn.Module:
    model = load_weights(weights).build_model().eval()
    return torch_kernels(model) if kind == "torch" else model


def child(kind: str, weights: str, batch: int, calls: int, keep: bool) -> None:
    """One timing process: prints one line of per-call milliseconds."""
    import time

    if keep:
        keep_freed_memory()
    torch.set_num_threads(1)
    model = build(kind, weights)
    x = torch.rand(batch, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(calls + 2):
            start = time.perf_counter()
            model(x)
            if i >= 2:  # the first calls grow the heap
                times.append((time.perf_counter() - start) * 1e3)
    print(" ".join(f"{t:.2f}" for t in times))


def timed(kind: str, args: argparse.Namespace, keep: bool) -> list[float]:
    cmd = [sys.executable, __file__, "--child", kind, "--weights", args.weights, "--batch", str(args.batch),
           "--calls", str(args.calls)] + (["--keep"] if keep else [])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(args.procs)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"timing process failed ({p.returncode})")
        out += [float(t) for t in stdout.split()]
    return out


def check(weights: str) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 256, 256)
    x[1, :, :64] = 0.0  # a blank band: ties in every pooling window
    with torch.no_grad():
        a, b = build("torch", weights)(x), build("mmcli", weights)(x)
    return {"probabilities": float((a.cls_logits.softmax(1) - b.cls_logits.softmax(1)).abs().max()),
            "saliency": float((a.saliency - b.saliency).abs().max()),
            "mask_logits": float((a.seg_logits - b.seg_logits).abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="multimix-cxr-v2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--calls", type=int, default=8, help="timed calls per process and repeat")
    p.add_argument("--procs", type=int, default=2, help="processes timed at once")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", choices=("torch", "mmcli"), help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.weights, args.batch, args.calls, args.keep)
        return
    diffs = check(args.weights)
    print("largest differences, mmcli against torch kernels:", diffs, flush=True)
    if diffs["probabilities"] or diffs["saliency"] or diffs["mask_logits"] > 1e-5:
        raise SystemExit("the kernels disagree")
    rows = [("torch", False), ("mmcli", False), ("torch", True), ("mmcli", True)]
    times: dict[str, list[float]] = {f"{k}{'+keep' if keep else ''}": [] for k, keep in rows}
    for rep in range(args.repeats):
        for kind, keep in rows:
            name = f"{kind}{'+keep' if keep else ''}"
            t = timed(kind, args, keep)
            times[name] += t
            print(f"repeat {rep} {name:11s} {statistics.median(t):7.1f} ms per call", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:11s} {v:7.1f} ms per call of {args.batch}, {med['torch'] / v:.2f}x torch kernels")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "ms_per_call": {k: round(v, 1) for k, v in med.items()},
            "speedup_vs_torch": {k: round(med["torch"] / v, 3) for k, v in med.items()},
            "batch": args.batch, "procs": args.procs, "calls": args.calls, "repeats": args.repeats,
            "weights": args.weights, "max_difference": diffs, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
