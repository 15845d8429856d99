"""Figures in the style of HPD22's Figs. 2–12 from training runs (matplotlib).

Every figure is a grid with one panel per (dataset, network) cell — datasets as columns,
networks as rows, as in HPD22's Fig. 2 — and the runs of a cell overlaid in one colour per
variant (the loss: MSE vs CE as in Figs. 10–11, or the run's directory name when a cell holds
several runs of the same loss). Epochs are on a log scale; a vertical line marks each run's
zero-training-error epoch (red, as in HPD22, when there is one variant). Within a panel the
line style says which quantity: solid for class means / the training set, dashed for
classifiers / the test set (in the robustness figure: solid DeepFool's r, dashed the tight s*·r,
dash-dot the percentage of out-of-range pixels on a second axis).

Runs trained with ``--online-every`` also get
:func:`~ncfast.report.online_figures.online_figure` (``online``): NC1 and the MSE decomposition
of the training passes against SGD steps, with the eval-mode measurements at the measured
epochs on the same axes and the learning-rate drops marked. The other figures draw the
eval-mode rows only.

Figures are ``matplotlib.figure.Figure`` objects made without pyplot: drawing them selects no
global backend (a user's interactive one stays), and
:func:`~ncfast.report.figure_layout.save_figure` writes them to files (PNG/PDF/SVG need no
backend of their own), the one figure saver of ncfast. ``new_figure``, ``save_figure``,
``FORMATS``, the colours, ``ONLINE_FIGURE`` and ``online_figure`` are importable from here too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ncfast.report.figure_layout import (
    DECOMPOSITION_TERMS,
    FORMATS,
    LOSS_COLORS,
    OTHER_COLORS,
    ZERO_ERROR_COLOR,
    figure_legend,
    log_y,
    new_figure,
    panel_figsize,
    plot_series,
    run_history,
    save_figure,
)

# LR_DROP_COLOR is not used here: imported so that it stays importable from this module.
from ncfast.report.online_figures import LR_DROP_COLOR, ONLINE_FIGURE, online_figure  # noqa: F401
from ncfast.report.runs import SPLITS, Run, central_path_fit


@dataclass(frozen=True)
class Curve:
    key: str
    split: str
    style: str
    meaning: str
    scale: float = 1.0
    marker: str = "o"  # tells curves apart where a run has a single measured epoch


@dataclass(frozen=True)
class MetricFigure:
    name: str
    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    logy: bool = False
    # Curves of another quantity, on a linear second y axis at the right of each panel.
    right: tuple[Curve, ...] = ()
    right_ylabel: str = ""


MEANS_AND_CLASSIFIERS = ("-", "--")
METRIC_FIGURES = (
    MetricFigure(
        "error",
        "Training and test error",
        "error (%)",
        (Curve("error", "train", "-", "train", 100.0), Curve("error", "test", "--", "test", 100.0)),
    ),
    MetricFigure(
        "equinorm",
        "Equinorm (HPD22 Fig. 3)",
        r"std$_c$ / avg$_c$ of norm",
        (
            Curve("nc2_equinorm_means", "train", "-", r"class means $\|\mu_c-\mu_G\|$"),
            Curve("nc2_equinorm_classifiers", "train", "--", r"classifiers $\|w_c\|$"),
        ),
    ),
    MetricFigure(
        "equiangularity",
        "Equiangularity (HPD22 Fig. 4)",
        r"std$_{c\neq c'}$ cos",
        (
            Curve("nc2_equiangular_means", "train", "-", "class means"),
            Curve("nc2_equiangular_classifiers", "train", "--", "classifiers"),
        ),
    ),
    MetricFigure(
        "maxangle",
        "Maximal-angle equiangularity (HPD22 Fig. 5)",
        r"avg$_{c\neq c'}$ |cos + 1/(C−1)|",
        (
            Curve("nc2_maxangle_means", "train", "-", "class means"),
            Curve("nc2_maxangle_classifiers", "train", "--", "classifiers"),
        ),
    ),
    MetricFigure(
        "self_duality",
        "Self-duality (HPD22 Fig. 6)",
        r"$\| W^\top/\|W\|_F - \bar M/\|\bar M\|_F \|_F^2$",
        (Curve("nc3_self_duality", "train", "-", "train"),),
    ),
    MetricFigure(
        "nc1",
        "Variability collapse (HPD22 Figs. 7 and 12)",
        r"tr$(\Sigma_W \Sigma_B^\dagger)/C$",
        (Curve("nc1", "train", "-", "train"), Curve("nc1", "test", "--", "test")),
        logy=True,
    ),
    MetricFigure(
        "ncc_mismatch",
        "Convergence to nearest class center (HPD22 Fig. 8)",
        "proportion mismatch",
        (
            Curve("nc4_ncc_mismatch", "train", "-", "train"),
            Curve("nc4_ncc_mismatch", "test", "--", "test"),
        ),
    ),
    MetricFigure(
        "robustness",
        "DeepFool robustness on the test set (HPD22 Fig. 9, SPEC §7)",
        r"avg $\|r\|_2 / \|x\|_2$",
        (
            Curve("robustness", "test", "-", r"DeepFool $r$ (HPD22)"),
            Curve("robustness_tight", "test", "--", r"tight $s^* r$ (first flip)", marker="v"),
        ),
        logy=True,
        right=(Curve("robustness_out_of_range", "test", "-.", "x + r out of range", 100.0, "s"),),
        right_ylabel="pixels of x + r out of range (%)",
    ),
    MetricFigure(
        "snr_condition",
        "Spread of the SNR singular values (HPD22 Cor. 1)",
        r"$\omega_{\max}/\omega_{\min}$",
        (
            Curve("snr_condition", "train", "-", "train"),
            Curve("snr_condition", "test", "--", "test"),
        ),
        logy=True,
    ),
    MetricFigure(
        "ls_perp_ratio",
        "Proximity to the central path (HPD22 Fig. 2)",
        r"$\mathcal{L}^{\perp}_{LS} / \mathcal{L}_{LS}$",
        (Curve("ls_perp_ratio", "train", "-", "train"),),
        logy=True,
    ),
)
FIGURE_NAMES = (
    *(f.name for f in METRIC_FIGURES if f.name != "ls_perp_ratio"),
    "decomposition",
    "ls_perp_ratio",
    "snr",
)


def _has_data(run: Run, key: str, split: str) -> bool:
    values = run_history(run, split).get(key)
    return values is not None and values.size > 0 and bool(np.isfinite(values).any())


def _cells(runs: Sequence[Run]):
    """Grid layout: datasets as columns, networks as rows, in order of first appearance."""
    datasets = list(dict.fromkeys(r.dataset for r in runs))
    nets = list(dict.fromkeys(r.net for r in runs))
    cells = {(r.dataset, r.net) for r in runs}
    return datasets, nets, cells


def _variants(runs: Sequence[Run]) -> dict[int, tuple[str, str]]:
    """Per run (by position): (legend label, colour). The loss unless a cell repeats it."""
    counts: dict[tuple, int] = {}
    for r in runs:
        counts[(r.dataset, r.net, r.loss)] = counts.get((r.dataset, r.net, r.loss), 0) + 1
    repeated = any(n > 1 for n in counts.values())
    labels = [f"{r.loss.upper()} ({r.name})" if repeated else r.loss.upper() for r in runs]
    colors: dict[str, str] = {}
    if repeated:  # several runs per loss: one palette colour per run, loss colours first
        palette = list(LOSS_COLORS.values()) + OTHER_COLORS
        for label in dict.fromkeys(labels):
            colors[label] = palette[len(colors) % len(palette)]
    else:  # the loss's own colour; other losses take the spare ones in turn
        for r, label in zip(runs, labels, strict=True):
            if label not in colors:
                spare = OTHER_COLORS[sum(c in OTHER_COLORS for c in colors.values()) % 6]
                colors[label] = LOSS_COLORS.get(r.loss.lower(), spare)
    return {i: (label, colors[label]) for i, label in enumerate(labels)}


def _epoch_axis(ax) -> None:
    """Log-scale epochs labelled 1, 10, 100 (not 10⁰, 10¹), light grid."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", axis="x", alpha=0.1)
    ax.tick_params(which="both", labelsize=8)


