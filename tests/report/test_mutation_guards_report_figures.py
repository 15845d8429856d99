"""Guards of the figures' shared layout (figure_layout.py) and of the training passes' figure
(online_figures.py): what a reader sees, read back from the ``matplotlib.figure.Figure``
objects (grid shapes, sizes, titles, axis labels and scales, the data of every line, colours,
legend entries, the files written), on tiny hand-made runs, so that a small change of these
modules fails here. The tables' and texts' guards are in test_mutation_guards_report_tables.py.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.lines import Line2D

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
from ncfast.report.online_figures import LR_DROP_COLOR, ONLINE_FIGURE, online_figure
from ncfast.report.runs import Run

# ---- ncfast.report.figure_layout ---------------------------------------------------------------


def test_constants_a_reader_sees():
    assert FORMATS == ("png", "pdf")
    assert ZERO_ERROR_COLOR == "#d62728"
    assert LOSS_COLORS == {"mse": "#1f77b4", "ce": "#ff7f0e", "mse-rescaled": "#2ca02c"}
    assert OTHER_COLORS == ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    assert DECOMPOSITION_TERMS == (
        ("loss_mse", r"$\mathcal{L}$ (MSE)", "black"),
        ("loss_ls", r"$\mathcal{L}_{LS} = \mathcal{L}_{NC1} + \mathcal{L}_{NC2/3}$", "#1f77b4"),
        ("loss_nc1", r"$\mathcal{L}_{NC1}$", "#2ca02c"),
        ("loss_nc23", r"$\mathcal{L}_{NC2/3}$", "#ff7f0e"),
        ("loss_ls_perp", r"$\mathcal{L}^{\perp}_{LS}$", "#9467bd"),
    )
    assert (ONLINE_FIGURE, LR_DROP_COLOR) == ("online", "0.45")


@pytest.mark.parametrize(("nrows", "ncols"), [(1, 1), (2, 3)])
def test_new_figure_grid_is_always_two_dimensional(nrows, ncols):
    fig, axes = new_figure(nrows, ncols, (3.0, 2.0))
    assert axes.shape == (nrows, ncols)
    assert len(fig.axes) == nrows * ncols
    assert tuple(fig.get_size_inches()) == (3.0, 2.0)
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height in pixels, from the PNG header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_save_figure_names_formats_and_resolution(tmp_path):
    fig, _ = new_figure(1, 1, (2.0, 1.0))
    out = tmp_path / "new" / "figures"
    paths = save_figure(fig, out, "nc1")
    assert paths == [out / "nc1.png", out / "nc1.pdf"]
    assert png_size(paths[0]) == (300, 150)  # 150 dpi
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert save_figure(fig, out, "nc1", formats=("svg",)) == [out / "nc1.svg"]
    assert sorted(p.name for p in out.iterdir()) == ["nc1.pdf", "nc1.png", "nc1.svg"]


def train_run(rows: list[dict], config: dict | None = None, name: str = "run") -> Run:
    """A run in memory whose train records (epochs 1, 2, ...) hold ``rows``' numbers."""
    records = [
        {"epoch": epoch, "split": "train", "error": 0.5, **row}
        for epoch, row in enumerate(rows, start=1)
    ]
    return Run(path=Path("runs") / name, config=dict(config or {}), records=records)


