"""``torch.compile`` of the whole MultiMix forward, saliency gradient included, against eager.

The default weights, ``--batch`` random model-sized images, ``--threads`` threads (1 and
batch 2 is a CPU predict worker's setting). The input is given ``requires_grad`` before
the call, so that Dynamo (with ``torch._dynamo.config.trace_autograd_ops``) traces the
bridge in one graph: the script first counts the graph breaks with
``torch._dynamo.explain``, then times the first compiled call (the compiling), and then
eager and compiled calls alternating ``--repeats`` times, and checks that probabilities
and masks agree.

    python benchmarks/compile_probe.py --threads 1 --batch 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mmcli.weights import load_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="multimix-cxr-v1")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.trace_autograd_ops = True
    ckpt = load_weights(args.weights)
    model = ckpt.build_model().to(args.device).eval()
    size = ckpt.preprocess.image_size
    x = torch.randn(args.batch, 1, size, size, generator=torch.Generator().manual_seed(0)).to(args.device)

    def call(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = m(x.detach().requires_grad_(True))
        return torch.softmax(out.cls_logits.float(), 1), out.seg_logits.float()

    explained = torch._dynamo.explain(model)(x.detach().requires_grad_(True))
    breaks = [str(b.reason) for b in explained.break_reasons]
    print(f"graphs {explained.graph_count}, graph breaks {explained.graph_break_count}")
    for reason in breaks:
        print("  break:", reason.splitlines()[0][:160])
    torch._dynamo.reset()
    compiled = torch.compile(model)
    start = time.perf_counter()
    call(compiled)
    compile_s = time.perf_counter() - start
    print(f"first compiled call (compiling): {compile_s:.1f} s", flush=True)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    outs = {}
    for _ in range(args.repeats):
        for name, m in (("eager", model), ("compiled", compiled)):
            start = time.perf_counter()
            outs[name] = call(m)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    dp = float((outs["eager"][0] - outs["compiled"][0]).abs().max())
    masks = float(((outs["eager"][1] >= 0) != (outs["compiled"][1] >= 0)).float().mean())
    print(f"eager {med['eager']:.3f} s, compiled {med['compiled']:.3f} s per batch of {args.batch} "
          f"(eager/compiled {med['eager'] / med['compiled']:.2f}x); max |dp| {dp:.1e}, mask pixels differing "
          f"{100 * masks:.3f} %")
    result = {"weights": args.weights, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
              "device": args.device, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "graph_count": explained.graph_count, "graph_breaks": breaks, "compile_s": round(compile_s, 1),
              "median_s": {k: round(v, 4) for k, v in med.items()}, "max_dp": dp, "mask_pixels_differing": masks}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
