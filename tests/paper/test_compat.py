"""A run directory written by ncfast 0.1.0 (tests/data/run_v0_1_0) still works with this release:
its checkpoint analyses, its log plots and tabulates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ncfast.cli import main

OLD_RUN = Path(__file__).resolve().parents[1] / "data" / "run_v0_1_0"


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    return run


def test_a_v0_1_0_checkpoint_analyses_and_agrees_with_its_log(old_run, tmp_path):
    out = tmp_path / "analysis"
    result = CliRunner().invoke(
        main,
        [
            "analyze",
            str(old_run / "checkpoint.pt"),
            "--out",
            str(out),
            "--quiet",
            "--robustness-samples",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["epoch"] == 2
    # Same weights, data and measurement code path as the run used: the 0.1.0 log is matched to
    # the rounding of a different backend (the run used the reference, analyze here the native
    # ops): float64 statistics of float32 features, far below 1e-6.
    for split in ("train", "test"):
        agreement = report["agreement_with_log"][split]
        assert agreement["max_relative_difference"] < 1e-6, agreement


def test_a_v0_1_0_run_plots_and_tabulates(old_run, tmp_path):
    runner = CliRunner()
    plotted = runner.invoke(main, ["plot", str(old_run), "--out", str(tmp_path / "figs")])
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "figs" / "nc1.png").stat().st_size > 0
    table = runner.invoke(main, ["table", str(old_run), "--out", str(tmp_path / "tables")])
    assert table.exit_code == 0, table.output
    assert "mnist5k" in (tmp_path / "tables" / "table1.md").read_text()


def test_a_v0_1_0_run_resumes_to_its_last_epoch(old_run):
    result = CliRunner().invoke(
        main, ["train", "--resume", "--out", str(old_run), "--quiet", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({(r["epoch"], r["split"]) for r in rows}) == [
        (e, s) for e in (1, 2, 3) for s in ("test", "train")
    ]
