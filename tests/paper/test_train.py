"""Training with in-loop measurement (ncfast.paper.train, ncfast.paper.evaluate,
ncfast.paper.checkpoint) and the
``ncfast train`` command. Tiny networks and a few dozen images keep every run to seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ncfast import ClassStats, metrics, mse_lambda, nc_metrics
from ncfast.cli import main
from ncfast.paper.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from ncfast.paper.config import (
    EXPERIMENT_FIELDS,
    INVOCATION_FIELDS,
    PAPER_MEASURE_EPOCHS,
    PRESETS,
    REFERENCE_LR,
    TrainConfig,
    default_measure_epochs,
)
from ncfast.paper.evaluate import measure_split
from ncfast.paper.losses import compute_loss
from ncfast.paper.models import build
from ncfast.paper.rundir import RunDirectoryError
from ncfast.paper.train import (
    ROW_KEYS,
    build_model,
    epoch_batches,
    epoch_permutation,
    train,
)
from tests.helpers import oracle
from tests.helpers.tiny_runs import (
    NUM_CLASSES,
    TINY_TRAIN_ARGS,
    read_rows,
    tiny_config,
    tiny_payload,
)

SPEC_KEYS = (*metrics.SPEC_KEYS, "error", "loss")  # as measure_split returns them
TIMING_KEYS = ("wall_time", "epoch_time", "measure_time")


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


# ----------------------------------------------------------------------------- configuration
def test_paper_defaults():
    c = TrainConfig(dataset="svhn", net="vgg").resolved()
    assert c.net == "vgg13"  # HPD22 Table A.2
    assert (c.epochs, c.batch_size, c.weight_decay, c.momentum) == (350, 128, 5e-4, 0.9)
    assert c.lr_milestones == (116, 233) and c.lr_gamma == 0.1
    assert c.measure_epochs == PAPER_MEASURE_EPOCHS and len(PAPER_MEASURE_EPOCHS) == 50
    assert c.lr == REFERENCE_LR["mse"] == 0.0184
    assert TrainConfig(dataset="mnist", loss="ce").resolved().lr == 0.0679
    assert TrainConfig(dataset="cifar10").resolved().net == "resnet50"


def test_measure_epochs_scale():
    assert default_measure_epochs(350) == PAPER_MEASURE_EPOCHS
    for epochs in (1, 2, 7, 35, 100, 700):
        got = default_measure_epochs(epochs)
        assert got == tuple(sorted(set(got)))
        assert got[-1] == epochs and all(1 <= e <= epochs for e in got)
        assert got[0] == 1 or epochs > 350
    # 700 epochs: every paper epoch doubled.
    assert default_measure_epochs(700) == tuple(2 * e for e in PAPER_MEASURE_EPOCHS)


def test_measure_epochs_round_half_up():
    # Computed by hand from SPEC §6's list: e·epochs/350 rounded half up (banker's rounding
    # would give 4 for 45/10 and 22 for 225/10; truncation 2 for 27/10), at least 1,
    # duplicates dropped.
    assert default_measure_epochs(35) == (
        *range(1, 15),
        *(16, 17, 19, 21, 23, 25, 27, 29, 32, 35),
    )
    assert default_measure_epochs(175) == (
        *range(1, 13),
        *(14, 15, 16, 18, 19, 21, 23, 25, 27, 30, 33, 36, 39, 43, 46, 51, 55, 61, 66),
        *(72, 79, 86, 94, 103, 113, 123, 134, 147, 160, 175),
    )
    assert default_measure_epochs(2) == (1, 2)
    assert default_measure_epochs(1) == (1,)


def test_measure_epochs_words(tmp_path):
    every = tiny_config(tmp_path, epochs=3, measure_epochs="all").resolved()
    assert every.measure_epochs == (1, 2, 3)
    assert tiny_config(tmp_path, measure_epochs="none").resolved().measure_epochs == ()


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_permutation(50, 3, 7, "cpu")
    assert torch.equal(a, epoch_permutation(50, 3, 7, "cpu"))
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, epoch_permutation(50, 3, 8, "cpu"))
    assert not torch.equal(a, epoch_permutation(50, 4, 7, "cpu"))
    assert epoch_batches(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert epoch_batches(9, 4) == [(0, 4), (4, 8)]  # no single-sample batch for batch norm


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"net": "alexnet"}, "net must be one of"),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"loss": "mse-rescaled"}, "needs mse_scale"),
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"lr_milestones": (0,)}, "lr_milestones"),
        ({"measure_epochs": (3,)}, "measure_epochs"),
        ({"precision": "fp16"}, "precision"),
        ({"device": "tpu"}, "device"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_config_errors_name_the_option(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, **overrides).resolved()


def test_presets():
    demo = TrainConfig.from_preset("demo").resolved()
    assert demo.dataset == "mnist5k" and demo.net == PRESETS["demo"]["net"]
    assert TrainConfig.from_preset("demo", epochs=60).resolved().epochs == 60
    # The demo's milestones (50, 60) do not fit 10 epochs: an error naming the option.
    with pytest.raises(ValueError, match="lr_milestones"):
        TrainConfig.from_preset("demo", epochs=10).resolved()
    assert TrainConfig.from_preset("demo", epochs=10, lr_milestones=(5,)).resolved().epochs == 10
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_preset("fast")


# ------------------------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_and_errors(tmp_path):
    payload = tiny_payload()
    path = save_checkpoint(tmp_path / "c.pt", payload)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    loaded = load_checkpoint(path)
    assert loaded["history"] == payload["history"]
    assert torch.equal(loaded["model"]["weight"], payload["model"]["weight"])

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": FORMAT, "obj": argparse_namespace()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"contains code .*argparse\.Namespace"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an ncfast checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": FORMAT, "epoch": 1}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(tmp_path / "partial.pt")
    write_text_atomic(tmp_path / "t.txt", "é\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é\n"


def argparse_namespace():
    import argparse

    return argparse.Namespace(x=1)


# --------------------------------------------------------------------------------- training
def test_two_epoch_run_writes_every_output(tmp_path, tiny_data):
    out = train(tiny_config(tmp_path / "run"), progress=False, data=tiny_data)
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint.pt"}
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["net"] == "vgg11" and config["num_classes"] == 4
    assert config["lambda"] == pytest.approx(mse_lambda(5e-4, 4))
    rows = read_rows(out)
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (1, "train"),
        (1, "test"),
        (2, "train"),
        (2, "test"),
    ]
    for row in rows:
        missing = set(SPEC_KEYS) | set(ROW_KEYS)
        missing -= set(row)
        assert not missing, f"missing keys {missing}"
        assert isinstance(row["snr_singular_values"], list)
        assert len(row["snr_singular_values"]) == NUM_CLASSES - 1
        assert row["weight_decay"] == pytest.approx(mse_lambda(5e-4, NUM_CLASSES))
        assert row["num_samples"] == (80 if row["split"] == "train" else 24)
        assert 0 <= row["error"] <= 1 and row["loss"] > 0 and math.isfinite(row["nc1"])
    assert rows[0]["lr"] == 0.05 and rows[2]["lr"] == pytest.approx(0.005)  # milestone at 1
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["history"] == rows
    assert checkpoint["config"]["out"] == str(tmp_path / "run")
    # A second run into the same directory is refused unless asked for.
    with pytest.raises(RunDirectoryError, match="--resume"):
        train(tiny_config(tmp_path / "run"), progress=False, data=tiny_data)


def test_resume_after_kill_gives_the_same_metrics(tmp_path, tiny_data, monkeypatch):
    # The milestone comes after the kill: a resumption that does not restore the learning-rate
    # schedule decays at the wrong epoch (or never), and the logged lr and metrics differ.
    kwargs = {"epochs": 4, "measure_epochs": (1, 2, 3, 4), "lr_milestones": (3,)}
    whole = read_rows(train(tiny_config(tmp_path / "a", **kwargs), progress=False, data=tiny_data))
    assert [r["lr"] for r in whole[::2]] == [0.05, 0.05, 0.05, pytest.approx(0.005)]

    import ncfast.paper.rundir as rundir_module

    real_save = rundir_module.save_checkpoint

    def save_then_die(path, payload):
        real_save(path, payload)
        if payload["epoch"] == 2:
            raise KeyboardInterrupt  # killed right after the epoch-2 checkpoint

    monkeypatch.setattr(rundir_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", **kwargs), progress=False, data=tiny_data)
    monkeypatch.setattr(rundir_module, "save_checkpoint", real_save)
    # A line half-written after the checkpoint, as a kill can leave it.
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "split": "tr')
    resumed_config = tiny_config(tmp_path / "b", resume=True, **kwargs)
    resumed = read_rows(train(resumed_config, progress=False, data=tiny_data))
    assert without_timing(resumed) == without_timing(whole)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 4

    # Resuming with other options is refused, naming them.
    with pytest.raises(RunDirectoryError, match="lr"):
        train(tiny_config(tmp_path / "b", resume=True, lr=0.1, **kwargs), data=tiny_data)


def test_resume_a_checkpoint_from_before_an_option_existed(tmp_path, tiny_data):
    out = tmp_path / "run"
    train(tiny_config(out, stop_after=1, measure_epochs=(2,)), progress=False, data=tiny_data)
    path = out / "checkpoint.pt"
    payload = load_checkpoint(path)
    assert payload["epoch"] == 1 and read_rows(out) == []
    del payload["config"]["sync_batchnorm"]  # an option added later, at its default
    save_checkpoint(path, payload)
    train(tiny_config(out, resume=True, measure_epochs=(2,)), progress=False, data=tiny_data)
    assert load_checkpoint(path)["epoch"] == 2 and [r["epoch"] for r in read_rows(out)] == [2, 2]
    # Not at its default: refused, naming it.
    payload["config"]["sync_batchnorm"] = False
    save_checkpoint(path, payload)
    with pytest.raises(RunDirectoryError, match="sync_batchnorm"):
        train(tiny_config(out, resume=True, measure_epochs=(2,)), progress=False, data=tiny_data)


def test_a_resumption_may_change_how_it_runs_not_what_it_is(tmp_path, tiny_data):
    out = tmp_path / "run"
    kwargs = {"measure_epochs": (2,)}
    train(tiny_config(out, stop_after=1, **kwargs), progress=False, data=tiny_data)
    # Every option of the Experiment, changed, is refused naming it (one of each kind).
    experiment = {
        "width": 0.125,
        "momentum": 0.5,
        "seed": 1,
        "precision": "bf16",
        "batch_size": 8,
        "measure_batch_size": 16,
        "channels_last": False,
        "lr_milestones": (2,),  # the default is (1,)
    }
    assert set(experiment) <= set(EXPERIMENT_FIELDS)
    for name, value in experiment.items():
        changed = tiny_config(out, resume=True, **{**kwargs, name: value})
        with pytest.raises(RunDirectoryError, match=f"{name}: checkpoint"):
            train(changed, progress=False, data=tiny_data)
    # The Invocation may change: another memory budget, the overhead timing, DeepFool.
    invocation = {"memory_budget_bytes": 2**20, "measure_overhead": True, "robustness_samples": 2}
    assert set(invocation) <= set(INVOCATION_FIELDS)
    resumed = tiny_config(out, resume=True, **kwargs, **invocation)
    train(resumed, progress=False, data=tiny_data)
    test_row = read_rows(out)[1]
    assert test_row["epoch"] == 2 and test_row["robustness_samples"] == 2
    assert "forward_time" in test_row


def test_measured_metrics_equal_a_separate_pass_from_the_checkpoint(tmp_path, tiny_data):
    out = train(tiny_config(tmp_path / "run", epochs=3), progress=False, data=tiny_data)
    last = {r["split"]: r for r in read_rows(out) if r["epoch"] == 3}
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    config = TrainConfig.from_json(checkpoint["config"])
    model = build(config.net, NUM_CLASSES, 1, 32, config.width)
    model.load_state_dict(checkpoint["model"])
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    lam = mse_lambda(config.weight_decay, NUM_CLASSES)
    for split, data in zip(("train", "test"), tiny_data, strict=True):
        stats = ClassStats(NUM_CLASSES, model.feature_dim)
        features, labels = [], []
        with torch.no_grad():
            for start in range(0, len(data), config.measure_batch_size):
                index = torch.arange(start, min(start + config.measure_batch_size, len(data)))
                x, y = data.batch(index)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                h = model.features(x)
                stats.update(h, y)
                features.append(h.double())
                labels.append(y)
        h, y = torch.cat(features), torch.cat(labels)
        expected = nc_metrics(stats, weight, bias, lam)
        logits = h @ weight.double().T + bias.double()
        expected["error"] = float((logits.argmax(1) != y).double().mean())
        expected["loss"] = float(compute_loss("mse", logits, y))
        brute = oracle.nc_metrics(h.numpy(), y.numpy(), NUM_CLASSES, weight, bias, lam)
        expected["nc4_ncc_mismatch"] = brute["nc4_ncc_mismatch"]
        got = last[split]
        for key, value in expected.items():
            if key == "snr_singular_values":
                np.testing.assert_allclose(got[key], value.numpy(), rtol=1e-6)
            else:
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
        assert got["loss_mse"] == pytest.approx(brute["loss_mse"], rel=1e-6)
        # The logged loss is the MSELoss of the network; HPD22 Eq. 3 is (C/2) of it plus the
        # weight-decay term (SPEC §3).
        w_tilde_sq = float(weight.double().square().sum() + bias.double().square().sum())
        assert got["loss_mse"] == pytest.approx(
            NUM_CLASSES / 2 * got["loss"] + lam / 2 * w_tilde_sq, rel=1e-6
        )


def _loss_by_hand(loss: str, logits: torch.Tensor, labels: torch.Tensor, scale=None) -> float:
    """The mean per-sample loss, from the definitions (float64): cross-entropy
    log Σ_j exp f_j − f_y, or Hui & Belkin's (1/C)[k (f_y − M)² + Σ_{j≠y} f_j²]."""
    f = logits.double()
    true = f.gather(1, labels[:, None])[:, 0]
    if loss == "ce":
        return float((f.exp().sum(1).log() - true).mean())
    k, m = scale
    others = f.square().sum(1) - true.square()
    return float(((k * (true - m) ** 2 + others) / f.shape[1]).mean())


