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
:class:`~ncfast.paper.training_state.TrainingDivergedError` and keeps the last checkpoint, which
predates it.

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
import platform
import time
from functools import partial
from pathlib import Path

import torch

from ncfast._version import __version__
from ncfast.backend.precision import resolve_precision
from ncfast.metrics import mse_lambda
from ncfast.paper import distributed as dist_utils
from ncfast.paper.checkpoint import CheckpointError
from ncfast.paper.config import TrainConfig, check_model_size
from ncfast.paper.console import Console, overhead_line, summary_line  # noqa: F401 (re-export)
from ncfast.paper.evaluate import measure_split, network_autocast, split_features
from ncfast.paper.robustness import robustness
from ncfast.paper.rundir import (
    RunDirectory,
    RunDirectoryError,
    check_tensorboard,
    check_writable_dir,
)
from ncfast.paper.sgd_epoch import (  # noqa: F401 (re-exported: their home before the split)
    ONLINE_ROW_KEYS,
    EpochResult,
    OnlineLog,
    epoch_batches,
    epoch_permutation,
    min_last_batch,
    nonfinite_weights,
    train_epoch,
)
from ncfast.paper.training_state import (  # noqa: F401 (re-exported: their home before the split)
    TrainingDivergedError,
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
from ncfast.report.runs import to_json_value
from ncfast.stats import InvalidInputError

# Keys of a metrics row besides those of measure_split (and, on test rows at a run with
# robustness_samples > 0, those of ncfast.paper.robustness.robustness plus "robustness_time").
TIME_KEYS = ("wall_time", "epoch_time", "measure_time")
ROW_KEYS = ("epoch", "split", "lr", "sgd_loss", "sgd_error", "world_size", *TIME_KEYS)
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


# ------------------------------------------------------------------------------- the run
def train(config: TrainConfig, progress: bool = True, data=None) -> Path:
    """Run (or with ``config.resume``, continue) the training of ``config``; returns the run
    directory. ``data``: an optional ``(train, test)`` pair of
    :class:`ncfast.paper.data.LabeledImages` to use instead of loading ``config.dataset``.

    The run directory is locked for the life of the run (:class:`ncfast.paper.rundir.RunDirectory`):
    a second run, or a resumption, of the same directory meanwhile is a RunDirectoryError.
    Training that produces a non-finite loss, weights or outputs stops with a
    :class:`~ncfast.paper.training_state.TrainingDivergedError` and keeps the last checkpoint
    from before.

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
    payload = resume_payload(config, rundir)
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


# -------------------------------------------------------------------------------- saving
def _save_epoch(rundir: RunDirectory, state: TrainingState, config, rows, console) -> None:
    """Rank 0: the checkpoint and the epoch's log lines (:meth:`RunDirectory.save`), then the
    epoch's lines on the console."""
    rundir.save(state.checkpoint(config), rows, state.epoch)
    if rows:
        console.measured(state.epoch, rows, state.epoch_times[-1])