def test_run_history_adds_the_ls_perp_ratio():
    run = train_run(
        [
            {"loss_ls_perp": 1.0, "loss_ls": 4.0},
            {"loss_ls_perp": 1.0, "loss_ls": 0.0},
            {"loss_ls_perp": 0.0, "loss_ls": 0.0},
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zero L_LS divides silently
        hist = run_history(run, "train")
    ratio = hist["ls_perp_ratio"]
    assert ratio[:2].tolist() == [0.25, math.inf] and math.isnan(ratio[2])
    assert hist["epoch"].tolist() == [1, 2, 3] and hist["loss_ls"].tolist() == [4.0, 0.0, 0.0]
    assert "ls_perp_ratio" not in run.history("train")  # the cached history is not changed
    for only in ("loss_ls_perp", "loss_ls"):
        assert "ls_perp_ratio" not in run_history(train_run([{only: 1.0}]), "train")
    test_split = Run(Path("r"), {}, [{"epoch": 1, "split": "test", "error": 0.5, "loss_ls": 2.0}])
    assert set(run_history(test_split, "test")) == {"epoch", "error", "loss_ls"}


def test_panel_figsize_has_a_minimum_width():
    assert panel_figsize(1, 1, 4.4, 3.2) == pytest.approx((5.2, 4.4), abs=1e-12)
    assert panel_figsize(2, 3, 2.0, 1.0) == pytest.approx((6.6, 3.2), abs=1e-12)


def test_plot_series_draws_the_drawable_points_only():
    epochs = np.array([0, 1, 2, 3, 4])
    values = np.array([1.0, math.nan, -1.0, 0.0, 2.0])
    _, axes = new_figure(1, 2, (4.0, 2.0))
    linear, log = axes[0]
    assert plot_series(linear, epochs, values, logy=False, color="red") is True
    assert plot_series(log, epochs, values, logy=True, color="red") is True
    (line,) = linear.get_lines()
    assert line.get_xydata().tolist() == [[2.0, -1.0], [3.0, 0.0], [4.0, 2.0]]
    assert log.get_lines()[0].get_xydata().tolist() == [[4.0, 2.0]]
    assert (line.get_color(), line.get_marker(), line.get_markersize()) == ("red", "o", 2.5)
    assert line.get_linewidth() == 1.3
    styled = plot_series(linear, epochs, values, logy=False, marker="s", markersize=4)
    assert styled is True and linear.get_lines()[1].get_marker() == "s"
    assert linear.get_lines()[1].get_markersize() == 4
    nothing = np.array([1.0, math.nan, -1.0, 0.0, math.inf])  # epoch 0 is not drawn
    assert plot_series(log, epochs, nothing, logy=True) is False
    assert plot_series(log, np.zeros(2), np.ones(2), logy=False) is False  # epoch 0
    assert len(log.get_lines()) == 1


def log_axis(values=None, ylim=None):
    _, axes = new_figure(1, 1, (3.0, 2.0))
    ax = axes[0, 0]
    if values is not None:
        ax.plot(np.arange(1, len(values) + 1), values)
    if ylim is not None:
        ax.set_ylim(*ylim)
    log_y(ax)
    return ax


def formatters(ax) -> tuple[str, str]:
    return (
        type(ax.yaxis.get_major_formatter()).__name__,
        type(ax.yaxis.get_minor_formatter()).__name__,
    )


def test_log_y_within_two_decades_writes_plain_numbers():
    ax = log_axis([0.05, 0.5])
    assert ax.get_yscale() == "log"
    major, minor = ax.yaxis.get_major_formatter(), ax.yaxis.get_minor_formatter()
    assert [major(v) for v in (0.1, 0.06, 0.3)] == ["0.1", "0.06", "0.3"]
    assert [minor(v) for v in (0.06, 0.2)] == ["0.06", "0.2"]
    assert (major.labelOnlyBase, minor.labelOnlyBase) == (False, False)
    assert minor.minor_thresholds == (2, 0.5)
    # Exactly two decades: matplotlib's own notation.
    assert formatters(log_axis(ylim=(0.01, 1.0))) == (
        "LogFormatterSciNotation",
        "LogFormatterSciNotation",
    )
    assert formatters(log_axis([1e-3, 1.0])) == ("LogFormatterSciNotation",) * 2


def test_log_y_widens_nearly_equal_values_to_a_factor_of_one_and_a_half():
    ax = log_axis([0.5, 0.5000001])
    low, high = ax.get_ylim()
    assert math.sqrt(low * high) == pytest.approx(0.50000005, rel=1e-6)
    assert high / low == pytest.approx(2.25, rel=1e-12)
    assert low == pytest.approx(0.50000005 / 1.5, rel=1e-6)
    assert formatters(ax)[0] == "_PlainLogFormatter"
    # A range of exactly ×1.5 is kept.
    assert log_axis(ylim=(2.0, 3.0)).get_ylim() == pytest.approx((2.0, 3.0), rel=1e-12)


@pytest.mark.parametrize(
    ("width", "entries", "ncol"), [(5.4, 5, 3), (5.4, 2, 2), (1.0, 3, 1), (9.0, 9, 5)]
)
def test_figure_legend_columns_and_style(width, entries, ncol):
    fig, _ = new_figure(1, 1, (width, 2.0))
    handles = [Line2D([], [], label=f"entry {i}") for i in range(entries)]
    figure_legend(fig, handles)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"entry {i}" for i in range(entries)]
    assert legend._ncols == ncol
    assert legend._loc == 8  # lower center
    assert legend.get_frame_on() is False
    assert {t.get_fontsize() for t in legend.get_texts()} == {8.0}


# ---- ncfast.report.online_figures --------------------------------------------------------------

LOSSES = ("loss_mse", "loss_ls", "loss_nc1", "loss_nc23", "loss_ls_perp")


def online_run(
    name: str = "on", config: dict | None = None, online_epochs=None, online_lr=None
) -> Run:
    """Eval-mode train/test records at epochs 1-3 (zero training error from epoch 2) and six
    training-pass rows, steps 5..30 at epochs step/10 (or ``online_epochs``)."""
    records = []
    for epoch in (1, 2, 3):
        scale = 2.0**-epoch
        train = {"epoch": epoch, "split": "train", "error": 0.5 if epoch == 1 else 0.0}
        train["nc1"] = 4 * scale
        train.update({key: (k + 1) * scale for k, key in enumerate(LOSSES)})
        records += [train, {"epoch": epoch, "split": "test", "error": 0.25}]
    steps = (5, 10, 15, 20, 25, 30)
    epochs = online_epochs or [s / 10 for s in steps]
    lrs = online_lr or [0.1, 0.1, 0.1, 0.01, 0.01, 0.01]
    for step, epoch, lr in zip(steps, epochs, lrs, strict=True):
        records.append(
            {
                "epoch": epoch,
                "step": step,
                "split": "train_online",
                "nc1": 100.0 / step,
                "loss_mse": 10.0 / step,
                "loss_nc1": 5.0 / step,
                "lr": lr,
            }
        )
    base = {"dataset": "mnist5k", "net": "vgg11", "loss": "mse"}
    return Run(path=Path("runs") / name, config={**base, **(config or {})}, records=records)


def plain_run() -> Run:
    return Run(Path("runs") / "plain", {}, [{"epoch": 1, "split": "train", "error": 0.5}])


def line_data(line) -> tuple:
    return (
        line.get_xydata().tolist(),
        line.get_color(),
        line.get_linestyle(),
        line.get_marker(),
        line.get_markersize(),
    )


def online_series(key: str, color: str) -> tuple:
    value = {"nc1": 100.0, "loss_mse": 10.0, "loss_nc1": 5.0}[key]
    points = [[float(s), value / s] for s in (5, 10, 15, 20, 25, 30)]
    return (points, color, "-", "none", 2.5)


def eval_dots(key: str, color: str, per_epoch: float) -> tuple:
    value = 4.0 if key == "nc1" else LOSSES.index(key) + 1.0
    points = [[e * per_epoch, value * 2.0**-e] for e in (1, 2, 3)]
    return (points, color, "None", "o", 4.0)


def vline(x: float, color: str, style: str) -> tuple:
    return ([[x, 0.0], [x, 1.0]], color, style, "None", 6.0)


def test_online_figure_layout_titles_labels_and_legend():
    runs = [plain_run(), online_run("on"), online_run("again")]
    fig = online_figure(runs)
    assert fig is not None
    assert len(fig.axes) == 4  # two runs with training passes × (NC1, decomposition)
    assert tuple(fig.get_size_inches()) == pytest.approx((9.4, 7.6), abs=1e-12)
    assert fig.get_suptitle() == "Neural Collapse of the training passes, every few SGD steps"
    assert fig._suptitle.get_fontsize() == 11
    for row, name in enumerate(("on", "again")):
        nc1_ax, loss_ax = fig.axes[2 * row : 2 * row + 2]
        assert nc1_ax.get_title() == f"mnist5k · vgg11 · mse ({name}): NC1"
        assert nc1_ax.get_ylabel() == r"NC1 = tr$(\Sigma_W \Sigma_B^\dagger)/C$"
        assert loss_ax.get_title() == "MSE decomposition (HPD22 Fig. 2)"
        assert loss_ax.get_ylabel() == "loss (training set)"
        for ax in (nc1_ax, loss_ax):
            assert (ax.title.get_fontsize(), ax.yaxis.label.get_fontsize()) == (9, 8)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [
        *(label for _, label, _ in DECOMPOSITION_TERMS),
        "training passes (online)",
        "eval mode",
        "learning-rate drop",
        "zero training error",
    ]
    handles = legend.legend_handles
    assert [h.get_color() for h in handles] == [
        *(color for _, _, color in DECOMPOSITION_TERMS),
        "0.3",
        "0.3",
        LR_DROP_COLOR,
        ZERO_ERROR_COLOR,
    ]
    assert [h.get_linestyle() for h in handles[-4:]] == ["-", "None", "--", "-"]
    assert [h.get_linewidth() for h in handles[:6]] == [2] * 5 + [1.3]
    assert [h.get_linewidth() for h in handles[-2:]] == [1, 1]
    assert (handles[-3].get_marker(), handles[-3].get_markersize()) == ("o", 4)
    assert legend._ncols == 5  # 9 entries, 9.4 inches wide


def test_online_figure_is_none_without_training_passes():
    assert online_figure([plain_run()]) is None
    assert online_figure([]) is None


def test_online_panels_lines_axes_and_marks():
    """Milestones [1, 3, 0] of a run of 3 epochs: one drop, after epoch 1 (step 10); zero
    training error at epoch 2 (step 20); 10 steps per epoch from config.json."""
    run = online_run(config={"steps_per_epoch": 10, "lr_milestones": [1, 3, 0]})
    fig = online_figure([run])
    nc1_ax, loss_ax = fig.axes
    blue = LOSS_COLORS["mse"]
    marks = [vline(10.0, LR_DROP_COLOR, "--"), vline(20.0, ZERO_ERROR_COLOR, "-")]
    assert [line_data(line) for line in nc1_ax.get_lines()] == [
        online_series("nc1", blue),
        eval_dots("nc1", blue, 10.0),
        *marks,
    ]
    colors = {key: color for key, _, color in DECOMPOSITION_TERMS}
    assert [line_data(line) for line in loss_ax.get_lines()] == [
        online_series("loss_mse", colors["loss_mse"]),
        eval_dots("loss_mse", colors["loss_mse"], 10.0),
        eval_dots("loss_ls", colors["loss_ls"], 10.0),
        online_series("loss_nc1", colors["loss_nc1"]),
        eval_dots("loss_nc1", colors["loss_nc1"], 10.0),
        eval_dots("loss_nc23", colors["loss_nc23"], 10.0),
        eval_dots("loss_ls_perp", colors["loss_ls_perp"], 10.0),
        *marks,
    ]
    drop, zero = nc1_ax.get_lines()[-2:]
    assert (drop.get_linewidth(), drop.get_zorder()) == (1.0, 0)
    assert (zero.get_linewidth(), zero.get_alpha(), zero.get_zorder()) == (1.0, 0.8, 0)
    assert nc1_ax.get_lines()[0].get_linewidth() == 1.3
    for ax in (nc1_ax, loss_ax):
        assert ax.get_xlim()[0] == 0
        assert ax.get_yscale() == "log"
        assert ax.get_xlabel() == "SGD step" and ax.xaxis.label.get_fontsize() == 8
        grid = ax.xaxis.get_gridlines()[0]
        assert grid.get_visible() and grid.get_alpha() == 0.3
        assert ax.xaxis.get_major_ticks()[0].label1.get_fontsize() == 8
        (top,) = ax.child_axes  # the epoch axis over the steps
        assert top.get_xlabel() == "epoch" and top.xaxis.label.get_fontsize() == 8
        assert top._pos == 1.0  # "top"
        to_epoch, to_step = top._functions
        assert (to_epoch(25.0), to_step(2.5)) == (2.5, 25.0)
        assert top.xaxis.get_major_ticks()[0].label1.get_fontsize() == 8


def per_epoch_and_drops(run: Run) -> tuple[float, list[float]]:
    """Steps per epoch (read from the eval-mode dots) and the learning-rate drops drawn."""
    (nc1_ax, _) = online_figure([run]).axes
    dots = nc1_ax.get_lines()[1].get_xydata()
    drops = [line.get_xdata()[0] for line in nc1_ax.get_lines() if line.get_linestyle() == "--"]
    return float(dots[0, 0]), [float(x) for x in drops]


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"steps_per_epoch": True},
        {"steps_per_epoch": 0},
        {"steps_per_epoch": -4},
        {"steps_per_epoch": "10"},
        {"steps_per_epoch": None},
    ],
)
def test_steps_per_epoch_from_the_last_training_pass_row(config):
    """No valid value in config.json: step / epoch of the last online row (30 / 2.5 = 12)."""
    run = online_run(config=config, online_epochs=[0.4, 0.8, 1.2, 1.6, 2.0, 2.5])
    assert per_epoch_and_drops(run) == (12.0, [15.0])  # the lr falls after step 15


