"""End-to-end throughput of ``mmcli predict`` against a naive inference loop.

Builds (once, cached in ``--workdir``) a folder of native-size radiographs by upscaling
real images from the shared data set to ``--size`` x ``--size``, a third each as 8-bit
PNG, 16-bit PNG and 16-bit DICOM (12 bits stored, uncompressed), plus a MultiMix
checkpoint with seeded random weights (speed does not depend on the weights). Then, in
the same run and alternating ``--repeats`` times:

* naive: the habits of research code: one image at a time, float32, decoding on the main
  thread, the network built as research code builds it (``nn.InstanceNorm2d``, decoder
  blocks that convolve a ``torch.cat``; same weights, same outputs), the saliency from a
  second encoder pass with a full ``backward()``, the mask resized back and written, the
  CSV written at the end. It uses mmcli's reader and mask writer, so their speed-ups
  are not counted in the ratio;
* mmcli: :func:`mmcli.predict.run_predict` with its defaults (on a CPU: one worker
  process per core running whole cases on one thread each, one encoder pass for the
  bridge, mmcli's model kernels).

* ceiling: no model at all: read, preprocess, bring a constant mask back to native size
  and write it, in one process per core. What the CPU side alone allows: no predict can
  be faster, whatever the device (the goal on a GPU is 80 % of it).

``--ablation`` adds the naive loop on mmcli's model code, mmcli with ``--workers 0`` and,
where ``--precision auto`` is not float32 on that device (``mixed`` where it has native
bf16), mmcli with ``--precision fp32``.
Both produce the same outputs (a mask PNG per image and a CSV). Reports images/second
for each and the ratio of medians; ``--json`` writes the figures.

    python benchmarks/predict_throughput.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from mmcli.config import PreprocessConfig
from mmcli.data.transforms import mask_to_native, preprocess
from mmcli.io.discover import discover_inputs
from mmcli.io.readers import read_radiograph
from mmcli.io.writers import write_mask_png
from mmcli.models import create_model, model_kwargs
from mmcli.models.blocks import Dropout, InstanceNorm, MaxPool2x2, Up, _conv_of_concat
from mmcli.predict import PredictConfig, run_predict
from mmcli.runtime import cpu_has_fast_bf16, resolve_device, resolve_precision
from mmcli.weights import Checkpoint, load_checkpoint, save_checkpoint


def _save_dicom(path: Path, pixels: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.175, 0.175]
    ds.PixelData = np.round(pixels * 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_inputs(data: Path, folder: Path, n: int, size: int) -> Path:
    """Upscale ``n`` real radiographs to ``size`` x ``size`` as 8-bit PNG, 16-bit PNG and DICOM."""
    marker = folder / f".done-{n}-{size}"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = sorted((data / "cls-in").glob("*.png"))[:n]
    if len(sources) < n:
        raise SystemExit(f"need {n} images in {data / 'cls-in'}, found {len(sources)}")
    for i, src in enumerate(sources):
        with Image.open(src) as img:
            big = img.convert("L").resize((size, size), Image.Resampling.BICUBIC)
        grey = np.asarray(big, dtype=np.float64) / 255.0
        kind = i % 3
        if kind == 0:
            big.save(folder / f"{src.stem}.png")
        elif kind == 1:
            Image.fromarray(np.round(grey * 65535).astype(np.uint16)).save(folder / f"{src.stem}_16.png")
        else:
            _save_dicom(folder / f"{src.stem}.dcm", grey)
    marker.touch()
    return folder


def make_weights(path: Path) -> Path:
    if not path.exists():
        torch.manual_seed(0)
        kwargs = model_kwargs("multimix")
        model = create_model("multimix", **kwargs)
        save_checkpoint(Checkpoint("multimix", kwargs, model.state_dict(), PreprocessConfig()), path)
    return path


def _concat_forward(self: Up, x: torch.Tensor, skip: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
    return self.conv(torch.cat([up, skip] + ([extra] if extra is not None else []), dim=1))


def _interpolate_forward(self: Up, x: torch.Tensor, skip: torch.Tensor,
                         extra: torch.Tensor | None = None) -> torch.Tensor:
    up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
    first, *rest = self.conv
    y = _conv_of_concat(first, [up, skip] + ([extra.to(up.dtype)] if extra is not None else []))
    for layer in rest:
        y = layer(y)
    return y


def torch_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with mmcli's ``Dropout`` layers replaced by ``nn.Dropout`` (PyTorch's own mask)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Dropout):
                setattr(module, child_name, torch.nn.Dropout(child.p).train(child.training))
    return model


def torch_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with PyTorch's ``nn.MaxPool2d``, ``F.interpolate`` upsampling and an
    out-of-place ``nn.LeakyReLU`` instead of mmcli's CPU kernels; the rest of mmcli's model
    code (summed decoder convolutions, group-norm instance norm, dropout) is kept."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MaxPool2x2):
                setattr(module, child_name, torch.nn.MaxPool2d(2))
            elif isinstance(child, torch.nn.LeakyReLU):
                child.inplace = False
        if isinstance(module, Up):
            module.forward = types.MethodType(_interpolate_forward, module)
    return model


def research_model(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights built as research code builds them: ``nn.InstanceNorm2d`` layers,
    ``nn.MaxPool2d``, ``nn.LeakyReLU`` that is not in place, ``nn.Dropout`` and decoder
    blocks that upsample with ``F.interpolate`` and convolve a ``torch.cat`` of their inputs."""
    for module in list(torch_kernels(torch_dropout(model)).modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, InstanceNorm):
                ref = torch.nn.InstanceNorm2d(child.num_channels, affine=True)
                ref.load_state_dict(child.state_dict())
                setattr(module, child_name, ref)
        if isinstance(module, Up):
            module.forward = types.MethodType(_concat_forward, module)
    return model


