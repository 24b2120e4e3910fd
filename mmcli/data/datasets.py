"""Datasets that read radiographs in DataLoader workers and never raise on a bad file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from mmcli.config import DEFAULT_MAX_PIXELS, PreprocessConfig
from mmcli.data.transforms import preprocess
from mmcli.errors import CaseError
from mmcli.io.discover import InputFile
from mmcli.io.readers import read_radiograph
from mmcli.qa.image import image_flags

logger = logging.getLogger(__name__)


class RadiographDataset(Dataset[dict[str, Any]]):
    """Read and preprocess one input per item.

    Each item is a dict with ``index``, ``image`` (``(1, S, S)`` float32 tensor, or
    ``None`` when the file failed), ``error`` (the reason, or ``None``) and ``meta``
    (native ``height``/``width``, ``pixel_spacing`` in mm or ``None``, ``format``).
    """

    def __init__(
        self, files: Sequence[InputFile], cfg: PreprocessConfig, *, voi_lut: bool = False, keep_pixels: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS, image_qa: bool = False,
    ) -> None:
        self.files = list(files)
        self.cfg = cfg
        self.voi_lut = voi_lut
        self.keep_pixels = keep_pixels
        self.max_pixels = max_pixels
        self.image_qa = image_qa

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_case(self.files[index], self.cfg, index=index, voi_lut=self.voi_lut, keep_pixels=self.keep_pixels,
                         max_pixels=self.max_pixels, image_qa=self.image_qa)


def load_case(
    file: InputFile, cfg: PreprocessConfig, *, index: int = 0, voi_lut: bool = False, keep_pixels: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS, image_qa: bool = False,
) -> dict[str, Any]:
    """Read and preprocess one file; a failure is returned as the item's ``error``, never raised.

    ``max_pixels`` is the reader's pixel budget, checked from the header before decoding.
    ``image_qa`` adds ``meta["image_flags"]``, :func:`mmcli.qa.image.image_flags` of the pixels read.

    Returns:
        ``{"index", "image": (1, S, S) tensor or None, "error": str or None, "meta": {...}}``,
        plus ``"pixels"``, the native ``(H, W)`` reader output, with ``keep_pixels``.
    """
    item: dict[str, Any] = {"index": index, "image": None, "error": None, "meta": {}}
    try:
        rad = read_radiograph(file.path, voi_lut=voi_lut, max_pixels=max_pixels)
        item["meta"] = {
            "height": rad.height,
            "width": rad.width,
            "pixel_spacing": rad.pixel_spacing,
            "format": rad.format,
        }
        if image_qa:
            item["meta"]["image_flags"] = image_flags(rad.pixels, height=rad.height, width=rad.width,
                                                      colour=rad.colour)
        item["image"] = preprocess(rad.pixels, cfg)
        if keep_pixels:
            item["pixels"] = rad.pixels
    except CaseError as err:
        item["error"] = err.reason
    except MemoryError:
        item["error"] = "out of memory while reading the image"
    except Exception as err:  # one bad file must never stop the batch
        logger.debug("unexpected error reading %s", file.path, exc_info=True)
        item["error"] = f"unexpected error while reading: {type(err).__name__}: {err}"
    return item


def collate_cases(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the images that were read; keep every item's metadata and error.

    Returns:
        ``{"images": (N, 1, S, S) tensor or None, "ok": [positions in items with an image],
        "items": items without their image tensors}``.
    """
    ok = [i for i, item in enumerate(items) if item["image"] is not None]
    images = torch.stack([items[i]["image"] for i in ok]) if ok else None
    stripped = [{k: v for k, v in item.items() if k != "image"} for item in items]
    return {"images": images, "ok": ok, "items": stripped}


def worker_init(_: int) -> None:
    """Keep each DataLoader worker on one thread: the main process owns the cores' BLAS."""
    torch.set_num_threads(1)
