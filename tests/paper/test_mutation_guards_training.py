"""Mutation guards of ncfast.paper.training_state, in-process and fast: what a TrainingState
starts from, what its checkpoint holds and how a resumption restores it (exactly: torch.equal,
and the next epoch identical to the uninterrupted run's), every refusal of a restored state
naming what is wrong, the divergence messages, and the checks of a run to resume."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ncfast._version import __version__
from ncfast.paper.checkpoint import FORMAT, CheckpointError, save_checkpoint
from ncfast.paper.rundir import RunDirectory, RunDirectoryError
from ncfast.paper.sgd_epoch import train_epoch
from ncfast.paper.training_state import (
    TrainingState,
    build_model,
    make_optimizer,
    restore_training_state,
    resume_config,
    resume_payload,
    rng_state,
    set_rng_state,
    steps_per_epoch,
    stored_config,
)
from tests.helpers.tiny_runs import synthetic_split, tiny_config
from tests.helpers.tiny_training import (
    CPU,
    RecordingConsole,
    TinyNet,
    cpu_context,
    small_config,
    tiny_split,
    tiny_state,
)


# ----------------------------------------------------------- a VGG run, saved and resumed
@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory):
    """A 1/16-width VGG11 state after one epoch of 20 images (online every 2 steps), its
    checkpoint payload, and the configuration and data."""
    out = tmp_path_factory.mktemp("vgg") / "run"
    config = tiny_config(out, batch_size=8, epochs=3, lr_milestones=(1,), online_every=2)
    data = synthetic_split("train", 5, 0)
    ctx = cpu_context()
    state = TrainingState.start(config, ctx, data, None, "ckpt")
    fresh = copy.deepcopy(state.model.state_dict())
    train_epoch(state, 1, data, config, ctx, RecordingConsole())
    state.history = [{"epoch": 1, "split": "train", "error": 0.5}]
    state.online.keep_state(ctx)
    payload = state.checkpoint(config)
    payload = copy.deepcopy(payload)
    return config, data, state, payload, fresh


def test_a_new_state_is_the_seeded_network_and_the_configured_sgd(vgg_run):
    config, data, _, _, fresh = vgg_run
    state = TrainingState.start(config, cpu_context(), data, None, "ckpt")
    assert (state.epoch, state.step, state.saved_epoch, state.resumed_epoch) == (0, 0, 0, 0)
    assert state.history == [] and state.epoch_times == []
    assert state.trained is state.model and state.device == CPU
    norms = {type(m) for m in state.model.modules() if "Norm" in type(m).__name__}
    assert norms == {torch.nn.BatchNorm2d}  # no batch norm over processes in one process
    assert not torch.backends.cudnn.benchmark
    assert all(torch.equal(v, fresh[k]) for k, v in state.model.state_dict().items())
    assert 0 <= state.wall_time() < 5
    group = state.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 5e-4)
    assert not group["fused"]
    assert state.scheduler.milestones == {1: 1} and state.scheduler.gamma == 0.1
    assert state.online is not None and state.online.sgd_samples == 0


def test_the_checkpoint_holds_everything_training_changes(vgg_run):
    config, _, state, payload, _ = vgg_run
    assert sorted(payload) == sorted(
        [
            "format",
            "ncfast_version",
            "epoch",
            "config",
            "model",
            "optimizer",
            "scheduler",
            "rng",
            "history",
            "wall_time",
            "epoch_times",
            "step",
            "online",
        ]
    )
    assert payload["format"] == FORMAT and payload["ncfast_version"] == __version__
    assert payload["epoch"] == 1 and payload["step"] == 3  # 20 images in batches of 8
    assert payload["config"] == config.to_json()
    assert payload["history"] == state.history and payload["epoch_times"] == state.epoch_times
    assert 0 < payload["wall_time"] <= state.wall_time()
    assert sorted(payload["rng"]) == ["torch"]
    assert sorted(payload["online"]) == ["sgd_samples", "sgd_sums", "watch"]
    assert payload["online"]["sgd_samples"] == 4  # the third step's window is open
    for key, value in state.model.state_dict().items():
        assert torch.equal(payload["model"][key], value)
    assert payload["scheduler"] == state.scheduler.state_dict()
    assert payload["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005)
    empty = dataclasses.replace(state, online=None).checkpoint(config)
    assert empty["online"] is None


def test_a_resumed_state_is_the_saved_one_and_trains_on_identically(vgg_run):
    config, data, _, payload, _ = vgg_run
    ctx = cpu_context()
    saved = copy.deepcopy(payload)
    # the uninterrupted run from the same payload's start
    original = TrainingState.start(config, ctx, data, copy.deepcopy(saved), "ckpt")
    torch.manual_seed(12345)  # a resumption restores the stored RNG states
    state = TrainingState.start(config, ctx, data, payload, "ckpt")
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert (state.epoch, state.saved_epoch, state.resumed_epoch, state.step) == (1, 1, 1, 3)
    assert state.history == saved["history"] and state.history is not payload["history"]
    assert state.epoch_times == saved["epoch_times"]
    assert state.epoch_times is not payload["epoch_times"]
    assert saved["wall_time"] <= state.wall_time() < saved["wall_time"] + 5
    for key, value in state.model.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    assert state.optimizer.state_dict()["param_groups"] == saved["optimizer"]["param_groups"]
    for index, value in saved["optimizer"]["state"].items():
        mine = state.optimizer.state_dict()["state"][index]["momentum_buffer"]
        assert torch.equal(mine, value["momentum_buffer"])
    assert state.scheduler.state_dict() == saved["scheduler"]
    assert state.online.sgd_samples == 4
    assert torch.equal(state.online.sgd_sums, saved["online"]["sgd_sums"])
    assert state.online.saved_state is payload["online"]
    first = train_epoch(original, 2, data, config, ctx, RecordingConsole())
    again = train_epoch(state, 2, data, config, ctx, RecordingConsole())
    assert (again.loss, again.error, again.lr) == (first.loss, first.error, first.lr)
    assert again.online_rows[0]["sgd_loss"] == first.online_rows[0]["sgd_loss"]
    for a, b in zip(state.model.parameters(), original.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_older_checkpoint_without_clocks_or_step(vgg_run):
    config, data, _, payload, _ = vgg_run
    older = {
        k: v
        for k, v in copy.deepcopy(payload).items()
        if k not in ("wall_time", "epoch_times", "step", "online")
    }
    state = TrainingState.start(config, cpu_context(), data, older, "ckpt")
    assert state.epoch_times == [] and state.wall_time() < 1.0
    assert state.step == 1 * steps_per_epoch(config, 1, len(data)) == 3
    assert state.online.sgd_samples == 0


@pytest.mark.parametrize("step", [-1, True, 1.5, "3"])
def test_a_stored_step_must_be_a_count(vgg_run, step):
    config, data, _, payload, _ = vgg_run
    bad = {**copy.deepcopy(payload), "step": step}
    with pytest.raises(CheckpointError, match=r"checkpoint ckpt: 'step' must be an integer ≥ 0"):
        TrainingState.start(config, cpu_context(), data, bad, "ckpt")
    zero = {**copy.deepcopy(payload), "step": 0}
    assert TrainingState.start(config, cpu_context(), data, zero, "ckpt").step == 0


# ------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize(
    ("samples", "batch", "world", "sync", "expected"),
    [
        (17, 8, 1, True, 2),
        (18, 8, 1, True, 3),
        (20, 8, 2, False, 3),  # last batch 4 = 2 per process
        (19, 8, 2, False, 2),
        (19, 8, 3, True, 3),
        (18, 8, 3, True, 2),
    ],
)
def test_steps_per_epoch(samples, batch, world, sync, expected):
    config = small_config(batch_size=batch, sync_batchnorm=sync)
    assert steps_per_epoch(config, world, samples) == expected


@pytest.mark.parametrize("channels_last", [True, False])
def test_build_model_is_seeded_and_in_the_configured_memory_format(seed, channels_last):
    config = small_config(seed=seed % 1000, channels_last=channels_last)
    torch.manual_seed(seed + 1)
    a = build_model(config, 4, 1, 32)
    b = build_model(config, 4, 1, 32)
    other = build_model(dataclasses.replace(config, seed=config.seed + 1), 4, 1, 32)
    params = [
        (p, q, r)
        for p, q, r in zip(a.parameters(), b.parameters(), other.parameters(), strict=True)
    ]
    assert all(torch.equal(p, q) for p, q, _ in params)
    assert not all(torch.equal(p, r) for p, _, r in params)
    conv = next(p for p in a.parameters() if p.dim() == 4 and p.shape[1] > 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert conv.is_contiguous(memory_format=fmt) and conv.shape[-1] > 1
    assert not conv.is_contiguous() if channels_last else conv.is_contiguous()


def test_make_optimizer_is_the_configured_sgd_and_step_schedule():
    config = small_config(
        lr=0.2, momentum=0.8, weight_decay=1e-3, lr_milestones=(2, 3), lr_gamma=0.5
    )
    optimizer, scheduler = make_optimizer(TinyNet(), config, CPU)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.8, 1e-3)
    assert not group["fused"] and len(group["params"]) == 2
    lrs = []
    for _ in range(4):
        lrs.append(group["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.2, 0.2, 0.1, 0.05], rel=1e-12)


def test_rng_state_is_the_cpu_generator_and_restores_it():
    state = rng_state(CPU)
    assert sorted(state) == ["torch"] and sorted(rng_state()) == ["torch"]
    expected = torch.rand(5)
    # a CUDA state in the checkpoint is ignored off CUDA (this machine may have none)
    set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]}, CPU)
    assert torch.equal(torch.rand(5), expected)
    set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]})
    assert torch.equal(torch.rand(5), expected)


# --------------------------------------------------------- restoring a training state
@pytest.fixture(scope="module")
def tiny_payload_of_epoch_2():
    """A TinyNet state after 2 epochs (milestone 2 passed: lr 0.005) and its payload."""
    config = small_config()
    state = tiny_state(config)
    for epoch in (1, 2):
        train_epoch(state, epoch, tiny_split(16, 0), config, cpu_context(), RecordingConsole())
    payload = {
        "epoch": 2,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": rng_state(CPU),
    }
    return config, copy.deepcopy(payload)


def _restore(config, payload, model=None):
    state = tiny_state(config, model, seed=7)
    restore_training_state(
        copy.deepcopy(payload), state.model, state.optimizer, state.scheduler, config, CPU, "p"
    )
    return state


def test_restore_training_state_loads_every_part(tiny_payload_of_epoch_2):
    config, payload = tiny_payload_of_epoch_2
    torch.manual_seed(99)
    state = _restore(config, payload)
    assert torch.equal(torch.get_rng_state(), payload["rng"]["torch"])
    for key, value in state.model.state_dict().items():
        assert torch.equal(value, payload["model"][key])
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.005, rel=1e-12)
    assert state.scheduler.last_epoch == 2
    for index, param in enumerate(state.model.parameters()):
        stored = payload["optimizer"]["state"][index]["momentum_buffer"]
        assert torch.equal(state.optimizer.state[param]["momentum_buffer"], stored)


def test_momentum_buffers_take_their_parameters_memory_layout():
    config = small_config(net="vgg11", channels_last=True)
    model = build_model(config, 4, 1, 32)
    optimizer, scheduler = make_optimizer(model, config, CPU)
    model(torch.randn(2, 1, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    optimizer.step()
    scheduler.step()
    stored = optimizer.state_dict()
    stored = copy.deepcopy(stored)
    for value in stored["state"].values():
        value["momentum_buffer"] = value["momentum_buffer"].contiguous()
    payload = {
        "epoch": 1,
        "model": model.state_dict(),
        "optimizer": stored,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    target = build_model(config, 4, 1, 32)
    opt2, sched2 = make_optimizer(target, config, CPU)
    restore_training_state(payload, target, opt2, sched2, config, CPU, "p")
    convs = [p for p in target.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert convs
    for param in convs:
        buffer = opt2.state[param]["momentum_buffer"]
        assert buffer.stride() == param.stride() and not buffer.is_contiguous()


def _edited(payload, edit):
    payload = copy.deepcopy(payload)
    edit(payload)
    return payload


def _group(p):
    return p["optimizer"]["param_groups"][0]


def _set_group(key, value):
    return lambda p: _group(p).__setitem__(key, value)


def _buffer(p):
    return p["optimizer"]["state"][0]


REFUSALS = {
    "model": (
        lambda p: p["model"].pop("classifier.bias"),
        r"'model'",
    ),
    "fewer parameters": (
        lambda p: _group(p).__setitem__("params", [0]),
        r"'optimizer' holds 1 parameters in 1 group\(s\); a vgg11 of width 0.0625 has 2 in 1",
    ),
    "two groups": (
        lambda p: p["optimizer"]["param_groups"].append(
            {**_group(p), "params": [_group(p)["params"].pop()]}
        ),
        r"'optimizer' holds 2 parameters in 2 group\(s\)",
    ),
    "buffer shape": (
        lambda p: _buffer(p).__setitem__(
            "momentum_buffer", torch.zeros(3, 15, dtype=torch.float64)
        ),
        r"'optimizer' state momentum_buffer of parameter 0 has shape \[3, 15\], "
        r"the parameter \[3, 16\]",
    ),
    "buffer dtype": (
        lambda p: _buffer(p).__setitem__("momentum_buffer", torch.zeros(3, 16)),
        r"state momentum_buffer of parameter 0 is torch.float32, the parameter torch.float64",
    ),
    "momentum": (_set_group("momentum", 0.8), r"'optimizer' setting momentum is 0.8, the run's"),
    "momentum a bool": (_set_group("momentum", True), r"setting momentum is True"),
    "weight_decay None": (_set_group("weight_decay", None), r"setting weight_decay is None"),
    "nesterov an int": (_set_group("nesterov", 0), r"setting nesterov is 0"),
    "maximize": (_set_group("maximize", True), r"setting maximize is True"),
    "lr zero": (
        _set_group("lr", 0.0),
        r"'optimizer' setting lr must be a positive number, got 0.0",
    ),
    "lr negative": (_set_group("lr", -0.1), r"setting lr must be a positive number"),
    "lr nan": (_set_group("lr", float("nan")), r"setting lr must be a positive number"),
    "lr inf": (_set_group("lr", float("inf")), r"setting lr must be a positive number"),
    "lr bool": (_set_group("lr", True), r"setting lr must be a positive number"),
    "lr text": (_set_group("lr", "0.005"), r"setting lr must be a positive number"),
    "lr missing": (lambda p: _group(p).pop("lr"), r"setting lr must be a positive number"),
    "lr off the schedule": (
        _set_group("lr", 0.0075),
        r"'optimizer'/'scheduler': learning rate 0.0075 after epoch 2, the schedule gives 0.005",
    ),
    "fused an int": (_set_group("fused", 1), r"setting fused must be True, False or None, got 1"),
    "foreach a text": (_set_group("foreach", "no"), r"setting foreach must be True, False"),
    "capturable an int": (_set_group("capturable", 0), r"setting capturable must be True"),
    "last_epoch": (
        lambda p: p["scheduler"].__setitem__("last_epoch", 1),
        r"'scheduler' must be the learning-rate schedule after epoch 2 .*got last_epoch 1",
    ),
    "milestones a list": (
        lambda p: p["scheduler"].__setitem__("milestones", [2, 3]),
        r"'scheduler' must be the learning-rate schedule after epoch 2",
    ),
    "milestones": (
        lambda p: p["scheduler"].__setitem__("milestones", {2: 1, 4: 1}),
        r"'scheduler' setting milestones is \{2: 1, 4: 1\}, the run's config.json gives",
    ),
    "milestone count a float": (
        lambda p: p["scheduler"].__setitem__("milestones", {2: 1.0, 3: 1}),
        r"'scheduler' setting milestones",
    ),
    "milestone count a bool": (
        lambda p: p["scheduler"].__setitem__("milestones", {2: True, 3: 1}),
        r"'scheduler' setting milestones",
    ),
    "gamma": (
        lambda p: p["scheduler"].__setitem__("gamma", 0.5),
        r"'scheduler' setting gamma is 0.5, the run's config.json gives 0.1",
    ),
    "gamma missing": (lambda p: p["scheduler"].pop("gamma"), r"'scheduler' setting gamma is None"),
    "base_lrs": (
        lambda p: p["scheduler"].__setitem__("base_lrs", [0.1]),
        r"'scheduler' setting base_lrs is \[0.1\]",
    ),
    "base_lrs longer": (
        lambda p: p["scheduler"].__setitem__("base_lrs", [0.05, 0.05]),
        r"'scheduler' setting base_lrs",
    ),
    "base_lrs a tuple": (
        lambda p: p["scheduler"].__setitem__("base_lrs", (0.05,)),
        r"'scheduler' setting base_lrs",
    ),
    "rng": (
        lambda p: p["rng"].__setitem__("torch", torch.zeros(3)),
        r"checkpoint p: 'rng' cannot be restored",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_each_unfit_part_of_a_checkpoint_is_refused_by_name(tiny_payload_of_epoch_2, name):
    config, payload = tiny_payload_of_epoch_2
    edit, message = REFUSALS[name]
    with pytest.raises(CheckpointError, match=message):
        _restore(config, _edited(payload, edit))


@pytest.mark.parametrize(
    ("key", "value"), [("fused", False), ("foreach", True), ("capturable", False), ("fused", None)]
)
def test_implementation_choices_of_another_machine_are_accepted(
    tiny_payload_of_epoch_2, key, value
):
    config, payload = tiny_payload_of_epoch_2
    state = _restore(config, _edited(payload, _set_group(key, value)))
    assert state.scheduler.last_epoch == 2


def test_a_resumption_at_a_milestone_expects_the_decayed_rate(tiny_payload_of_epoch_2):
    """Epoch 2 is a milestone: the next epoch's rate is lr·γ (0.005), not lr."""
    config, payload = tiny_payload_of_epoch_2
    with pytest.raises(CheckpointError, match=r"learning rate 0.05 after epoch 2"):
        _restore(config, _edited(payload, _set_group("lr", 0.05)))
    later = small_config(lr_milestones=(3, 4))  # the stored schedule is (2, 3)'s
    with pytest.raises(CheckpointError, match=r"setting milestones is Counter\(\{2: 1, 3: 1\}\)"):
        _restore(later, payload)