def naive_loop(inputs: Path, weights: Path, out: Path, *, research_model_: bool = True, device: str = "cpu") -> int:
    """Batch 1, float32, decode on the main thread, saliency from a second encoder pass."""
    ckpt = load_checkpoint(weights)
    model = ckpt.build_model()
    if research_model_:
        model = research_model(model)
    model = model.to(device)
    rows = []
    for f in discover_inputs([inputs]):
        rad = read_radiograph(f.path)
        x = preprocess(rad.pixels, ckpt.preprocess)[None].to(device)
        with torch.no_grad():
            feats = model.encode(x)
            logits = model.classify(feats.bottleneck)
        x_grad = x.clone().requires_grad_(True)  # the second pass, for the saliency
        model.zero_grad()
        model.classify(model.encode(x_grad).bottleneck).max(dim=1).values.sum().backward()
        saliency = x_grad.grad.abs()
        saliency = saliency / saliency.amax().clamp_min(1e-12)
        with torch.no_grad():
            bridge = model.bridge_input(x, saliency, size=feats.skips[-1].shape[-2:])
            seg = model.decode(feats, bridge)
        mask = mask_to_native(seg[0].cpu(), rad.height, rad.width).numpy()
        mask_path = out.parent / "naive_masks" / f"{f.case_id}.png"
        write_mask_png(mask_path, mask)
        p = float(torch.softmax(logits, dim=1)[0, -1])
        rows.append({"case_id": f.case_id, "p_pneumonia": p, "lung_fraction": float(mask.mean()),
                     "mask": str(mask_path)})
    pd.DataFrame(rows).to_csv(out, index=False)
    return len(rows)


def mmcli_run(inputs: Path, weights: Path, out: Path, batch_size: int | None, workers: int | None,
              device: str = "auto", precision: str = "auto") -> int:
    cfg = PredictConfig(inputs=(str(inputs),), out=out, weights=str(weights), overwrite=True,
                        batch_size=batch_size, workers=workers, device=device, precision=precision)
    summary = run_predict(cfg)
    if summary.failed:
        raise SystemExit(f"{summary.failed} cases failed in the mmcli run")
    return summary.ok