def test_steps_per_epoch_from_config_and_a_last_row_at_epoch_zero():
    run = online_run(config={"steps_per_epoch": 8.0}, online_epochs=[0.4] * 6)
    assert per_epoch_and_drops(run)[0] == 8.0
    run = online_run(config={"steps_per_epoch": 8}, online_epochs=[0.4] * 6)
    assert per_epoch_and_drops(run)[0] == 8.0
    run = online_run(online_epochs=[0.4, 0.8, 1.2, 1.6, 2.0, 0.0])
    assert per_epoch_and_drops(run)[0] == 1.0


@pytest.mark.parametrize(
    ("milestones", "lrs", "drops"),
    [
        ([2], None, [20.0]),
        ([0.5, 2.5], None, [5.0, 25.0]),
        ([], None, []),
        (None, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], [10.0, 20.0]),
        (None, [0.1, 0.2, 0.2, 0.2, 0.2, 0.2], []),  # a warm-up rise is no drop
        (None, [0.1] * 6, []),
        (["2"], [0.1, 0.01, 0.01, 0.01, 0.01, 0.01], [5.0]),  # not numbers: the logged lr
    ],
)
def test_learning_rate_drops(milestones, lrs, drops):
    config = {"steps_per_epoch": 10}
    if milestones is not None:
        config["lr_milestones"] = milestones
    run = online_run(config=config, online_lr=lrs)
    assert per_epoch_and_drops(run)[1] == drops


