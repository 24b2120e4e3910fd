"""Training settings: one frozen dataclass holding every option of ``mmcli train``,
and the ablation variants of the paper as configurations of the same code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from mmcli.config import ARCH_PRESETS, arch_overrides
from mmcli.errors import UsageError

__all__ = [
    "FREEZABLE", "OPTION_OF", "SITE_OPS", "VARIANTS", "LossWeights", "SiteOp", "TrainConfig", "Variant", "option_for",
    "site_augment_record",
]


@dataclass(frozen=True)
class LossWeights:
    """Weights and threshold of the MultiMix objective (paper values by default)."""

    lambda_u: float = 0.25
    threshold: float = 0.7
    alpha: float = 5.0
    beta: float = 0.01
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class Variant:
    """A row of the paper's ablation table: a registry model plus the loss terms that are on.

    Streams used: ``seg_l`` (labelled segmentation) when ``seg``; ``seg_u`` (unlabelled
    segmentation) when ``consistency``; ``cls_l`` when ``cls``; the weak and strong views of
    unlabelled classification images (``cls_u``) when ``pseudo``.
    """

    model: str
    seg: bool
    cls: bool
    pseudo: bool = False
    consistency: bool = False

    def pools(self) -> tuple[str, ...]:
        """Index pools the variant samples from, in a fixed order."""
        wanted = {"seg_l": self.seg, "seg_u": self.consistency, "cls_l": self.cls, "cls_u": self.pseudo}
        return tuple(k for k, on in wanted.items() if on)


@dataclass(frozen=True)
class SiteOp:
    """One site-shift augmentation: applied with probability ``p`` at a value from ``low..high``.

    ``unit`` says what the value is. ``geometric`` ops move masks too.
    """

    p: float
    low: float
    high: float
    unit: str
    geometric: bool = False


SITE_OPS: dict[str, SiteOp] = {
    "window": SiteOp(0.3, 0.0, 0.3, "share of the intensity range clipped"),
    "gamma": SiteOp(0.3, -0.4, 0.4, "log of the gamma exponent"),
    "edges": SiteOp(0.3, 0.0, 1.0, "unsharp-mask gain (radius 8 px at 256)"),
    "blur": SiteOp(0.3, 0.3, 1.5, "Gaussian sigma in px at 256"),
    "noise": SiteOp(0.3, 0.0, 0.04, "Gaussian noise sigma (image range 1)"),
    "rotate": SiteOp(0.3, -10.0, 10.0, "degrees", geometric=True),
    "scale": SiteOp(0.3, 0.85, 1.15, "magnification", geometric=True),
}
"""The site-shift ops, in the order they are applied, with their probabilities and ranges."""


def site_augment_record(ops: tuple[str, ...] | list[str]) -> dict[str, dict[str, object]]:
    """What ``ops`` do, for run.json: each op's probability, range and unit."""
    return {name: {"p": op.p, "range": [op.low, op.high], "unit": op.unit}
            for name, op in SITE_OPS.items() if name in ops}


FREEZABLE = ("encoder", "classifier", "decoder")
"""Parts of a model ``--freeze`` can keep fixed (the decoder includes the mask output layer)."""

