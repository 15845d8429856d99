"""Training with Neural Collapse measured in the loop (the paper's protocol, SPEC §6).

``train(TrainConfig(...))`` trains one network on one dataset and, at the measurement epochs,
measures the training and test splits with :func:`ncfast.paper.evaluate.measure_split` (eval mode,
streamed, nothing per-sample kept). It writes, in the run directory ``out``:

- ``config.json``: the resolved configuration (every default filled in),
- ``metrics.jsonl``: one flat JSON object per measured epoch and split: ``epoch``, ``split``
  (``train``/``test``), ``lr`` (of that epoch), ``sgd_loss``/``sgd_error`` (running means over
  the epoch's SGD steps, train mode), ``wall_time`` (seconds since the run began, across
  resumptions), ``epoch_time`` (the epoch's training), ``measure_time`` (this split's
  measurement), ``forward_time`` (with ``measure_overhead``), and every key of
  :func:`ncfast.paper.evaluate.measure_split` (``error``, ``loss``, all SPEC §2–§4 keys with λ as
  ``weight_decay``; ``snr_singular_values`` a list),
- ``checkpoint.pt``: model, optimiser, scheduler, RNG states, config and metrics history
  (see :mod:`ncfast.paper.checkpoint`), rewritten atomically after each measurement and at the end,
  before that epoch's lines are appended to the log (a resumption rewrites the log from it); also
  ``step`` (SGD steps done) and, with ``online_every``, ``online`` (the state of the online
  measurement: :meth:`ncfast.monitor.TrainingWatch.state_dict`).

With ``online_every = K`` (``--online-every K``; 0, the default, is off) Neural Collapse is also
measured from the training forward passes themselves, at no extra forward pass
(:class:`ncfast.monitor.TrainingWatch`, a forward pre-hook on ``model.classifier``): every K SGD
steps a row of ``split: "train_online"`` holds ``step`` (SGD steps since the start, continued by
a resumption), ``epoch`` (fractional: e − 1 + k/S after k of the S steps of epoch e, so epoch e
ends at ``epoch == e``), ``window_steps``, ``lr`` (of the window's last step), ``sgd_loss``/
``sgd_error`` (running means over the window's steps), ``world_size``, ``wall_time``, and the
SPEC keys of the window's samples (NC1-NC3, the MSE decomposition with λ as ``weight_decay``,
the SNR) with the classifier at the window's end; ``nc4_ncc_mismatch`` is NC4 of each batch
against the *previous* window's class means (none in the first window). These are not the
eval-mode numbers: batch norm normalises with each batch's statistics (train mode) and the
weights move within a window (ncfast applies no augmentation). With the learning rate at 0 and
batch norm frozen, a window of one epoch equals that epoch's eval-mode measurement. Online rows
are appended to the log at the end of each epoch (TensorBoard gets the epoch rows only); the
window in progress is part of the checkpoint, so a resumed run's online rows go on exactly where
the checkpoint's history ends (rows of epochs after the checkpoint, written before a kill, are
dropped and measured again, as every row is).

The run directory belongs to one run at a time (:class:`ncfast.paper.rundir.RunDirectory`): it is
created and locked before any data is loaded (an unusable ``out`` is the first error), another
run or resumption of it meanwhile is refused naming the owner's PID, and ``overwrite`` removes
the old run's files before the new run writes anything. Training that diverges (a non-finite
training loss or weight, checked on the device once per epoch with the epoch's one host
synchronisation, or non-finite eval-mode outputs before a measurement or checkpoint) stops with
:class:`TrainingDivergedError` and keeps the last checkpoint, which predates it.

An epoch is a permutation of the training indices drawn from a generator seeded with
``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one; on the CPU it
reproduces the same metrics exactly. Training draws no other random numbers after the network's
seeded initialisation (no dropout, no augmentation); the checkpoint still carries the RNG states.

Several processes (``torchrun --nproc_per_node=K -m ncfast train ...``, see
:mod:`ncfast.paper.distributed`): ``batch_size`` is the *global* batch, as in the paper's protocol;
each process takes a contiguous ``batch_size / K`` of every global batch of the same seeded
permutation (an error if K does not divide it), the model is wrapped in
DistributedDataParallel with batch norm over the global batch (``sync_batchnorm``), and the
losses are scaled so that the averaged gradient is the global batch's. The run is then the
single-process run up to floating-point summation order. Measurement: each process streams its
contiguous share of each split and the statistics are combined exactly
(``Measurement.compute(distributed=True)``); ``measure_batch_size`` is per process. Only rank 0
writes files, prints and runs DeepFool; every rank reads the checkpoint on resume. The
checkpoint does not depend on the number of processes: a run may resume with any number. Online
measurement: each process feeds the features of its share of every batch; the window's
statistics are reduced once at its end (:meth:`ncfast.ClassStats.reduced`), none per batch.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ncfast._version import __version__
from ncfast.backend.precision import resolve_precision
from ncfast.errors import NCFastError
from ncfast.metrics import mse_lambda
from ncfast.monitor import NCMonitor, TrainingWatch
from ncfast.paper import distributed as dist_utils
from ncfast.paper.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_state_checked
from ncfast.paper.config import TrainConfig, check_model_size
from ncfast.paper.evaluate import measure_split, network_autocast, split_features
from ncfast.paper.losses import compute_loss
from ncfast.paper.models import build
from ncfast.paper.robustness import robustness
from ncfast.paper.rundir import (
    RunDirectory,
    RunDirectoryError,
    check_tensorboard,
    check_writable_dir,
)
from ncfast.report.runs import ONLINE_SPLIT, to_json_value
from ncfast.stats import InvalidInputError

# Keys of a metrics row besides those of measure_split (and, on test rows at a run with
# robustness_samples > 0, those of ncfast.paper.robustness.robustness plus "robustness_time").
TIME_KEYS = ("wall_time", "epoch_time", "measure_time")
ROW_KEYS = ("epoch", "split", "lr", "sgd_loss", "sgd_error", "world_size", *TIME_KEYS)
# Keys of a train_online row besides the SPEC keys of ncfast.monitor.TrainingWatch.
ONLINE_ROW_KEYS = (
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
# Of the robustness() result, the keys logged (its seed and overshoot are the run's settings).
ROBUSTNESS_KEYS = (
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
)


class TrainingDivergedError(NCFastError, FloatingPointError):
    """Training produced a non-finite loss, weights or outputs; the run's last checkpoint (one
    from before the divergence) is kept."""


# ------------------------------------------------------------------------------- the run
def train(config: TrainConfig, progress: bool = True, data=None) -> Path:
    """Run (or with ``config.resume``, continue) the training of ``config``; returns the run
    directory. ``data``: an optional ``(train, test)`` pair of
    :class:`ncfast.paper.data.LabeledImages` to use instead of loading ``config.dataset``.

    The run directory is locked for the life of the run (:class:`ncfast.paper.rundir.RunDirectory`):
    a second run, or a resumption, of the same directory meanwhile is a RunDirectoryError.
    Training that produces a non-finite loss, weights or outputs stops with a
    :class:`TrainingDivergedError` and keeps the last checkpoint from before.

    Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) every process calls this: it
    joins the process group (and leaves it at the end) unless the caller initialised one; see
    the module docstring for how the work is shared.
    """
    config = config.resolved()
    if config.tensorboard is not None:
        check_tensorboard()
    ctx = dist_utils.setup(config.device)
    rundir = RunDirectory(config.out)
    try:
        return _train(config, ctx, progress and ctx.is_main, data, rundir)
    finally:
        rundir.close_tensorboard()
        rundir.unlock()
        dist_utils.teardown(ctx)


def _train(config: TrainConfig, ctx, progress: bool, data, rundir: RunDirectory) -> Path:
    """The run: its directory, data and state, then one epoch of SGD after another, measured
    and saved at the measurement epochs."""
    _check_global_batch(config.batch_size, ctx.world_size)
    # Before anything is loaded: rank 0 locks the directory, every rank learns the outcome.
    _on_main(
        ctx, partial(_open_run_directory, rundir, config), f"open the run directory {rundir.path}"
    )
    payload = _resume_payload(config, rundir)
    splits = _load_splits(config, ctx.device, data)
    state = TrainingState.start(config, ctx, splits[0], payload, rundir.checkpoint_path)
    if payload is not None:
        _check_resumed_network(state, splits[0], config, rundir.checkpoint_path)
    record = run_record(config, ctx, state.model, splits)
    _on_main(
        ctx,
        partial(rundir.start, record, state.history, config.overwrite and not config.resume),
        f"write to the run directory {rundir.path}",
    )
    if ctx.is_main and config.tensorboard is not None:
        rundir.open_tensorboard(config.tensorboard, first_step=state.epoch + 1)
    console = Console(config, state.epoch, progress)
    try:
        for epoch in console.epochs(state.epoch + 1, config.last_epoch + 1):
            sgd = train_epoch(state, epoch, splits[0], config, ctx, console)
            console.trained(sgd)
            rundir.log_scalars({"loss": sgd.loss, "error": sgd.error, "lr": sgd.lr}, epoch, "sgd")
            if sgd.online_rows:
                state.history.extend(sgd.online_rows)
                append = partial(rundir.append_metrics, sgd.online_rows)
                _on_main(ctx, append, f"write the online rows of epoch {epoch}")
            if epoch in config.measure_epochs or epoch in (config.epochs, config.last_epoch):
                rows = measure_epoch(state, sgd, splits, config, ctx, progress)
                if state.online is not None:
                    state.online.keep_state(ctx)  # collective: before rank 0 alone saves
                save = partial(_save_epoch, rundir, state, config, rows, console)
                _on_main(ctx, save, f"write the results of epoch {epoch}")
                state.saved_epoch = epoch
    finally:
        console.close()
        if state.online is not None:
            state.online.watch.close()
    ctx.barrier()  # rank 0 has written its last checkpoint before any process leaves the group
    return rundir.path


def _check_global_batch(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise dist_utils.DistributedError(
            f"batch_size {batch_size} is the global batch and must be divisible by the "
            f"number of processes ({world_size}): each process trains on "
            f"batch_size/{world_size} samples of every batch"
        )


def _on_main(ctx: dist_utils.DistributedContext, action, what: str) -> None:
    """``action()`` on rank 0 only; a RunDirectoryError or CheckpointError there is raised on
    every rank (a collective with several processes, so no rank waits for a failed one)."""
    error = None
    if ctx.is_main:
        try:
            action()
        except (RunDirectoryError, CheckpointError) as exc:
            error = exc
    if not ctx.all_ok(error is None):
        raise error or RunDirectoryError(f"rank 0 failed to {what} (see its message)")


def _open_run_directory(rundir: RunDirectory, config: TrainConfig) -> None:
    """Lock the run directory (the check that --out is usable) and check it can be used as
    asked: a resumable run for --resume, no run (or --overwrite) otherwise."""
    rundir.lock()
    if config.resume:
        rundir.check_resumable()
    else:
        rundir.check_new_run(config.overwrite)
    if config.tensorboard is not None:
        check_writable_dir(config.tensorboard, "tensorboard")


def _resume_payload(config: TrainConfig, rundir: RunDirectory) -> dict | None:
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


def _check_resumed_network(state: TrainingState, data, config: TrainConfig, path) -> None:
    """CheckpointError blaming the checkpoint when the network it holds is already diverged:
    non-finite weights, or non-finite outputs in eval mode (weights near float32's limit)."""
    if bool(nonfinite_weights(state.model)):
        problem = "its weights are not finite (NaN or infinity)"
    elif not eval_outputs_finite(state.model, data, config):
        problem = "its network's outputs are not finite (weights too large)"
    else:
        return
    raise CheckpointError(
        f"checkpoint {path}: {problem}: it cannot be resumed; start the run again with "
        f"--overwrite (with a lower --lr than {config.lr:g} if it diverged)"
    )


def _load_splits(config: TrainConfig, device: torch.device, data=None):
    """(train, test) on ``device``: ``data`` if given, else the run's dataset; the network is
    checked to fit their shape."""
    if data is None:
        train_data, test_data = load_data(dataclasses.replace(config, device=str(device)))
    else:
        train_data, test_data = (d.to(device) for d in data)
    if train_data.num_classes != test_data.num_classes:
        raise ValueError("the training and test splits have different numbers of classes")
    _, in_channels, height, width = train_data.images.shape
    if height != width:
        raise ValueError(f"images must be square, got {height}×{width}")
    check_model_size(
        config.net, train_data.num_classes, in_channels, height, config.width, str(device)
    )
    return train_data, test_data


def load_data(config: TrainConfig):
    """(train, test) :class:`ncfast.paper.data.LabeledImages` on the run's device."""
    from ncfast.paper.data import load_dataset

    return load_dataset(
        config.dataset,
        root=config.data_root,
        per_class=config.per_class,
        download=config.download,
        device=config.device,
        seed=config.seed,
    )


def run_record(config: TrainConfig, ctx, model, splits) -> dict:
    """``config.json``: the resolved options and the facts of the run (versions, machine,
    process layout, data and network shapes, λ)."""
    train_data, test_data = splits
    device = ctx.device
    return {
        **config.to_json(),
        "ncfast_version": __version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": ctx.world_size,
        "per_process_batch_size": config.batch_size // ctx.world_size,
        "num_classes": train_data.num_classes,
        "in_channels": train_data.channels,
        "image_size": train_data.image_size,
        "train_samples": len(train_data),
        "test_samples": len(test_data),
        "feature_dim": model.feature_dim,
        "lambda": mse_lambda(config.weight_decay, train_data.num_classes),
        "steps_per_epoch": steps_per_epoch(config, ctx.world_size, len(train_data)),
        "stats_precision_resolved": resolve_precision(config.stats_precision, device),
    }


# ------------------------------------------------------------------- the training state
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
    """SGD steps in an epoch of ``num_samples`` training images (:func:`epoch_batches`)."""
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


# ------------------------------------------------------------------------- one epoch of SGD
@dataclass
class EpochResult:
    """One epoch of SGD: its learning rate, the running means of the loss and error over its
    steps (train mode, every process's samples), its seconds, and whether a weight went
    non-finite."""

    epoch: int
    lr: float
    loss: float
    error: float
    seconds: float
    nonfinite_weights: bool
    online_rows: list[dict] = field(default_factory=list)  # train_online rows of its windows


def train_epoch(state: TrainingState, epoch: int, data, config: TrainConfig, ctx, console):
    """One epoch of SGD over the permutation of ``(seed, epoch)``, in global batches (this
    process's share of each); then the schedule's step and the epoch's one host
    synchronisation (one reduction with several processes). TrainingDivergedError when the
    loss or a weight went non-finite."""
    state.trained.train()
    start = time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    batches = epoch_batches(
        len(data), config.batch_size, min_last_batch(ctx.world_size, config.sync_batchnorm)
    )
    perm = epoch_permutation(len(data), config.seed, epoch, state.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=state.device)
    wrong = torch.zeros((), dtype=torch.int64, device=state.device)
    online = state.online
    for done, (first, stop) in enumerate(console.batches(batches, epoch), start=1):
        index = dist_utils.shard(perm[first:stop], ctx.rank, ctx.world_size)
        x, y = data.batch(index, memory_format=memory_format)
        if online is not None:
            online.watch.labels(y)  # the hook pairs them with this forward pass's features
        with network_autocast(state.device, config.precision):
            logits = state.trained(x)
        batch_loss = compute_loss(config.loss, logits, y, config.mse_scale)
        scale = dist_utils.loss_scale(len(index), stop - first, ctx.world_size)
        state.optimizer.zero_grad(set_to_none=True)
        (batch_loss if scale == 1.0 else batch_loss * scale).backward()
        state.optimizer.step()
        state.step += 1
        batch_loss_sum = batch_loss.detach().double() * len(index)
        batch_wrong = (logits.detach().argmax(1) != y).sum()
        loss_sum += batch_loss_sum
        wrong += batch_wrong
        if online is not None:
            sgd = (batch_loss_sum, batch_wrong, stop - first, lr)
            online.stepped(sgd, epoch - 1 + done / len(batches), state, ctx)
    state.scheduler.step()
    nonfinite = nonfinite_weights(state.model).double()
    totals = ctx.all_reduce_sum(torch.stack([loss_sum, wrong.double(), nonfinite]))
    sgd_loss, sgd_wrong, nonfinite_count = totals.tolist()
    seen = batches[-1][1]
    result = EpochResult(
        epoch,
        lr,
        sgd_loss / seen,
        sgd_wrong / seen,
        time.perf_counter() - start,
        nonfinite_count > 0,
        online.take_rows() if online is not None else [],
    )
    state.epoch = epoch
    state.epoch_times.append(result.seconds)
    if not math.isfinite(result.loss):
        raise state.diverged(config, epoch, f"loss {result.loss}")
    if result.nonfinite_weights:
        raise state.diverged(config, epoch, "non-finite weights")
    return result


class OnlineLog:
    """A run's measurement of its training passes (``online_every``): the
    :class:`ncfast.monitor.TrainingWatch` on the network, the SGD loss and error sums of the
    window in progress, and the finished ``train_online`` rows not yet logged."""

    def __init__(self, watch: TrainingWatch, device: torch.device) -> None:
        self.watch = watch
        # The window's Σ loss·samples and misclassified samples (this process's), on the device.
        self.sgd_sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.sgd_samples = 0  # the window's samples, of all processes
        self.rows: list[dict] = []
        self.saved_state: dict | None = None  # the state of the last checkpoint (keep_state)

    @classmethod
    def start(cls, config: TrainConfig, ctx, model, num_classes: int, step: int) -> OnlineLog:
        """The watch on ``model.classifier``'s input, λ of the run, counting from ``step``.
        Non-finite features are left out of the statistics: training that produces them stops
        at the epoch's end with TrainingDivergedError, before the rows are logged."""
        monitor = NCMonitor(
            model,
            model.classifier,
            weight_decay=mse_lambda(config.weight_decay, num_classes),
            distributed=ctx.enabled,
            on_invalid="skip",
            precision=config.stats_precision,
        )
        return cls(monitor.watch_training(config.online_every, step=step), ctx.device)

    def stepped(self, sgd: tuple, epoch: float, state: TrainingState, ctx) -> None:
        """After an SGD step: ``sgd`` = (this process's loss·samples and misclassified samples
        as device scalars, the global batch size, the learning rate); at a window's end its row
        (collective with several processes)."""
        loss_sum, wrong, batch_size, lr = sgd
        self.sgd_sums[0] += loss_sum
        self.sgd_sums[1] += wrong
        self.sgd_samples += batch_size
        metrics = self.watch.step(epoch=epoch)
        if metrics is None:
            return
        total_loss, total_wrong = ctx.all_reduce_sum(self.sgd_sums.clone()).tolist()
        row = {
            "split": ONLINE_SPLIT,
            "lr": lr,
            "sgd_loss": total_loss / self.sgd_samples,
            "sgd_error": total_wrong / self.sgd_samples,
            "world_size": ctx.world_size,
            "wall_time": state.wall_time(),
            **to_json_value(metrics),
        }
        self.rows.append({k: row[k] for k in (*ONLINE_ROW_KEYS, *row) if k in row})
        self.sgd_sums.zero_()
        self.sgd_samples = 0

    def take_rows(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows

    def keep_state(self, ctx) -> None:
        """The state a checkpoint holds (:attr:`saved_state`): the watch's (its window in
        progress of all processes) and the window's SGD sums. Collective."""
        sums = ctx.all_reduce_sum(self.sgd_sums.clone())
        self.saved_state = {
            "watch": self.watch.state_dict(),
            "sgd_sums": sums,
            "sgd_samples": self.sgd_samples,
        }

    def restore(self, stored, is_main: bool, path) -> None:
        """Continue from a checkpoint's ``online``: the window in progress (of all processes)
        goes to rank 0 only, so that the next reduction counts it once."""
        try:
            self.watch.load_state_dict(stored["watch"], window=is_main)
            samples = stored["sgd_samples"]
            if not isinstance(samples, int) or samples < 0:
                raise ValueError(f"sgd_samples must be an integer ≥ 0, got {samples!r}")
            self.sgd_sums.zero_()
            if is_main:
                self.sgd_sums.copy_(stored["sgd_sums"])
            self.sgd_samples = samples
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {path}: 'online' cannot be restored ({exc})"
            ) from None
        self.saved_state = stored


def epoch_permutation(num_samples: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The order of the training samples in ``epoch``: a function of (seed, epoch) only."""
    generator = torch.Generator(device=device)
    generator.manual_seed((1_000_003 * seed + epoch) % 2**64)  # the same for seeds < 2**44
    return torch.randperm(num_samples, generator=generator, device=device)


def epoch_batches(num_samples: int, batch_size: int, min_last: int = 2) -> list[tuple[int, int]]:
    """Slices of the permutation (global batches); a last batch of fewer than ``min_last``
    samples is left out (batch norm cannot train on a single sample; those samples are in
    other positions in the next epoch). See :func:`min_last_batch` for several processes."""
    bounds = [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        bounds.pop()
    return bounds


def min_last_batch(world_size: int, sync_batchnorm: bool) -> int:
    """The smallest last global batch that trains: 2 samples for batch norm, and with several
    processes at least one per process (batch norm over the global batch) or two per process
    (batch norm over each share). With one process, or any last batch of at least that size,
    the batches are those of the single-process run."""
    if world_size == 1:
        return 2
    return max(2, world_size) if sync_batchnorm else 2 * world_size


def nonfinite_weights(model) -> torch.Tensor:
    """1 (on the device, no synchronisation) when a parameter or floating buffer of ``model``
    holds a NaN or an infinity, else 0."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return torch.stack([torch.isfinite(t).all() for t in tensors]).logical_not().any()


# ------------------------------------------------------------------------- the measurement
def measure_epoch(state: TrainingState, sgd: EpochResult, splits, config, ctx, progress) -> list:
    """The metrics rows of the epoch ``sgd`` (none when it is saved but not measured: the end,
    or ``stop_after``), each with the epoch's keys first (:data:`ROW_KEYS`); added to the
    history. TrainingDivergedError when the network's eval-mode outputs or features are not
    finite: nothing is then measured or saved."""
    epoch = sgd.epoch
    if ctx.enabled:
        # Every rank measures (and rank 0 saves) the same network.
        dist_utils.broadcast_buffers(state.model)
    # Finite weights can still give non-finite outputs in eval mode (running statistics of
    # exploding activations): one batch tells, before anything is measured or saved.
    if not eval_outputs_finite(state.model, splits[0], config):
        raise state.diverged(config, epoch, "non-finite outputs in eval mode")
    if epoch not in config.measure_epochs:
        return []
    try:
        rows = _measure(state.model, ctx, config, splits, progress)
    except InvalidInputError:  # the labels are valid: non-finite features
        raise state.diverged(config, epoch, "non-finite features in the measurement") from None
    epoch_keys = {
        "epoch": epoch,
        "lr": sgd.lr,
        "sgd_loss": sgd.loss,
        "sgd_error": sgd.error,
        "world_size": ctx.world_size,
        "wall_time": state.wall_time(),
        "epoch_time": sgd.seconds,
    }
    rows = [{**row, **epoch_keys} for row in rows]
    rows = [{k: row[k] for k in (*ROW_KEYS, *row) if k in row} for row in rows]
    state.history.extend(rows)
    return rows


def eval_outputs_finite(model, data, config: TrainConfig) -> bool:
    """Whether ``model``'s eval-mode outputs on the first measurement batch of ``data`` are
    finite (the same on every rank: same weights, same batch)."""
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    was_training = model.training
    model.eval()
    try:
        count = min(len(data), config.measure_batch_size)
        x, _ = data.batch(torch.arange(count, device=data.device), memory_format=memory_format)
        with torch.no_grad(), network_autocast(data.device, config.precision):
            return bool(torch.isfinite(model(x)).all())
    finally:
        model.train(was_training)


def _measure(model, ctx, config: TrainConfig, splits, progress: bool) -> list[dict]:
    """The metrics rows (without the epoch's keys) of the training and test splits; DeepFool
    robustness on the test row when asked for (rank 0 only: a modest sample; the other ranks
    wait at the next collective)."""
    measure_kwargs = {
        **config.measure_options(),
        "channels_last": config.channels_last,
        "distributed": ctx.enabled,
    }
    rows = []
    for split, split_data in zip(("train", "test"), splits, strict=True):
        measure_start = time.perf_counter()
        metrics = measure_split(model, split_data, **measure_kwargs)
        row = {"split": split, "measure_time": time.perf_counter() - measure_start}
        row.update(to_json_value(metrics))
        if config.measure_overhead:
            bounds = (
                dist_utils.shard_bounds(len(split_data), ctx.rank, ctx.world_size)
                if ctx.enabled
                else None
            )
            row["forward_time"] = _forward_time(model, split_data, config, bounds)
        if split == "test" and config.robustness_samples > 0 and ctx.is_main:
            row.update(_robustness(model, split_data, config, progress))
        rows.append(row)
    return rows


def _robustness(model, data, config: TrainConfig, progress: bool) -> dict:
    """The logged keys of DeepFool robustness on the run's seeded test sample, and their time."""
    start = time.perf_counter()
    robust = robustness(
        model,
        data,
        samples=config.robustness_samples,
        seed=config.seed,
        device=data.device,
        progress=progress,
    )
    return {
        **{k: robust[k] for k in ROBUSTNESS_KEYS},
        "robustness_time": time.perf_counter() - start,
    }


def _forward_time(model, data, config: TrainConfig, bounds=None) -> float:
    """Seconds for a plain eval-mode forward pass over ``data`` (or this process's share
    ``bounds``): the measurement's floor."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total = torch.zeros((), device=data.device)
    for h, _ in split_features(
        model, data, config.measure_batch_size, config.precision, config.channels_last, bounds
    ):
        with torch.no_grad():
            total += model.classifier(h).sum()
    float(total)  # waits for the device
    model.train(was_training)
    return time.perf_counter() - start


# ----------------------------------------------------------------------- saving, printing
def _save_epoch(rundir: RunDirectory, state: TrainingState, config, rows, console) -> None:
    """Rank 0: the checkpoint and the epoch's log lines (:meth:`RunDirectory.save`), then the
    epoch's lines on the console."""
    rundir.save(state.checkpoint(config), rows, state.epoch)
    if rows:
        console.measured(state.epoch, rows, state.epoch_times[-1])


class Console:
    """What a run prints (rank 0): the epoch bar and each epoch's batch bar (with
    ``progress``), and at each measured epoch its summary line (with ``progress`` or
    ``measure_overhead``) and the measurement's overhead (with ``measure_overhead``)."""

    def __init__(self, config: TrainConfig, start_epoch: int, progress: bool) -> None:
        self.progress = progress
        self.measure_overhead = config.measure_overhead
        self.bar = tqdm(
            total=config.epochs,
            initial=start_epoch,
            desc=f"{config.dataset}/{config.net}/{config.loss}",
            unit="epoch",
            disable=not progress,
            dynamic_ncols=True,
        )

    def epochs(self, first: int, stop: int):
        """The epochs ``first..stop-1``, counted on the bar."""
        for epoch in range(first, stop):
            yield epoch
            self.bar.update(1)

    def batches(self, batches: list, epoch: int):
        return tqdm(
            batches, desc=f"epoch {epoch}", leave=False, disable=not self.progress, unit="batch"
        )

    def trained(self, sgd: EpochResult) -> None:
        self.bar.set_postfix(
            loss=f"{sgd.loss:.4g}", err=f"{sgd.error:.4f}", epoch_s=f"{sgd.seconds:.1f}"
        )

    def measured(self, epoch: int, rows: list[dict], epoch_time: float) -> None:
        if self.progress or self.measure_overhead:
            tqdm.write(summary_line(epoch, rows))
        if self.measure_overhead:
            tqdm.write(overhead_line(epoch, epoch_time, rows))

    def close(self) -> None:
        self.bar.close()


def summary_line(epoch: int, rows: list[dict]) -> str:
    """One line per measured epoch: each split's error, loss, NC1 and NC4, and the time."""
    parts = [f"epoch {epoch:4d}"]
    for row in rows:
        parts.append(
            f"{row['split']}: err {row['error']:.4f} loss {row['loss']:.4g} "
            f"nc1 {row['nc1']:.3g} nc4 {row.get('nc4_ncc_mismatch', float('nan')):.3g}"
        )
    parts.append(f"measured in {sum(r['measure_time'] for r in rows):.1f} s")
    return " | ".join(parts)


def overhead_line(epoch: int, epoch_time: float, rows: list[dict]) -> str:
    """The measurement's cost beyond plain forward passes, next to the training epoch's."""
    measure = sum(r["measure_time"] for r in rows)
    forward = sum(r["forward_time"] for r in rows)
    beyond = measure - forward
    return (
        f"epoch {epoch:4d} overhead: training {epoch_time:.2f} s | measurement {measure:.2f} s "
        f"= forward passes {forward:.2f} s + statistics {beyond:.2f} s "
        f"({100 * beyond / epoch_time:+.1f}% of the training epoch beyond the forward passes)"
    )