def test_no_logged_learning_rate_and_no_milestones_draws_no_drop():
    run = online_run(config={"steps_per_epoch": 10})
    for record in run.records:
        record.pop("lr", None)
    assert per_epoch_and_drops(run)[1] == []


def test_zero_error_mark_only_after_epoch_zero():
    never = online_run(config={"steps_per_epoch": 10})
    for record in never.records:
        if record["split"] == "train":
            record["error"] = 0.25
    at_start = online_run(config={"steps_per_epoch": 10})
    at_start.records.insert(0, {"epoch": 0, "split": "train", "error": 0.0})
    for run in (never, at_start):
        (nc1_ax, _) = online_figure([run]).axes
        assert ZERO_ERROR_COLOR not in [line.get_color() for line in nc1_ax.get_lines()]


def test_online_panel_without_drawable_values_keeps_a_linear_axis():
    """Every logged value is NaN, no drop, no zero error: nothing is drawn, and the empty
    axis is not made log."""
    run = online_run(config={"steps_per_epoch": 10, "lr_milestones": []})
    for record in run.records:
        for key in ("nc1", *LOSSES):
            if key in record:
                record[key] = None
        if record["split"] == "train":
            record["error"] = 0.25
    nc1_ax, loss_ax = online_figure([run]).axes
    for ax in (nc1_ax, loss_ax):
        assert len(ax.get_lines()) == 0 and ax.get_yscale() == "linear"
        assert ax.get_xlabel() == "SGD step" and ax.get_xlim()[0] == 0


