"""Guards of the paper's figures (ncfast/report/plots.py): what a reader sees, read back from the
``matplotlib.figure.Figure`` objects (grid layout, panel titles, axis labels and scales, the data
and style of every line, colours per variant, legend entries, the files written), on tiny
hand-made runs, so that a small change of the module fails here. The shared layout's and the
training passes' figure's guards are in test_mutation_guards_report_figures.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps

import ncfast.report.plots as plots
from ncfast.report.figure_layout import DECOMPOSITION_TERMS, LOSS_COLORS, OTHER_COLORS
from ncfast.report.plots import (
    FIGURE_NAMES,
    METRIC_FIGURES,
    Curve,
    MetricFigure,
    decomposition_figure,
    figure,
    metric_figure,
    plot_runs,
    snr_figure,
)
from ncfast.report.runs import Run

RED = "#d62728"  # the zero-training-error line
BLUE, ORANGE = LOSS_COLORS["mse"], LOSS_COLORS["ce"]
EPOCHS = (1, 2, 4)
KEYS = (
    "nc2_equinorm_means",
    "nc2_equinorm_classifiers",
    "nc2_equiangular_means",
    "nc2_equiangular_classifiers",
    "nc2_maxangle_means",
    "nc2_maxangle_classifiers",
    "nc3_self_duality",
    "nc1",
    "nc4_ncc_mismatch",
    "robustness",
    "robustness_tight",
    "robustness_out_of_range",
    "snr_condition",
    "loss_mse",
    "loss_ls",
    "loss_nc1",
    "loss_nc23",
    "loss_ls_perp",
)


def value(key: str, split: str, epoch: int, factor: float = 1.0) -> float:
    """The logged number of ``key`` (distinct per key, split, epoch and run)."""
    if key == "error":
        return {"train": {0: 0.9, 1: 0.5, 2: 0.0, 4: 0.0}, "test": {}}[split].get(
            epoch, 0.25 / epoch
        )
    if key == "ls_perp_ratio":
        return value("loss_ls_perp", split, epoch, factor) / value("loss_ls", split, epoch, factor)
    return (KEYS.index(key) + 1) * factor * (1.0 if split == "train" else 3.0) / 2.0**epoch


def make_run(
    name: str = "a",
    loss: str = "mse",
    dataset: str = "mnist",
    net: str = "vgg11",
    factor: float = 1.0,
    keys=KEYS,
    online: bool = True,
) -> Run:
    """Train and test rows at epochs 0 (train only), 1, 2, 4 (zero training error from 2), a
    training-pass row at epoch 8 (not drawn in these figures)."""
    records = [{"epoch": 0, "split": "train", "error": 0.9, "nc1": 100.0}]
    for epoch in EPOCHS:
        for split in ("train", "test"):
            rec = {"epoch": epoch, "split": split, "error": value("error", split, epoch)}
            rec.update({k: value(k, split, epoch, factor) for k in keys})
            records.append(rec)
    if online:
        records.append({"epoch": 8.0, "step": 80, "split": "train_online", "nc1": 0.001})
    config = {"dataset": dataset, "net": net, "loss": loss}
    return Run(Path("runs") / name, config, records)


def series(key: str, split: str, factor: float = 1.0, scale: float = 1.0) -> list:
    return [[float(e), value(key, split, e, factor) * scale] for e in EPOCHS]


def lines(ax) -> list[tuple]:
    return [
        (
            line.get_xydata().tolist(),
            line.get_color(),
            line.get_linestyle(),
            line.get_marker(),
            line.get_markersize(),
        )
        for line in ax.get_lines()
    ]


def vline(x: float, color: str, style: str) -> tuple:
    return ([[x, 0.0], [x, 1.0]], color, style, "None", 6.0)


def legend(fig) -> list[tuple]:
    (leg,) = fig.legends
    return [
        (
            text.get_text(),
            handle.get_color(),
            handle.get_linestyle(),
            handle.get_linewidth(),
            handle.get_marker(),
            handle.get_markerfacecolor(),
        )
        for text, handle in zip(leg.get_texts(), leg.legend_handles, strict=True)
    ]


def style_entry(meaning: str, style: str, marker: str = "o", face: str = "0.3") -> tuple:
    return (meaning, "0.3", style, 1.5, marker, face)


def zero_entry(one_variant: bool) -> tuple:
    return ("zero training error", RED if one_variant else "0.3", "-" if one_variant else ":", 1)


def variant_entry(label: str, color: str) -> tuple:
    return (label, color, "-", 2, "None", color)


# name → title, y label, log y, main curves (key, split, style, legend text, scale, marker)
EXPECTED = {
    "error": (
        "Training and test error",
        "error (%)",
        False,
        [("error", "train", "-", "train", 100.0, "o"), ("error", "test", "--", "test", 100.0, "o")],
    ),
    "equinorm": (
        "Equinorm (HPD22 Fig. 3)",
        r"std$_c$ / avg$_c$ of norm",
        False,
        [
            ("nc2_equinorm_means", "train", "-", r"class means $\|\mu_c-\mu_G\|$", 1.0, "o"),
            ("nc2_equinorm_classifiers", "train", "--", r"classifiers $\|w_c\|$", 1.0, "o"),
        ],
    ),
    "equiangularity": (
        "Equiangularity (HPD22 Fig. 4)",
        r"std$_{c\neq c'}$ cos",
        False,
        [
            ("nc2_equiangular_means", "train", "-", "class means", 1.0, "o"),
            ("nc2_equiangular_classifiers", "train", "--", "classifiers", 1.0, "o"),
        ],
    ),
    "maxangle": (
        "Maximal-angle equiangularity (HPD22 Fig. 5)",
        r"avg$_{c\neq c'}$ |cos + 1/(C−1)|",
        False,
        [
            ("nc2_maxangle_means", "train", "-", "class means", 1.0, "o"),
            ("nc2_maxangle_classifiers", "train", "--", "classifiers", 1.0, "o"),
        ],
    ),
    "self_duality": (
        "Self-duality (HPD22 Fig. 6)",
        r"$\| W^\top/\|W\|_F - \bar M/\|\bar M\|_F \|_F^2$",
        False,
        [("nc3_self_duality", "train", "-", None, 1.0, "o")],
    ),
    "nc1": (
        "Variability collapse (HPD22 Figs. 7 and 12)",
        r"tr$(\Sigma_W \Sigma_B^\dagger)/C$",
        True,
        [("nc1", "train", "-", "train", 1.0, "o"), ("nc1", "test", "--", "test", 1.0, "o")],
    ),
    "ncc_mismatch": (
        "Convergence to nearest class center (HPD22 Fig. 8)",
        "proportion mismatch",
        False,
        [
            ("nc4_ncc_mismatch", "train", "-", "train", 1.0, "o"),
            ("nc4_ncc_mismatch", "test", "--", "test", 1.0, "o"),
        ],
    ),
    "robustness": (
        "DeepFool robustness on the test set (HPD22 Fig. 9, SPEC §7)",
        r"avg $\|r\|_2 / \|x\|_2$",
        True,
        [
            ("robustness", "test", "-", r"DeepFool $r$ (HPD22)", 1.0, "o"),
            ("robustness_tight", "test", "--", r"tight $s^* r$ (first flip)", 1.0, "v"),
        ],
    ),
    "snr_condition": (
        "Spread of the SNR singular values (HPD22 Cor. 1)",
        r"$\omega_{\max}/\omega_{\min}$",
        True,
        [
            ("snr_condition", "train", "-", "train", 1.0, "o"),
            ("snr_condition", "test", "--", "test", 1.0, "o"),
        ],
    ),
    "ls_perp_ratio": (
        "Proximity to the central path (HPD22 Fig. 2)",
        r"$\mathcal{L}^{\perp}_{LS} / \mathcal{L}_{LS}$",
        True,
        [("ls_perp_ratio", "train", "-", None, 1.0, "o")],
    ),
}


def test_figure_names():
    assert FIGURE_NAMES == (
        "error",
        "equinorm",
        "equiangularity",
        "maxangle",
        "self_duality",
        "nc1",
        "ncc_mismatch",
        "robustness",
        "snr_condition",
        "decomposition",
        "ls_perp_ratio",
        "snr",
    )
    assert [spec.name for spec in METRIC_FIGURES] == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_metric_figure_of_two_losses_in_one_cell(name):
    """An MSE and a CE run of one (dataset, network): one panel, one colour per loss, each
    run's curves and its zero-error epoch in its colour, the legend naming losses and styles."""
    title, ylabel, logy, curves = EXPECTED[name]
    runs = [make_run("m", "mse"), make_run("c", "ce", factor=2.0)]
    fig = figure(runs, name)
    assert fig.get_suptitle() == title and fig._suptitle.get_fontsize() == 11
    ax = fig.axes[0]
    assert ax.get_title() == "mnist · vgg11" and ax.title.get_fontsize() == 9
    assert (ax.get_ylabel(), ax.get_xlabel()) == (ylabel, "epoch")
    assert ax.yaxis.label.get_fontsize() == 8 and ax.xaxis.label.get_fontsize() == 8
    assert ax.get_yscale() == ("log" if logy else "linear") and ax.get_xscale() == "log"
    expected = []
    for factor, color in ((1.0, BLUE), (2.0, ORANGE)):
        for key, split, style, _, scale, marker in curves:
            expected.append((series(key, split, factor, scale), color, style, marker, 2.5))
        expected.append(vline(2.0, color, ":"))
    assert lines(ax) == expected
    assert ax.get_xlim() == pytest.approx((1 / 1.15, 4 * 1.15), rel=1e-12)
    entries = [variant_entry("MSE", BLUE), variant_entry("CE", ORANGE)]
    entries += [style_entry(c[3], c[2], c[5]) for c in curves if c[3] is not None]
    if name == "robustness":
        entries.append(style_entry("x + r out of range (right axis)", "-.", "s", "none"))
    assert legend(fig) == [*entries, (*zero_entry(False), "None", "0.3")]