def _epoch_limits(ax, runs: Sequence[Run]) -> None:
    """The x range of the runs' measured epochs (so a lone point still sits in its run)."""
    epochs = [
        int(r["epoch"])
        for run in runs
        for r in run.records
        if r["epoch"] > 0 and r["split"] in SPLITS  # eval-mode rows: train_online has its figure
    ]
    if epochs:
        ax.set_xlim(min(epochs) / 1.15, max(epochs) * 1.15)


def _ordered_labels(variants: dict[int, tuple[str, str]]) -> list[str]:
    """Variant labels, MSE first, then CE, then the rest in order of appearance."""
    labels = list(dict.fromkeys(v[0] for v in variants.values()))
    known = [k.upper() for k in LOSS_COLORS]
    return sorted(labels, key=lambda lab: known.index(lab) if lab in known else len(known))


def _grid(runs: Sequence[Run], title: str, panel_w=3.4, panel_h=2.6):
    datasets, nets, cells = _cells(runs)
    losses = {r.loss for r in runs}
    suffix = f" · {next(iter(losses))}" if len(losses) == 1 else ""
    nrows, ncols = len(nets), len(datasets)
    fig, axes = new_figure(nrows, ncols, panel_figsize(nrows, ncols, panel_w, panel_h))
    panel = {}
    for i, net in enumerate(nets):
        for j, ds in enumerate(datasets):
            ax = axes[i][j]
            if (ds, net) not in cells:
                ax.set_axis_off()
                continue
            ax.set_title(f"{ds} · {net}{suffix}", fontsize=9)
            _epoch_axis(ax)
            panel[(ds, net)] = ax
    for ds in datasets:
        for i in range(nrows - 1, -1, -1):
            if (ds, nets[i]) in cells:
                axes[i][datasets.index(ds)].set_xlabel("epoch", fontsize=8)
                break
    fig.suptitle(title, fontsize=11)
    return fig, panel


