"""Frozen settings shared by the library and stored with the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Intensity = Literal["minmax", "fixed"]


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