def test_one_loss_marks_zero_error_in_red_and_names_the_loss_in_titles():
    runs = [make_run("a", "mse"), make_run("b", "mse", dataset="cifar10", factor=2.0)]
    fig = metric_figure(runs, METRIC_FIGURES[5])  # nc1
    left, right = fig.axes
    assert (left.get_title(), right.get_title()) == ("mnist · vgg11 · mse", "cifar10 · vgg11 · mse")
    assert left.get_ylabel() == r"tr$(\Sigma_W \Sigma_B^\dagger)/C$" and right.get_ylabel() == ""
    assert lines(right) == [
        (series("nc1", "train", 2.0), BLUE, "-", "o", 2.5),
        (series("nc1", "test", 2.0), BLUE, "--", "o", 2.5),
        vline(2.0, RED, "-"),
    ]
    zero = right.get_lines()[-1]
    assert (zero.get_linewidth(), zero.get_alpha(), zero.get_zorder()) == (1.0, 0.8, 0)
    assert legend(fig) == [
        variant_entry("MSE", BLUE),
        style_entry("train", "-"),
        style_entry("test", "--"),
        (*zero_entry(True), "None", RED),
    ]
    assert tuple(fig.get_size_inches()) == pytest.approx((7.4, 3.8), abs=1e-12)


