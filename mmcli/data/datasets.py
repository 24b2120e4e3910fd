"""Datasets that read radiographs in DataLoader workers and never raise on a bad file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from mmcli.config import PreprocessConfig, ReadOptions
from mmcli.data.transforms import preprocess
from mmcli.errors import CaseError
from mmcli.io.discover import InputFile
from mmcli.io.image import ImageFacts
from mmcli.io.readers import read_radiograph
from mmcli.qa.image import image_flags

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Case:
    """One input as read: what travels from the reader to the task that finishes it.

    Attributes:
        index: its position in the run's input list.
        image: the model's input, ``(1, S, S)`` float32, or None when reading failed (or dropped
            once batched, see :func:`collate_cases`).
        error: why reading failed, or None.
        facts: native size, spacing, format and image flags (None when reading failed).
        pixels: the native ``(H, W)`` reader output, where :attr:`ReadOptions.keep_pixels` asked for it.
    """

    index: int
    image: torch.Tensor | None = None
    error: str | None = None
    facts: ImageFacts | None = None
    pixels: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, eq=False)
class CaseBatch:
    """Cases read together: the images of those that were read, stacked, and every case without its image.

    Attributes:
        images: ``(N, 1, S, S)``, or None when no case of the batch was read.
        ok: for each stacked image, its position in ``cases``.
        cases: every case of the batch, in order, with ``image`` None.
    """

    images: torch.Tensor | None
    ok: list[int]
    cases: list[Case]

    def pin_memory(self) -> CaseBatch:
        """The batch with its images in pinned memory (the DataLoader calls it with ``pin_memory``), so that
        copies to a GPU overlap with its work."""
        return replace(self, images=None if self.images is None else self.images.pin_memory())


class RadiographDataset(Dataset[Case]):
    """Read and preprocess one input per item (a :class:`Case`), never raising on a bad file."""

    def __init__(self, files: Sequence[InputFile], cfg: PreprocessConfig, read: ReadOptions) -> None:
        self.files = list(files)
        self.cfg = cfg
        self.read = read

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Case:
        return load_case(self.files[index], self.cfg, self.read, index=index)


def load_case(file: InputFile, cfg: PreprocessConfig, read: ReadOptions, *, index: int = 0) -> Case:
    """Read and preprocess one file as ``read`` says; a failure is the case's ``error``, never raised.

    ``read.max_pixels`` is the reader's pixel budget, checked from the header before decoding;
    ``read.image_qa`` adds the image's flags (:func:`mmcli.qa.image.image_flags`) to its facts.
    """
    try:
        rad = read_radiograph(file.path, voi_lut=read.voi_lut, max_pixels=read.max_pixels)
        flags = tuple(image_flags(rad.pixels, height=rad.height, width=rad.width, colour=rad.colour)) \
            if read.image_qa else ()
        facts = ImageFacts(rad.height, rad.width, rad.pixel_spacing, rad.format, flags)
        return Case(index, preprocess(rad.pixels, cfg), None, facts, rad.pixels if read.keep_pixels else None)
    except CaseError as err:
        return Case(index, error=err.reason)
    except MemoryError:
        return Case(index, error="out of memory while reading the image")
    except Exception as err:  # one bad file must never stop the batch
        logger.debug("unexpected error reading %s", file.path, exc_info=True)
        return Case(index, error=f"unexpected error while reading: {type(err).__name__}: {err}")


def collate_cases(cases: list[Case]) -> CaseBatch:
    """Stack the images that were read; keep every case's facts and error."""
    ok = [i for i, case in enumerate(cases) if case.image is not None]
    images = torch.stack([cases[i].image for i in ok]) if ok else None  # type: ignore[misc]
    return CaseBatch(images, ok, [replace(case, image=None) for case in cases])


def worker_init(_: int) -> None:
    """Keep each DataLoader worker on one thread: the main process owns the cores' BLAS."""
    torch.set_num_threads(1)
