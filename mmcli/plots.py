"""PNG figures of an evaluation, and heat-map overlays of explanations.

Matplotlib is imported lazily and used through its object API with the Agg canvas:
no pyplot, no global backend switch, so importing mmcli never changes a user's
matplotlib state. Every file is written atomically. Text from the data (case ids,
dataset names) is drawn as it is, never parsed as mathtext (a ``$`` in a name).
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
OUTLINE_COLOUR = "#ffffff"  # lung outline over a heat map: white stands apart from every colour of the map
HEAT_CMAP = "turbo"


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


def _plain_text(legend: Any) -> None:
    """Draw a legend's entries as they are: dataset names are data, never mathtext (``$x$``)."""
    for text in legend.get_texts():
        text.set_parse_math(False)


def dice_boxplot(path: Path, dice: Mapping[str, np.ndarray]) -> Path:
    """Box plot of per-case Dice, one box per dataset (``(N_d,)`` arrays), points overlaid."""
    fig = _figure(max(4.5, 1.5 + 1.6 * len(dice)), 4)  # wide enough for the title with one dataset
    ax = fig.add_subplot()
    names = list(dice)
    ax.boxplot([dice[n] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={dice[n].size})" for n in names], parse_math=False)
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
    _plain_text(ax.legend(loc="lower right", fontsize=8))
    return _save(fig, path)


def reliability_plot(path: Path, data: Mapping[str, tuple[np.ndarray, np.ndarray]], n_bins: int = M.ECE_BINS) -> Path:
    """Reliability diagram (top-label accuracy against confidence) per dataset, with its ECE.

    Below it, the number of cases in each confidence bin (a point of 3 cases says little).
    """
    fig = _figure(5, 6.2)
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    edges = np.linspace(0, 1, n_bins + 1)
    width = (edges[1] - edges[0]) / max(1, len(data))
    for i, (name, (y, p)) in enumerate(data.items()):
        probs = np.stack([1 - p, p], axis=1)
        count, conf, acc = M.calibration_bins(probs, y, n_bins)
        used = count > 0
        ece = M.expected_calibration_error(probs, y, n_bins)
        (line,) = ax.plot(conf[used], acc[used], "o-", label=f"{name} (ECE {ece:.3f}, n={y.size})")
        bars = hist.bar(edges[:-1][used] + (i + 0.5) * width, count[used], width=width, color=line.get_color(),
                        label=name)
        hist.bar_label(bars, fontsize=6, padding=1)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(ylabel="accuracy", title="Reliability diagram", xlim=(0.45, 1.0), ylim=(0, 1.02))
    _plain_text(ax.legend(loc="upper left", fontsize=8))
    hist.set(xlabel="confidence (top-class probability)", ylabel="cases per bin")
    hist.margins(y=0.25)
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
        ax.set_title("\n".join(_shorten(line) for line in title.splitlines()), fontsize=8, parse_math=False)
        ax.axis("off")
    handles = [Line2D([], [], color=PRED_COLOUR, label="predicted"),
               Line2D([], [], color=TRUE_COLOUR, label="reference")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2)
    fig.suptitle("Lowest-Dice cases")
    return _save(fig, path)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.6, cmap: str = HEAT_CMAP) -> np.ndarray:
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


def explain_figure(path: Path, image: np.ndarray, heat: np.ndarray, lungs: np.ndarray | None, *, title: str,
                   scale_label: str, alpha: float = 0.6, cmap: str = HEAT_CMAP) -> Path:
    """A heat map over a radiograph that reads on its own: title, lung outline, colour bar.

    The film is drawn pixel for pixel (one image pixel, one PNG pixel), the map blended
    over it as in :func:`heatmap_overlay`, whose scale the colour bar shows.

    Args:
        image: ``(H, W)`` in [0, 1]. heat: ``(H, W)`` non-negative, same shape.
        lungs: ``(h, w)`` bool lung mask on any grid (drawn stretched over the film), or None.
        title: up to three lines (case, probability and label, what the map shows).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    height, width = image.shape
    dpi, top, side, pad = 100, 64, 118, 8  # px: title band, colour-bar column, margins
    fig = _figure((width + side + pad) / dpi, (height + top + pad) / dpi)
    fig.set_layout_engine(None)  # exact placement: the film keeps its pixels
    fig_w, fig_h = width + side + pad, height + top + pad
    ax = fig.add_axes((pad / fig_w, pad / fig_h, width / fig_w, height / fig_h))
    ax.imshow(heatmap_overlay(image, heat, alpha=alpha, cmap=cmap), interpolation="none")
    handles = []
    if lungs is not None and lungs.any() and not lungs.all():
        # with an origin, a contour's extent is the outer pixel edges, as imshow's: the mask spans the film
        ax.contour(lungs.astype(np.float32), levels=[0.5], colors=OUTLINE_COLOUR, linewidths=1.2,
                   extent=(-0.5, width - 0.5, height - 0.5, -0.5), origin="upper")
        handles.append(Line2D([], [], color=OUTLINE_COLOUR, label="predicted lungs"))
    ax.set(xlim=(-0.5, width - 0.5), ylim=(height - 0.5, -0.5))
    ax.axis("off")
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=7, facecolor="black", labelcolor="white",
                  framealpha=0.6, edgecolor="none")
    lines = [_shorten(line, max(24, width // 7)) for line in title.splitlines()]
    fig.text(pad / fig_w, 1 - 6 / fig_h, "\n".join(lines), ha="left", va="top", fontsize=9, linespacing=1.3,
             parse_math=False)
    bar = fig.add_axes(((pad + width + 12) / fig_w, pad / fig_h, 14 / fig_w, height / fig_h))
    fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps[cmap]), cax=bar).set_label(scale_label, fontsize=8)
    bar.tick_params(labelsize=7)
    return _save(fig, path)