def test_grid_of_datasets_and_networks():
    """Datasets as columns, networks as rows, in order of first appearance; a missing cell is
    blank; 'epoch' under the lowest panel of each column, the y label on the left-most."""
    runs = [
        make_run("a", "mse", "mnist", "vgg11"),
        make_run("b", "ce", "cifar10", "vgg11"),
        make_run("c", "mse", "cifar10", "resnet18"),
    ]
    fig = figure(runs, "error")
    _, top_right, bottom_left, bottom_right = fig.axes
    assert tuple(fig.get_size_inches()) == pytest.approx((7.4, 6.4), abs=1e-12)
    assert [ax.get_title() for ax in fig.axes] == [
        "mnist · vgg11",
        "cifar10 · vgg11",
        "",
        "cifar10 · resnet18",
    ]
    assert bottom_left.axison is False and bottom_right.axison is True
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "", "", "epoch"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["error (%)", "", "", "error (%)"]
    assert bottom_left.get_xscale() == "linear" and bottom_right.get_xscale() == "log"
    assert [len(ax.get_lines()) for ax in fig.axes] == [3, 3, 0, 3]
    assert top_right.get_lines()[0].get_color() == ORANGE


def test_epoch_axis_ticks_and_grid():
    ax = figure([make_run()], "nc1").axes[0]
    formatter = ax.xaxis.get_major_formatter()
    assert (formatter(10.0, 0), formatter(0.5, 1), formatter(100.0, 2)) == ("10", "0.5", "100")
    assert type(ax.xaxis.get_major_locator()).__name__ == "LogLocator"
    assert ax.xaxis.get_major_locator()._base == 10.0
    assert type(ax.xaxis.get_minor_formatter()).__name__ == "NullFormatter"
    major, minor = ax.xaxis._major_tick_kw, ax.xaxis._minor_tick_kw
    assert (major["gridOn"], major["grid_alpha"], major["labelsize"]) == (True, 0.3, 8)
    assert (minor["gridOn"], minor["grid_alpha"], minor["labelsize"]) == (True, 0.1, 8)
    assert ax.yaxis._major_tick_kw["gridOn"] is True
    assert ax.yaxis._major_tick_kw["grid_alpha"] == 0.3
    assert ax.yaxis._minor_tick_kw["gridOn"] is False
    assert ax.yaxis._minor_tick_kw["labelsize"] == 8