def _zero_error_line(ax, run: Run, color: str, style: str = "-") -> None:
    epoch = run.zero_error_epoch
    if epoch is not None and epoch > 0:
        ax.axvline(epoch, color=color, linewidth=1.0, linestyle=style, alpha=0.8, zorder=0)


def _legend(fig, variants: dict[int, tuple[str, str]], styles, one_variant: bool) -> None:
    colors = {label: color for label, color in variants.values()}
    handles = [
        Line2D([], [], color=colors[lab], linewidth=2, label=lab)
        for lab in _ordered_labels(variants)
    ]
    handles += [
        Line2D([], [], color="0.3", linestyle=s, marker=marker, markerfacecolor=face, label=m)
        for s, (m, marker, face) in styles
    ]
    handles.append(
        Line2D(
            [],
            [],
            color=ZERO_ERROR_COLOR if one_variant else "0.3",
            linewidth=1,
            linestyle="-" if one_variant else ":",
            label="zero training error",
        )
    )
    figure_legend(fig, handles)


def _ylabel(panel: dict, text: str) -> None:
    # Label the left-most panel of each row only.
    rows: dict[str, tuple] = {}
    for (_, net), ax in panel.items():
        if net not in rows or ax.get_subplotspec().colspan.start < rows[net][1]:
            rows[net] = (ax, ax.get_subplotspec().colspan.start)
    for ax, _ in rows.values():
        ax.set_ylabel(text, fontsize=8)


def _right_axes(panel: dict, right_panels: dict, spec: MetricFigure) -> None:
    """Style the second y axes: from 0, in grey, labelled on the right-most panel of a row."""
    rows: dict[str, tuple] = {}
    for (ds, net), twin in right_panels.items():
        twin.set_ylim(bottom=0)
        twin.tick_params(axis="y", labelsize=8, colors="0.4")
        column = panel[(ds, net)].get_subplotspec().colspan.start
        if net not in rows or column > rows[net][1]:
            rows[net] = (twin, column)
    for twin, _ in rows.values():
        twin.set_ylabel(spec.right_ylabel, fontsize=8, color="0.4")