def test_a_momentum_of_one_is_not_true(tiny_payload_of_epoch_2):
    config, payload = tiny_payload_of_epoch_2
    one = dataclasses.replace(config, momentum=1.0)
    with pytest.raises(CheckpointError, match=r"setting momentum is True"):
        _restore(one, _edited(payload, _set_group("momentum", True)))


# --------------------------------------------------------------------------- divergence
def test_diverged_says_which_checkpoint_is_kept():
    config = small_config(lr=0.25)
    state = tiny_state(config)
    head = "training diverged at epoch 4 (loss nan); lower --lr (now 0.25) and start again with "
    assert str(state.diverged(config, 4, "loss nan")) == (
        head + "--overwrite; no checkpoint was written"
    )
    state.saved_epoch = state.resumed_epoch = 3
    assert str(state.diverged(config, 4, "loss nan")) == (
        head + "--overwrite; the checkpoint of epoch 3, which this run resumed from, is kept, "
        "but training diverges from it"
    )
    state.saved_epoch = 4
    error = state.diverged(config, 4, "loss nan")
    assert str(error) == head + "--overwrite; the checkpoint of epoch 4 is kept"
    assert isinstance(error, FloatingPointError)


# ------------------------------------------------------------------ the run to resume
@pytest.fixture
def saved_run(tmp_path, vgg_run):
    config, _, _, payload, _ = vgg_run
    out = tmp_path / "run"
    config = dataclasses.replace(config, out=str(out))
    stored = {**payload, "config": config.to_json()}
    out.mkdir()
    save_checkpoint(out / "checkpoint.pt", stored)
    return config, out


