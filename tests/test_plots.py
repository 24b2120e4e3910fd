"""Figures draw text from the data (case ids, dataset names) as it is: ``$`` is not mathtext."""

import numpy as np

from mmcli import plots

ODD = "a$\\left$b"  # invalid mathtext: drawing it as mathtext raises


def test_case_ids_and_dataset_names_with_dollars_are_drawn_as_text(tmp_path):
    image = np.linspace(0, 1, 64 * 48).reshape(64, 48)
    lungs = np.zeros((64, 48), bool)
    lungs[10:50, 8:40] = True
    plots.explain_figure(tmp_path / "e.png", image, image, lungs, title=f"{ODD}\np = 0.5", scale_label="Grad-CAM")
    plots.worst_cases_grid(tmp_path / "w.png", [(f"{ODD}\nDice 0.5", image, lungs, lungs)])
    y, p = np.array([0, 1, 0, 1]), np.array([0.2, 0.8, 0.4, 0.6])
    plots.roc_plot(tmp_path / "roc.png", {ODD: (y, p)})
    plots.reliability_plot(tmp_path / "rel.png", {ODD: (y, p)}, n_bins=5)
    plots.dice_boxplot(tmp_path / "d.png", {ODD: np.array([0.9, 0.95])})
    assert all((tmp_path / name).stat().st_size > 0 for name in ("e.png", "w.png", "roc.png", "rel.png", "d.png"))
