"""Images/second of one MultiMix training step (five streams) against a naive step.

Both steps train the same model from the same weights on the same batches (random
images in [0, 1] with blob masks; speed does not depend on the data), alternating
``--repeats`` times in one run:

* naive: the habits of research code: float32, each of the five streams through the whole
  network separately (decoder included where no loss uses it), the saliency for the
  bridge from a separate encoder pass with a full ``backward()`` (parameter gradients
  included, then ``zero_grad``), the weak view with a graph, ``gc.collect()`` (and
  ``torch.cuda.empty_cache()``) after every step; the network built as research code
  builds it (``nn.InstanceNorm2d``, ``nn.Dropout``, decoder blocks that convolve a ``torch.cat``;
  ``--ablation`` adds the naive step on mmcli's model code, and the mmcli step with
  ``nn.Dropout`` instead of mmcli's cheaper CPU dropout mask);
* mmcli: :func:`mmcli.training.step.train_step`: segmentation streams batched through the
  full model, classification streams through encoder and classifier only, the saliency
  from the same encoder pass, the weak view under ``no_grad``, precision from
  ``--precision auto`` (training's: bf16 autocast on CUDA GPUs from Ampere on, float32 elsewhere).

An image is one image of one stream: a step processes ``5 * batch`` images.

    python benchmarks/train_step.py --image-size 256 --batch-size 10 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mmcli.models import create_model
from mmcli.runtime import autocast, resolve_device, resolve_precision
from mmcli.training.config import VARIANTS
from mmcli.training.losses import (
    LossWeights,
    cross_entropy,
    foreground_kl_consistency,
    pseudo_label_loss,
    soft_dice_loss,
    total_loss,
)
from mmcli.training.step import StepBatch, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_throughput import research_model, torch_dropout  # noqa: E402


def make_batch(batch: int, size: int, seed: int) -> StepBatch:
    """Five streams of (batch, 1, size, size) normalised images, masks and labels."""
    g = torch.Generator().manual_seed(seed)

    def images() -> torch.Tensor:
        return torch.rand(batch, 1, size, size, generator=g) * 2 - 1

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    masks = ((xx.abs() - 0.45) ** 2 + yy**2 < 0.15).float().expand(batch, 1, size, size).contiguous()
    return StepBatch(seg_l=images(), seg_l_masks=masks, seg_u=images(), cls_l=images(),
                     cls_l_labels=torch.randint(0, 2, (batch,), generator=g), cls_weak=images(), cls_strong=images())


def _naive_forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Research-code forward: a separate saliency pass with a full backward, then the whole net."""
    x_grad = x.clone().requires_grad_(True)
    model.classify(model.encode(x_grad).bottleneck).max(dim=1).values.sum().backward()
    saliency = x_grad.grad.abs()
    saliency = saliency / saliency.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    model.zero_grad()
    feats = model.encode(x)
    logits = model.classify(feats.bottleneck)
    seg = model.decode(feats, model.bridge_input(x, saliency, size=feats.skips[-1].shape[-2:]))
    return logits, seg


def naive_step(model: torch.nn.Module, opt: torch.optim.Optimizer, b: StepBatch, w: LossWeights) -> None:
    _, seg_l = _naive_forward(model, b.seg_l)
    _, seg_u = _naive_forward(model, b.seg_u)
    cls_l, _ = _naive_forward(model, b.cls_l)
    weak, _ = _naive_forward(model, b.cls_weak)
    strong, _ = _naive_forward(model, b.cls_strong)
    terms = {"ce": cross_entropy(cls_l, b.cls_l_labels), "pseudo": pseudo_label_loss(weak, strong, w.threshold)[0],
             "dice": soft_dice_loss(seg_l, b.seg_l_masks), "consistency": foreground_kl_consistency(seg_l, seg_u)}
    opt.zero_grad()
    total_loss(terms, w).backward()
    opt.step()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mmcli_step(model: torch.nn.Module, opt: torch.optim.Optimizer, b: StepBatch, w: LossWeights, amp) -> None:
    loss, _ = train_step(model, b, VARIANTS["multimix"], w, amp)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _time(step, device: torch.device, steps: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=10, help="images per stream")
    p.add_argument("--arch", choices=["multimix", "multimix_tiny"], default="multimix")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ablation", action="store_true",
                   help="also time the naive step on mmcli's model code and mmcli with nn.Dropout")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device, training=True)
    w = LossWeights()
    batch = make_batch(args.batch_size, args.image_size, 0).to(device)
    torch.manual_seed(0)
    base = create_model(args.arch)
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def build(research: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = create_model(args.arch)
        model.load_state_dict(state)
        model = (research_model(model) if research else model).to(device).train()
        return model, torch.optim.Adam(model.parameters(), lr=1e-4)

    setups = {"naive": build(True), "mmcli": build(False)}
    runs = {
        "naive": lambda: naive_step(*setups["naive"], batch, w),
        "mmcli": lambda: mmcli_step(*setups["mmcli"], batch, w, autocast(device, precision)),
    }
    if args.ablation:
        setups["naive-mmcli-net"] = build(False)
        runs["naive-mmcli-net"] = lambda: naive_step(*setups["naive-mmcli-net"], batch, w)
        model, optimizer = build(False)
        setups["mmcli-nn-dropout"] = (torch_dropout(model), optimizer)
        runs["mmcli-nn-dropout"] = lambda: mmcli_step(*setups["mmcli-nn-dropout"], batch, w,
                                                      autocast(device, precision))
    for run in runs.values():  # warm-up: allocator, oneDNN/cuDNN kernel selection
        run()
    per_image: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            per_image[name].append(5 * args.batch_size / _time(run, device, args.steps))
    medians = {k: statistics.median(v) for k, v in per_image.items()}
    result = {
        "device": str(device), "precision": precision, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "image_size": args.image_size, "batch_per_stream": args.batch_size, "arch": args.arch,
        "images_per_second": per_image, "median_images_per_second": medians,
        "speedup": medians["mmcli"] / medians["naive"],
    }
    for name, value in medians.items():
        print(f"{name:>16}: {value:8.2f} images/s  ({', '.join(f'{v:.2f}' for v in per_image[name])})")
    print(f"{'speed-up':>16}: {result['speedup']:.2f}x  ({device}, {precision}, {torch.get_num_threads()} threads)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
