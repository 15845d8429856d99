"""Mutation guards of ncfast.paper.sgd_epoch, in-process and fast: one epoch of SGD of a
float64 linear network against SGD written out by hand over the same seeded batches (loss,
errors, weights and momentum, within float64 rounding: the two differ only in summation
order), the batches, the permutation's formula, divergence, and the online measurement's rows
and checkpointed state."""

from __future__ import annotations

import math

import pytest
import torch

import ncfast.paper.sgd_epoch as sgd_epoch
from ncfast.paper.checkpoint import CheckpointError
from ncfast.paper.sgd_epoch import (
    OnlineLog,
    epoch_batches,
    epoch_permutation,
    min_last_batch,
    nonfinite_weights,
    train_epoch,
)
from ncfast.paper.training_state import TrainingDivergedError
from tests.helpers.tiny_training import (
    CLASSES,
    CPU,
    RecordingConsole,
    TinyNet,
    cpu_context,
    permutation_by_hand,
    sgd_epoch_by_hand,
    small_config,
    tiny_split,
    tiny_state,
)

# float64 SGD by autograd against SGD by hand: the same operations up to summation order, over
# a few steps of values O(1): agreement to ~1e-15 relative; 1e-10 leaves room, and any change of
# a batch, a gradient or a step size is far beyond it.
RTOL = 1e-10


# ------------------------------------------------------------------ batches and permutation
def test_the_permutation_is_the_seeded_formula_of_seed_and_epoch(seed):
    for s in (seed, 0, 2**63 - 1):
        for epoch in (1, 2, 350):
            assert torch.equal(
                epoch_permutation(23, s, epoch, CPU), permutation_by_hand(23, s, epoch)
            )
    assert not torch.equal(epoch_permutation(50, seed, 1, CPU), epoch_permutation(50, seed, 2, CPU))


@pytest.mark.parametrize(
    ("samples", "batch", "min_last", "expected"),
    [
        (17, 8, 2, [(0, 8), (8, 16)]),  # a last batch of 1 is left out
        (18, 8, 2, [(0, 8), (8, 16), (16, 18)]),  # of 2 it trains
        (16, 8, 2, [(0, 8), (8, 16)]),
        (1, 8, 2, [(0, 1)]),  # a single batch is never left out
        (20, 8, 4, [(0, 8), (8, 16), (16, 20)]),
        (19, 8, 4, [(0, 8), (8, 16)]),
        (5, 2, 1, [(0, 2), (2, 4), (4, 5)]),
    ],
)
def test_epoch_batches(samples, batch, min_last, expected):
    assert epoch_batches(samples, batch, min_last) == expected


def test_epoch_batches_leave_out_a_last_single_sample_by_default():
    assert epoch_batches(17, 8) == [(0, 8), (8, 16)]
    assert epoch_batches(18, 8) == [(0, 8), (8, 16), (16, 18)]


@pytest.mark.parametrize(
    ("world", "sync", "expected"),
    [(1, True, 2), (1, False, 2), (2, True, 2), (3, True, 3), (2, False, 4), (3, False, 6)],
)
def test_min_last_batch(world, sync, expected):
    assert min_last_batch(world, sync) == expected


def test_nonfinite_weights_looks_at_parameters_and_floating_buffers():
    model = TinyNet(batchnorm=True)
    assert not bool(nonfinite_weights(model))
    model.norm.running_var[3] = float("inf")
    assert bool(nonfinite_weights(model))
    model = TinyNet(batchnorm=True)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    assert bool(nonfinite_weights(model))


