"""Mutation guards of ncfast.paper.train, in-process: the epoch loop's decisions on a run of a
1/16-width VGG11 over 20 synthetic images (which epochs train, are measured and are saved, a
stop and its resumption from the right epoch, what goes to the log, the checkpoint and
config.json, the metrics rows' keys and values), divergence after a checkpoint, and the pieces
of the loop (rank 0's actions, the checks of a resumed network and of the data, the row of one
measurement) on their own."""

from __future__ import annotations

import contextlib
import io
import json
import platform
import shutil
from pathlib import Path

import pytest
import torch

import ncfast.paper.sgd_epoch as sgd_epoch
import ncfast.paper.train as train_module
from ncfast._version import __version__
from ncfast.paper.checkpoint import CheckpointError, load_checkpoint
from ncfast.paper.data import LabeledImages
from ncfast.paper.distributed import DistributedContext, DistributedError
from ncfast.paper.rundir import RunDirectory, RunDirectoryError
from ncfast.paper.train import (
    TrainingDivergedError,
    eval_outputs_finite,
    measure_epoch,
    run_record,
    train,
)
from ncfast.stats import InvalidInputError
from tests.helpers.tiny_runs import read_rows, synthetic_split, tiny_config
from tests.helpers.tiny_training import CPU, TinyNet, cpu_context, tiny_split

ROW_KEYS = [
    "epoch",
    "split",
    "lr",
    "sgd_loss",
    "sgd_error",
    "world_size",
    "wall_time",
    "epoch_time",
    "measure_time",
]
ROBUSTNESS_KEYS = [
    "robustness",
    "robustness_median",
    "robustness_stderr",
    "robustness_correct",
    "robustness_tight",
    "robustness_tight_median",
    "robustness_tight_stderr",
    "robustness_tight_scale_median",
    "robustness_out_of_range",
    "robustness_samples",
    "robustness_correct_samples",
    "robustness_not_fooled",
    "robustness_mean_iterations",
]


# ------------------------------------------------------------------------ the pieces
def test_the_global_batch_must_divide_among_the_processes():
    with pytest.raises(DistributedError, match="divisible by the number of processes"):
        train_module._check_global_batch(10, 3)
    train_module._check_global_batch(9, 3)
    train_module._check_global_batch(7, 1)


class FakeContext:
    def __init__(self, is_main: bool, ok: bool) -> None:
        self.is_main, self.ok = is_main, ok

    def all_ok(self, ok: bool) -> bool:
        return ok and self.ok


def test_on_main_runs_on_rank_0_and_raises_its_error_everywhere():
    calls = []
    train_module._on_main(cpu_context(), lambda: calls.append(1), "x")
    assert calls == [1]
    train_module._on_main(FakeContext(False, True), lambda: calls.append(2), "x")
    assert calls == [1]
    error = RunDirectoryError("disk full")

    def fail():
        raise error

    with pytest.raises(RunDirectoryError) as info:
        train_module._on_main(cpu_context(), fail, "x")
    assert info.value is error
    with pytest.raises(CheckpointError):
        train_module._on_main(
            cpu_context(), lambda: (_ for _ in ()).throw(CheckpointError("c")), "x"
        )
    with pytest.raises(RunDirectoryError, match="rank 0 failed to write it"):
        train_module._on_main(FakeContext(False, False), lambda: None, "write it")
    with pytest.raises(ZeroDivisionError):  # other errors are not caught
        train_module._on_main(cpu_context(), lambda: 1 / 0, "x")


class Holder:
    def __init__(self, model) -> None:
        self.model = model


