"""What the figures of runs share: a figure made without pyplot and the one figure saver of
ncfast, the colours, a run's plotted series, the log y axis and the legend below the panels.

Figures are ``matplotlib.figure.Figure`` objects made without pyplot (:func:`new_figure`): drawing
them selects no global backend (a user's interactive one stays), and :func:`save_figure` writes
them to files (PNG/PDF/SVG need no backend of their own). Used by :mod:`ncfast.report.plots`,
:mod:`ncfast.report.online_figures`, :mod:`ncfast.report.sweep_figures` and
:mod:`ncfast.report.theory_figures`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from ncfast.report.runs import Run

FORMATS = ("png", "pdf")
ZERO_ERROR_COLOR = "#d62728"
LOSS_COLORS = {"mse": "#1f77b4", "ce": "#ff7f0e", "mse-rescaled": "#2ca02c"}
OTHER_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
DECOMPOSITION_TERMS = (
    ("loss_mse", r"$\mathcal{L}$ (MSE)", "black"),
    ("loss_ls", r"$\mathcal{L}_{LS} = \mathcal{L}_{NC1} + \mathcal{L}_{NC2/3}$", "#1f77b4"),
    ("loss_nc1", r"$\mathcal{L}_{NC1}$", "#2ca02c"),
    ("loss_nc23", r"$\mathcal{L}_{NC2/3}$", "#ff7f0e"),
    ("loss_ls_perp", r"$\mathcal{L}^{\perp}_{LS}$", "#9467bd"),
)


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float]):
    """A figure (no pyplot, so no global backend) with a ``nrows × ncols`` grid of axes
    (always a 2-d array) and constrained layout."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(
    fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write ``fig`` as ``out_dir/<name>.<format>`` for each format (PNG at 150 dpi; PDF and
    SVG are vector); returns the paths. ``out_dir`` is created if missing."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, dpi=150 if fmt == "png" else None)
        paths.append(path)
    return paths


def run_history(run: Run, split: str) -> dict[str, np.ndarray]:
    """The series of ``run``'s ``split`` rows (:meth:`ncfast.report.runs.Run.history`), with the
    ratio ``ls_perp_ratio`` = L⊥_LS / L_LS where both losses were logged."""
    hist = dict(run.history(split))
    if "loss_ls_perp" in hist and "loss_ls" in hist:
        with np.errstate(divide="ignore", invalid="ignore"):
            hist["ls_perp_ratio"] = hist["loss_ls_perp"] / hist["loss_ls"]
    return hist


def panel_figsize(nrows: int, ncols: int, panel_w: float, panel_h: float) -> tuple[float, float]:
    """The size (inches) of a figure of ``nrows × ncols`` panels of ``panel_w × panel_h``."""
    # A single panel still needs room for the title and the legend below it.
    return max(panel_w * ncols + 0.6, 5.2), panel_h * nrows + 1.2


def plot_series(ax, epochs, values, *, logy, marker="o", markersize=2.5, **kwargs) -> bool:
    """Plot ``values`` against ``epochs`` (x) at the points that can be drawn (value finite,
    epoch > 0 and, on a log axis, value > 0); whether any could. ``kwargs`` go to ``ax.plot``."""
    mask = np.isfinite(values) & (epochs > 0)
    if logy:
        mask &= values > 0
    if not mask.any():
        return False
    ax.plot(
        epochs[mask], values[mask], marker=marker, markersize=markersize, linewidth=1.3, **kwargs
    )
    return True


class _PlainLogFormatter(LogFormatter):
    """LogFormatter's choice of ticks, written as plain numbers (0.06, 30) not 6e−02, 3×10¹."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:g}"


def log_y(ax) -> None:
    """Log y; within two decades plain numbers on the minor ticks too."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if low > 0 and high / low < 1.5:
        # Nearly equal values (one measured epoch): a range of ×1.5 around them, not ticks
        # that differ in the sixth digit.
        middle = math.sqrt(low * high)
        low, high = middle / 1.5, middle * 1.5
        ax.set_ylim(low, high)
    if low > 0 and high / low < 100:
        ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(
            _PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
        )


def figure_legend(fig, handles) -> None:
    """The legend of ``fig``: ``handles`` in rows below the panels."""
    # As many columns as fit the figure's width (about 1.8 inch per entry).
    per_row = max(1, int(fig.get_figwidth() / 1.8))
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(len(handles), per_row),
        fontsize=8,
        frameon=False,
    )
