"""Neural Collapse of a LightningModule, measured at chosen epochs and logged with its logger.

Add it to the trainer's callbacks::

    from ncfast.integrations.lightning import NeuralCollapseCallback

    trainer = Trainer(callbacks=[NeuralCollapseCallback(classifier="classifier")])
    trainer.fit(model, train_loader, val_loader)   # logs nc/nc1, nc/nc2_..., every epoch

The features are the input of the classifier (an ``nn.Linear`` of the module, by attribute
name or object), or the output of ``penultimate``, taken by a forward hook
(:class:`ncfast.monitor.NCMonitor`): no change to the module. By default the callback rides on
the validation loop: while the chosen epochs validate, each batch's labels (``labels(batch)``,
default ``batch[1]``) are paired with the features of that batch's forward pass, so measuring
costs no extra forward pass. With ``dataloader=`` it runs its own pass over that loader (e.g. the
training set in eval mode) at the end of the chosen training epochs instead.

Under DDP every rank measures its own share (Lightning's distributed sampler for validation; a
given loader's batches are dealt out by rank) and the statistics are reduced exactly across
ranks, so every rank gets the metrics of all samples (:meth:`ncfast.ClassStats.reduced`). The
values are then logged on every rank with ``sync_dist=False``, as there is nothing left to
reduce: ``callback_metrics`` agree on all ranks (for checkpointing or early stopping on them) and
Lightning's loggers write once, from rank 0. Lightning's hint to use ``sync_dist=True`` for
these keys is silenced. Note that Lightning's distributed sampler pads the validation set with
repeated samples when its size does not divide by the number of ranks; ``num_samples`` then
counts them, as Lightning's own validation metrics do.

With ``online_every=K`` it also measures the training passes themselves, at no extra forward
pass (:meth:`ncfast.monitor.NCMonitor.watch_training`): each training batch's labels are paired
with the features of its forward pass, and every K training batches (``on_train_batch_end``,
after the optimiser step) the window's metrics are logged as ``{prefix}train_online/{key}`` at
the trainer's global step and kept in :attr:`online_history` (with ``step``, the fractional
``epoch`` and the window's keys: NC4 against the previous window's class means). These are
train-mode numbers with weights that move within a window (see
:class:`ncfast.monitor.TrainingWatch`). Under DDP each rank feeds its share and the window's
statistics are reduced once at its end. Steps count training batches (with gradient
accumulation, a window is K batches); ``training_step`` must run the model's forward pass once
per batch.

Lightning is optional (``pip install 'ncfast[lightning]'``); the ``lightning`` package is used,
else ``pytorch_lightning``.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ncfast.checks import check_int, check_weight_decay
from ncfast.errors import user_stacklevel
from ncfast.measure import scalars
from ncfast.monitor import MonitorPass, NCMonitor, TrainingWatch
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET
from ncfast.stats import skip_advice

try:
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:  # an optional dependency: say which extra brings it
        raise ImportError(
            "ncfast.integrations.lightning needs Lightning, which is not installed: "
            "pip install 'ncfast[lightning]' (or pip install lightning)"
        ) from exc

__all__ = ["NeuralCollapseCallback"]


def _warn(message: str) -> None:
    """A RuntimeWarning pointing at the user's line (past ncfast's and Lightning's frames)."""
    warnings.warn(
        message, RuntimeWarning, stacklevel=user_stacklevel("lightning", "pytorch_lightning")
    )


def _second_item(batch):
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict) and "labels" in batch:
        return batch["labels"]
    raise TypeError(
        "NeuralCollapseCallback: cannot find the labels of a batch of type "
        f"{type(batch).__name__}; pass labels=a function of the batch returning them"
    )


