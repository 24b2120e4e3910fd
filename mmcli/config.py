"""Frozen settings: preprocessing (stored with the weights) and what every model-running command takes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from mmcli.errors import UsageError

Intensity = Literal["minmax", "fixed"]
Precision = Literal["auto", "fp32", "mixed", "bf16"]
DEFAULT_MAX_PIXELS = 60_000_000
"""Largest image (width x height x frames x samples) a batch command decodes by default."""
DEFAULT_CASE_TIMEOUT = 300.0
"""Seconds a worker process may spend on one case before the case fails and the worker is replaced."""
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "mixed", "bf16")
QA_POLICIES: tuple[str, ...] = ("warn", "refuse", "off")
"""The ``--qa`` policies (what each does: :mod:`mmcli.qa.policy`)."""
TRAIN_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
"""``mixed`` is for running a model only: training takes these."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How a radiograph becomes the model's input tensor, and back.

    The reader hands over grey pixels in ``[0, 1]`` at native resolution. Preprocessing
    resizes them straight to ``image_size x image_size`` (aspect ratio not kept, no crop,
    no padding: the layout the training sets use), optionally stretches each image to its
    own min..max (``intensity="minmax"``, which makes 10-, 12- and 16-bit sources look
    alike), then normalises once with ``(x - mean) / std``. The inverse maps a
    prediction back onto the native pixel grid.
    """

    image_size: int = 256
    intensity: Intensity = "minmax"
    mean: float = 0.5
    std: float = 0.5

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (>= 16), got {self.image_size}")
        if self.intensity not in ("minmax", "fixed"):
            raise ValueError(f"intensity must be 'minmax' or 'fixed', got {self.intensity!r}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


CLASS_NAMES: tuple[str, ...] = ("normal", "pneumonia")

# Size presets that apply to every registered model: "base" keeps the paper's widths,
# "tiny" is for tests and smoke runs (``multimix_tiny`` is ``multimix`` with it).
ARCH_PRESETS: dict[str, Mapping[str, Any]] = {"base": {}, "tiny": {"widths": (4, 8, 16, 32, 64)}}


def arch_overrides(arch: str) -> dict[str, Any]:
    """Constructor overrides of the size preset ``arch`` (a key of :data:`ARCH_PRESETS`)."""
    try:
        return dict(ARCH_PRESETS[arch])
    except KeyError:
        raise ValueError(f"Unknown arch {arch!r}. Available: {', '.join(ARCH_PRESETS)}") from None


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How a command reads its images, passed whole from its settings to the reader
    (:func:`mmcli.data.datasets.load_case`).

    Attributes:
        voi_lut: apply a DICOM's VOI LUT. max_pixels: the reader's pixel budget (None: no budget
        of mmcli's own). keep_pixels: keep the native pixels for the task (a picture, a DICOM SC).
        image_qa: compute the image's quality-control flags (off under ``--qa off``).
    """

    voi_lut: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    keep_pixels: bool = False
    image_qa: bool = True


@dataclass(frozen=True, kw_only=True)
class ModelRunConfig:
    """Settings of every command that runs the model over images (predict, explain, evaluate).

    ``batch_size`` and ``workers`` of ``None`` take the device's defaults
    (:mod:`mmcli.runtime`); ``weights`` of ``None`` the default weights; ``max_pixels``
    of ``None`` lifts mmcli's own pixel budget (Pillow's limit then applies); ``qa`` is the
    quality-control policy (:mod:`mmcli.qa.policy`); ``raw_masks`` keeps the network's own mask
    instead of the anatomical one (:func:`mmcli.qa.mask.anatomical_mask`).
    """

    weights: str | None = None
    device: str = "auto"
    precision: Precision = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threshold: float = 0.5
    voi_lut: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    qa: str = "warn"
    raw_masks: bool = False
    overwrite: bool = False

    def read_options(self, *, keep_pixels: bool = False) -> ReadOptions:
        """How this run reads its images."""
        return ReadOptions(voi_lut=self.voi_lut, max_pixels=self.max_pixels, keep_pixels=keep_pixels,
                           image_qa=self.qa != "off")

    def __post_init__(self) -> None:
        if self.qa not in QA_POLICIES:
            raise UsageError(f"--qa must be warn, refuse or off, got {self.qa!r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 or more, got {self.workers}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold must lie in [0, 1], got {self.threshold}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"Unknown precision {self.precision!r}: use {', '.join(PRECISIONS)}")


@dataclass(frozen=True, kw_only=True)
class BatchConfig(ModelRunConfig):
    """A batch command's inputs (folders, files, globs), ``--out``, ``--fail-fast`` and resume checks.

    ``verify_inputs``: a resume also compares each input's sha256 (not only size and
    mtime). ``anonymize_ids``: the file mapping anonymised case ids back to inputs.
    ``shard``: ``(K, N)``, run only part K of N of the discovered inputs (see :mod:`mmcli.batch`).
    ``case_timeout``: seconds a worker process may spend on one case (:mod:`mmcli.engines`).
    """

    inputs: tuple[str, ...]
    out: Path
    fail_fast: bool = False
    verify_inputs: bool = False
    anonymize_ids: Path | None = None
    shard: tuple[int, int] | None = None
    case_timeout: float = DEFAULT_CASE_TIMEOUT

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.case_timeout > 0:
            raise UsageError(f"--case-timeout must be a number of seconds above 0, got {self.case_timeout}")
        if self.shard is not None:
            k, n = self.shard
            if not (n >= 1 and 0 <= k < n):
                raise UsageError(f"--shard K/N needs 0 <= K < N, got {k}/{n}")