@pytest.mark.parametrize(
    ("loss", "scale"), [("ce", None), ("mse-rescaled", (2.0, 3.0)), ("mse", (1.0, 1.0))]
)
def test_logged_losses_match_their_definitions(tmp_path, tiny_data, loss, scale):
    # One batch per epoch (batch 80 = the training set): epoch 1's SGD loss is the loss of the
    # initial network in train mode on all of it; the measured loss is that of the trained
    # network in eval mode. Both from float32 logits: sums of ~N·C terms, relative 1e-5.
    out = tmp_path / "run"
    options = {"loss": loss, "mse_scale": scale if loss == "mse-rescaled" else None}
    config = tiny_config(out, epochs=1, batch_size=80, **options).resolved()
    rows = read_rows(train(config, progress=False, data=tiny_data))
    train_data = tiny_data[0]

    def logits_of(model, data, mode: str) -> torch.Tensor:
        model.train(mode == "train")
        x, _ = data.batch(torch.arange(len(data)), memory_format=torch.channels_last)
        with torch.no_grad():
            return model(x)

    initial = build_model(config, NUM_CLASSES, 1, 32)
    expected_sgd = _loss_by_hand(
        loss, logits_of(initial, train_data, "train"), train_data.labels, scale
    )
    trained = build_model(config, NUM_CLASSES, 1, 32)
    trained.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    for row, data in zip(rows, tiny_data, strict=True):
        assert row["sgd_loss"] == pytest.approx(expected_sgd, rel=1e-5)
        expected = _loss_by_hand(loss, logits_of(trained, data, "eval"), data.labels, scale)
        assert row["loss"] == pytest.approx(expected, rel=1e-5), row["split"]