class NeuralCollapseCallback(Callback):
    """Measures every SPEC key of the model's penultimate features and logs the scalars.

    - ``classifier``: the final ``nn.Linear`` of the LightningModule, or its attribute path
      (``"classifier"``, ``"head.fc"``), resolved at ``setup``.
    - ``penultimate``: optional module (or path) whose output is the feature; default: the
      classifier's input.
    - ``epochs``: the values of Lightning's ``trainer.current_epoch`` (from 0) to measure at, or a
      function ``epoch -> bool``; ``None``: every epoch.
    - ``dataloader``: measure on this loader of ``(inputs, labels)`` at the end of the chosen
      training epochs (``model(inputs)`` runs the model), instead of during validation.
      Under DDP it must yield the same batches in the same order on every rank (no shuffling).
    - ``labels``: a function of a batch (validation, or training with ``online_every``)
      returning its labels (default ``batch[1]``, or ``batch["labels"]``); ``dataloader_idx``:
      the validation dataloader to measure.
    - ``online_every``: also measure the training passes every this many training batches (see
      the module docstring); ``None`` or 0: off.
    - ``weight_decay``: λ of HPD22 Eq. 3 (:func:`ncfast.mse_lambda`); ``prefix`` of the logged
      keys; ``memory_budget_bytes`` and ``on_invalid`` as in :class:`ncfast.Measurement`.

    :attr:`history` holds ``{"epoch": e, **metrics}`` per measurement (the SPEC dict, on every
    rank); :attr:`metrics` the last one; :attr:`online_history` the rows of the training
    passes (``online_every``). Undefined metrics (one class in the validation set,
    degenerate features, SPEC §2) are logged as NaN with a warning that says why; the fit goes
    on.

    Example:
        >>> from ncfast.integrations.lightning import NeuralCollapseCallback
        >>> callback = NeuralCollapseCallback(classifier="classifier", epochs=[0, 4, 9])
        >>> [callback._wants(epoch) for epoch in (0, 1, 9)]
        [True, False, True]
        >>> trainer = lightning.Trainer(callbacks=[callback])  # doctest: +SKIP
        >>> trainer.fit(model, train_loader, val_loader)  # doctest: +SKIP
        >>> callback.metrics["nc1"]  # doctest: +SKIP
    """

    def __init__(
        self,
        classifier: str | nn.Linear = "classifier",
        penultimate: str | nn.Module | None = None,
        *,
        epochs: Iterable[int] | Callable[[int], bool] | None = None,
        dataloader: Iterable | None = None,
        labels: Callable | None = None,
        dataloader_idx: int = 0,
        weight_decay: float = 0.0,
        prefix: str = "nc/",
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
        on_invalid: str = "raise",
        online_every: int | None = None,
    ):
        where = "NeuralCollapseCallback"
        if not isinstance(classifier, (str, nn.Linear)):
            raise TypeError(
                f"{where}: classifier must be an nn.Linear or the attribute path of one, got "
                f"{type(classifier).__name__}"
            )
        if penultimate is not None and not isinstance(penultimate, (str, nn.Module)):
            raise TypeError(
                f"{where}: penultimate must be an nn.Module, its attribute path, or None, got "
                f"{type(penultimate).__name__}"
            )
        if epochs is None or callable(epochs):
            self._wanted = epochs
        else:
            try:
                chosen = frozenset(check_int(e, "epochs", 0, where) for e in epochs)
            except TypeError as exc:
                raise TypeError(
                    f"{where}: epochs must be None, a function of the epoch, or integers ≥ 0"
                    f" ({exc})"
                ) from None
            self._wanted = chosen.__contains__
        if labels is not None and not callable(labels):
            raise TypeError(f"{where}: labels must be a function of the batch, or None")
        if not isinstance(prefix, str):
            raise TypeError(f"{where}: prefix must be a string, got {type(prefix).__name__}")
        self.classifier, self.penultimate = classifier, penultimate
        self.dataloader = dataloader
        self.labels = labels or _second_item
        self.dataloader_idx = check_int(dataloader_idx, "dataloader_idx", 0, where)
        self.weight_decay = check_weight_decay(weight_decay, where)
        self.prefix = prefix
        self.memory_budget_bytes = check_int(memory_budget_bytes, "memory_budget_bytes", 0, where)
        self.on_invalid = on_invalid
        self.online_every = (
            0 if online_every is None else check_int(online_every, "online_every", 0, where)
        )
        self.monitor: NCMonitor | None = None
        self.watch: TrainingWatch | None = None
        self.history: list[dict] = []
        self.online_history: list[dict] = []
        self.metrics: dict | None = None
        self._pass: MonitorPass | None = None
        self._measuring = False
        self._result: dict | None = None

    # ----------------------------------------------------------------- setup
    def setup(self, trainer, pl_module, stage: str) -> None:
        classifier = _module(pl_module, self.classifier, "classifier")
        if not isinstance(classifier, nn.Linear):
            raise TypeError(
                f"NeuralCollapseCallback: classifier {self.classifier!r} of "
                f"{type(pl_module).__name__} is a {type(classifier).__name__}, not an nn.Linear"
            )
        penultimate = (
            None
            if self.penultimate is None
            else _module(pl_module, self.penultimate, "penultimate")
        )
        self.monitor = NCMonitor(
            pl_module,
            classifier,
            penultimate,
            weight_decay=self.weight_decay,
            on_invalid=self.on_invalid,
            memory_budget_bytes=self.memory_budget_bytes,
            on_degenerate="nan",  # a NaN row with the reason: never abort the fit
        )
        self.monitor.invalid_advice = skip_advice(
            "NeuralCollapseCallback(..., on_invalid='skip')",
            "callback.monitor.last_pass.measurement.stats.skipped",
        )
        # Every rank logs the same, already global values (see the module docstring).
        warnings.filterwarnings(
            "ignore",
            message=r"It is recommended to use `self\.log\('" + re.escape(self.prefix),
            category=UserWarning,
        )

    def _wants(self, epoch: int) -> bool:
        return self._wanted is None or bool(self._wanted(epoch))

    # --------------------------------------------------- during validation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._measuring = (
            self.dataloader is None
            and not trainer.sanity_checking
            and self._wants(trainer.current_epoch)
        )
        self._pass = None

    def on_validation_batch_start(
        self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._measuring:
            return
        if dataloader_idx != self.dataloader_idx:
            # Another validation dataloader: its forward passes must not reach the hook.
            self._finish_validation_pass()
            return
        if self._pass is None:
            self._pass = self.monitor.measure().open()
        if self._pass.is_open:
            self._pass.labels(self.labels(batch))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._measuring:
            self._finish_validation_pass()
            self._measuring = False
            self._record(trainer, pl_module)

    def _finish_validation_pass(self) -> None:
        nc = self._pass
        if nc is None or not nc.is_open:
            return
        nc.close()
        if nc.needs_second_pass:
            # The validation loop cannot be run again from here: NC4 is left NaN.
            _warn(
                "NeuralCollapseCallback: the validation features exceeded "
                f"memory_budget_bytes={self.memory_budget_bytes}, so nc4_ncc_mismatch is "
                "NaN; raise the budget or pass dataloader= (which can run a second pass)",
            )
            self._result = {**nc.compute(nc4=False), "nc4_ncc_mismatch": math.nan}
        else:
            self._result = dict(nc.metrics)

    # ------------------------------------------- the training passes (online)
    def on_train_start(self, trainer, pl_module) -> None:
        if self.online_every:
            self._close_watch()
            self.watch = self.monitor.watch_training(self.online_every, step=trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.watch is not None:
            self.watch.labels(self.labels(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.watch is None:
            return
        batches = trainer.num_training_batches
        epoch = None
        if isinstance(batches, int) or math.isfinite(batches):
            epoch = trainer.current_epoch + (batch_idx + 1) / batches
        row = self.watch.step(epoch=epoch)
        if row is None:
            return
        if "nc_undefined" in row:
            _warn(
                f"NeuralCollapseCallback: metrics of the training passes undefined at step "
                f"{row['step']}, logged as NaN: {row['nc_undefined']}",
            )
        self.online_history.append(row)
        values = {
            key: torch.tensor(value, dtype=torch.float64, device=pl_module.device)
            for key, value in scalars(row, f"{self.prefix}train_online/").items()
        }
        # Every rank holds the reduced window: nothing to reduce, logged at this global step.
        pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_watch()

    def _close_watch(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    # ------------------------------------------------------ own dataloader
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.dataloader is None or not self._wants(trainer.current_epoch):
            return
        batches = _RankShare(self.dataloader, trainer.global_rank, trainer.world_size)
        self._result = dict(self.monitor.evaluate(batches))
        self._record(trainer, pl_module)

    # -------------------------------------------------------------- results
    def _record(self, trainer, pl_module) -> None:
        result, self._result = self._result, None
        if result is None:  # the measured dataloader had no batches
            return
        epoch = trainer.current_epoch
        if "nc_undefined" in result:
            _warn(
                f"NeuralCollapseCallback: metrics undefined at epoch {epoch}, logged as NaN: "
                f"{result['nc_undefined']}",
            )
        self.metrics = result
        self.history.append({"epoch": epoch, **result})
        values = {
            key: torch.tensor(value, dtype=torch.float64, device=pl_module.device)
            for key, value in scalars(result, self.prefix).items()
        }
        # Each rank holds the global values: nothing to reduce (sync_dist=False), and
        # batch_size=1 keeps Lightning's epoch mean of one value exact.
        pl_module.log_dict(
            values,
            on_step=False,
            on_epoch=True,
            sync_dist=False,
            batch_size=1,
            add_dataloader_idx=False,
        )

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._pass is not None:
            self._pass.cancel()
        self._close_watch()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._pass is not None:
            self._pass.cancel()
        self._pass = None
        self._close_watch()


def _module(root: nn.Module, spec, what: str) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec
    try:
        return root.get_submodule(spec)
    except AttributeError:
        names = ", ".join(name for name, _ in root.named_modules() if name) or "none"
        raise ValueError(
            f"NeuralCollapseCallback: {what} {spec!r} is not a submodule of "
            f"{type(root).__name__} (its submodules: {names})"
        ) from None


class _RankShare:
    """Batches ``rank``, ``rank + world``, … of ``loader``: each rank's share of a given
    loader (re-iterable, for NC4's second pass)."""

    def __init__(self, loader, rank: int, world: int):
        sampler = getattr(loader, "sampler", None)
        if world > 1 and isinstance(sampler, torch.utils.data.RandomSampler):
            raise ValueError(
                "NeuralCollapseCallback: dataloader shuffles (RandomSampler); under DDP every "
                "rank must see the same batches in the same order to share them out: build it "
                "with shuffle=False"
            )
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.rank, None, self.world)