def metric_figure(runs: Sequence[Run], spec: MetricFigure):
    """One metric figure (runs of a cell overlaid); None when no run has the data of its main
    (left-axis) curves. ``spec.right`` curves go on a second y axis, made only where a run has
    their data."""
    if not any(_has_data(r, c.key, c.split) for r in runs for c in spec.curves):
        return None
    variants = _variants(runs)
    one_variant = len({v[0] for v in variants.values()}) == 1
    fig, panel = _grid(runs, spec.title)
    used_styles = {}
    right_panels = {}
    for i, run in enumerate(runs):
        color = variants[i][1]
        ax = panel[(run.dataset, run.net)]
        for curve in spec.curves:
            hist = run_history(run, curve.split)
            if curve.key not in hist:
                continue
            if plot_series(
                ax,
                hist["epoch"],
                hist[curve.key] * curve.scale,
                logy=spec.logy,
                color=color,
                linestyle=curve.style,
                marker=curve.marker,
            ):
                used_styles[curve.style] = (curve.meaning, curve.marker, "0.3")
        for curve in spec.right:
            if not _has_data(run, curve.key, curve.split):
                continue
            cell = (run.dataset, run.net)
            if cell not in right_panels:
                right_panels[cell] = ax.twinx()
            hist = run_history(run, curve.split)
            if plot_series(
                right_panels[cell],
                hist["epoch"],
                hist[curve.key] * curve.scale,
                logy=False,
                color=color,
                linestyle=curve.style,
                marker=curve.marker,
                markersize=4,
                markerfacecolor="none",  # hollow: the other axis's points may sit behind
            ):
                used_styles[curve.style] = (f"{curve.meaning} (right axis)", curve.marker, "none")
        _zero_error_line(
            ax, run, ZERO_ERROR_COLOR if one_variant else color, "-" if one_variant else ":"
        )
    for cell, ax in panel.items():
        _epoch_limits(ax, [r for r in runs if (r.dataset, r.net) == cell])
        if spec.logy and ax.has_data():
            log_y(ax)
    _ylabel(panel, spec.ylabel)
    _right_axes(panel, right_panels, spec)
    styles = list(used_styles.items()) if len(spec.curves) + len(spec.right) > 1 else []
    _legend(fig, variants, styles, one_variant)
    return fig


def decomposition_figure(runs: Sequence[Run]):
    """HPD22 Fig. 2: the MSE decomposition terms over epochs (training set), log–log; None
    when no run has them."""
    if not any(_has_data(r, "loss_mse", "train") for r in runs):
        return None
    variants = _variants(runs)
    labels = _ordered_labels(variants)
    styles = ["-", "--", ":", "-."]
    title = (
        r"MSE decomposition (HPD22 Fig. 2): $\mathcal{L} = \mathcal{L}_{NC1} + "
        r"\mathcal{L}_{NC2/3} + \mathcal{L}^{\perp}_{LS}$"
    )
    fig, panel = _grid(runs, title)
    for i, run in enumerate(runs):
        ax = panel[(run.dataset, run.net)]
        style = styles[labels.index(variants[i][0]) % len(styles)]
        hist = run_history(run, "train")
        for key, _, color in DECOMPOSITION_TERMS:
            if key in hist:
                plot_series(ax, hist["epoch"], hist[key], logy=True, color=color, linestyle=style)
        _zero_error_line(ax, run, ZERO_ERROR_COLOR, style)
    for cell, ax in panel.items():
        _epoch_limits(ax, [r for r in runs if (r.dataset, r.net) == cell])
        if ax.has_data():
            log_y(ax)
    _ylabel(panel, "loss (training set)")
    handles = [Line2D([], [], color=c, linewidth=2, label=lab) for _, lab, c in DECOMPOSITION_TERMS]
    if len(labels) > 1:
        handles += [
            Line2D([], [], color="0.3", linestyle=styles[k % len(styles)], label=lab)
            for k, lab in enumerate(labels)
        ]
    handles.append(Line2D([], [], color=ZERO_ERROR_COLOR, linewidth=1, label="zero training error"))
    figure_legend(fig, handles)
    return fig


def _fit_range(fit: dict) -> str:
    start = fit["start_epoch"]
    return f"from epoch {start}" if start > 0 else "over all epochs"


