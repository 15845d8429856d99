"""Run directories (ncfast.report.runs), figures (ncfast.report.plots), Table 1
(ncfast.report.tables) and the
``plot``/``table`` commands, on synthetic runs in the on-disk format of ``ncfast train``."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ncfast.cli import main
from ncfast.report.plots import FIGURE_NAMES, figure, plot_runs
from ncfast.report.runs import (
    SPLITS,
    RunError,
    central_path_fit,
    history_arrays,
    load_run,
    run_from_history,
    to_json_value,
    zero_error_epoch,
)
from ncfast.report.tables import summary, table1_rows, to_csv, to_markdown, write_table1
from ncfast.theory import snr_closed_form
from tests.helpers.synthetic_runs import synthetic_records, write_run_dir


@pytest.fixture(scope="module")
def records():
    return synthetic_records(loss="mse", seed=1)


@pytest.fixture(scope="module")
def grid_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    dirs = []
    for k, (ds, net, loss) in enumerate(
        [(d, n, l) for d in ("mnist", "svhn") for n in ("vgg11", "resnet18") for l in ("mse", "ce")]
    ):
        dirs.append(
            write_run_dir(
                root / f"{ds}-{net}-{loss}",
                dataset=ds,
                net=net,
                loss=loss,
                seed=k,
                zero_error_at=8 if loss == "mse" else 12,
                epochs=(1, 2, 4, 8, 12, 20, 30),
            )
        )
    return dirs


# ---- ncfast.report.runs --------------------------------------------------------------------------
def test_to_json_value_converts_what_a_measurement_returns():
    value = {
        "omega": torch.tensor([2.0, float("nan")], dtype=torch.float64),
        "half": torch.tensor([1.5], dtype=torch.bfloat16),  # no numpy for bf16
        "count": torch.tensor(3),
        "mean": np.float32(0.25),
        4: (np.arange(2), Path("runs/a")),
        "far": -math.inf,
        "name": "mse",
    }
    loose = to_json_value(value)
    assert loose["omega"][0] == 2.0 and math.isnan(loose["omega"][1])  # metrics.jsonl keeps NaN
    assert loose["far"] == -math.inf
    strict = to_json_value(value, strict=True)
    assert strict == {
        "omega": [2.0, None],
        "half": [1.5],
        "count": 3,
        "mean": 0.25,
        "4": [[0, 1], "runs/a"],
        "far": None,
        "name": "mse",
    }
    assert type(strict["count"]) is int and type(strict["mean"]) is float
    json.dumps(strict, allow_nan=False)  # strict JSON, as report.json


def test_load_run_and_history_arrays(tmp_path, records):
    run = load_run(write_run_dir(tmp_path / "r", records=records))
    assert run.config["net"] == "resnet18" and run.loss == "mse"
    hist = run.history("train")
    train = [r for r in records if r["split"] == "train"]
    np.testing.assert_array_equal(hist["epoch"], [r["epoch"] for r in train])
    np.testing.assert_array_equal(hist["nc1"], [r["nc1"] for r in train])
    np.testing.assert_array_equal(
        hist["snr_singular_values"], [r["snr_singular_values"] for r in train]
    )
    assert run.last_record("test")["epoch"] == max(r["epoch"] for r in records)


def test_history_sorts_keeps_last_duplicate_and_pads_lists():
    recs = [
        {"epoch": 3, "split": "train", "error": 0.0, "nc1": 3.0, "snr_singular_values": [2.0]},
        {"epoch": 1, "split": "train", "error": 0.5, "nc1": 1.0, "snr_singular_values": [4.0, 3.0]},
        {"epoch": 3, "split": "train", "error": 0.0, "nc1": 30.0, "snr_singular_values": [5.0]},
        {"epoch": 2, "split": "test", "error": 0.1, "nc1": None},
    ]
    hist = history_arrays(recs, "train")
    np.testing.assert_array_equal(hist["epoch"], [1, 3])
    np.testing.assert_array_equal(hist["nc1"], [1.0, 30.0])
    np.testing.assert_array_equal(hist["snr_singular_values"], [[4.0, 3.0], [5.0, np.nan]])
    assert np.isnan(history_arrays(recs, "test")["nc1"]).all()
    with pytest.raises(ValueError, match="split"):
        history_arrays(recs, "val")


def test_zero_error_epoch_is_first_measured_zero():
    recs = [
        {"epoch": e, "split": "train", "error": err}
        for e, err in [(1, 0.3), (2, 0.0), (4, 0.01), (5, 0.0)]
    ]
    recs.append({"epoch": 1, "split": "test", "error": 0.0})  # the test split does not count
    assert zero_error_epoch(recs) == 2
    assert zero_error_epoch([{"epoch": 1, "split": "train", "error": 0.1}]) is None


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"epoch": 1, "split": "train", "error": 0.1}\n{"epoch": 2, oops\n'
            '{"epoch": 3, "split": "train", "error": 0.1}\n',
            "line 2: not valid JSON",
        ),
        ('{"epoch": 1, "split": "train"}\n', "missing key.*error"),
        ('{"epoch": 1, "split": "valid", "error": 0.1}\n', "'split' must be"),
        ('{"epoch": "1", "split": "train", "error": 0.1}\n', "'epoch' must be an integer"),
        ('{"epoch": 1, "split": "train", "error": 1.5}\n', "'error' must be a fraction"),
        ("[1, 2]\n", "expected a JSON object"),
        ("\n", "no measurements logged"),
    ],
)
def test_bad_metrics_give_clear_errors(tmp_path, text, message):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(RunError, match=message):
        load_run(tmp_path)


def test_truncated_last_line_is_skipped_with_warning(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": 1, "split": "train", "error": 0.1}\n{"epoch": 2, "spl'
    )
    with pytest.warns(UserWarning, match="line 2: incomplete last line"):
        run = load_run(tmp_path)
    assert len(run.records) == 1


def test_bad_run_directories(tmp_path):
    with pytest.raises(RunError, match="not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="not a run directory"):
        load_run(tmp_path / "file")
    with pytest.raises(RunError, match="metrics log not found"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "split": "train", "error": 0.1}\n')
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(RunError, match="config.json: not valid JSON"):
        load_run(tmp_path)
    with pytest.raises(RunError, match="non-empty list"):
        run_from_history([], {})


def test_central_path_fit_recovers_the_law_from_logged_omegas():
    """ω_j(t) from the SPEC §5 closed form, logged as a run would: the fit (from the zero-error
    epoch on, skipping an epoch where the rank dropped) recovers c1/c3 = 4C², c2/c3 = 4C."""
    c, n = 4, 3
    epochs = np.array([1, 2, 3, 5, 8, 12, 18, 27, 40])
    start = 3
    omega = snr_closed_form(
        torch.tensor([2.0, 1.2, 0.7], dtype=torch.float64),
        torch.tensor(epochs - start, dtype=torch.float64).clamp(min=0),
        c,
        n,
    )
    recs = []
    for k, e in enumerate(epochs):
        values = omega[k].tolist() if e != 18 else omega[k, :2].tolist()  # rank drop at 18
        recs.append(
            {
                "epoch": int(e),
                "split": "train",
                "error": 0.0 if e >= start else 0.2,
                "snr_singular_values": values,
            }
        )
    run = run_from_history(recs, {"dataset": "x", "net": "y", "loss": "mse"})
    fit = central_path_fit(run)
    assert fit["fitted"] and fit["start_epoch"] == start
    np.testing.assert_array_equal(fit["epochs"], [3, 5, 8, 12, 27, 40])
    assert fit["r2_omega"] > 1 - 1e-9
    assert fit["c1_over_c3"] == pytest.approx(4 * c * c, rel=1e-6)
    assert fit["c2_over_c3"] == pytest.approx(4 * c, rel=1e-6)
    np.testing.assert_allclose(fit["predicted_omega"], omega[[2, 3, 4, 5, 7, 8]].numpy(), rtol=1e-6)
    short = central_path_fit(run_from_history(recs[:4], {}))
    assert not short["fitted"] and "need 3" in short["reason"]


# ---- ncfast.report.plots -------------------------------------------------------------------------


def _lines(fig):
    return [line for ax in fig.axes for line in ax.get_lines()]


def test_figures_plot_the_logged_numbers(tmp_path, records):
    run = load_run(write_run_dir(tmp_path / "r", records=records))
    train = run.history("train")
    test = run.history("test")
    fig = figure([run], "error")
    ys = [line.get_ydata() for line in _lines(fig) if len(line.get_xdata()) > 2]
    np.testing.assert_allclose(ys[0], 100 * train["error"])
    np.testing.assert_allclose(ys[1], 100 * test["error"])
    assert fig.axes[0].get_xscale() == "log"
    # the zero-error line sits at the first epoch of zero training error
    vlines = [line for line in _lines(fig) if len(set(np.atleast_1d(line.get_xdata()))) == 1]
    assert [line.get_xdata()[0] for line in vlines] == [run.zero_error_epoch]
    plt.close(fig)

    fig = figure([run], "decomposition")
    curves = [line.get_ydata() for line in _lines(fig) if len(line.get_xdata()) > 2]
    expected = [train[k] for k in ("loss_mse", "loss_ls", "loss_nc1", "loss_nc23", "loss_ls_perp")]
    for got, want in zip(curves, expected, strict=True):
        np.testing.assert_allclose(got, want)
    assert fig.axes[0].get_yscale() == "log"
    plt.close(fig)

    fig = figure([run], "ls_perp_ratio")
    (ratio,) = [line.get_ydata() for line in _lines(fig) if len(line.get_xdata()) > 2]
    np.testing.assert_allclose(ratio, train["loss_ls_perp"] / train["loss_ls"])
    plt.close(fig)
    assert figure([run], "robustness") is None  # nothing logged, no figure
    with pytest.raises(ValueError, match="name must be one of"):
        figure([run], "nope")


def test_plot_single_run_writes_every_figure(tmp_path, records):
    run = load_run(write_run_dir(tmp_path / "r", records=records))
    paths = plot_runs([run], tmp_path / "fig", formats=("png",))
    assert {p.name for p in paths} == {f"{n}.png" for n in FIGURE_NAMES if n != "robustness"}
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="formats"):
        plot_runs([run], tmp_path / "fig", formats=("jpg",))
    with pytest.raises(ValueError, match="no runs"):
        plot_runs([], tmp_path / "fig")


def test_grid_overlays_losses_per_dataset_network_cell(tmp_path, grid_dirs):
    runs = [load_run(d) for d in grid_dirs]
    fig = figure(runs, "nc1")
    titles = sorted(ax.get_title() for ax in fig.axes if ax.get_title())
    assert titles == ["mnist · resnet18", "mnist · vgg11", "svhn · resnet18", "svhn · vgg11"]
    panel = next(ax for ax in fig.axes if ax.get_title() == "svhn · vgg11")
    curves = [line for line in panel.get_lines() if len(line.get_xdata()) > 2]
    assert len(curves) == 4  # (MSE, CE) × (train, test)
    colors = {line.get_color() for line in curves}
    assert len(colors) == 2  # one colour per loss
    legend_text = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"MSE", "CE", "train", "test"} <= legend_text
    plt.close(fig)
    # robustness appears when a run logged it
    assert figure(runs, "robustness") is None
    for rec in runs[0].records:
        if rec["split"] == "test":
            rec["robustness"] = 0.01 * rec["epoch"]
    runs[0].forget_history()
    fig = figure(runs, "robustness")
    (curve,) = [line for line in _lines(fig) if len(line.get_xdata()) > 2]
    np.testing.assert_allclose(curve.get_ydata(), 0.01 * runs[0].history("test")["epoch"])
    plt.close(fig)


def test_robustness_figure_draws_tight_bound_and_out_of_range(tmp_path, grid_dirs):
    """SPEC §7: the papers' robustness and the tight bound on the same (log) axes, the
    out-of-range percentage on a second, linear axis; a run without them draws only the first."""
    runs = [load_run(d) for d in grid_dirs[:2]]  # mnist · vgg11, MSE and CE: one panel
    for k, run in enumerate(runs):
        for rec in run.records:
            if rec["split"] == "test":
                rec["robustness"] = 0.02 * rec["epoch"] + k
                if k == 0:
                    rec["robustness_tight"] = 0.005 * rec["epoch"]
                    rec["robustness_out_of_range"] = 0.01 * rec["epoch"]
        run.forget_history()
    fig = figure(runs, "robustness")
    main_ax = next(ax for ax in fig.axes if ax.get_title() == "mnist · vgg11")
    (right_ax,) = [ax for ax in fig.axes if ax is not main_ax and ax.has_data()]
    epochs = [run.history("test")["epoch"] for run in runs]
    curves = [line for line in main_ax.get_lines() if len(line.get_xdata()) > 2]
    expected = [0.02 * epochs[0], 0.02 * epochs[1] + 1, 0.005 * epochs[0]]
    np.testing.assert_allclose(
        sorted(tuple(c.get_ydata()) for c in curves), sorted(tuple(e) for e in expected)
    )
    assert main_ax.get_yscale() == "log"
    (tight,) = [c for c in curves if c.get_linestyle() == "--"]
    np.testing.assert_allclose(tight.get_ydata(), 0.005 * epochs[0])
    (outside,) = [line for line in right_ax.get_lines() if len(line.get_xdata()) > 2]
    np.testing.assert_allclose(outside.get_ydata(), 100 * 0.01 * epochs[0])  # percent
    # A run measured at a single epoch draws single points: the markers tell them apart.
    assert len({c.get_marker() for c in curves} | {outside.get_marker()}) == 3
    assert right_ax.get_yscale() == "linear" and right_ax.get_ylim()[0] == 0
    assert "out of range" in right_ax.get_ylabel()
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"DeepFool $r$ (HPD22)", "tight $s^* r$ (first flip)"} <= legend
    assert "x + r out of range (right axis)" in legend
    plt.close(fig)
    # Only the papers' number logged (runs older than SPEC §7): no second axis.
    fig = figure(runs[1:], "robustness")
    assert len([ax for ax in fig.axes if ax.has_data()]) == 1
    plt.close(fig)


# ---- ncfast.report.tables ------------------------------------------------------------------------


def test_table1_against_the_records(tmp_path, grid_dirs):
    runs = [load_run(d) for d in grid_dirs]
    never = synthetic_records(loss="ce", zero_error_at=None, epochs=(1, 2, 3), seed=9)
    runs.append(load_run(write_run_dir(tmp_path / "never", records=never, loss="ce")))
    rows = table1_rows(runs)
    improvements = []
    for run, row in zip(runs, rows, strict=True):
        train = [r for r in run.records if r["split"] == "train"]
        test = {r["epoch"]: r for r in run.records if r["split"] == "test"}
        zero = next(
            (r["epoch"] for r in sorted(train, key=lambda r: r["epoch"]) if r["error"] == 0), None
        )
        assert row["zero_error_epoch"] == zero
        final = test[max(test)]
        assert row["acc_final"] == pytest.approx(100 * (1 - final["error"]))
        if zero is None:
            assert row["acc_zero_error"] is None and row["improvement"] is None
            continue
        acc0 = 100 * (1 - test[zero]["error"])
        assert row["acc_zero_error"] == pytest.approx(acc0)
        improvements.append(100 * (1 - final["error"]) - acc0)
    s = summary(rows)
    assert s["runs"] == 9 and s["runs_with_zero_error"] == 8
    assert s["median_improvement"] == pytest.approx(statistics.median(improvements))
    assert s["mean_improvement"] == pytest.approx(float(np.mean(improvements)))

    md = to_markdown(rows)
    assert md.count("\n|") == len(rows) + 1  # rule and rows
    assert "| never | — | — | 3 | 85.33 | — |" in md  # listed, left out of the summary
    assert f"Median improvement: {s['median_improvement']:.2f}" in md
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert len(parsed) == 9 and parsed[-1]["acc_zero_error"] == ""
    assert float(parsed[0]["acc_final"]) == pytest.approx(rows[0]["acc_final"])
    text, paths = write_table1(runs, tmp_path / "t")
    assert [p.name for p in paths] == ["table1.md", "table1.csv"] and text == md


# ---- the commands ----------------------------------------------------------------------------


def test_plot_and_table_commands(tmp_path, grid_dirs):
    cli = CliRunner()
    # Runs that logged only the error: one figure, so the command's wiring is quick to check.
    minimal = []
    for k, loss in enumerate(("mse", "ce")):
        recs = [
            {"epoch": e, "split": s, "error": 0.1 / e} for e in (1, 2, 4) for s in ("train", "test")
        ]
        minimal.append(write_run_dir(tmp_path / f"m{k}", records=recs, loss=loss))
    res = cli.invoke(
        main,
        [
            "plot",
            *map(str, minimal),
            "--out",
            str(tmp_path / "f"),
            "--format",
            "png",
            "--format",
            "pdf",
        ],
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["error.pdf", "error.png"]
    assert (tmp_path / "f" / "error.pdf").read_bytes()[:4] == b"%PDF"
    assert "2 files from 2 run(s)" in res.output
    res = cli.invoke(main, ["table", *map(str, grid_dirs), "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert "Median improvement" in res.output
    assert (tmp_path / "t" / "table1.csv").is_file()


def test_commands_reject_bad_input(tmp_path, grid_dirs):
    cli = CliRunner()
    res = cli.invoke(main, ["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "f")])
    assert res.exit_code != 0 and "run directory not found" in res.output
    res = cli.invoke(main, ["plot", str(grid_dirs[0])])
    assert res.exit_code != 0 and "--out" in res.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    res = cli.invoke(main, ["table", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "missing key(s) split, error" in res.output
    res = cli.invoke(main, ["table"])
    assert res.exit_code != 0 and "RUN_DIRS" in res.output
    (tmp_path / "afile").write_text("x")
    res = cli.invoke(main, ["table", str(grid_dirs[0]), "--out", str(tmp_path / "afile")])
    assert res.exit_code != 0


def test_two_runs_of_one_loss_in_a_cell_are_told_apart(tmp_path):
    runs = []
    for name, err in (("seed0", 0.2), ("seed1", 0.3)):
        recs = [{"epoch": e, "split": s, "error": err / e} for e in (1, 2, 4) for s in SPLITS]
        runs.append(load_run(write_run_dir(tmp_path / name, records=recs, loss="mse")))
    fig = figure(runs, "error")
    curves = [line for line in _lines(fig) if len(line.get_xdata()) > 2]
    assert len({line.get_color() for line in curves}) == 2
    legend_text = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"MSE (seed0)", "MSE (seed1)"} <= legend_text
    plt.close(fig)


def test_drawing_selects_no_backend_and_needs_no_pyplot(tmp_path, grid_dirs):
    # A user's backend (here "pdf", standing for an interactive one) stays what it was: the
    # figures are matplotlib Figures saved without pyplot.
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('pdf')\n"
        "from ncfast.report.plots import plot_runs\n"
        "from ncfast.report.runs import load_run\n"
        f"paths = plot_runs([load_run({str(grid_dirs[0])!r})], {str(tmp_path)!r}, ('png',))\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules, len(paths))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[:2] == ["pdf", "False"] and int(out[2]) > 5
    assert (tmp_path / "nc1.png").stat().st_size > 0