VARIANTS: dict[str, Variant] = {
    "unet": Variant("unet", seg=True, cls=False),
    "enc": Variant("enc", seg=False, cls=True),
    "enc-ssl": Variant("enc", seg=False, cls=True, pseudo=True),
    "umtl": Variant("umtl", seg=True, cls=True),
    "umtls": Variant("umtls", seg=True, cls=True),
    "umtl-ssl": Variant("umtl", seg=True, cls=True, pseudo=True),
    "multimix": Variant("multimix", seg=True, cls=True, pseudo=True, consistency=True),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``mmcli train`` was asked for; stored in run.json and in each checkpoint.

    ``seg_labels``/``cls_labels`` None means all labels. ``patience`` None disables early
    stopping. ``steps_per_epoch`` None means one pass over the largest labelled pool.
    ``arch`` names a size preset of the model registry (:data:`mmcli.models.registry.ARCH_PRESETS`):
    ``tiny`` for tests and smoke runs. ``site_aug`` names the site-shift augmentations of
    :data:`mmcli.training.augment.SITE_OPS` used on the labelled streams and the strong view;
    ``balance_sources`` draws every stream from its source folders at equal rates.
    ``freeze`` names parts of the model (:data:`FREEZABLE`) whose weights stay those of
    ``init``: e.g. ``("encoder", "classifier")`` adapts the masks and keeps the pneumonia
    answer of the starting weights exactly. ``workers`` None: the rule of every command
    (:func:`mmcli.runtime.default_workers`), resolved by the trainer. ``threshold``, ``alpha`` and ``beta`` are set by
    ``--pseudo-threshold``, ``--dice-weight`` and ``--consistency-weight`` (:data:`OPTION_OF`).
    """

    out: str
    seg_data: tuple[str, ...] = ()
    cls_data: tuple[str, ...] = ()
    unlabelled_data: tuple[str, ...] = ()
    init: str | None = None
    variant: str = "multimix"
    arch: Literal["base", "tiny"] = "base"
    seg_labels: int | None = None
    cls_labels: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    epochs: int = 30
    batch_size: int = 10
    steps_per_epoch: int | None = None
    image_size: int = 256
    lr: float = 1e-4
    lr_step: int = 8
    lr_gamma: float = 0.1
    threshold: float = 0.7
    lambda_u: float = 0.25
    alpha: float = 5.0
    beta: float = 0.01
    label_smoothing: float = 0.0
    hflip: bool = False
    site_aug: tuple[str, ...] = ()
    balance_sources: bool = False
    freeze: tuple[str, ...] = ()
    patience: int | None = 10
    calibrate: bool = True
    voi_lut: bool = False
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    resume: bool = False

    # Settings that may change when a run is resumed (they do not change the result).
    RESUMABLE = ("out", "epochs", "patience", "device", "workers", "resume", "calibrate")

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UsageError(f"Unknown variant {self.variant!r}: use {', '.join(VARIANTS)}")
        if self.arch not in ARCH_PRESETS:
            raise UsageError(f"Unknown arch {self.arch!r}: use {' or '.join(ARCH_PRESETS)}")
        v = VARIANTS[self.variant]
        if v.seg and not self.seg_data:
            raise UsageError(f"--variant {self.variant} learns lung masks: pass --seg-data DIR, a folder of images "
                             "with their masks in DIR/masks/<stem>.png")
        if v.cls and not self.cls_data:
            raise UsageError(f"--variant {self.variant} learns pneumonia: pass --cls-data DIR, a folder of images "
                             "with DIR/labels.csv (columns file,label)")
        for name in ("epochs", "batch_size", "lr_step"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 or more, got {self.workers}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--pseudo-threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        unknown = [o for o in self.site_aug if o not in SITE_OPS]
        if unknown:
            raise UsageError(f"--site-aug: unknown {', '.join(unknown)}: use {', '.join(SITE_OPS)} or all")
        unknown = [p for p in self.freeze if p not in FREEZABLE]
        if unknown:
            raise UsageError(f"--freeze: unknown {', '.join(unknown)}: use {', '.join(FREEZABLE)}")
        if self.freeze and not self.init:
            raise UsageError("--freeze keeps weights of the starting checkpoint: pass --init WEIGHTS too")
        if not 64 <= self.image_size <= 1024 or self.image_size % 16:
            raise UsageError(f"--image-size must be a multiple of 16 in 64..1024 (what a checkpoint may declare), "
                             f"got {self.image_size}")

    @property
    def variant_spec(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(lambda_u=self.lambda_u, threshold=self.threshold, alpha=self.alpha, beta=self.beta,
                           label_smoothing=self.label_smoothing)

    def model_overrides(self) -> dict[str, Any]:
        return arch_overrides(self.arch)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def describe_differences(self, other: dict[str, Any]) -> str:
        """The settings that differ from ``other``, as options: ``"--seed 0 -> 1, --dice-weight 5.0 -> 2.0"``."""
        mine = self.to_dict()
        defaults = {f.name: _stored(f.default) for f in fields(self)}
        return ", ".join(f"{option_for(k)} {other.get(k, defaults[k])!r} -> {mine[k]!r}"
                         for k in self.differences(other))

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Names of settings (other than RESUMABLE) whose values differ from ``other``.

        A setting ``other`` lacks (a run from before it existed) counts as its default.
        """
        mine = self.to_dict()
        return [f.name for f in fields(self) if f.name not in self.RESUMABLE
                and mine[f.name] != other.get(f.name, _stored(f.default))]


def _stored(value: Any) -> Any:
    """``value`` as :meth:`TrainConfig.to_dict` stores it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


OPTION_OF: dict[str, str] = {"threshold": "--pseudo-threshold", "alpha": "--dice-weight",
                             "beta": "--consistency-weight"}
"""Settings stored under another name than their option's: run.json keeps the paper's names
(and the names older runs were stored under, so that they still resume)."""


def option_for(setting: str) -> str:
    """The option of ``mmcli train`` that sets the :class:`TrainConfig` field ``setting``."""
    return OPTION_OF.get(setting, "--" + setting.replace("_", "-"))
