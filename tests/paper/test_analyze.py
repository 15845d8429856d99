"""``ncfast analyze`` end to end on a short CPU training run of the embedded MNIST subset, then
``plot`` and ``table`` on its directory; untrusted and bad checkpoints are refused."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from click.testing import CliRunner

from ncfast import metrics
from ncfast.cli import main
from ncfast.paper.analyze import analyze
from ncfast.paper.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ncfast.paper.config import TrainConfig
from ncfast.paper.train import train
from ncfast.report.plots import FIGURE_NAMES
from ncfast.report.runs import load_run
from ncfast.report.summary import robustness_lines
from ncfast.report.tables import table1_rows

# Every key of SPEC §2–§4 as measure_split returns it.
SPEC_KEYS = (*metrics.SPEC_KEYS, "error", "loss")  # as measure_split returns them
SGD_WEIGHT_DECAY = 5e-4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("run") / "mnist5k-vgg11"
    config = TrainConfig(
        dataset="mnist5k",
        net="vgg11",
        width=0.125,
        per_class=10,
        epochs=14,
        lr=0.07,
        batch_size=25,
        lr_milestones=(14,),
        measure_epochs=(1, 2, 4, 7, 9, 11, 12, 13, 14),
        weight_decay=SGD_WEIGHT_DECAY,
        out=str(out),
        device="cpu",
        seed=0,
    )
    train(config, progress=False)
    return out


def _close(a, b, rtol=1e-6):
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b, strict=True))
    if a is None or b is None:  # NaN is written as null in report.json
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


@pytest.mark.slow
def test_analyze_plot_table_end_to_end(tmp_path, run_dir, one_thread):
    cli = CliRunner()
    out = tmp_path / "analysis"
    res = cli.invoke(
        main,
        [
            "analyze",
            str(run_dir / "checkpoint.pt"),
            "--out",
            str(out),
            "--robustness-samples",
            "6",
            "--format",
            "png",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "NC1" in res.output and "DeepFool robustness" in res.output

    report = json.loads((out / "report.json").read_text())
    assert {p.name for p in (out / "figures").iterdir()} == {f"{n}.png" for n in FIGURE_NAMES}
    summary = (out / "summary.md").read_text()
    assert "| | train | test |" in summary and "![nc1](figures/nc1.png)" in summary

    # report.json agrees with the run's last logged metrics (same function, same weights).
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["epoch"] for r in records)
    assert report["epoch"] == last == 14
    for split in ("train", "test"):
        logged = next(r for r in records if r["epoch"] == last and r["split"] == split)
        measured = report["splits"][split]
        for key in SPEC_KEYS:
            assert _close(measured[key], logged[key]), (split, key, measured[key], logged[key])
        assert report["agreement_with_log"][split]["max_relative_difference"] <= 1e-6
        dec = report["decomposition"][split]
        assert dec["lambda"] == pytest.approx(10 * SGD_WEIGHT_DECAY / 2)
        parts = dec["loss_nc1"] + dec["loss_nc23"] + dec["loss_ls_perp"]
        assert dec["loss_mse"] == pytest.approx(parts, rel=1e-8)
        assert dec["ls_perp_ratio"] == pytest.approx(dec["loss_ls_perp"] / dec["loss_ls"])
        assert report["snr_singular_values"][split] == measured["snr_singular_values"]
    assert report["splits"]["train"]["num_samples"] == 100
    assert report["splits"]["test"]["num_samples"] == 1000

    rob = report["robustness"]
    assert rob["robustness_samples"] == 6 and rob["robustness"] > 0
    assert rob["robustness_not_fooled"] == 0
    # SPEC §7: s* ≤ 1.02 image by image, so the tight mean cannot exceed the papers' one.
    assert 0 < rob["robustness_tight"] <= rob["robustness"]
    assert 0 < rob["robustness_tight_scale_median"] <= 1.02
    assert 0 <= rob["robustness_out_of_range"] <= 1  # MNIST has mean/std: measured, not null
    assert robustness_lines(rob)[1] in summary and robustness_lines(rob)[2] in summary
    assert robustness_lines(rob)[1] in res.output

    run = load_run(run_dir)
    assert report["zero_error_epoch"] == run.zero_error_epoch
    row = table1_rows([run])[0]
    assert report["table1"]["acc_final"] == pytest.approx(row["acc_final"])
    assert report["table1"]["zero_error_epoch"] == row["zero_error_epoch"]
    fit = report["central_path"]
    assert set(fit) >= {"fitted", "start_epoch", "epochs"}
    if fit["fitted"]:
        assert len(fit["predicted_omega"]) == len(fit["epochs"])

    # plot and table on the run directory
    res = cli.invoke(
        main, ["plot", str(run_dir), "--out", str(tmp_path / "fig"), "--format", "pdf"]
    )
    assert res.exit_code == 0, res.output
    expected = {f"{n}.pdf" for n in FIGURE_NAMES if n != "robustness"}
    assert {p.name for p in (tmp_path / "fig").iterdir()} == expected
    res = cli.invoke(main, ["table", str(run_dir), "--out", str(tmp_path / "tab")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tab" / "table1.md").read_text().count("| mnist5k | vgg11 | mse |") == 1


def test_robustness_lines_name_the_three_numbers():
    rob = {
        "robustness": 1.51,
        "robustness_stderr": 0.1,
        "robustness_median": 1.4,
        "robustness_samples": 100,
        "robustness_seed": 0,
        "robustness_not_fooled": 2,
        "robustness_tight": 0.52,
        "robustness_tight_stderr": 0.04,
        "robustness_tight_median": 0.5,
        "robustness_tight_scale_median": 0.35,
        "robustness_out_of_range": 0.4812,
    }
    papers, tight, outside = robustness_lines(rob)
    assert "mean 1.51 ± 0.1, median 1.4; 2 not fooled" in papers
    assert "median s* = 0.35" in tight and "mean 0.52 ± 0.04, median 0.5" in tight
    assert "48.12%" in outside
    # null in report.json (data without a known range): said so, not a number.
    assert "not measured" in robustness_lines({**rob, "robustness_out_of_range": None})[2]
    # A report from before SPEC §7: the papers' line only.
    old = {k: v for k, v in rob.items() if "tight" not in k and "range" not in k}
    assert robustness_lines(old) == [papers]


class _Touch:
    """Unpickling this calls Path.touch(marker): a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_checkpoint_with_pickled_callable_is_refused(tmp_path):
    marker = tmp_path / "executed"
    payload = {"format": "ncfast-checkpoint-v1", "model": _Touch(marker)}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refuse"):
        analyze(tmp_path / "evil.pt", out_dir=tmp_path / "a", progress=False)
    res = CliRunner().invoke(main, ["analyze", str(tmp_path / "evil.pt"), "--quiet"])
    assert res.exit_code != 0 and "refuse" in res.output
    assert "Traceback" not in res.output
    assert not marker.exists()
    # The control: an unrestricted load would have run it.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_bad_inputs_give_clear_errors(tmp_path, run_dir):
    cli = CliRunner()
    ckpt = str(run_dir / "checkpoint.pt")

    def fails(args, message):
        res = cli.invoke(main, ["analyze", *args, "--quiet"])
        assert res.exit_code != 0, res.output
        assert message in res.output, res.output
        assert "Traceback" not in res.output

    fails([str(tmp_path / "none.pt")], "does not exist")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all" * 10)
    fails([str(tmp_path / "junk.pt")], "corrupt")
    fails([ckpt, "--robustness-samples", "-1"], "--robustness-samples")
    fails([ckpt, "--device", "tpu"], "device must be")
    if not torch.cuda.is_available():
        fails([ckpt, "--device", "cuda"], "CUDA is not available")
    (tmp_path / "afile").write_text("x")
    fails([ckpt, "--out", str(tmp_path / "afile")], "afile")

    payload = load_checkpoint(ckpt)
    wrong = {**payload, "config": {**payload["config"], "width": 0.25}}
    save_checkpoint(tmp_path / "wrong.pt", wrong)
    fails([str(tmp_path / "wrong.pt")], "weights do not fit a vgg11")
    other = {**payload, "config": {**payload["config"], "dataset": "cifar10"}}
    save_checkpoint(tmp_path / "other.pt", other)
    fails([str(tmp_path / "other.pt"), "--data-root", str(tmp_path)], "cifar10")
    bad = {**payload, "config": {**payload["config"], "net": "alexnet"}}
    save_checkpoint(tmp_path / "bad.pt", bad)
    fails([str(tmp_path / "bad.pt")], "training options are unusable")
    with pytest.raises(TypeError, match="robustness_samples"):
        analyze(ckpt, robustness_samples=2.5)
    with pytest.raises(ValueError, match="robustness_samples"):
        analyze(ckpt, robustness_samples=-1)