def test_measure_split_restores_mode_and_checks_its_model(tiny_data):
    train_data, _ = tiny_data
    torch.manual_seed(0)
    model = build("resnet18", NUM_CLASSES, 1, 32, 0.0625)
    model.train()
    kwargs = {"loss": "ce", "sgd_weight_decay": 5e-4, "batch_size": 30}
    result = measure_split(model, train_data, **kwargs)
    assert model.training
    assert result["num_samples"] == len(train_data) and "nc4_ncc_mismatch" in result
    # A budget too small for the features forces NC4's second pass: same numbers.
    small = measure_split(model, train_data, memory_budget_bytes=0, **kwargs)
    assert small["nc4_ncc_mismatch"] == result["nc4_ncc_mismatch"]
    assert small["nc1"] == pytest.approx(result["nc1"], rel=1e-12)
    with pytest.raises(TypeError, match="features"):
        measure_split(torch.nn.Linear(3, 4), train_data, **kwargs)
    wrong_classes = build("vgg11", 7, 1, 32, 0.0625)
    with pytest.raises(ValueError, match="7 outputs"):
        measure_split(wrong_classes, train_data, **kwargs)


def test_a_checkpoint_is_replaced_whole_never_written_in_place(tmp_path, tiny_data, monkeypatch):
    # While each new checkpoint is being written, a reader of checkpoint.pt finds the previous
    # one, whole (or none before the first): a write in place would show the new or half of it.
    path = tmp_path / "run" / "checkpoint.pt"
    seen = []
    real_save = torch.save

    def save_and_read(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if hasattr(f, "flush"):
            f.flush()
        on_disk = load_checkpoint(path)["epoch"] if path.exists() else None
        seen.append((obj["epoch"], on_disk))

    monkeypatch.setattr(torch, "save", save_and_read)
    train(
        tiny_config(tmp_path / "run", epochs=3, measure_epochs="all"),
        progress=False,
        data=tiny_data,
    )
    assert seen == [(1, None), (2, 1), (3, 2)]
    assert load_checkpoint(path)["epoch"] == 3


def test_bf16_and_other_losses_run(tmp_path, tiny_data):
    for i, extra in enumerate(
        (
            {"precision": "bf16"},
            {"loss": "ce"},
            {"loss": "mse-rescaled", "mse_scale": (2.0, 3.0), "net": "resnet18"},
        )
    ):
        config = tiny_config(tmp_path / f"r{i}", epochs=1, **extra)
        rows = read_rows(train(config, progress=False, data=tiny_data))
        assert len(rows) == 2 and all(math.isfinite(r["nc1"]) for r in rows)


# ------------------------------------------------------------------------------------- CLI
def cli_args(out: Path, *extra: str) -> list[str]:
    return [
        "train",
        *TINY_TRAIN_ARGS,
        *("--per-class", "6", "--batch-size", "20", "--measure-batch-size", "500"),
        *("--out", str(out), "--quiet"),
        *extra,
    ]


def test_cli_train_and_resume(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(main, cli_args(out, "--epochs", "1", "--measure-epochs", "1"))
    assert result.exit_code == 0, result.output
    assert len(read_rows(out)) == 2
    # Continue the same run for one more epoch: only --out and the new total given.
    result = runner.invoke(
        main, ["train", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]
    )
    # The epoch count is part of the run's identity (it sets the schedule): refused.
    assert result.exit_code != 0 and "epochs" in result.output
    result = runner.invoke(main, ["train", "--resume", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    # No measurement at all: an empty log and the final checkpoint.
    plain = tmp_path / "plain"
    result = runner.invoke(main, cli_args(plain, "--measure-epochs", "none"))
    assert result.exit_code == 0, result.output
    assert read_rows(plain) == [] and load_checkpoint(plain / "checkpoint.pt")["epoch"] == 2
    result = runner.invoke(main, cli_args(out))
    assert result.exit_code != 0 and "already holds a run" in result.output


def test_cli_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--dataset", "imagenet"])
    assert result.exit_code == 2 and "'imagenet' is not one of" in result.output

    empty = tmp_path / "data"
    empty.mkdir()
    result = runner.invoke(
        main, ["train", "--dataset", "mnist", "--data-root", str(empty), "--out", str(tmp_path)]
    )
    assert result.exit_code == 1, result.output
    assert "--download" in result.output and "train-images-idx3-ubyte" in result.output
    assert "Traceback" not in result.output

    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x00" * 100)
    result = runner.invoke(main, ["train", "--resume", "--out", str(run)])
    assert result.exit_code == 1 and "corrupt" in result.output, result.output
    assert f"Error: cannot resume: checkpoint {run / 'checkpoint.pt'}" in result.output

    result = runner.invoke(main, ["train", "--resume", "--out", str(tmp_path / "none")])
    assert result.exit_code == 1 and "does not exist" in result.output

    result = runner.invoke(main, cli_args(tmp_path / "x", "--loss", "mse-rescaled"))
    assert result.exit_code == 2 and "mse_scale" in result.output
    result = runner.invoke(main, cli_args(tmp_path / "x", "--mse-scale", "a,b"))
    assert result.exit_code == 2 and "--mse-scale" in result.output
    result = runner.invoke(main, cli_args(tmp_path / "x", "--lr-milestones", "x"))
    assert result.exit_code == 2 and "--lr-milestones" in result.output
    result = runner.invoke(main, cli_args(tmp_path / "x", "--measure-epochs", "5"))
    assert result.exit_code == 2 and "measure_epochs" in result.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_run_and_resume(tmp_path, tiny_data, monkeypatch):
    # channels-last, fused SGD, bf16 autocast; the resumed run reloads momentum buffers into the
    # parameters' channels-last layout.
    kwargs = {"device": "cuda", "precision": "bf16", "epochs": 3, "measure_epochs": (1, 2, 3)}
    whole = read_rows(train(tiny_config(tmp_path / "a", **kwargs), progress=False, data=tiny_data))

    import ncfast.paper.rundir as rundir_module

    real_save = rundir_module.save_checkpoint

    def save_then_die(path, payload):
        real_save(path, payload)
        if payload["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", **kwargs), progress=False, data=tiny_data)
    monkeypatch.setattr(rundir_module, "save_checkpoint", real_save)
    resumed = read_rows(
        train(tiny_config(tmp_path / "b", resume=True, **kwargs), progress=False, data=tiny_data)
    )
    assert len(resumed) == len(whole) == 6
    for a, b in zip(whole, resumed, strict=True):
        assert all(math.isfinite(a[k]) for k in ("nc1", "loss", "loss_mse"))
        # cuDNN is not bitwise deterministic; the same run within a loose tolerance.
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
        assert b["error"] == pytest.approx(a["error"], abs=0.05)


def test_merged_for_resume_puts_the_options_given_now_on_the_stored_config(tmp_path):
    # TrainConfig.merged_for_resume: what `ncfast train --resume` runs with.
    stored = TrainConfig.from_preset("demo", stop_after=2, tensorboard="tb", epochs=4)
    merged = stored.merged_for_resume(
        {"epochs": 6, "lr": None, "tensorboard": "/abs/tb"}, tmp_path / "run"
    )
    assert (merged.epochs, merged.lr, merged.tensorboard) == (6, stored.lr, "/abs/tb")
    assert merged.stop_after is None  # a stop is for the session that asked for it
    assert (merged.resume, merged.overwrite, merged.out) == (True, False, tmp_path / "run")
    assert stored.merged_for_resume({"stop_after": 3, "tensorboard": "/t"}, "run").stop_after == 3
    off = stored.merged_for_resume({"tensorboard": None}, "run", tensorboard_off=True)
    assert off.tensorboard is None
    # the stored folder is reused only when absolute (a relative one: relative to what?)
    with pytest.raises(ValueError, match="TensorBoard folder 'tb' is a relative path"):
        stored.merged_for_resume({}, "run")
    absolute = TrainConfig.from_preset("demo", tensorboard="/abs/tb")
    assert absolute.merged_for_resume({}, "run").tensorboard == "/abs/tb"