def test_variant_colours_and_legend_order():
    """Other losses take the spare colours in turn; MSE, then CE, then the rest, in the legend."""
    losses = ["huber", "CE", "l1", "mse", "a", "b", "c", "d", "e"]
    runs = [make_run(f"r{k}", loss, factor=k + 1.0) for k, loss in enumerate(losses)]
    fig = figure(runs, "self_duality")
    colors = [line.get_color() for line in fig.axes[0].get_lines()[::2]]
    spare = OTHER_COLORS
    assert colors == [spare[0], ORANGE, spare[1], BLUE, *spare[2:], spare[0]]
    labels = [entry[0] for entry in legend(fig)]
    assert labels == ["MSE", "CE", "HUBER", "L1", "A", "B", "C", "D", "E", "zero training error"]


def test_runs_of_one_loss_in_a_cell_are_told_apart_by_name():
    runs = [make_run("a"), make_run("b", factor=2.0), make_run("c", "ce", factor=3.0)]
    runs.append(make_run("d", dataset="svhn", factor=4.0))
    fig = figure(runs, "self_duality")
    first, second = fig.axes
    assert [line.get_color() for line in first.get_lines()[::2]] == [BLUE, ORANGE, "#2ca02c"]
    assert [line.get_color() for line in second.get_lines()[::2]] == ["#9467bd"]
    assert [entry[:2] for entry in legend(fig)] == [
        ("MSE (a)", BLUE),
        ("MSE (b)", ORANGE),
        ("CE (c)", "#2ca02c"),
        ("MSE (d)", "#9467bd"),
        ("zero training error", "0.3"),
    ]


def test_metric_figure_without_data_is_none():
    no_nc1 = make_run(keys=[k for k in KEYS if k != "nc1"])
    no_nc1.records[0].pop("nc1")
    assert figure([no_nc1], "nc1") is None
    nan_only = make_run(keys=[])
    for record in nan_only.records:
        record["nc1"] = None
    assert figure([nan_only], "nc1") is None
    right_only = make_run(keys=["robustness_out_of_range"])
    assert figure([right_only], "robustness") is None
    test_only = make_run(keys=["robustness"])
    assert figure([test_only], "robustness") is not None


def without_lines(name: str, dataset: str) -> Run:
    """A run with only the SNR condition logged and never zero training error: nothing to draw
    in the other figures, not even the zero-error line."""
    run = make_run(name, dataset=dataset, keys=["snr_condition"], online=False)
    run.records[0].pop("nc1")
    for record in run.records:
        if record["split"] == "train":
            record["error"] = 0.5
    return run


def test_a_curve_missing_from_a_run_leaves_the_others():
    run = make_run(keys=["nc2_equinorm_classifiers"])
    fig = figure([run], "equinorm")
    assert lines(fig.axes[0]) == [
        (series("nc2_equinorm_classifiers", "train"), BLUE, "--", "o", 2.5),
        vline(2.0, RED, "-"),
    ]
    assert [entry[0] for entry in legend(fig)] == [
        "MSE",
        r"classifiers $\|w_c\|$",
        "zero training error",
    ]


def test_a_log_panel_without_data_stays_linear():
    runs = [make_run("a"), without_lines("b", "svhn")]
    with_data, without = figure(runs, "nc1").axes
    assert with_data.get_yscale() == "log" and without.get_yscale() == "linear"
    assert lines(without) == []


def test_zero_error_at_epoch_zero_or_never_draws_no_line():
    at_zero = make_run()
    at_zero.records[0]["error"] = 0.0
    never = make_run("n", dataset="svhn")
    for record in never.records:
        if record["split"] == "train":
            record["error"] = 0.5
    fig = figure([at_zero, never], "self_duality")
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1]


