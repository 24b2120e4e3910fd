"""PNG figures of an evaluation, and heat-map overlays of explanations.

Matplotlib is imported lazily and used through its object API with the Agg canvas:
no pyplot, no global backend switch, so importing mmcli never changes a user's
matplotlib state. Every file is written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import metrics as M
from mmcli.io.writers import atomic_path

logger = logging.getLogger(__name__)

PRED_COLOUR = "#ff8c00"  # predicted lung boundary: orange
TRUE_COLOUR = "#00e5ff"  # reference lung boundary: cyan (both visible on grey, colour-blind safe pair)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    logger.info("wrote %s", path)
    return path


def dice_boxplot(path: Path, dice: Mapping[str, np.ndarray]) -> Path:
    """Box plot of per-case Dice, one box per dataset (``(N_d,)`` arrays), points overlaid."""
    fig = _figure(1.5 + 1.6 * len(dice), 4)
    ax = fig.add_subplot()
    names = list(dice)
    ax.boxplot([dice[n] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={dice[n].size})" for n in names])
    rng = np.random.default_rng(0)
    for i, n in enumerate(names, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, dice[n].size), dice[n], s=8, alpha=0.5, color="k")
    ax.set_ylabel("Dice")
    ax.set_title("Lung segmentation: Dice per case")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def roc_plot(path: Path, data: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """ROC curve per dataset from ``{name: (y_true (N,), p_pneumonia (N,))}``."""
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    for name, (y, p) in data.items():
        fpr, tpr = M.roc_curve(y, p)
        if fpr.size:
            ax.plot(fpr, tpr, label=f"{name} (AUC {M.roc_auc(y, p):.3f}, n={y.size})")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC: pneumonia vs normal", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reliability_plot(path: Path, data: Mapping[str, tuple[np.ndarray, np.ndarray]], n_bins: int = M.ECE_BINS) -> Path:
    """Reliability diagram (top-label accuracy against confidence) per dataset, with its ECE."""
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    for name, (y, p) in data.items():
        probs = np.stack([1 - p, p], axis=1)
        count, conf, acc = M.calibration_bins(probs, y, n_bins)
        used = count > 0
        ece = M.expected_calibration_error(probs, y, n_bins)
        ax.plot(conf[used], acc[used], "o-", label=f"{name} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", title="Reliability diagram",
           xlim=(0.45, 1.0), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _shorten(text: str, width: int = 38) -> str:
    """``text`` cut in the middle with an ellipsis to at most ``width`` characters (titles of long case ids)."""
    if len(text) <= width:
        return text
    keep = width - 1
    return f"{text[: keep - keep // 2]}\u2026{text[-(keep // 2):]}"


def worst_cases_grid(
    path: Path, cases: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], ncols: int = 4
) -> Path:
    """Radiographs with predicted and reference lung boundaries drawn over them.

    Args:
        cases: ``(title, image (H, W) in [0, 1], predicted mask (H, W), reference mask (H, W))``.
    """
    from matplotlib.lines import Line2D

    ncols = max(1, min(ncols, len(cases)))
    nrows = -(-len(cases) // ncols)
    fig = _figure(3 * ncols, 3.2 * nrows + 0.4)
    for i, (title, image, pred, true) in enumerate(cases):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="antialiased")
        for mask, colour in ((true, TRUE_COLOUR), (pred, PRED_COLOUR)):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title("\n".join(_shorten(line) for line in title.splitlines()), fontsize=8)
        ax.axis("off")
    handles = [Line2D([], [], color=PRED_COLOUR, label="predicted"),
               Line2D([], [], color=TRUE_COLOUR, label="reference")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2)
    fig.suptitle("Lowest-Dice cases")
    return _save(fig, path)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.6, cmap: str = "jet") -> np.ndarray:
    """Blend a colour heat map over a grey radiograph.

    The map is scaled by its 99th percentile (clipped to 1) for display only, so a few
    spikes do not hide everything else; each pixel's opacity grows with its heat, so
    cold regions show the radiograph.

    Args:
        image: ``(H, W)`` in [0, 1]. heat: ``(H, W)`` non-negative, same shape.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    from matplotlib import colormaps

    h = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    scale = float(np.percentile(h, 99)) if h.size else 0.0
    h = np.clip(h / scale, 0, 1) if scale > 0 else np.zeros_like(h)
    colour = colormaps[cmap](h)[..., :3]
    grey = np.repeat(np.asarray(image, dtype=np.float32)[..., None], 3, axis=2)
    a = alpha * h[..., None]
    return np.round(255 * ((1 - a) * grey + a * colour)).astype(np.uint8)
