"""A run directory written by ncfast 0.1.0 (tests/data/run_v0_1_0) still works with this release:
its checkpoint analyses, its log plots and tabulates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ncfast.cli import main
from ncfast.paper import evaluate
from ncfast.paper.analyze import compare_with_log

OLD_RUN = Path(__file__).resolve().parents[1] / "data" / "run_v0_1_0"


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    return run


# The float32 forward pass rounds each feature by the summation order of its reductions, which
# differs between CPUs (AVX2 vs AVX-512 kernels): two orders of a sum of K terms differ by up to
# about K·u32 of the terms' size. VGG11 at width 1/16 reduces up to K = 3·3·32 = 288 terms per
# layer: each key may differ from the 0.1.0 log (written on another CPU) by what a random relative
# perturbation of the features of that size, 288 float32 ulps, changes it, plus 1e-6 of float64
# and backend rounding. Measured on an AMD EPYC box: snr_condition 1.8e-6 from the log (Σ_W of
# 50 samples in 32 dimensions is ill-conditioned: 64 ulps of noise move it by 0.7e-6 to 2e-6).
FEATURE_ULPS = 288


def _analyze(checkpoint: Path, out: Path) -> dict:
    result = CliRunner().invoke(
        main,
        [
            "analyze",
            str(checkpoint),
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
    return json.loads((out / "report.json").read_text())


def test_a_v0_1_0_checkpoint_analyses_and_agrees_with_its_log(old_run, tmp_path, monkeypatch, seed):
    report = _analyze(old_run / "checkpoint.pt", tmp_path / "analysis")
    assert report["epoch"] == 2
    # Each key's sensitivity to the features' float32 rounding, measured on this machine.
    generator = torch.Generator().manual_seed(seed)
    unperturbed = evaluate.split_features

    def perturbed_features(*args, **kwargs):
        for h, y in unperturbed(*args, **kwargs):
            noise = torch.rand(h.shape, generator=generator, dtype=torch.float64) * 2 - 1
            yield (h.double() * (1 + FEATURE_ULPS * 2.0**-24 * noise)).float(), y

    monkeypatch.setattr(evaluate, "split_features", perturbed_features)
    # One random draw can cancel by chance (a key moved 0.7e-6 in one draw, 4e-6 in another):
    # the largest change of a few draws.
    draws = [_analyze(old_run / "checkpoint.pt", tmp_path / f"perturbed{i}") for i in range(3)]
    for split in ("train", "test"):
        sensitivity: dict[str, float] = {}
        for moved in draws:
            for key, change in compare_with_log(moved["splits"][split], report["splits"][split])[
                "per_key"
            ].items():
                sensitivity[key] = max(sensitivity.get(key, 0.0), change)
        agreement = report["agreement_with_log"][split]["per_key"]
        assert agreement, "no logged key was compared"
        beyond = {
            key: (difference, sensitivity.get(key, 0.0))
            for key, difference in agreement.items()
            if not difference <= 1e-6 + sensitivity.get(key, 0.0)
        }
        assert not beyond, f"{split}: (difference from the log, allowed rounding) {beyond}"


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