def test_robustness_right_axis():
    """The out-of-range share on a second axis from 0, in grey, hollow squares; labelled on the
    right-most panel of a row; no second axis for a run without it."""
    runs = [
        make_run("a"),
        make_run("b", dataset="svhn", factor=2.0),
        make_run("c", dataset="stl10", keys=["robustness"]),
    ]
    fig = figure(runs, "robustness")
    assert len(fig.axes) == 5
    left, middle, plain, twin_left, twin_middle = fig.axes
    assert twin_left.get_shared_x_axes().joined(twin_left, left)
    for twin, factor in ((twin_left, 1.0), (twin_middle, 2.0)):
        color = BLUE
        assert lines(twin) == [
            (series("robustness_out_of_range", "test", factor, 100.0), color, "-.", "s", 4.0)
        ]
        assert twin.get_lines()[0].get_markerfacecolor() == "none"
        assert twin.get_ylim()[0] == 0
        kw = twin.yaxis._major_tick_kw
        assert (kw["labelsize"], kw["color"], kw["labelcolor"]) == (8, "0.4", "0.4")
        assert twin.get_yscale() == "linear"
    assert twin_left.get_ylabel() == ""
    assert twin_middle.get_ylabel() == "pixels of x + r out of range (%)"
    assert twin_middle.yaxis.label.get_color() == "0.4"
    assert twin_middle.yaxis.label.get_fontsize() == 8
    assert [ax.get_ylabel() for ax in (left, middle, plain)] == [r"avg $\|r\|_2 / \|x\|_2$", "", ""]
    assert lines(plain)[0][0] == series("robustness", "test")


DECOMPOSITION_TITLE = (
    r"MSE decomposition (HPD22 Fig. 2): $\mathcal{L} = \mathcal{L}_{NC1} + "
    r"\mathcal{L}_{NC2/3} + \mathcal{L}^{\perp}_{LS}$"
)


def test_decomposition_figure_two_losses():
    runs = [make_run("c", "ce", factor=2.0), make_run("m", "mse")]
    fig = decomposition_figure(runs)
    assert fig.get_suptitle() == DECOMPOSITION_TITLE
    (ax,) = fig.axes
    assert ax.get_title() == "mnist · vgg11" and ax.get_ylabel() == "loss (training set)"
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "epoch"
    expected = []
    for factor, style in ((2.0, "--"), (1.0, "-")):  # MSE solid, CE dashed
        expected += [
            (series(key, "train", factor), color, style, "o", 2.5)
            for key, _, color in DECOMPOSITION_TERMS
        ]
        expected.append(vline(2.0, RED, style))
    assert lines(ax) == expected
    assert ax.get_xlim() == pytest.approx((1 / 1.15, 4 * 1.15), rel=1e-12)
    assert legend(fig) == [
        *((label, color, "-", 2, "None", color) for _, label, color in DECOMPOSITION_TERMS),
        ("MSE", "0.3", "-", 1.5, "None", "0.3"),
        ("CE", "0.3", "--", 1.5, "None", "0.3"),
        ("zero training error", RED, "-", 1, "None", RED),
    ]


def test_decomposition_figure_one_loss_and_without_data():
    partial = make_run(keys=["loss_mse", "loss_nc1"])
    other = without_lines("o", "svhn")
    fig = figure([partial, other], "decomposition")
    with_data, without = fig.axes
    colors = {key: color for key, _, color in DECOMPOSITION_TERMS}
    assert lines(with_data) == [
        (series("loss_mse", "train"), colors["loss_mse"], "-", "o", 2.5),
        (series("loss_nc1", "train"), colors["loss_nc1"], "-", "o", 2.5),
        vline(2.0, RED, "-"),
    ]
    assert without.get_yscale() == "linear" and lines(without) == []
    assert [entry[0] for entry in legend(fig)][5:] == ["zero training error"]
    assert figure([other], "decomposition") is None
    assert decomposition_figure([make_run(keys=["loss_ls"])]) is None


def snr_run(name: str, omegas, loss="mse", zero_at=2) -> Run:
    records = []
    for epoch, omega in zip(EPOCHS, omegas, strict=True):
        error = 0.0 if zero_at is not None and epoch >= zero_at else 0.5
        rec = {"epoch": epoch, "split": "train", "error": error}
        if omega is not None:
            rec["snr_singular_values"] = omega
        records.append(rec)
    config = {"dataset": "mnist", "net": "vgg11", "loss": loss}
    return Run(Path("runs") / name, config, records)


