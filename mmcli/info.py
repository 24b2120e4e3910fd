"""What this installation would run with: version, weights, torch, devices, precision, decoders.

:func:`gather_info` answers ``mmcli info``: a batch script asks it (``--json``) instead of
guessing, e.g. whether the default weights are present and which device ``auto`` picks.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

from mmcli import __version__
from mmcli.runtime import (
    cpu_has_fast_bf16,
    default_workers,
    has_fast_bf16,
    resolve_device,
    resolve_precision,
    usable_cores,
)
from mmcli.weights import read_registry

__all__ = ["DICOM_DECODERS", "gather_info"]

DICOM_DECODERS: dict[str, str] = {
    "JPEG baseline": "JPEGBaseline8BitDecoder",
    "JPEG extended (12-bit)": "JPEGExtended12BitDecoder",
    "JPEG lossless": "JPEGLosslessSV1Decoder",
    "JPEG-LS": "JPEGLSLosslessDecoder",
    "JPEG 2000": "JPEG2000Decoder",
    "JPEG 2000 lossless": "JPEG2000LosslessDecoder",
    "HTJ2K": "HTJ2KDecoder",
    "RLE lossless": "RLELosslessDecoder",
}
"""Compressed DICOM transfer syntaxes the reader may meet, and pydicom's decoder for each."""


def _weights() -> dict[str, Any]:
    found = read_registry()
    if found is None:
        return {"folder": None, "default": None, "registered": []}
    folder, registry = found
    entries = []
    for name, entry in sorted(registry.get("weights", {}).items()):
        path = folder / entry["file"]
        entries.append({
            "name": name, "file": str(path), "sha256": entry.get("sha256"), "present": path.is_file(),
            "default": name == registry.get("default"), "model": entry.get("model"), "use": entry.get("use"),
        })
    return {"folder": str(folder), "default": registry.get("default"), "registered": entries}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _devices() -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = [{"device": "cpu", "name": _cpu_name(),
                                      "cores": usable_cores(), "fast_bf16": cpu_has_fast_bf16()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"device": f"cuda:{i}", "name": props.name,
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "fast_bf16": has_fast_bf16(torch.device(f"cuda:{i}"))})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"device": "mps", "name": "Apple MPS"})
    return devices


def _decoders() -> dict[str, bool]:
    from pydicom.pixels import decoders

    return {name: bool(getattr(getattr(decoders, cls, None), "is_available", False))
            for name, cls in DICOM_DECODERS.items()}


def gather_info() -> dict[str, Any]:
    """Everything ``mmcli info`` reports, as plain JSON values."""
    auto = resolve_device("auto")
    return {
        "mmcli_version": __version__,
        "python": platform.python_version(),
        "platform": sys.platform,
        "torch": torch.__version__,
        "weights": _weights(),
        "devices": _devices(),
        "auto": {"device": str(auto), "precision": resolve_precision("auto", auto), "workers": default_workers(auto)},
        "dicom_decoders": _decoders(),
    }