# ------------------------------------------------------------------------ one epoch of SGD
@pytest.mark.parametrize(
    ("loss", "scale", "samples"),
    [("mse", None, 17), ("ce", None, 21), ("mse-rescaled", (2.0, 3.0), 21)],
)
def test_an_epoch_is_sgd_by_hand_over_the_seeded_batches(seed, loss, scale, samples):
    config = small_config(loss=loss, mse_scale=scale, seed=seed % 1000, lr_milestones=(1, 3))
    state = tiny_state(config, seed=seed)
    state.step, state.epoch_times = 5, [7.0]
    state.model.eval()  # train_epoch puts it in train mode
    weight = state.model.classifier.weight.detach().clone()
    bias = state.model.classifier.bias.detach().clone()
    data, console = tiny_split(samples, seed), RecordingConsole()
    result = train_epoch(state, 2, data, config, cpu_context(), console)

    buffers: list = []
    loss_sum, wrong, seen, steps = sgd_epoch_by_hand(
        weight, bias, data, config, 2, config.lr, buffers
    )
    assert seen == (16 if samples == 17 else 21)
    assert console.calls == [(epoch_batches(samples, 8), 2)]
    assert result.epoch == 2 and state.epoch == 2
    assert result.lr == config.lr  # the epoch's, before the schedule's step
    assert result.loss == pytest.approx(loss_sum / seen, rel=RTOL)
    assert result.error == wrong / seen
    assert 0 <= result.seconds < 30 and state.epoch_times == [7.0, result.seconds]
    assert result.nonfinite_weights is False and result.online_rows == []
    assert state.step == 5 + len(steps)
    assert state.model.training
    torch.testing.assert_close(state.model.classifier.weight, weight, rtol=RTOL, atol=1e-14)
    torch.testing.assert_close(state.model.classifier.bias, bias, rtol=RTOL, atol=1e-14)
    momentum = [state.optimizer.state[p]["momentum_buffer"] for p in state.model.parameters()]
    torch.testing.assert_close(momentum, buffers, rtol=RTOL, atol=1e-14)
    # the schedule stepped once: milestone 1 passed
    assert state.scheduler.last_epoch == 1
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(config.lr * 0.1, rel=1e-15)


def test_batch_norm_trains_in_train_mode():
    config = small_config()
    torch.manual_seed(0)
    state = tiny_state(config, TinyNet(batchnorm=True))
    state.model.eval()
    train_epoch(state, 1, tiny_split(16, 0), config, cpu_context(), RecordingConsole())
    assert int(state.model.norm.num_batches_tracked) == 2
    assert not torch.equal(state.model.norm.running_mean, torch.zeros(16, dtype=torch.float64))


class FormatSpy:
    """The training split, recording the memory format each batch is asked in."""

    def __init__(self, data) -> None:
        self.data, self.formats = data, []
        self.num_classes = data.num_classes

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, index, memory_format=torch.contiguous_format):
        self.formats.append(memory_format)
        return self.data.batch(index, memory_format=memory_format)


@pytest.mark.parametrize("channels_last", [True, False])
def test_batches_come_in_the_configured_memory_format(channels_last):
    config = small_config(channels_last=channels_last)
    state = tiny_state(config)
    data = FormatSpy(tiny_split(16, 0))
    train_epoch(state, 1, data, config, cpu_context(), RecordingConsole())
    expected = torch.channels_last if channels_last else torch.contiguous_format
    assert data.formats == [expected, expected]


# ----------------------------------------------------------------------------- divergence
def _message(epoch: int, what: str) -> str:
    return (
        f"training diverged at epoch {epoch} ({what}); lower --lr (now 0.05) and start again "
        "with --overwrite; no checkpoint was written"
    )


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_a_non_finite_loss_with_finite_weights_stops_the_epoch(monkeypatch, bad):
    compute_loss = sgd_epoch.compute_loss

    def shifted(*args):  # a constant: gradients and weights stay finite
        return compute_loss(*args) + torch.tensor(float(bad), dtype=torch.float64)

    monkeypatch.setattr(sgd_epoch, "compute_loss", shifted)
    config = small_config()
    state = tiny_state(config)
    with pytest.raises(TrainingDivergedError) as info:
        train_epoch(state, 3, tiny_split(16, 0), config, cpu_context(), RecordingConsole())
    assert str(info.value) == _message(3, f"loss {bad}")
    assert bool(nonfinite_weights(state.model)) is False
    assert state.epoch == 3 and len(state.epoch_times) == 1


def test_a_non_finite_running_var_with_finite_parameters_stops_the_epoch():
    config = small_config()
    torch.manual_seed(0)
    state = tiny_state(config, TinyNet(batchnorm=True))

    def poison(module, args):
        module.running_var.fill_(float("inf"))

    state.model.norm.register_forward_pre_hook(poison)
    with pytest.raises(TrainingDivergedError) as info:
        train_epoch(state, 1, tiny_split(16, 0), config, cpu_context(), RecordingConsole())
    assert str(info.value) == _message(1, "non-finite weights")
    assert all(bool(torch.isfinite(p).all()) for p in state.model.parameters())


# ------------------------------------------------------------------ the online measurement
ROW_KEYS = (
    "epoch",
    "split",
    "step",
    "window_steps",
    "lr",
    "sgd_loss",
    "sgd_error",
    "world_size",
    "wall_time",
)


def _online_state(config, step: int = 0, seed: int = 0):
    state = tiny_state(config, seed=seed)
    state.step = step
    state.online = OnlineLog.start(config, cpu_context(), state.model, CLASSES, step)
    return state