FIT = {
    "fitted": True,
    "start_epoch": 2,
    "epochs": np.array([2, 4]),
    "predicted_omega": np.array([[1.5, 0.5], [2.5, 0.75]]),
    "r2_omega": 0.98765,
    "r2_time": 0.5,
    "c1": 16.0,
    "c2": 4.0,
    "c3": 0.25,
}
THREE = [[1.0, 0.4, 0.2], [2.0, 0.8, 0.3], [3.0, 1.2, 0.5]]


def snr_runs() -> list[Run]:
    return [
        snr_run("a", THREE),
        snr_run("none", [None] * 3),
        snr_run("b", [[1.0], [2.0], [4.0]], "ce", zero_at=None),
        snr_run("c", [[1.0, 2.0]] * 3),
        snr_run("d", [[1.0, 3.0], [2.0, 3.0], [4.0, 3.0]]),
    ]


def note(ax) -> str:
    (text,) = ax.texts
    assert text.get_position() == (0.02, 0.97) and text.get_transform() is ax.transAxes
    assert (text.get_fontsize(), text.get_va(), text.get_wrap()) == (7, "top", True)
    return text.get_text()


def test_snr_figure_panels_dots_fits_and_notes():
    fits = {0: {**FIT, "start_epoch": 0}, 2: {"fitted": False, "reason": "too few"}, 4: FIT}
    fig = snr_figure(snr_runs(), fits)
    assert fig.get_suptitle() == "SNR singular values (HPD22 §3, SPEC §5)"
    assert fig._suptitle.get_fontsize() == 11
    assert len(fig.axes) == 6 and tuple(fig.get_size_inches()) == pytest.approx((12.6, 7.4))
    a, b, c, d, blank1, blank2 = fig.axes
    assert (blank1.axison, blank2.axison, a.axison) == (False, False, True)
    assert [ax.get_title() for ax in (a, b, c, d)] == [
        "mnist · vgg11 · mse (a)",
        "mnist · vgg11 · ce (b)",
        "mnist · vgg11 · mse (c)",
        "mnist · vgg11 · mse (d)",
    ]
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch"] * 4 + ["", ""]
    omega_label = r"SNR singular values $\omega_j$"
    assert [ax.get_ylabel() for ax in fig.axes] == [omega_label, "", "", omega_label, "", ""]
    assert a.yaxis.label.get_fontsize() == 8 and d.yaxis.label.get_fontsize() == 8
    for ax in (a, b, c, d):
        assert ax.title.get_fontsize() == 9 and ax.xaxis.label.get_fontsize() == 8
        assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
        assert ax.get_xlim() == pytest.approx((1 / 1.15, 4 * 1.15), rel=1e-12)
        assert ax.xaxis.get_major_formatter()(10.0, 0) == "10"
    viridis = colormaps["viridis"]
    three = [viridis(j / 2 * 0.9) for j in range(3)]
    dots = [
        ([[float(e), THREE[k][j]] for k, e in enumerate(EPOCHS)], three[j], "None", "o", 2.5)
        for j in range(3)
    ]
    fit_lines = [
        ([[2.0, 1.5], [4.0, 2.5]], three[0], "-", "None", 6.0),
        ([[2.0, 0.5], [4.0, 0.75]], three[1], "-", "None", 6.0),
    ]
    assert lines(a) == [*dots, *fit_lines, vline(2.0, RED, "-")]
    assert [line.get_linewidth() for line in a.get_lines()[3:6]] == [1.0, 1.0, 1.0]
    assert lines(b) == [([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]], viridis(0.0), "None", "o", 2.5)]
    two = [viridis(0.0), viridis(0.9)]
    assert [line.get_color() for line in d.get_lines()] == [*two, *two, RED]
    assert note(a) == (
        "fit over all epochs: R²(ω) = 0.988, R²(t) = 0.500\nc₁, c₂, c₃ = 16, 4, 0.25 (κ = 1/epoch)"
    )
    assert note(b) == "no central-path fit: too few"
    assert note(c) == "no central-path fit"
    assert note(d).startswith("fit from epoch 2: R²(ω) = 0.988")
    assert legend(fig) == [
        (r"measured $\omega_j$ (colour: j)", "0.3", "None", 1.5, "o", "0.3"),
        (
            r"fit $c_1\log\omega + c_2\omega^2 + c_3\omega^4 = a_j + \kappa t$",
            "0.3",
            "-",
            1,
            "None",
            "0.3",
        ),
        ("zero training error", RED, "-", 1, "None", RED),
    ]
    (leg,) = fig.legends
    assert leg.legend_handles[0].get_markersize() == 3


