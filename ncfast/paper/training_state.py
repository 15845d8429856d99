"""The state of a training run and its resumption: the network, optimiser, learning-rate
schedule, RNG states and metrics history that :func:`ncfast.paper.train.train` changes and a
checkpoint holds (:class:`TrainingState`), and the checks that a checkpoint resumes this run
(the same experiment, a network, optimiser and schedule that fit it)."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ncfast._version import __version__
from ncfast.errors import NCFastError
from ncfast.paper import distributed as dist_utils
from ncfast.paper.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_state_checked
from ncfast.paper.config import TrainConfig
from ncfast.paper.models import build
from ncfast.paper.rundir import RunDirectory, RunDirectoryError
from ncfast.paper.sgd_epoch import OnlineLog, epoch_batches, min_last_batch


class TrainingDivergedError(NCFastError, FloatingPointError):
    """Training produced a non-finite loss, weights or outputs; the run's last checkpoint (one
    from before the divergence) is kept."""


@dataclass
class TrainingState:
    """What training changes and a checkpoint holds: the network, the optimiser, the
    learning-rate schedule (and the RNG states), the metrics history and the run's clocks."""

    model: nn.Module  # what is measured and saved
    trained: nn.Module  # what trains: ``model``, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    epoch: int = 0  # the last completed epoch
    step: int = 0  # SGD steps done since the run began
    saved_epoch: int = 0  # the epoch of the checkpoint on disk (0: none)
    resumed_epoch: int = 0  # the epoch of the checkpoint this session resumed from (0: none)
    history: list[dict] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)  # training seconds of every epoch
    run_start: float = field(default_factory=time.perf_counter)  # wall_time's zero
    online: OnlineLog | None = None  # with online_every: the measurement of the training passes

    @classmethod
    def start(cls, config: TrainConfig, ctx, train_data, payload: dict | None, path):
        """A new run's state (the network initialised from the random seed), or with ``payload`` the
        checkpoint's (CheckpointError naming the field that does not fit)."""
        device = ctx.device
        model = build_model(
            config, train_data.num_classes, train_data.channels, train_data.image_size
        )
        model = model.to(device)
        if ctx.enabled and config.sync_batchnorm:
            model = dist_utils.convert_sync_batchnorm(model, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        optimizer, scheduler = make_optimizer(model, config, device)
        state = cls(model, model, optimizer, scheduler, device)
        if payload is not None:
            restore_training_state(payload, model, optimizer, scheduler, config, device, path)
            state.epoch = state.saved_epoch = state.resumed_epoch = payload["epoch"]
            state.history = list(payload["history"])
            state.epoch_times = list(payload.get("epoch_times", []))
            state.run_start -= float(payload.get("wall_time", 0.0))
            state.step = _stored_step(payload, config, ctx, len(train_data), path)
        if config.online_every:
            state.online = OnlineLog.start(config, ctx, model, train_data.num_classes, state.step)
            if payload is not None and payload.get("online") is not None:
                state.online.restore(payload["online"], ctx.is_main, path)
        if ctx.enabled:
            # DDP averages the gradients; `model` (the same parameters) is what is measured and
            # saved, so checkpoints hold no wrapper prefixes.
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            state.trained = DistributedDataParallel(model, device_ids=ids)
        return state

    def wall_time(self) -> float:
        """Seconds since the run began, across resumptions."""
        return time.perf_counter() - self.run_start

    def checkpoint(self, config: TrainConfig) -> dict:
        """The checkpoint payload after :attr:`epoch` (:mod:`ncfast.paper.checkpoint`)."""
        return {
            "format": FORMAT,
            "ncfast_version": __version__,
            "epoch": self.epoch,
            "config": config.to_json(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.device),
            "history": self.history,
            "wall_time": self.wall_time(),
            "epoch_times": self.epoch_times,
            "step": self.step,
            "online": None if self.online is None else self.online.saved_state,
        }

    def diverged(self, config: TrainConfig, epoch: int, what: str) -> TrainingDivergedError:
        if not self.saved_epoch:
            kept = "no checkpoint was written"
        elif self.saved_epoch == self.resumed_epoch:
            kept = (
                f"the checkpoint of epoch {self.saved_epoch}, which this run resumed from, is "
                "kept, but training diverges from it"
            )
        else:
            kept = f"the checkpoint of epoch {self.saved_epoch} is kept"
        return TrainingDivergedError(
            f"training diverged at epoch {epoch} ({what}); lower --lr (now {config.lr:g}) and "
            f"start again with --overwrite; {kept}"
        )


def _stored_step(payload: dict, config: TrainConfig, ctx, num_samples: int, path) -> int:
    """The SGD steps a checkpoint's run has done: its ``step`` (checkpoints of older releases
    lack it: its epochs times this run's steps per epoch)."""
    step = payload.get("step")
    if step is None:
        return payload["epoch"] * steps_per_epoch(config, ctx.world_size, num_samples)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {path}: 'step' must be an integer ≥ 0, got {step!r}")
    return step


def steps_per_epoch(config: TrainConfig, world_size: int, num_samples: int) -> int:
    """SGD steps in an epoch of ``num_samples`` training images
    (:func:`ncfast.paper.sgd_epoch.epoch_batches`)."""
    min_last = min_last_batch(world_size, config.sync_batchnorm)
    return len(epoch_batches(num_samples, config.batch_size, min_last))


def build_model(config: TrainConfig, num_classes: int, in_channels: int, image_size: int):
    """The run's network, initialised from ``config.seed`` (same weights on CPU and CUDA), in
    the memory format it trains in (channels-last unless ``config.channels_last`` is False)."""
    torch.manual_seed(config.seed)
    model = build(config.net, num_classes, in_channels, image_size, config.width)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(model, config: TrainConfig, device: torch.device):
    extra = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        **extra,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma
    )
    return optimizer, scheduler