def test_resume_config_is_the_stored_configuration(saved_run):
    config, out = saved_run
    assert resume_config(out) == config
    owner = RunDirectory(out).lock()
    try:
        with pytest.raises(RunDirectoryError):
            resume_config(out)
    finally:
        owner.unlock()
    with pytest.raises(RunDirectoryError):
        resume_config(out.parent / "none")


def test_an_unusable_stored_configuration_cannot_be_resumed(saved_run):
    config, out = saved_run
    payload = torch.load(out / "checkpoint.pt", weights_only=False)
    payload["config"]["epochs"] = 0
    torch.save(payload, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"^cannot resume: checkpoint .*'config' is unusable"):
        resume_config(out)
    assert stored_config({"config": config.to_json()}, "p") == config
    resumed = dataclasses.replace(config, resume=True, overwrite=True)
    assert stored_config({"config": resumed.to_json()}, "p") == resumed


def test_resume_payload_checks_the_run_and_the_epochs(saved_run):
    config, out = saved_run
    rundir = RunDirectory(out)
    assert resume_payload(config, rundir) is None  # not resuming
    resume = dataclasses.replace(config, resume=True)
    assert resume_payload(resume, rundir)["epoch"] == 1
    assert resume_payload(dataclasses.replace(resume, stop_after=2), rundir)["epoch"] == 1
    with pytest.raises(RunDirectoryError, match=r"already trained 1 epochs; give an epoch in 2..3"):
        resume_payload(dataclasses.replace(resume, stop_after=1), rundir)
    with pytest.raises(RunDirectoryError, match=r"lr: checkpoint 0.05, now 0.1$"):
        resume_payload(dataclasses.replace(resume, lr=0.1), rundir)
    # an epoch count past the stored epoch (1 of 3): the run's last epoch is 3
    payload = torch.load(out / "checkpoint.pt", weights_only=False)
    torch.save({**payload, "epoch": 3}, out / "checkpoint.pt")
    assert resume_payload(resume, rundir)["epoch"] == 3
    torch.save({**payload, "epoch": 4}, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"'epoch' is 4, after the run's last epoch 3"):
        resume_payload(resume, rundir)


def test_options_added_later_match_at_their_default(saved_run):
    config, out = saved_run
    payload = torch.load(out / "checkpoint.pt", weights_only=False)
    del payload["config"]["online_every"]  # a checkpoint of a release before the option
    torch.save(payload, out / "checkpoint.pt")
    resume = dataclasses.replace(config, resume=True, online_every=0)
    assert resume_payload(resume, RunDirectory(out))["epoch"] == 1
    with pytest.raises(RunDirectoryError, match=r"online_every: checkpoint None, now 2"):
        resume_payload(dataclasses.replace(resume, online_every=2), RunDirectory(out))