def test_online_rows_are_the_windows_of_sgd_steps(seed):
    config = small_config(online_every=2, seed=seed % 1000)
    state = _online_state(config, step=10, seed=seed)
    weight = state.model.classifier.weight.detach().clone()
    bias = state.model.classifier.bias.detach().clone()
    data, ctx, buffers = tiny_split(21, seed), cpu_context(), []
    first = train_epoch(state, 1, data, config, ctx, RecordingConsole())
    *_, steps1 = sgd_epoch_by_hand(weight, bias, data, config, 1, config.lr, buffers)
    second = train_epoch(state, 2, data, config, ctx, RecordingConsole())
    *_, steps2 = sgd_epoch_by_hand(weight, bias, data, config, 2, config.lr, buffers)

    rows = first.online_rows + second.online_rows
    assert [len(first.online_rows), len(second.online_rows)] == [1, 2]
    for row in rows:
        assert tuple(row)[: len(ROW_KEYS)] == ROW_KEYS
        assert row["split"] == "train_online" and row["window_steps"] == 2
        assert row["world_size"] == 1 and row["lr"] == config.lr
        assert 0 <= row["wall_time"] <= state.wall_time()
        assert row["weight_decay"] == pytest.approx(CLASSES * config.weight_decay / 2)
    assert [r["step"] for r in rows] == [12, 14, 16]
    assert [r["epoch"] for r in rows] == pytest.approx([2 / 3, 1 + 1 / 3, 2.0], rel=1e-15)
    windows = [steps1[:2], [steps1[2], steps2[0]], steps2[1:]]
    for row, window in zip(rows, windows, strict=True):
        samples = sum(s[2] for s in window)
        assert row["num_samples"] == samples
        assert row["sgd_loss"] == pytest.approx(sum(s[0] for s in window) / samples, rel=RTOL)
        assert row["sgd_error"] == sum(s[1] for s in window) / samples
    assert state.online.take_rows() == []


def test_the_online_window_in_progress_is_kept_and_restored():
    config = small_config(online_every=2)
    state = _online_state(config)
    ctx = cpu_context()
    train_epoch(state, 1, tiny_split(21, 0), config, ctx, RecordingConsole())
    log = state.online
    log.keep_state(ctx)
    saved = log.saved_state
    assert sorted(saved) == ["sgd_samples", "sgd_sums", "watch"]
    assert saved["sgd_samples"] == 5  # the third step of 5 samples is in progress
    assert torch.equal(saved["sgd_sums"], log.sgd_sums) and saved["sgd_sums"][0] > 0
    assert saved["sgd_sums"] is not log.sgd_sums

    for is_main in (True, False):
        fresh = OnlineLog.start(config, ctx, tiny_state(config).model, CLASSES, 3)
        fresh.restore(saved, is_main, "ckpt")
        assert fresh.sgd_samples == 5 and fresh.saved_state is saved
        expected = saved["sgd_sums"] if is_main else torch.zeros(2, dtype=torch.float64)
        assert torch.equal(fresh.sgd_sums, expected)
        assert fresh.watch.state_dict()["step"] == log.watch.state_dict()["step"]


@pytest.mark.parametrize("samples", [-1, "5", 2.0, None])
def test_restoring_unusable_online_state_names_it(samples):
    config = small_config(online_every=2)
    log = _online_state(config).online
    log.keep_state(cpu_context())
    stored = {**log.saved_state, "sgd_samples": samples}
    with pytest.raises(CheckpointError, match=r"checkpoint ckpt: 'online' cannot be restored"):
        log.restore(stored, True, "ckpt")
    stored = {k: v for k, v in log.saved_state.items() if k != "watch"}
    with pytest.raises(CheckpointError, match=r"'online' cannot be restored"):
        log.restore(stored, True, "ckpt")
    log.restore({**log.saved_state, "sgd_samples": 0}, True, "ckpt")  # 0 is a count
    assert log.sgd_samples == 0


def test_online_sgd_error_counts_are_integers_of_the_batch():
    """The window's error is a fraction of its samples: a whole number of misclassified."""
    config = small_config(online_every=1)
    state = _online_state(config)
    result = train_epoch(state, 1, tiny_split(16, 0), config, cpu_context(), RecordingConsole())
    for row in result.online_rows:
        assert math.isclose(row["sgd_error"] * 8, round(row["sgd_error"] * 8))
        assert row["window_steps"] == 1 and row["num_samples"] == 8