def test_snr_figure_computes_the_fits_when_not_given():
    runs = snr_runs()[2:3]
    fig = snr_figure(runs)
    assert len(fig.axes) == 1 and tuple(fig.get_size_inches()) == pytest.approx((5.2, 4.3))
    assert note(fig.axes[0]) == (
        "no central-path fit: fit_central_path: need at least 3 times and more equations "
        "(T·J = 3) than unknowns (3 + J = 4) plus one"
    )
    assert [entry[0] for entry in legend(fig)] == [
        r"measured $\omega_j$ (colour: j)",
        "zero training error",
    ]
    assert len(snr_figure(snr_runs(), {}).legends[0].legend_handles) == 2


def test_snr_figure_none_without_singular_values():
    assert snr_figure([snr_run("x", [None] * 3)]) is None
    assert figure([make_run()], "snr") is None


def test_figure_dispatch():
    run = make_run()
    assert figure([run], "snr") is None
    assert figure([run], "decomposition").get_suptitle() == DECOMPOSITION_TITLE
    online = figure([run], "online")
    assert online.get_suptitle() == "Neural Collapse of the training passes, every few SGD steps"
    assert (
        figure([snr_run("s", THREE)], "snr", {0: FIT})
        .axes[0]
        .texts[0]
        .get_text()
        .startswith("fit from epoch 2")
    )
    with pytest.raises(ValueError) as caught:
        figure([run], "nc9")
    assert (
        str(caught.value) == f"figure: name must be one of {[*FIGURE_NAMES, 'online']}, got 'nc9'"
    )


@pytest.fixture
def saved(monkeypatch):
    """Replaces the figure saver: records (out_dir, name, formats, suptitle)."""
    calls = []

    def save(fig, out_dir, name, formats=("default",)):
        notes = [text.get_text() for text in fig.axes[0].texts]
        calls.append((out_dir, name, tuple(formats), fig.get_suptitle(), notes))
        return [Path(out_dir) / f"{name}.{fmt}" for fmt in formats]

    monkeypatch.setattr(plots, "save_figure", save)
    return calls


def test_plot_runs_writes_every_figure_with_data(tmp_path, saved):
    runs = [make_run(), snr_run("s", THREE)]
    out = tmp_path / "figs"
    paths = plot_runs(runs, out, fits={1: FIT})
    names = [*FIGURE_NAMES, "online"]
    assert [call[1] for call in saved] == names
    assert {call[2] for call in saved} == {("png", "pdf")}
    assert {call[0] for call in saved} == {out}
    assert paths == [out / f"{n}.{fmt}" for n in names for fmt in ("png", "pdf")]
    snr_title = saved[names.index("snr")][3]
    assert snr_title == "SNR singular values (HPD22 §3, SPEC §5)"
    assert saved[names.index("snr")][4][0].startswith("fit from epoch 2: R²(ω) = 0.988")
    saved.clear()
    assert plot_runs([make_run(keys=["nc1"], online=False)], out, formats=("svg",)) == [
        out / "error.svg",
        out / "nc1.svg",
    ]


def test_plot_runs_makes_the_folder_and_refuses_bad_arguments(tmp_path):
    out = tmp_path / "new" / "figures"
    empty = Run(Path("e"), {}, [{"epoch": 1, "split": "train", "error": None}])
    assert plot_runs([empty], out) == [] and out.is_dir()
    error_only = make_run(keys=[], online=False)
    error_only.records[0].pop("nc1")
    written = plot_runs([error_only], tmp_path / "one", formats=["svg"])
    assert written == [tmp_path / "one" / "error.svg"] and written[0].is_file()
    with pytest.raises(ValueError, match="no runs given"):
        plot_runs([], tmp_path)
    with pytest.raises(ValueError, match=r"got \['jpg'\]"):
        plot_runs([make_run()], tmp_path, formats=("png", "jpg"))


