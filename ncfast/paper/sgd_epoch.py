"""One epoch of SGD of a training run (:func:`train_epoch`): the seeded permutation of the
training samples and its global batches, each process's share of them, and with
``online_every`` the measurement of the training passes (:class:`OnlineLog`); see
:mod:`ncfast.paper.train` for the protocol."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ncfast.metrics import mse_lambda
from ncfast.monitor import NCMonitor, TrainingWatch
from ncfast.paper import distributed as dist_utils
from ncfast.paper.checkpoint import CheckpointError
from ncfast.paper.config import TrainConfig
from ncfast.paper.evaluate import network_autocast
from ncfast.paper.losses import compute_loss
from ncfast.report.runs import ONLINE_SPLIT, to_json_value

if TYPE_CHECKING:
    from ncfast.paper.training_state import TrainingState

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
