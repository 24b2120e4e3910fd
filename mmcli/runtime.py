"""Where and how torch runs: one policy for device, precision, autocast, cores and batches.

Every command that runs the model (predict, explain, evaluate, train) resolves its
``--device`` and ``--precision`` here, so one host gives one answer whatever the command.

Precision policy:

* ``fp32`` means float32 everywhere, TF32 included: on CUDA, cuDNN convolutions and
  matmuls are kept off TF32 (its 10-bit mantissa moves probabilities in the third
  decimal against the CPU).
* ``mixed`` keeps everything the probabilities and the saliency bridge come from (the
  encoder, the classifier, the saliency gradient) in float32, TF32 off as in ``fp32``,
  and runs only the segmentation decoder, over half of the network's arithmetic, under
  bf16 autocast. Probabilities and saliency are bit for bit those of ``fp32`` on the
  same device; masks differ from ``fp32`` in a few boundary pixels (the tests hold them
  under 0.1 % of the pixels).
* ``bf16`` runs the whole model under bf16 autocast; outputs stay float32. On a CPU it
  moves the bridge's saliency by up to a quarter of its range, and the masks with it.
* ``auto`` is ``mixed`` where the device computes in bf16 natively (CUDA GPUs from
  Ampere on, CPUs with AMX or AVX-512 bf16 instructions) and ``fp32`` everywhere else:
  on other CPUs bf16 is emulated and many times slower. Probabilities and saliency are
  then float32's whichever CPU a job lands on.

Training takes ``auto|fp32|bf16``; its ``auto`` is ``bf16`` on those CUDA GPUs (Ampere
on) and ``fp32`` elsewhere. Its temperature is fitted on float32 logits, as ``mixed`` and
``fp32`` give them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from typing import Literal

import torch

from mmcli.config import PRECISIONS, TRAIN_PRECISIONS, Precision
from mmcli.errors import UsageError

__all__ = [
    "PRECISIONS", "Precision", "apply_precision_policy", "autocast", "cpu_has_fast_bf16", "decoder_dtype",
    "default_batch_size", "default_workers", "has_fast_bf16", "keep_freed_memory", "resolve_device",
    "resolve_precision", "usable_cores",
]


def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda[:N]|mps`` into an available :class:`torch.device`.

    ``auto`` takes CUDA, then Apple MPS, then the CPU.

    Raises:
        UsageError: the device is unknown or not available here.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"Device {device!r} asked for, but CUDA is not available here: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"Device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"Device {device!r} asked for, but MPS is not available here: use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"Unsupported device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix units (AMX) or AVX-512 bf16 instructions."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def has_fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA GPUs from Ampere on (and ROCm),
    CPUs with AMX or AVX-512 bf16 (:func:`cpu_has_fast_bf16`); not where it is emulated."""
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8
    return device.type == "cpu" and cpu_has_fast_bf16()


def resolve_precision(precision: str, device: torch.device, *, training: bool = False,
                      ) -> Literal["fp32", "mixed", "bf16"]:
    """Turn ``--precision`` into ``fp32``, ``mixed`` or ``bf16`` (see the module docstring).

    Raises:
        UsageError: the precision is unknown, or ``mixed`` asked for in training.
    """
    allowed = TRAIN_PRECISIONS if training else PRECISIONS
    if training and precision == "mixed":
        raise UsageError(f"--precision mixed is for predict, explain and evaluate; training takes "
                         f"{', '.join(allowed)}")
    if precision not in allowed:
        raise UsageError(f"Unknown precision {precision!r}: use {', '.join(allowed)}")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    if training:
        return "bf16" if device.type == "cuda" and has_fast_bf16(device) else "fp32"
    return "mixed" if has_fast_bf16(device) else "fp32"


def apply_precision_policy(device: torch.device, precision: str) -> None:
    """Make the float32 of ``fp32`` and ``mixed`` mean float32 on CUDA (no TF32 convolutions or
    matmuls): ``mixed``'s encoder, classifier and saliency are float32's."""
    if device.type == "cuda" and precision in ("fp32", "mixed"):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast when ``precision == "bf16"``, else nothing (``mixed`` is the model's own
    business: pass :func:`decoder_dtype` to its forward)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decoder_dtype(precision: str) -> torch.dtype | None:
    """What ``MultiMix.forward(decoder_dtype=...)`` takes at this precision: bf16 for ``mixed``."""
    return torch.bfloat16 if precision == "mixed" else None


# glibc's mallopt parameters (malloc.h) and the values set by keep_freed_memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit hosts
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Let this process keep the memory it frees for its next allocations (glibc only).

    Every model call and every image allocates the same large buffers again. With glibc's
    defaults, blocks of a few MiB and up are handed back to the kernel when freed, and the
    next batch pays a page fault and a zeroing for every 4 KiB of them: about 9,000 faults
    and a tenth of the time of a batch-2 model call on a CPU. Raising the mmap threshold to
    32 MiB and the trim threshold to 1 GiB keeps them in the heap; the process then holds on
    to its peak memory until it ends, which a batch job does anyway. Forked workers inherit
    the setting. Returns whether it took (False on other C libraries, where nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: torch.device) -> int:
    """One worker process per usable core on a CPU; up to 8 decoders beside a GPU."""
    cores = usable_cores()
    return cores if device.type == "cpu" else min(8, cores)


def default_batch_size(device: torch.device, *, in_processes: bool) -> int:
    """Images per model call.

    A CPU worker process runs small batches on one thread (2 measured best); the model in
    the main process on a CPU takes 4; a GPU wants big batches (16).
    """
    if in_processes:
        return 2
    return 4 if device.type == "cpu" else 16