# ------------------------------------------------- boundaries of what is drawn (mutation run)
def test_every_figure_is_drawn_without_a_warning():
    """matplotlib warns where a call contradicts itself (a grid turned off while its line
    properties are given, which it then turns on; an unknown line style): the figures of
    ordinary runs raise none."""
    runs = [make_run("c", "ce", factor=2.0), make_run("m", "mse")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = [name for name in FIGURE_NAMES if figure(runs, name) is not None]
        assert snr_figure(snr_runs(), {0: FIT}) is not None
    assert drawn == [name for name in FIGURE_NAMES if name != "snr"]


def test_a_run_measured_at_one_epoch_is_drawn():
    """One measured epoch is data: its point is drawn (the marker tells curves apart)."""
    run = make_run(online=False)
    run.records[:] = [r for r in run.records if r["epoch"] == 1]
    (ax,) = figure([run], "nc1").axes
    assert lines(ax)[0][0] == [[1.0, value("nc1", "train", 1)]]


def test_zero_training_error_from_the_first_epoch_is_marked():
    run = make_run()
    for record in run.records:
        if record["split"] == "train" and record["epoch"] == 1:
            record["error"] = 0.0
    assert run.zero_error_epoch == 1
    (ax,) = figure([run], "self_duality").axes
    assert lines(ax)[-1] == vline(1.0, RED, "-")


def test_values_of_zero_are_left_out_on_log_axes_only():
    """A log axis cannot show 0: the point is left out of the line (the decomposition's terms,
    NC1, the SNR singular values); on a linear axis (the out-of-range share) 0 is drawn."""
    run = make_run()
    for record in run.records:
        if record["epoch"] == 2:
            record.update(nc1=0.0, loss_nc1=0.0, robustness_out_of_range=0.0)
    without_2 = [[x, y] for x, y in series("nc1", "train") if x != 2.0]
    (ax,) = figure([run], "nc1").axes
    assert lines(ax)[0][0] == without_2
    (ax,) = decomposition_figure([run]).axes
    by_color = {line[1]: line[0] for line in lines(ax)}
    term_color = {key: color for key, _, color in DECOMPOSITION_TERMS}
    assert by_color[term_color["loss_nc1"]] == [
        [x, y] for x, y in series("loss_nc1", "train") if x != 2.0
    ]
    assert by_color[term_color["loss_mse"]] == series("loss_mse", "train")
    _, twin = figure([run], "robustness").axes
    assert lines(twin)[0][0] == [
        [x, 0.0 if x == 2.0 else y] for x, y in series("robustness_out_of_range", "test", 1, 100)
    ]
    omegas = [[1.0, 0.5], [2.0, 0.0], [3.0, 0.25]]
    (ax,) = snr_figure([snr_run("z", omegas)], {}).axes
    assert [line[0] for line in lines(ax)[:2]] == [
        [[1.0, 1.0], [2.0, 2.0], [4.0, 3.0]],
        [[1.0, 0.5], [4.0, 0.25]],
    ]


def test_a_missing_right_curve_leaves_the_next_one():
    """A figure of one's own with two right-axis curves: the first missing from a run, the
    second is still drawn."""
    spec = MetricFigure(
        "two_right",
        "two right curves",
        "NC1",
        (Curve("nc1", "train", "-", "NC1"),),
        right=(
            Curve("robustness_tight", "test", ":", "tight"),
            Curve("robustness_out_of_range", "test", "-.", "out of range", 100.0, "s"),
        ),
        right_ylabel="share (%)",
    )
    run = make_run(keys=[k for k in KEYS if k != "robustness_tight"])
    _, twin = metric_figure([run], spec).axes
    assert [line[0] for line in lines(twin)] == [series("robustness_out_of_range", "test", 1, 100)]


def test_the_decomposition_tells_four_variants_apart_by_line_style():
    runs = [
        make_run(loss, loss, factor=k + 1.0) for k, loss in enumerate(["mse", "ce", "l1", "hb"])
    ]
    entries = legend(decomposition_figure(runs))[len(DECOMPOSITION_TERMS) : -1]
    assert [(label, style) for label, _, style, *_ in entries] == [
        ("MSE", "-"),
        ("CE", "--"),
        ("L1", ":"),
        ("HB", "-."),
    ]


def test_a_fit_from_the_first_epoch_says_so():
    (ax,) = snr_figure([snr_run("a", THREE)], {0: {**FIT, "start_epoch": 1}}).axes
    assert note(ax).startswith("fit from epoch 1: R²(ω) = 0.988")
