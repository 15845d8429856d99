"""The figure of the training passes (``ncfast train --online-every``): NC1 and the MSE
decomposition of the ``train_online`` rows against SGD steps, with the eval-mode measurements
at the measured epochs on the same axes and the learning-rate drops marked
(:func:`online_figure`; drawn by :func:`ncfast.report.plots.plot_runs` as
:data:`ONLINE_FIGURE`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.lines import Line2D

from ncfast.report.figure_layout import (
    DECOMPOSITION_TERMS,
    LOSS_COLORS,
    ZERO_ERROR_COLOR,
    figure_legend,
    log_y,
    new_figure,
    panel_figsize,
    plot_series,
    run_history,
)
from ncfast.report.runs import ONLINE_SPLIT, Run

# Drawn in addition to ncfast.report.plots.FIGURE_NAMES where a run logged its training
# passes (--online-every).
ONLINE_FIGURE = "online"
LR_DROP_COLOR = "0.45"


def _steps_per_epoch(run: Run) -> float:
    """SGD steps per epoch of ``run``: its ``config.json``'s, else those of its online rows
    (step / epoch, the last row's)."""
    stored = run.config.get("steps_per_epoch")
    if isinstance(stored, (int, float)) and not isinstance(stored, bool) and stored > 0:
        return float(stored)
    online = run.history(ONLINE_SPLIT)
    epoch = online["epoch"][-1]
    return float(online["step"][-1] / epoch) if epoch > 0 else 1.0


def _lr_drop_steps(run: Run, per_epoch: float) -> list[float]:
    """Steps at which the learning rate dropped: after each of the run's ``lr_milestones``
    (config.json), else where the online rows' learning rate falls (at the end of the window
    before the fall)."""
    milestones = run.config.get("lr_milestones")
    if isinstance(milestones, list) and all(isinstance(m, (int, float)) for m in milestones):
        last = run.last_epoch
        return [m * per_epoch for m in milestones if 0 < m < last]
    online = run.history(ONLINE_SPLIT)
    lr = online.get("lr")
    if lr is None:
        return []
    falls = np.flatnonzero(lr[1:] < lr[:-1])
    return [float(online["step"][i]) for i in falls]


def _online_panel(ax, run: Run, curves, per_epoch: float, logy: bool = True) -> None:
    """``curves`` = (key, colour) of the run's training passes (lines) and of its eval-mode
    training-set measurements at step epoch·``per_epoch`` (dots), the learning-rate drops
    (dashed) and the zero-error epoch (red)."""
    online, measured = run.history(ONLINE_SPLIT), run_history(run, "train")
    for key, color in curves:
        if key in online:
            steps = online["step"].astype(np.float64)
            plot_series(ax, steps, online[key], logy=logy, color=color, marker="none")
        if key in measured:
            steps = measured["epoch"] * per_epoch
            plot_series(
                ax, steps, measured[key], logy=logy, color=color, linestyle="none", markersize=4
            )
    for step in _lr_drop_steps(run, per_epoch):
        ax.axvline(step, color=LR_DROP_COLOR, linestyle="--", linewidth=1.0, zorder=0)
    zero = run.zero_error_epoch
    if zero is not None and zero > 0:
        ax.axvline(zero * per_epoch, color=ZERO_ERROR_COLOR, linewidth=1.0, alpha=0.8, zorder=0)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.set_xlabel("SGD step", fontsize=8)
    top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
    top.set_xlabel("epoch", fontsize=8)
    top.tick_params(labelsize=8)
    if logy and ax.has_data():
        log_y(ax)


def online_figure(runs: Sequence[Run]):
    """Neural Collapse of the training passes (``train_online`` rows of ``--online-every``):
    per run, NC1 (left) and the MSE decomposition (right, HPD22 Fig. 2's terms) against SGD
    steps as lines, the eval-mode measurements of the training set as dots at the measured
    epochs (epoch e at step e·steps per epoch), the learning-rate drops as dashed lines and the
    zero-training-error epoch in red. None when no run has online rows."""
    runs = [run for run in runs if run.has_online]
    if not runs:
        return None
    fig, axes = new_figure(len(runs), 2, panel_figsize(len(runs), 2, 4.4, 3.2))
    for row, run in enumerate(runs):
        per_epoch = _steps_per_epoch(run)
        nc1_ax, loss_ax = axes[row]
        _online_panel(nc1_ax, run, [("nc1", LOSS_COLORS["mse"])], per_epoch)
        nc1_ax.set_ylabel(r"NC1 = tr$(\Sigma_W \Sigma_B^\dagger)/C$", fontsize=8)
        nc1_ax.set_title(f"{run.label} ({run.name}): NC1", fontsize=9)
        _online_panel(loss_ax, run, [(k, c) for k, _, c in DECOMPOSITION_TERMS], per_epoch)
        loss_ax.set_ylabel("loss (training set)", fontsize=8)
        loss_ax.set_title("MSE decomposition (HPD22 Fig. 2)", fontsize=9)
    handles = [Line2D([], [], color=c, linewidth=2, label=lab) for _, lab, c in DECOMPOSITION_TERMS]
    handles += [
        Line2D([], [], color="0.3", linewidth=1.3, label="training passes (online)"),
        Line2D([], [], color="0.3", marker="o", markersize=4, linestyle="none", label="eval mode"),
        Line2D(
            [], [], color=LR_DROP_COLOR, linestyle="--", linewidth=1, label="learning-rate drop"
        ),
        Line2D([], [], color=ZERO_ERROR_COLOR, linewidth=1, label="zero training error"),
    ]
    figure_legend(fig, handles)
    fig.suptitle("Neural Collapse of the training passes, every few SGD steps", fontsize=11)
    return fig
