"""Neural Collapse of the training forward passes themselves (:class:`TrainingWatch`, made by
:meth:`ncfast.monitor.NCMonitor.watch_training`): one row of metrics every ``every`` optimiser
steps, from the features the training passes compute anyway."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ncfast.backend import ops
from ncfast.checks import check_int, check_number
from ncfast.metrics import nc_metrics_or_nan
from ncfast.nc4 import mismatch_fraction, valid_rows
from ncfast.stats import ClassStats

if TYPE_CHECKING:
    import ncfast.monitor

__all__ = ["TrainingWatch"]


def distributed_now() -> bool:
    """Whether torch.distributed is initialised (then monitors reduce over the ranks)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class TrainingWatch:
    """Neural Collapse of the training forward passes themselves: no extra forward pass.

    Made by :meth:`ncfast.monitor.NCMonitor.watch_training`. Call :meth:`labels` before each
    training forward pass and :meth:`step` after each optimiser step: the hook feeds the
    features of every batch (detached; nothing kept beyond the float64 sums of
    :class:`ncfast.ClassStats`, no host synchronisation per batch on CUDA) into the statistics
    of the current *window*, and every ``every`` steps :meth:`step` returns the window's row and
    starts the next window:

    - ``step`` (optimiser steps since the start, counted from ``step=`` of
      :meth:`ncfast.monitor.NCMonitor.watch_training`), ``window_steps`` (steps in this
      window: ``every``, or fewer in a resumed run's first window when its state was not
      restored), ``epoch`` when :meth:`step` was given one (e.g. fractional: steps done /
      steps per epoch);
    - the keys of :func:`ncfast.nc_metrics` of the window's samples with the classifier as it is
      at the window's end (after its last optimiser step): NC1, NC2, NC3, the MSE decomposition
      (λ = the monitor's ``weight_decay``), the SNR, ranks and counts;
    - ``nc4_ncc_mismatch``: NC4 of each batch's features against the class means of the
      *previous* window, with the classifier of that batch's forward pass, counted on the
      device (the window's own means are known only at its end, and its features are not
      kept). Classes absent from the previous window are not candidates. The first window has
      no previous one and no ``nc4_ncc_mismatch``.

    Where this differs from the eval-mode measurement
    (:meth:`ncfast.monitor.NCMonitor.evaluate`, ``ncfast train``'s measured epochs): batch norm
    normalises with each batch's own statistics (train mode), the weights move within a window
    (each batch's features come from the weights of its step, the classifier is the one at the
    window's end), dropout and augmentation, if the model or data have them, act on the
    features. With frozen weights (learning rate 0) and no train-mode layers, a window of one
    epoch gives the eval-mode numbers of the same samples.

    Forward passes in eval mode without labels (validation, checks) are ignored; a train-mode
    forward pass without :meth:`labels` is an error. Degenerate windows (class means that do
    not separate, fewer than two classes, non-finite classifier) give a row of NaN metrics with
    the reason in ``nc_undefined`` (:func:`ncfast.metrics.undefined_metrics`).

    With ``torch.distributed`` initialised (or the monitor's ``distributed=True``), each rank
    feeds its own share of every batch and :meth:`step` is collective at a window's end: the
    window's statistics are reduced (:meth:`ClassStats.reduced`, no per-batch communication)
    and every rank returns the same row, of all ranks' samples. :meth:`state_dict` (collective
    too) holds the step count, the window in progress and the previous window's means, so a
    resumed run goes on as if never stopped.

    Example:
        See :meth:`ncfast.monitor.NCMonitor.watch_training`, which makes it.
    """

    def __init__(
        self, monitor: ncfast.monitor.NCMonitor, every: int, *, step: int = 0, nc4: bool = True
    ) -> None:
        where = "watch_training"
        self.monitor = monitor
        self.every = check_int(every, "every", 1, where)
        self.steps = check_int(step, "step", 0, where)
        if not isinstance(nc4, bool):
            raise TypeError(f"{where}: nc4 must be True or False, got {nc4!r}")
        self.nc4 = nc4
        self.window_start = self.steps
        device = monitor.classifier.weight.device
        self.stats = ClassStats(
            monitor.num_classes,
            monitor.dim,
            device=device,
            on_invalid=monitor.on_invalid,
            precision=monitor.precision,
        )
        self.stats.invalid_advice = monitor.invalid_advice
        # NC4 of the window so far: (mismatches, samples counted), int64 on the device.
        self._nc4_counts = torch.zeros(2, dtype=torch.int64, device=device)
        self.previous_means: torch.Tensor | None = None  # float64 [C, P], zero rows if absent
        self.previous_present: torch.Tensor | None = None  # bool [C]
        self._counting = False  # NC4 counted since this window began (previous means known)
        self._pending: torch.Tensor | None = None
        distributed = monitor.distributed
        self._distributed = distributed_now() if distributed is None else distributed
        if self._distributed and not distributed_now():
            raise RuntimeError(
                "NCMonitor(distributed=True).watch_training needs torch.distributed to be "
                "initialised (torch.distributed.init_process_group) first"
            )
        self._handle: RemovableHandle | None = monitor._register(self._on_features)

    # ---------------------------------------------------------------- feeding
    def labels(self, labels: object) -> None:
        """Labels of the samples of the next training forward pass (tensor, list or array of
        ints, any device)."""
        if self._handle is None:
            raise RuntimeError("TrainingWatch.labels: the watch is closed")
        if self._pending is not None:
            raise ValueError(
                "TrainingWatch.labels: the labels of the previous call were never used: no "
                "forward pass of the model reached the hook since then; call labels(y) once "
                "before each training forward pass"
            )
        self._pending = self.monitor._given_labels(labels, "TrainingWatch.labels")

    def _on_features(self, features: torch.Tensor) -> None:
        labels, self._pending = self._pending, None
        mon = self.monitor
        if labels is None:
            if not mon.classifier.training:
                return  # an eval-mode pass (validation, a check): not part of training
            raise RuntimeError(
                "TrainingWatch: a training forward pass reached the hook without labels; call "
                "watch.labels(y) before every training forward pass (or close() the watch)"
            )
        labels = mon._paired_labels(labels, features, "TrainingWatch.labels")
        self.stats.update(features, labels)
        means, present = self.previous_means, self.previous_present
        if self._counting and means is not None and present is not None:
            weight = mon.classifier.weight.detach().to(torch.float64)
            bias = _bias64(mon.classifier, weight)
            valid = valid_rows(features, labels, mon.num_classes)
            self._nc4_counts[0] += ops.ncc_mismatch_count(
                features, valid, weight, bias, means, present
            )
            self._nc4_counts[1] += valid.sum()

    # ------------------------------------------------------------------ windows
    def step(self, epoch: float | None = None) -> dict[str, object] | None:
        """Count one optimiser step; at the end of a window (``step`` a multiple of ``every``)
        return its row (see the class docstring; ``epoch``, if given, is put in it) and start
        the next window, else None. Collective at a window's end in distributed mode."""
        if self._handle is None:
            raise RuntimeError("TrainingWatch.step: the watch is closed")
        if epoch is not None:
            epoch = check_number(epoch, "epoch", "TrainingWatch.step", minimum=0.0)
        self.steps += 1
        if self.steps % self.every:
            return None
        if self._pending is not None:
            raise ValueError(
                "TrainingWatch.step: labels() was called but no forward pass followed before "
                "the window ended"
            )
        stats, counts = self._window()
        row: dict[str, object] = {
            "step": self.steps,
            "window_steps": self.steps - self.window_start,
        }
        if epoch is not None:
            row["epoch"] = epoch
        row.update(self._metrics(stats, counts if self._counting and self.nc4 else None))
        self._next_window(stats)
        return row

    def _window(self) -> tuple[ClassStats, torch.Tensor]:
        """The window's statistics and NC4 counts, of all ranks in distributed mode."""
        counts = self._nc4_counts.clone()
        if not self._distributed:
            return self.stats, counts
        import torch.distributed as dist

        dist.all_reduce(counts, group=self.monitor.group)
        return self.stats.reduced(self.monitor.group), counts

    def _metrics(self, stats: ClassStats, nc4_counts: torch.Tensor | None) -> dict[str, object]:
        """The window's metrics with the classifier as it is now; NaN rows with the reason
        where they are undefined (:func:`ncfast.metrics.nc_metrics_or_nan`)."""
        mon = self.monitor
        bias = mon.classifier.bias
        mismatch = None
        if nc4_counts is not None:
            mismatch = mismatch_fraction(nc4_counts[0], nc4_counts[1], stats)
        out = dict(
            nc_metrics_or_nan(
                stats,
                mon.classifier.weight.detach(),
                None if bias is None else bias.detach(),
                mon.weight_decay,
                ncc_mismatch=mismatch,
            )
        )
        if nc4_counts is None:
            out.pop("nc4_ncc_mismatch", None)
        return out

    def _next_window(self, stats: ClassStats) -> None:
        """The window's class means become the previous ones (for NC4); the sums restart."""
        if stats.num_samples > 0:
            means, _ = stats.finalized()
            self.previous_means = means.clone()
            self.previous_present = stats.present
            self._counting = self.nc4
        self.stats.reset()
        self._nc4_counts.zero_()
        self.window_start = self.steps

    # ------------------------------------------------------------- save, close
    def state_dict(self) -> dict[str, object]:
        """The step count, the window in progress (its statistics and NC4 counts, of all ranks
        in distributed mode: collective) and the previous window's class means."""
        stats, counts = self._window()
        return {
            "step": self.steps,
            "window_start": self.window_start,
            "every": self.every,
            "window": stats.state_dict(),
            "nc4_counts": counts,
            "counting": self._counting,
            "previous_means": self.previous_means,
            "previous_present": self.previous_present,
        }

    def load_state_dict(self, state: Mapping[str, object], window: bool = True) -> TrainingWatch:
        """Restore :meth:`state_dict` (same ``every``, classes and feature size). ``window=False``
        restores all but the window in progress, which starts empty: in distributed mode one
        rank restores it (it holds all ranks' samples) and the others pass False."""
        where = "TrainingWatch.load_state_dict"
        missing = [k for k in _WATCH_STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"{where}: the state lacks {missing}")
        if state["every"] != self.every:
            raise ValueError(
                f"{where}: the state is of windows of every={state['every']!r} steps, this watch "
                f"has every={self.every}"
            )
        steps = check_int(state["step"], "step", 0, where)
        start = check_int(state["window_start"], "window_start", 0, where, maximum=steps)
        means, present = state["previous_means"], state["previous_present"]
        device = self._nc4_counts.device
        shape = (self.monitor.num_classes, self.monitor.dim)
        if means is not None or present is not None:
            if not (
                isinstance(means, torch.Tensor)
                and isinstance(present, torch.Tensor)
                and tuple(means.shape) == shape
                and tuple(present.shape) == shape[:1]
            ):
                raise ValueError(
                    f"{where}: previous_means must be a tensor of shape {list(shape)} with "
                    f"previous_present of shape [{shape[0]}], or both None"
                )
            self.previous_means = means.to(device, torch.float64)
            self.previous_present = present.to(device, torch.bool)
        counts, window_state = state["nc4_counts"], state["window"]
        if not isinstance(counts, torch.Tensor) or counts.shape != (2,):
            raise ValueError(f"{where}: nc4_counts must be a tensor of 2 counts")
        if not isinstance(window_state, Mapping):
            raise ValueError(f"{where}: window must be a ClassStats state_dict")
        self.stats.reset()
        self._nc4_counts.zero_()
        if window:
            self.stats.load_state_dict(window_state)
            self._nc4_counts.copy_(counts)
        self.steps, self.window_start = steps, start
        self._counting = self.nc4 and bool(state["counting"]) and self.previous_means is not None
        return self

    def close(self) -> None:
        """Remove the hook (the window in progress is dropped)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.monitor.release_watch(self)

    @property
    def is_open(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> TrainingWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_WATCH_STATE_KEYS = (
    "step",
    "window_start",
    "every",
    "window",
    "nc4_counts",
    "counting",
    "previous_means",
    "previous_present",
)


def _bias64(classifier: nn.Linear, weight: torch.Tensor) -> torch.Tensor:
    """The classifier's bias in float64 (zeros when it has none)."""
    if classifier.bias is None:
        return weight.new_zeros(classifier.out_features)
    return classifier.bias.detach().to(torch.float64)