def snr_figure(runs: Sequence[Run], fits: dict[int, dict] | None = None):
    """SNR singular values ω_j(t) (training set), measured (dots) and central-path fit (lines).

    One panel per run. ``fits`` maps a run's position to its
    :func:`ncfast.report.runs.central_path_fit` result (computed here when None). None when no run
    logged SNR singular values.
    """
    runs_with = [(i, r) for i, r in enumerate(runs) if _has_data(r, "snr_singular_values", "train")]
    if not runs_with:
        return None
    n = len(runs_with)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, panel_figsize(nrows, ncols, 4.0, 3.1))
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].set_axis_off()
    any_fit = False
    for k, (i, run) in enumerate(runs_with):
        ax = axes[k // ncols][k % ncols]
        hist = run_history(run, "train")
        epochs, omega = hist["epoch"], hist["snr_singular_values"]
        cmap = colormaps["viridis"]
        num = omega.shape[1]
        colors = [cmap(j / max(num - 1, 1) * 0.9) for j in range(num)]
        for j in range(num):
            plot_series(ax, epochs, omega[:, j], logy=True, color=colors[j], linestyle="none")
        fit = fits.get(i) if fits is not None else central_path_fit(run)
        if fit is not None and fit.get("fitted"):
            t, pred = np.asarray(fit["epochs"]), np.asarray(fit["predicted_omega"])
            for j in range(min(num, pred.shape[1])):
                ax.plot(t, pred[:, j], color=colors[j], linewidth=1.0)
            any_fit = True
            note = (
                f"fit {_fit_range(fit)}: R²(ω) = {fit['r2_omega']:.3f}, "
                f"R²(t) = {fit['r2_time']:.3f}\n"
                f"c₁, c₂, c₃ = {fit['c1']:.3g}, {fit['c2']:.3g}, {fit['c3']:.3g} (κ = 1/epoch)"
            )
        else:
            note = "no central-path fit" + (f": {fit['reason']}" if fit else "")
        ax.text(0.02, 0.97, note, transform=ax.transAxes, fontsize=7, va="top", wrap=True)
        _zero_error_line(ax, run, ZERO_ERROR_COLOR)
        _epoch_axis(ax)
        _epoch_limits(ax, [run])
        if ax.has_data():
            log_y(ax)
        ax.set_title(f"{run.label} ({run.name})", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        if k % ncols == 0:
            ax.set_ylabel(r"SNR singular values $\omega_j$", fontsize=8)
    handles = [
        Line2D(
            [],
            [],
            color="0.3",
            marker="o",
            markersize=3,
            linestyle="none",
            label=r"measured $\omega_j$ (colour: j)",
        ),
    ]
    if any_fit:
        handles.append(
            Line2D(
                [],
                [],
                color="0.3",
                linewidth=1,
                label=r"fit $c_1\log\omega + c_2\omega^2 + c_3\omega^4 = a_j + "
                r"\kappa t$",
            )
        )
    handles.append(Line2D([], [], color=ZERO_ERROR_COLOR, linewidth=1, label="zero training error"))
    figure_legend(fig, handles)
    fig.suptitle("SNR singular values (HPD22 §3, SPEC §5)", fontsize=11)
    return fig


def plot_runs(
    runs: Sequence[Run],
    out_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    fits: dict[int, dict] | None = None,
) -> list[Path]:
    """Every figure of :data:`FIGURE_NAMES` the runs have data for (and :data:`ONLINE_FIGURE`
    where a run has online rows), written to ``out_dir`` as ``<name>.<format>``; returns the
    paths. ``fits``: as in :func:`snr_figure`."""
    if not runs:
        raise ValueError("plot_runs: no runs given")
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad:
        raise ValueError(f"plot_runs: formats must be among png, pdf, svg; got {bad}")
    paths: list[Path] = []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name in (*FIGURE_NAMES, ONLINE_FIGURE):
        fig = figure(runs, name, fits)
        if fig is not None:
            paths += save_figure(fig, out_dir, name, formats)
    return paths


def figure(runs: Sequence[Run], name: str, fits: dict[int, dict] | None = None):
    """The figure ``name`` (one of :data:`FIGURE_NAMES` or :data:`ONLINE_FIGURE`) for ``runs``,
    or None without data: a ``matplotlib.figure.Figure`` outside pyplot (nothing to close;
    ``fig.savefig`` or :func:`save_figure` writes it)."""
    if name == "decomposition":
        return decomposition_figure(runs)
    if name == "snr":
        return snr_figure(runs, fits)
    if name == ONLINE_FIGURE:
        return online_figure(runs)
    specs = {spec.name: spec for spec in METRIC_FIGURES}
    if name not in specs:
        names = [*FIGURE_NAMES, ONLINE_FIGURE]
        raise ValueError(f"figure: name must be one of {names}, got {name!r}")
    return metric_figure(runs, specs[name])