def test_a_resumed_network_already_diverged_is_blamed_on_the_checkpoint():
    config = tiny_config("unused", lr=0.25)
    data = tiny_split(6, 0)
    model = TinyNet(batchnorm=True, dtype=torch.float32)
    train_module._check_resumed_network(Holder(model), data, config, "ckpt")
    model.norm.running_var.fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"^checkpoint ckpt: its weights are not finite"):
        train_module._check_resumed_network(Holder(model), data, config, "ckpt")
    model = TinyNet(dtype=torch.float32)
    with torch.no_grad():
        model.classifier.weight.fill_(3e38)
    with pytest.raises(CheckpointError, match=r"outputs are not finite .*lower --lr than 0.25"):
        train_module._check_resumed_network(Holder(model), data, config, "ckpt")


@pytest.mark.parametrize("training", [True, False])
def test_eval_outputs_finite_looks_in_eval_mode_and_restores_the_mode(training):
    config = tiny_config("unused", measure_batch_size=4)
    model = TinyNet(batchnorm=True, dtype=torch.float32)
    model.train(training)
    model.norm.running_var.fill_(0.0)  # eval mode divides by √eps: large but finite
    assert eval_outputs_finite(model, tiny_split(6, 0), config) is True
    assert model.training is training
    with torch.no_grad():
        model.classifier.weight.fill_(3e38)
    assert eval_outputs_finite(model, tiny_split(6, 0), config) is False
    assert model.training is training


def test_load_splits_checks_the_data():
    config = tiny_config("unused")
    train_data, test_data = synthetic_split("train", 2, 0), synthetic_split("test", 1, 1)
    splits = train_module._load_splits(config, CPU, (train_data, test_data))
    assert [s.split for s in splits] == ["train", "test"]
    other = LabeledImages(
        test_data.images, test_data.labels, 5, test_data.mean, test_data.std, "x", "test"
    )
    with pytest.raises(ValueError, match="different numbers of classes"):
        train_module._load_splits(config, CPU, (train_data, other))
    wide = LabeledImages(
        train_data.images[..., :16], train_data.labels, 4, train_data.mean, train_data.std, "x", "t"
    )
    with pytest.raises(ValueError, match="square"):
        train_module._load_splits(config, CPU, (wide, test_data))


def test_load_data_asks_for_the_configured_dataset(monkeypatch):
    import ncfast.paper.data as data_module

    seen = {}
    monkeypatch.setattr(data_module, "load_dataset", lambda name, **kw: seen.update(kw, name=name))
    config = tiny_config("unused", dataset="fashion", per_class=7, seed=5, data_root="/d")
    train_module.load_data(config)
    assert seen == {
        "name": "fashion",
        "root": "/d",
        "per_class": 7,
        "download": False,
        "device": "cpu",
        "seed": 5,
    }


@pytest.fixture
def vgg_state():
    from ncfast.paper.training_state import TrainingState

    config = tiny_config(
        "unused", epochs=3, measure_epochs=(2,), measure_batch_size=8, lr_milestones=(2,)
    )
    splits = (synthetic_split("train", 2, 0), synthetic_split("test", 1, 1))
    state = TrainingState.start(config, cpu_context(), splits[0], None, "ckpt")
    return config, splits, state


def _sgd(epoch: int):
    return sgd_epoch.EpochResult(epoch, 0.05, 0.7, 0.25, 1.5, False)


def test_measure_epoch_measures_the_measurement_epochs_only(vgg_state):
    config, splits, state = vgg_state
    assert measure_epoch(state, _sgd(3), splits, config, cpu_context(), False) == []
    assert state.history == []
    rows = measure_epoch(state, _sgd(2), splits, config, cpu_context(), False)
    assert [(r["epoch"], r["split"]) for r in rows] == [(2, "train"), (2, "test")]
    assert state.history == rows
    for row in rows:
        assert list(row)[: len(ROW_KEYS)] == ROW_KEYS
        assert (row["lr"], row["sgd_loss"], row["sgd_error"], row["epoch_time"]) == (
            0.05,
            0.7,
            0.25,
            1.5,
        )
        assert "forward_time" not in row and "robustness" not in row