def test_log_panel_leaves_out_values_at_or_below_zero():
    """On the log panels a training-pass value of 0 and an eval-mode value below 0 are not
    drawn (a log axis cannot show them); the other points are."""
    run = online_run(config={"steps_per_epoch": 10})
    for record in run.records:
        if record["split"] == "train_online" and record["step"] == 15:
            record["nc1"] = 0.0
        if record["split"] == "train" and record["epoch"] == 2:
            record["nc1"] = -1.0
    (nc1_ax, _) = online_figure([run]).axes
    passes, dots = nc1_ax.get_lines()[:2]
    assert [x for x, _ in passes.get_xydata().tolist()] == [5.0, 10.0, 20.0, 25.0, 30.0]
    assert [x for x, _ in dots.get_xydata().tolist()] == [10.0, 30.0]
    assert nc1_ax.get_yscale() == "log"


def test_zero_error_at_epoch_one_is_marked():
    run = online_run(config={"steps_per_epoch": 10})
    for record in run.records:
        if record["split"] == "train":
            record["error"] = 0.0
    (nc1_ax, _) = online_figure([run]).axes
    marks = [line for line in nc1_ax.get_lines() if line.get_color() == ZERO_ERROR_COLOR]
    assert [line.get_xdata()[0] for line in marks] == [10.0]


def test_online_figure_is_built_without_warnings():
    """matplotlib warns when a grid is switched off while given line properties: the panels
    turn it on, with no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = online_figure([online_run(config={"steps_per_epoch": 10})])
    assert all(line.get_visible() for line in fig.axes[0].get_xgridlines())


def test_a_stored_steps_per_epoch_of_one_is_used():
    """One SGD step per epoch (a full-batch run) is a valid stored value, not a missing one
    (which would give 30 / 3 = 10 from the last online row)."""
    assert per_epoch_and_drops(online_run(config={"steps_per_epoch": 1}))[0] == 1.0


def test_steps_per_epoch_from_passes_shorter_than_one_epoch():
    """Online rows only within the first epoch: 30 steps at epoch 0.5 are 60 steps per epoch."""
    run = online_run(online_epochs=[0.1, 0.2, 0.3, 0.4, 0.45, 0.5])
    assert per_epoch_and_drops(run)[0] == 60.0