def rng_state(device: torch.device | None = None) -> dict:
    """The CPU generator's state and, on a CUDA ``device``, that device's (a one-entry list
    under ``"cuda"``): the training device's generator only, so the checkpoint does not depend
    on how many GPUs or processes the run used."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = [torch.cuda.get_rng_state(device)]
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore :func:`rng_state` (every process gets the same states; a CUDA state goes to the
    training ``device``)."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # Older checkpoints held every visible device's state: take this device's if present.
        own = cuda_states[index] if len(cuda_states) > index else cuda_states[0]
        torch.cuda.set_rng_state(own, device)


def restore_training_state(
    payload: dict, model, optimizer, scheduler, config: TrainConfig, device, path
) -> None:
    """Load a checkpoint's model, optimiser, scheduler and RNG states; a CheckpointError
    naming the field when one does not fit this run's network or schedule."""
    what = f"a {config.net} of width {config.width:g}"
    load_state_checked(model, payload["model"], path, "model", what)
    _check_optimizer_state(payload["optimizer"], optimizer, path, what)
    load_state_checked(optimizer, payload["optimizer"], path, "optimizer", "SGD of " + what)
    _match_state_layout(optimizer)
    _restore_schedule(payload, scheduler, optimizer, config, path)
    try:
        set_rng_state(payload["rng"], device)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path}: 'rng' cannot be restored ({exc})") from None