def test_measure_epoch_stops_on_non_finite_outputs_or_features(vgg_state, monkeypatch):
    config, splits, state = vgg_state

    def invalid(*args):
        raise InvalidInputError("features")

    monkeypatch.setattr(train_module, "_measure", invalid)
    with pytest.raises(TrainingDivergedError, match=r"epoch 2 \(non-finite features in the meas"):
        measure_epoch(state, _sgd(2), splits, config, cpu_context(), False)
    with torch.no_grad():
        state.model.classifier.weight.fill_(float("inf"))
    for epoch in (2, 3):  # saved but not measured epochs are checked too
        with pytest.raises(TrainingDivergedError, match=r"\(non-finite outputs in eval mode\)"):
            measure_epoch(state, _sgd(epoch), splits, config, cpu_context(), False)
    assert state.history == []


def test_run_record_of_an_in_memory_network(vgg_state):
    config, splits, state = vgg_state
    record = run_record(config.resolved(), cpu_context(), state.model, splits)
    assert record["feature_dim"] == state.model.feature_dim
    assert (record["train_samples"], record["test_samples"]) == (8, 4)
    assert record["steps_per_epoch"] == 1 and record["per_process_batch_size"] == 16
    two = DistributedContext(device=CPU, world_size=2)  # no collective is needed
    record = run_record(config.resolved(), two, state.model, splits)
    assert record["world_size"] == 2
    assert record["per_process_batch_size"] == 8 and type(record["per_process_batch_size"]) is int


@pytest.mark.parametrize("training", [True, False])
def test_forward_time_restores_the_mode(vgg_state, training):
    config, splits, state = vgg_state
    state.model.train(training)
    assert 0 < train_module._forward_time(state.model, splits[1], config) < 30
    assert state.model.training is training


def test_robustness_is_logged_on_the_test_row_of_rank_0(vgg_state, monkeypatch):
    config, splits, state = vgg_state
    config = tiny_config(
        "unused", epochs=3, measure_epochs=(2,), robustness_samples=1, seed=4, lr_milestones=(2,)
    )
    calls = []

    def robustness(model, data, **options):
        calls.append((model, data.split, options))
        return {**{k: 0.5 for k in ROBUSTNESS_KEYS}, "seed": 4, "overshoot": 0.02}

    monkeypatch.setattr(train_module, "robustness", robustness)
    rows = measure_epoch(state, _sgd(2), splits, config, cpu_context(), True)
    assert calls == [
        (state.model, "test", {"samples": 1, "seed": 4, "device": CPU, "progress": True})
    ]
    assert "robustness" not in rows[0]
    test_row = rows[1]
    assert [k for k in test_row if k.startswith("robustness")] == [
        *ROBUSTNESS_KEYS,
        "robustness_time",
    ]
    assert "seed" not in test_row and "overshoot" not in test_row
    assert 0 <= test_row["robustness_time"] < 5


# ------------------------------------------------------------------ the run, end to end
RUN_OPTIONS = dict(
    epochs=3,
    batch_size=8,
    measure_epochs=(1, 3),
    lr_milestones=(2,),
    online_every=2,
    measure_overhead=True,
)