def _ceiling_case(path: str, out: str, pre: PreprocessConfig) -> None:
    rad = read_radiograph(Path(path))
    preprocess(rad.pixels, pre)
    logits = torch.full((1, pre.image_size, pre.image_size), -1.0)
    logits[:, pre.image_size // 4 : -pre.image_size // 4, pre.image_size // 8 : -pre.image_size // 8] = 1.0
    write_mask_png(Path(out), mask_to_native(logits, rad.height, rad.width).numpy())


def ceiling_loop(inputs: Path, out: Path) -> int:
    """The CPU side alone: read, preprocess, constant mask to native size and PNG, one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    from mmcli.runtime import usable_cores

    files = discover_inputs([inputs])
    masks = out.parent / "ceiling_masks"
    masks.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(usable_cores(), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        list(pool.map(_ceiling_case, [str(f.path) for f in files], [str(masks / f"{f.case_id}.png") for f in files],
                      [PreprocessConfig()] * len(files), chunksize=2))
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("bench-data"))
    parser.add_argument("--n", type=int, default=48, help="number of images")
    parser.add_argument("--size", type=int, default=2048, help="side of the upscaled images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="mmcli's --batch-size (default: its own)")
    parser.add_argument("--workers", type=int, default=None, help="mmcli's --workers (default: its own)")
    parser.add_argument("--ablation", action="store_true",
                        help="also time the naive loop on mmcli's model code and mmcli with --workers 0")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both sides run the model")
    args = parser.parse_args()

    inputs = make_inputs(args.data, args.workdir / f"scans-{args.size}", args.n, args.size)
    weights = make_weights(args.workdir / "bench-multimix.safetensors")
    auto_precision = resolve_precision("auto", resolve_device(args.device))
    runs = {
        "naive": lambda out: naive_loop(inputs, weights, out, device=args.device),
        "mmcli": lambda out: mmcli_run(inputs, weights, out, args.batch_size, args.workers, args.device),
        "ceiling": lambda out: ceiling_loop(inputs, out),
    }
    if args.ablation:
        runs["naive+model"] = lambda out: naive_loop(inputs, weights, out, research_model_=False, device=args.device)
        runs["mmcli-j0"] = lambda out: mmcli_run(inputs, weights, out, args.batch_size, 0, args.device)
        if auto_precision != "fp32":
            runs["mmcli-fp32"] = lambda out: mmcli_run(inputs, weights, out, args.batch_size, args.workers,
                                                       args.device, "fp32")
    times: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, run in runs.items():
                out = Path(tmp) / f"{name}-{r}.csv"
                start = time.perf_counter()
                n = run(out)
                times[name].append(time.perf_counter() - start)
                print(f"repeat {r} {name:9s} {n} images in {times[name][-1]:6.2f} s "
                      f"= {n / times[name][-1]:.2f} images/s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    naive, fast = medians["naive"], medians["mmcli"]
    result = {
        "images_per_s": {name: round(args.n / t, 3) for name, t in medians.items()},
        "images": args.n, "size": args.size, "repeats": args.repeats,
        "batch_size": args.batch_size, "workers": args.workers,
        "naive_images_per_s": round(args.n / naive, 3), "mmcli_images_per_s": round(args.n / fast, 3),
        "speedup": round(naive / fast, 2), "share_of_ceiling": round(medians["ceiling"] / fast, 3),
        "precision": auto_precision, "cpu_fast_bf16": cpu_has_fast_bf16(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "device": args.device, "times_s": times,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    print(f"naive {result['naive_images_per_s']} images/s, mmcli {result['mmcli_images_per_s']} images/s, "
          f"speedup x{result['speedup']}, {100 * result['share_of_ceiling']:.0f} % of the decode-only ceiling "
          f"({result['images_per_s']['ceiling']} images/s) (medians of {args.repeats})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
