"""Neural Collapse inside your own training loop: a forward hook feeds :class:`ncfast.Measurement`.

Attach to any ``nn.Module`` by naming its final linear layer (and, optionally, the module whose
output is the feature); the hook exists only while a measurement pass is open, so training
forward passes cost nothing::

    monitor = NCMonitor(model, classifier=model.fc)           # features = the input of model.fc
    metrics = monitor.evaluate(val_loader)                    # eval mode, no grad, SPEC dict

or, in a loop you write yourself::

    model.eval()
    with torch.no_grad(), monitor.measure() as nc:
        for x, y in loader:
            nc.labels(y)                                      # labels of the next forward pass
            model(x)
    print(nc.metrics["nc1"])

or, from callbacks that cannot hold a ``with`` block, ``nc = monitor.measure().open()`` …
``nc.close()`` (``nc.cancel()`` on failure); :mod:`ncfast.integrations.lightning` does so.

With ``torch.distributed`` initialised, each rank feeds its own shard and every rank gets the
metrics of all ranks' samples (statistics through :meth:`ClassStats.reduced`).
:class:`ncfast.integrations.tensorboard.TensorBoardWriter` writes every scalar of the result.

Neural Collapse from the training passes themselves (no extra forward pass):
:meth:`NCMonitor.watch_training` keeps the hook on while the model trains and gives one row of
metrics every ``every`` optimiser steps (:class:`TrainingWatch`)::

    watch = monitor.watch_training(every=100)
    for x, y in train_loader:
        watch.labels(y)                                       # labels of the next forward pass
        loss = loss_fn(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()
        row = watch.step()                                    # None, or the window's metrics
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ncfast.checks import (
    PairSource,
    check_int,
    check_label_dtype,
    check_weight_decay,
    iter_pairs,
)
from ncfast.measure import Measurement
from ncfast.metrics import ON_DEGENERATE, NCMetrics
from ncfast.monitor_pass import MonitorPass
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET
from ncfast.stats import skip_advice
from ncfast.watch import TrainingWatch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["MonitorPass", "NCMonitor"]

# What the batches hold as model inputs: whatever ``forward`` (default: the model) takes.
_Inputs = TypeVar("_Inputs")


def _is_submodule(model: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in model.modules())


class NCMonitor:
    """Measures Neural Collapse (every SPEC key, NC4 included) of ``model`` through forward hooks.

    - ``classifier``: the final ``nn.Linear`` of ``model`` (W ``[C, P]`` and b of the SPEC).
    - ``penultimate``: optional module of ``model`` whose output, flattened per sample to ``P``
      values, is the feature. Default: the input of ``classifier`` itself; inputs ``[..., P]``
      count every leading position as a sample (tokens of a sequence model), and the labels
      given for that forward pass must have the same leading shape.
    - ``weight_decay``: λ of HPD22 Eq. 3 for the MSE decomposition (:func:`ncfast.mse_lambda`
      converts an SGD weight decay).
    - ``distributed``: all-reduce over ``group`` when the pass ends; ``None`` (default) does so
      exactly when ``torch.distributed`` is initialised.
    - ``on_invalid``, ``memory_budget_bytes``, ``precision``: as in :class:`ncfast.Measurement`;
      ``on_degenerate``: as in :meth:`ncfast.Measurement.compute` (``"nan"``: a row of NaN
      metrics with the reason in ``nc_undefined`` where they are undefined, e.g. a validation
      set of one class).

    The classifier's weight and bias are read when a pass starts and must not change until its
    metrics are computed (checked). Statistics live on the classifier's device.

    Example:
        >>> import torch, ncfast
        >>> model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 3))
        >>> features = torch.tensor(
        ...     [[2.0, 0.0], [2.2, 0.2], [0.0, 2.0], [0.2, 2.2], [-2.0, -2.0], [-2.2, -1.8]]
        ... )
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> monitor = ncfast.NCMonitor(model, classifier=model[1])
        >>> monitor.evaluate([(features, labels)])["num_samples"]
        6
    """

    def __init__(
        self,
        model: nn.Module,
        classifier: nn.Linear,
        penultimate: nn.Module | None = None,
        *,
        weight_decay: float = 0.0,
        distributed: bool | None = None,
        group: ProcessGroup | None = None,
        on_invalid: str = "raise",
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
        precision: str = "auto",
        on_degenerate: str = "raise",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"NCMonitor: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(classifier, nn.Linear):
            raise TypeError(
                "NCMonitor: classifier must be the model's final nn.Linear, got "
                f"{type(classifier).__name__}"
            )
        if not _is_submodule(model, classifier):
            raise ValueError(
                "NCMonitor: classifier is not a submodule of model (pass the layer object itself, "
                "e.g. model.fc, not a copy)"
            )
        if penultimate is not None:
            if not isinstance(penultimate, nn.Module):
                raise TypeError(
                    "NCMonitor: penultimate must be an nn.Module or None, got "
                    f"{type(penultimate).__name__}"
                )
            if not _is_submodule(model, penultimate):
                raise ValueError("NCMonitor: penultimate is not a submodule of model")
            if penultimate is model:
                raise ValueError(
                    "NCMonitor: penultimate is the model itself, whose output is the logits; pass "
                    "the module whose output feeds the classifier"
                )
        if on_degenerate not in ON_DEGENERATE:
            raise ValueError(
                f"NCMonitor: on_degenerate must be one of {ON_DEGENERATE}, got {on_degenerate!r}"
            )
        if distributed not in (None, True, False):
            raise TypeError(
                f"NCMonitor: distributed must be None, True or False, not {distributed!r}"
            )
        self.model = model
        self.classifier = classifier
        self.penultimate = penultimate
        self.num_classes = classifier.out_features
        self.dim = classifier.in_features
        self.weight_decay = check_weight_decay(weight_decay, "NCMonitor")
        self.distributed = distributed
        self.group = group
        self.on_invalid = on_invalid
        self.on_degenerate = on_degenerate
        # The advice of an InvalidInputError; a framework built on the monitor sets its own.
        self.invalid_advice = skip_advice(
            "NCMonitor(..., on_invalid='skip')", "monitor.last_pass.measurement.stats.skipped"
        )
        self.memory_budget_bytes = check_int(
            memory_budget_bytes, "memory_budget_bytes", 0, "NCMonitor"
        )
        self._open: MonitorPass | None = None
        self.last_pass: MonitorPass | None = None
        self._watch: TrainingWatch | None = None
        self.precision = precision
        # Fail at construction, not at the first batch, on bad settings.
        Measurement(self.num_classes, self.dim, on_invalid=on_invalid, precision=precision)

    # ------------------------------------------------------------------ passes
    def measure(self) -> MonitorPass:
        """A measurement pass, to be used as a context manager or opened and closed (see the
        module docstring). The latest is also :attr:`last_pass` (e.g. the one of
        :meth:`evaluate`, for its ``measurement`` after an error).

        Returns:
            a new :class:`MonitorPass` (not yet open).

        Example:
            >>> import torch, ncfast
            >>> model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 3))
            >>> features = torch.tensor(
            ...     [[2.0, 0.0], [2.2, 0.2], [0.0, 2.0], [0.2, 2.2], [-2.0, -2.0], [-2.2, -1.8]]
            ... )
            >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
            >>> monitor = ncfast.NCMonitor(model, classifier=model[1])
            >>> with torch.no_grad(), monitor.measure() as nc:
            ...     for start in (0, 3):
            ...         nc.labels(labels[start : start + 3])
            ...         _ = model(features[start : start + 3])
            >>> nc.metrics["classes_present"]
            3
        """
        self.last_pass = MonitorPass(self)
        return self.last_pass

    def evaluate(
        self,
        batches: PairSource[_Inputs, object],
        forward: Callable[[_Inputs], object] | None = None,
    ) -> NCMetrics:
        """Measure over ``batches`` of ``(inputs, labels)`` in eval mode without gradients, with
        a second pass over them if NC4 needs one (then ``batches`` must be re-iterable, like a
        DataLoader, or a callable returning a fresh iterable). ``forward(inputs)`` runs the model
        (default: ``model(inputs)``, tensors moved to the classifier's device). The model's
        train/eval mode is restored.

        Args:
            batches: ``(inputs, labels)`` pairs (a DataLoader, a list, or a callable
                returning a fresh iterable).
            forward: how to run the model on ``inputs`` (default: ``model(inputs)``).

        Returns:
            the SPEC dict (:class:`ncfast.metrics.NCMetrics`).

        Example:
            >>> import torch, ncfast
            >>> model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 3))
            >>> features = torch.tensor(
            ...     [[2.0, 0.0], [2.2, 0.2], [0.0, 2.0], [0.2, 2.2], [-2.0, -2.0], [-2.2, -1.8]]
            ... )
            >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
            >>> monitor = ncfast.NCMonitor(model, classifier=model[1])
            >>> metrics = monitor.evaluate([(features[:3], labels[:3]), (features[3:], labels[3:])])
            >>> round(metrics["nc1"], 4)
            0.0027
        """
        run: Callable[[_Inputs], object] = forward or self._default_forward
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.measure() as nc:
                for inputs, labels in iter_pairs(batches, "NCMonitor.evaluate"):
                    nc.labels(labels)
                    run(inputs)
            if nc.needs_second_pass:
                return nc.compute(second_pass=batches, forward=run)
            return nc.metrics
        finally:
            self.model.train(was_training)

    def watch_training(self, every: int, *, step: int = 0, nc4: bool = True) -> TrainingWatch:
        """Neural Collapse of the training forward passes, one row every ``every`` optimiser
        steps: see :class:`TrainingWatch` (what it measures, and how it differs from
        :meth:`evaluate`). ``step``: the optimiser steps already done (a resumed run's count);
        windows end at the multiples of ``every``. ``nc4=False`` leaves NC4 out. The hook stays
        on until :meth:`TrainingWatch.close`; one watch per monitor at a time.

        Args:
            every: optimiser steps per window (one row each).
            step: optimiser steps already done.
            nc4: measure NC4 (against the previous window's means).

        Returns:
            the :class:`TrainingWatch` (a context manager that closes it).

        Example:
            >>> import torch, ncfast
            >>> model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 3))
            >>> features = torch.tensor(
            ...     [[2.0, 0.0], [2.2, 0.2], [0.0, 2.0], [0.2, 2.2], [-2.0, -2.0], [-2.2, -1.8]]
            ... )
            >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
            >>> monitor = ncfast.NCMonitor(model, classifier=model[1])
            >>> with monitor.watch_training(every=2) as watch:
            ...     for start in (0, 3):
            ...         watch.labels(labels[start : start + 3])
            ...         _ = model(features[start : start + 3])  # and the optimiser step
            ...         row = watch.step()
            >>> row["step"], row["num_samples"]
            (2, 6)
        """
        if self._watch is not None:
            raise RuntimeError(
                "NCMonitor.watch_training: this monitor already watches the training (close() "
                "that watch first)"
            )
        self._watch = TrainingWatch(self, every, step=step, nc4=nc4)
        return self._watch

    def release_watch(self, watch: TrainingWatch) -> None:
        """Forget ``watch`` when it closes (:meth:`TrainingWatch.close` calls this), so that
        :meth:`watch_training` may start another."""
        if self._watch is watch:
            self._watch = None

    @property
    def open_pass(self) -> MonitorPass | None:
        """The measurement pass open on this monitor now (None between passes)."""
        return self._open

    def hold_pass(self, measurement_pass: MonitorPass) -> None:
        """Record ``measurement_pass`` as the pass open on this monitor
        (:meth:`MonitorPass.open` calls this, once it has checked that none is)."""
        self._open = measurement_pass

    def release_pass(self, measurement_pass: MonitorPass) -> None:
        """Forget ``measurement_pass`` when it ends (:meth:`MonitorPass.close` and
        :meth:`MonitorPass.cancel` call this), so that another pass may open."""
        if self._open is measurement_pass:
            self._open = None

    def _default_forward(self, inputs: object) -> object:
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.to(self.classifier.weight.device, non_blocking=True)
        return self.model(inputs)

    # ------------------------------------------------------------------- hooks
    def _register(self, sink: Callable[[torch.Tensor], None]) -> RemovableHandle:
        if self.penultimate is None:

            def pre_hook(module: nn.Module, args: tuple[object, ...]) -> None:
                sink(self._features(args[0] if args else None))

            return self.classifier.register_forward_pre_hook(pre_hook)

        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            sink(self._features(output))

        return self.penultimate.register_forward_hook(hook)

    def _features(self, value: object) -> torch.Tensor:
        what = (
            "input of the classifier"
            if self.penultimate is None
            else f"output of the penultimate module ({type(self.penultimate).__name__})"
        )
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"NCMonitor: the {what} is a {type(value).__name__}, not a tensor; pass "
                "penultimate= a module whose output is the feature tensor"
            )
        if self.penultimate is None:
            features = value.detach().reshape(-1, value.shape[-1])
        else:
            if value.dim() < 2:
                raise ValueError(
                    f"NCMonitor: the {what} has shape {list(value.shape)}; features need a batch "
                    "dimension and at least one feature dimension"
                )
            features = value.detach().flatten(1)
        if features.shape[1] != self.dim:
            raise ValueError(
                f"NCMonitor: the {what} has {features.shape[1]} values per sample (shape "
                f"{list(value.shape)}) but the classifier takes {self.dim}; pass the module whose "
                "output feeds the classifier"
            )
        return features

    def _flat_labels(self, labels: torch.Tensor) -> torch.Tensor:
        # With the classifier's input as the feature, [..., P] inputs pair with [...] labels.
        return labels.reshape(-1) if self.penultimate is None else labels

    def _hooked_what(self) -> str:
        if self.penultimate is None:
            return f"input of the classifier {type(self.classifier).__name__}"
        return f"output of {type(self.penultimate).__name__}"

    def _paired_labels(
        self, labels: torch.Tensor, features: torch.Tensor, where: str
    ) -> torch.Tensor:
        """The pending ``labels`` on the features' device, after checking that they label the
        samples of this forward pass."""
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"{where}: got labels of shape {list(labels.shape)} for a batch of "
                f"{features.shape[0]} samples (features {list(features.shape)} at the "
                f"{self._hooked_what()}); the labels must match the samples of the forward pass"
            )
        return labels.to(features.device, non_blocking=True)

    def _given_labels(self, labels: object, where: str) -> torch.Tensor:
        """The labels a user gave for the next forward pass (tensor, list or array of ints),
        checked and flattened as the features will be."""
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(
                    f"{where}: labels must be a tensor (or a list/array) of integer class "
                    f"indices, got {type(labels).__name__}"
                ) from exc
        check_label_dtype(labels, "labels", where)
        return self._flat_labels(labels)