class Recorder:
    """Wraps train's train_epoch, _save_epoch and RunDirectory.log_scalars to record them."""

    def __init__(self, monkeypatch) -> None:
        self.trained, self.saved, self.scalars = [], [], []
        real_epoch, real_save = train_module.train_epoch, train_module._save_epoch
        real_scalars = RunDirectory.log_scalars

        def train_epoch(state, epoch, *args):
            result = real_epoch(state, epoch, *args)
            self.trained.append(result)
            return result

        def save_epoch(rundir, state, config, rows, console):
            self.saved.append((state.epoch, [(r["epoch"], r["split"]) for r in rows]))
            real_save(rundir, state, config, rows, console)

        def log_scalars(rundir, values, step, prefix):
            self.scalars.append((prefix, step, sorted(values)))
            real_scalars(rundir, values, step, prefix)

        monkeypatch.setattr(train_module, "train_epoch", train_epoch)
        monkeypatch.setattr(train_module, "_save_epoch", save_epoch)
        monkeypatch.setattr(RunDirectory, "log_scalars", log_scalars)


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory):
    """Three epochs (measured at 1 and 3, lr ×0.1 after 2, online every 2 of 3 steps, the
    overhead measured), stopped after epoch 2 and resumed."""
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("loop") / "run"
    data = (synthetic_split("train", 5, 0), synthetic_split("test", 3, 1))
    options = RUN_OPTIONS
    sessions = []
    try:
        for extra in ({"stop_after": 2}, {"resume": True}):
            recorder = Recorder(mp)
            stderr, stdout = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
                returned = train(tiny_config(out, **options, **extra), False, data)
            recorder.printed = [
                line.split("|")[0].split()[:2] for line in stdout.getvalue().splitlines()
            ]
            sessions.append(
                (recorder, returned, stderr.getvalue(), load_checkpoint(out / "checkpoint.pt"))
            )
            mp.undo()
    finally:
        mp.undo()
    return out, sessions


def test_the_stopped_session_trains_measures_and_saves_the_right_epochs(stopped_and_resumed):
    out, ((recorder, returned, stderr, payload), _) = stopped_and_resumed
    assert returned == out and stderr == ""
    assert [r.epoch for r in recorder.trained] == [1, 2]
    # measure_overhead: the summary and overhead lines of the measured epoch only
    assert recorder.printed == [["epoch", "1"], ["epoch", "1"]]
    assert recorder.saved == [(1, [(1, "train"), (1, "test")]), (2, [])]
    assert recorder.scalars[:1] == [("sgd", 1, ["error", "loss", "lr"])]
    assert [(p, step) for p, step, _ in recorder.scalars if p != "sgd"] == [
        ("train", 1),
        ("test", 1),
    ]
    assert [s for s in recorder.scalars if s[0] == "sgd"] == [
        ("sgd", e, ["error", "loss", "lr"]) for e in (1, 2)
    ]
    assert payload["epoch"] == 2 and payload["step"] == 6
    assert payload["online"] is not None and payload["online"]["sgd_samples"] == 0
    assert [(r["epoch"], r["split"]) for r in payload["history"]] == [
        (pytest.approx(2 / 3), "train_online"),
        (1, "train"),
        (1, "test"),
        (pytest.approx(4 / 3), "train_online"),
        (2.0, "train_online"),
    ]


def test_the_resumption_goes_on_from_the_saved_epoch(stopped_and_resumed):
    out, ((first, *_), (recorder, returned, stderr, payload)) = stopped_and_resumed
    assert returned == out and stderr == ""
    assert [r.epoch for r in recorder.trained] == [3]
    assert recorder.saved == [(3, [(3, "train"), (3, "test")])]
    assert payload["epoch"] == 3 and payload["step"] == 9
    assert payload["epoch_times"] == [r.seconds for r in first.trained + recorder.trained]
    rows = read_rows(out)
    assert payload["history"] == rows
    online = [r for r in rows if r["split"] == "train_online"]
    assert [r["step"] for r in online] == [2, 4, 6, 8]  # windows go on across epochs
    assert [r["epoch"] for r in online] == pytest.approx([2 / 3, 4 / 3, 2, 8 / 3])
    assert payload["online"]["sgd_samples"] == 4  # step 9's window is open
    assert RunDirectory(out).lock().unlock() is None  # the lock was released