def _check_optimizer_state(stored: dict, optimizer, path, what: str) -> None:
    """The stored optimiser state has this network's parameter count and shapes."""
    groups = stored["param_groups"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stored_ids = [i for group in groups for i in group["params"]]
    if len(groups) != len(optimizer.param_groups) or len(stored_ids) != len(params):
        raise CheckpointError(
            f"checkpoint {path}: 'optimizer' holds {len(stored_ids)} parameters in "
            f"{len(groups)} group(s); {what} has {len(params)} in {len(optimizer.param_groups)}"
        )
    for index, param in zip(stored_ids, params, strict=True):
        for key, value in stored["state"].get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise CheckpointError(
                    f"checkpoint {path}: 'optimizer' state {key} of parameter {index} has shape "
                    f"{list(value.shape)}, the parameter {list(param.shape)}"
                )
            if isinstance(value, torch.Tensor) and value.dtype != param.dtype:
                raise CheckpointError(
                    f"checkpoint {path}: 'optimizer' state {key} of parameter {index} is "
                    f"{value.dtype}, the parameter {param.dtype}"
                )
    for stored_group, group in zip(groups, optimizer.param_groups, strict=True):
        _check_optimizer_settings(stored_group, group, path)


# Settings of the SGD of this release's runs (torch's implementation choices, which may differ
# between machines, are not: fused, foreach, capturable).
_IMPLEMENTATION_KEYS = ("params", "lr", "fused", "foreach", "capturable")


def _check_optimizer_settings(stored: dict, fresh: dict, path) -> None:
    """Each hyperparameter of a stored parameter group equals (value and type) the one this
    run's config.json gives (``fresh``: the optimiser built from it); its ``lr`` is a number."""

    def same(a, b) -> bool:
        return type(a) is type(b) and a == b if isinstance(b, bool) else _number_equal(a, b)

    lr = stored.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise CheckpointError(
            f"checkpoint {path}: 'optimizer' setting lr must be a positive number, got {lr!r}"
        )
    for key, value in fresh.items():
        if key in _IMPLEMENTATION_KEYS or key not in stored:
            continue
        if not same(stored[key], value):
            raise CheckpointError(
                f"checkpoint {path}: 'optimizer' setting {key} is {stored[key]!r}, the run's "
                f"config.json gives {value!r}"
            )
    for key in ("fused", "foreach", "capturable"):
        if stored.get(key) is not None and not isinstance(stored.get(key), bool):
            raise CheckpointError(
                f"checkpoint {path}: 'optimizer' setting {key} must be True, False or None, "
                f"got {stored[key]!r}"
            )


def _number_equal(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return a is None and b is None


def _match_state_layout(optimizer) -> None:
    """Give loaded momentum buffers their parameter's memory layout (channels-last on CUDA):
    the fused optimiser walks parameters and buffers as flat memory."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _restore_schedule(payload: dict, scheduler, optimizer, config: TrainConfig, path) -> None:
    """The learning-rate schedule after the checkpoint's epoch; the next epoch's learning rate
    must be the schedule's, lr·γ^(milestones passed)."""
    epoch = payload["epoch"]
    stored = payload["scheduler"]
    if stored.get("last_epoch") != epoch or not isinstance(stored.get("milestones"), dict):
        raise CheckpointError(
            f"checkpoint {path}: 'scheduler' must be the learning-rate schedule after epoch "
            f"{epoch} (last_epoch {epoch} and the milestones), got last_epoch "
            f"{stored.get('last_epoch')!r}"
        )
    fresh = scheduler.state_dict()
    for key in ("milestones", "gamma", "base_lrs"):
        value = stored.get(key)
        if key == "milestones":
            matches = {**value} == {**fresh[key]} and all(_is_count(v) for v in value.values())
        elif key == "base_lrs":
            matches = isinstance(value, list) and len(value) == len(fresh[key])
            matches = matches and all(map(_number_equal, value, fresh[key]))
        else:
            matches = _number_equal(value, fresh[key])
        if not matches:
            raise CheckpointError(
                f"checkpoint {path}: 'scheduler' setting {key} is {value!r}, the run's "
                f"config.json gives {fresh[key]!r}"
            )
    try:
        scheduler.load_state_dict(stored)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: 'scheduler' cannot be loaded ({exc})") from None
    expected = config.lr * config.lr_gamma ** sum(m <= epoch for m in config.lr_milestones)
    for group in optimizer.param_groups:
        if not math.isclose(group["lr"], expected, rel_tol=1e-9):
            raise CheckpointError(
                f"checkpoint {path}: 'optimizer'/'scheduler': learning rate {group['lr']:g} "
                f"after epoch {epoch}, the schedule gives {expected:g}"
            )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def resume_config(out) -> TrainConfig:
    """The configuration stored in the checkpoint of the run in ``out`` (RunDirectoryError when
    there is none to resume, CheckpointError, saying it cannot resume, when it is unreadable or
    unusable)."""
    rundir = RunDirectory(out)
    rundir.check_not_in_use()
    rundir.check_resumable()
    try:
        return stored_config(load_checkpoint(rundir.checkpoint_path), rundir.checkpoint_path)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume: {exc}") from None


def stored_config(payload: dict, path) -> TrainConfig:
    """The TrainConfig of a checkpoint's ``config``, checked like options given now (with this
    machine's device); CheckpointError naming the option otherwise."""
    try:
        config = TrainConfig.from_json(payload["config"])
        dataclasses.replace(config, device="cpu", resume=False, overwrite=False).resolved()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: 'config' is unusable ({exc})") from None
    return config


def resume_payload(config: TrainConfig, rundir: RunDirectory) -> dict | None:
    """The checkpoint to resume from (every rank reads it; None for a new run), checked to be
    this experiment's and to leave epochs before ``stop_after``."""
    if not config.resume:
        return None
    payload = load_checkpoint(rundir.checkpoint_path)
    _check_same_run(config, payload["config"], rundir.checkpoint_path)
    done = payload["epoch"]
    if done > config.epochs:
        raise CheckpointError(
            f"checkpoint {rundir.checkpoint_path}: 'epoch' is {done}, after the run's last "
            f"epoch {config.epochs}"
        )
    if config.stop_after is not None and config.stop_after <= done:
        raise RunDirectoryError(
            f"stop_after: the run in {rundir.path} has already trained {done} epochs; give "
            f"an epoch in {done + 1}..{config.epochs} (or none to finish the run)"
        )
    return payload


def _check_same_run(config: TrainConfig, stored: dict, path: Path) -> None:
    """RunDirectoryError listing the :class:`ncfast.paper.config.Experiment` options that
    differ from the checkpoint's. Options added to ncfast after the run was started are missing
    from its checkpoint: they match when they hold their default."""
    mine = config.experiment_values()
    defaults = TrainConfig().experiment_values()
    differ = [
        f"{k}: checkpoint {stored.get(k)!r}, now {mine[k]!r}"
        for k in mine
        if stored.get(k, defaults[k]) != mine[k]
    ]
    if differ:
        raise RunDirectoryError(
            f"--resume: the options differ from those of the run in {path.parent}: "
            + "; ".join(differ)
        )