def test_the_metrics_rows_hold_the_epoch_and_the_measurement(stopped_and_resumed):
    out, ((first, *_), (second, *_)) = stopped_and_resumed
    results = {r.epoch: r for r in first.trained + second.trained}
    rows = [r for r in read_rows(out) if r["split"] != "train_online"]
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (1, "train"),
        (1, "test"),
        (3, "train"),
        (3, "test"),
    ]
    epoch_times = load_checkpoint(out / "checkpoint.pt")["epoch_times"]
    for row in rows:
        sgd = results[row["epoch"]]
        assert list(row)[: len(ROW_KEYS)] == ROW_KEYS
        assert (row["lr"], row["sgd_loss"], row["sgd_error"]) == (sgd.lr, sgd.loss, sgd.error)
        assert row["world_size"] == 1 and row["epoch_time"] == epoch_times[row["epoch"] - 1]
        assert row["measure_time"] > 0 and row["forward_time"] > 0
        assert row["num_samples"] == (20 if row["split"] == "train" else 12)
        assert row["weight_decay"] == pytest.approx(4 * 5e-4 / 2)
        assert "robustness" not in row
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.005, 0.005])
    assert rows[0]["wall_time"] < rows[2]["wall_time"]


def test_config_json_is_the_run_record(stopped_and_resumed):
    out, _ = stopped_and_resumed
    record = json.loads((out / "config.json").read_text())
    expected = {
        "ncfast_version": __version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
        "device_name": "cpu",
        "world_size": 1,
        "per_process_batch_size": 8,
        "num_classes": 4,
        "in_channels": 1,
        "image_size": 32,
        "train_samples": 20,
        "test_samples": 12,
        "lambda": pytest.approx(4 * 5e-4 / 2),
        "steps_per_epoch": 3,
        "epochs": 3,
        "batch_size": 8,
        "resume": True,
    }
    assert {k: record[k] for k in expected} == expected
    assert record["feature_dim"] > 0 and record["stats_precision_resolved"] in ("exact", "fast")


# ------------------------------------------------------------------------------ divergence
def test_divergence_after_a_checkpoint_keeps_it(tmp_path, monkeypatch):
    """Epoch 1 is measured and saved; epoch 2's loss is +inf: the run stops naming the kept
    checkpoint of epoch 1, which is left as it was."""
    real = sgd_epoch.compute_loss
    calls = []

    def infinite_in_epoch_2(*args):
        calls.append(1)
        loss = real(*args)
        return loss + float("inf") if len(calls) > 2 else loss

    monkeypatch.setattr(sgd_epoch, "compute_loss", infinite_in_epoch_2)
    out = tmp_path / "run"
    config = tiny_config(out, epochs=2, batch_size=10, measure_epochs=(1,), measure_batch_size=8)
    data = (synthetic_split("train", 5, 0), synthetic_split("test", 2, 1))
    with pytest.raises(TrainingDivergedError) as info:
        train(config, progress=False, data=data)
    assert str(info.value).endswith("--overwrite; the checkpoint of epoch 1 is kept")
    assert "diverged at epoch 2 (loss inf)" in str(info.value)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_rows(out)] == [1, 1]
    RunDirectory(out).lock().unlock()


def test_a_new_run_refuses_a_run_directory_that_holds_a_run(stopped_and_resumed, tmp_path):
    out, _ = stopped_and_resumed
    data = (synthetic_split("train", 2, 0), synthetic_split("test", 1, 1))
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        train(tiny_config(out, epochs=3), progress=False, data=data)
    with pytest.raises(RunDirectoryError, match="--resume"):
        train(tiny_config(tmp_path / "none", resume=True), progress=False, data=data)


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(stopped_and_resumed, tmp_path):
    out, _ = stopped_and_resumed
    run = Path(shutil.copytree(out, tmp_path / "run"))
    payload = torch.load(run / "checkpoint.pt", weights_only=False)
    weight = next(v for v in payload["model"].values() if v.is_floating_point())
    weight.view(-1)[0] = float("nan")
    torch.save(payload, run / "checkpoint.pt")
    data = (synthetic_split("train", 5, 0), synthetic_split("test", 3, 1))
    config = tiny_config(run, **RUN_OPTIONS, resume=True)
    with pytest.raises(CheckpointError, match="its weights are not finite"):
        train(config, progress=False, data=data)
