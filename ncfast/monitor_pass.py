"""One measurement pass of an :class:`ncfast.monitor.NCMonitor`: the forward hook held while
the pass is open, the labels paired with each forward pass's features, the metrics when it
closes, and the second pass over the data that NC4 may need (:meth:`MonitorPass.compute`).

Made by :meth:`ncfast.monitor.NCMonitor.measure` (see :mod:`ncfast.monitor` for the ways to use
it); the classifier's fingerprint taken when the pass opens tells whether it changed before the
metrics are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from torch.utils.hooks import RemovableHandle

from ncfast.checks import PairSource, iter_pairs
from ncfast.measure import Measurement
from ncfast.metrics import NCMetrics
from ncfast.watch import distributed_now

if TYPE_CHECKING:
    import ncfast.monitor

__all__ = ["MonitorPass"]

# What the batches hold as model inputs: whatever ``forward`` (default: the model) takes.
_Inputs = TypeVar("_Inputs")


class MonitorPass:
    """One measurement pass of an :class:`~ncfast.monitor.NCMonitor`, holding the forward hook
    while open.

    Use it as a context manager, or, where a ``with`` block does not fit (callbacks of a
    training framework), call :meth:`open` at the start and :meth:`close` at the end (or
    :meth:`cancel` when the pass is abandoned). While open, call :meth:`labels` before each
    forward pass of the model; the hook pairs the features of that pass with those labels and
    feeds :class:`ncfast.Measurement`. Closing removes the hook and computes the metrics (in
    distributed mode this is collective: every rank closes).
    """

    def __init__(self, monitor: ncfast.monitor.NCMonitor) -> None:
        self.monitor = monitor
        self.measurement: Measurement | None = None
        self.batches = 0
        self._pending: torch.Tensor | None = None
        self._handle: RemovableHandle | None = None
        self._state = "new"
        self._metrics: NCMetrics | None = None
        self._distributed = False
        self._needs_second_pass = False
        self._fingerprint: _Fingerprint | None = None

    # ------------------------------------------------------------- open, close
    def open(self) -> MonitorPass:
        """Start the pass: attach the hook and read the classifier. Returns the pass."""
        mon = self.monitor
        if self._state != "new":
            raise RuntimeError("MonitorPass: a pass can be opened once; call monitor.measure()")
        if mon.open_pass is not None:
            raise RuntimeError("NCMonitor: a measurement pass is already open on this monitor")
        weight, bias = mon.classifier.weight, mon.classifier.bias
        self._fingerprint = _fingerprint(weight, bias)
        self.measurement = Measurement(
            mon.num_classes,
            mon.dim,
            weight=weight.detach(),
            bias=None if bias is None else bias.detach(),
            weight_decay=mon.weight_decay,
            device=weight.device,
            on_invalid=mon.on_invalid,
            memory_budget_bytes=mon.memory_budget_bytes,
            precision=mon.precision,
        )
        self.measurement.stats.invalid_advice = mon.invalid_advice
        self._distributed = distributed_now() if mon.distributed is None else mon.distributed
        if self._distributed and not distributed_now():
            raise RuntimeError(
                "NCMonitor(distributed=True) needs torch.distributed to be initialised "
                "(torch.distributed.init_process_group) before a pass starts"
            )
        self._handle = mon._register(self._on_features)
        mon.hold_pass(self)
        self._state = "open"
        return self

    def close(self) -> None:
        """End the pass: remove the hook and compute the metrics (:attr:`metrics`), unless NC4
        needs a second pass (:attr:`needs_second_pass`; then :meth:`compute`). Collective in
        distributed mode."""
        if self._state != "open":
            raise RuntimeError(f"MonitorPass.close: the pass is not open (it is {self._state})")
        self._detach()
        if self._pending is not None:
            self._state = "failed"
            raise ValueError(
                "MonitorPass: labels() was called for a batch but no forward pass of the model "
                "followed before the pass ended"
            )
        self._state = "done"
        try:
            self._needs_second_pass = self._agree_on_second_pass()
            if not self._needs_second_pass:
                self._metrics = self._compute(None, None)
        except BaseException:
            # No metrics will come of this pass (e.g. the classifier changed): say so, not
            # that a second pass is due.
            self._state = "failed"
            raise

    def cancel(self) -> None:
        """Abandon the pass (e.g. after an exception): remove the hook, compute nothing."""
        self._detach()
        if self._state in ("new", "open"):
            self._state = "failed"

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def __enter__(self) -> MonitorPass:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.cancel()
            return
        self.close()

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.monitor.release_pass(self)

    # ------------------------------------------------------------- feeding
    def labels(self, labels: object) -> None:
        """Labels of the samples of the next forward pass (a tensor, list or array of ints;
        any device: they are moved to the features' device)."""
        if self._state != "open":
            raise RuntimeError(
                "MonitorPass.labels: the pass is not open; use it inside "
                "`with monitor.measure() as nc:` (or after nc.open(), before nc.close())"
            )
        if self._pending is not None:
            raise ValueError(
                "MonitorPass.labels: the labels of the previous call were never used: no "
                f"features reached the hook ({self.monitor._hooked_what()}) since then. Call "
                "labels(y) once before each forward pass, and check that this module runs in "
                "the forward"
            )
        self._pending = self.monitor._given_labels(labels, "MonitorPass.labels")

    def _on_features(self, features: torch.Tensor) -> None:
        labels, self._pending = self._pending, None
        if labels is None:
            raise RuntimeError(
                f"NCMonitor: features reached the hook ({self.monitor._hooked_what()}) without "
                "labels. Inside a measurement pass call nc.labels(y) before every forward pass; "
                "if the hooked module runs more than once per forward, hook a module that runs "
                "once"
            )
        labels = self.monitor._paired_labels(labels, features, "MonitorPass.labels")
        self._opened().update(features, labels)
        self.batches += 1

    def _opened(self) -> Measurement:
        """The measurement of this pass (made when it opened)."""
        if self.measurement is None:
            raise RuntimeError("MonitorPass: the pass was never opened (use monitor.measure())")
        return self.measurement

    # ------------------------------------------------------------- results
    @property
    def needs_second_pass(self) -> bool:
        """True when the pass has ended, its features exceeded ``memory_budget_bytes`` and NC4
        needs a second pass (on any rank, in distributed mode): see :meth:`compute`."""
        return self._needs_second_pass

    def _agree_on_second_pass(self) -> bool:
        measurement = self._opened()
        need = measurement.needs_second_pass
        if self._distributed:
            import torch.distributed as dist

            flag = torch.tensor(int(need), device=measurement.stats.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.monitor.group)
            need = bool(flag)
        return need

    @property
    def metrics(self) -> NCMetrics:
        """The SPEC dict of this pass (available once the ``with`` block has ended)."""
        if self._metrics is not None:
            return self._metrics
        if self._state == "done":
            raise ValueError(
                "MonitorPass.metrics: the features exceeded memory_budget_bytes="
                f"{self.monitor.memory_budget_bytes}, so NC4 needs a second pass over the same "
                "data: call nc.compute(second_pass=loader) (the monitor runs the model on it), "
                "use monitor.evaluate(loader), or raise memory_budget_bytes"
            )
        raise RuntimeError(
            "MonitorPass.metrics: the measurement pass has not ended (or ended with an error)"
        )

    def compute(
        self,
        second_pass: PairSource[_Inputs, object] | None = None,
        forward: Callable[[_Inputs], object] | None = None,
        nc4: bool = True,
    ) -> NCMetrics:
        """The SPEC dict, running ``second_pass`` (``(inputs, labels)`` batches over the same
        samples, or a callable returning them) through the model if NC4 needs it; ``forward``
        as in :meth:`~ncfast.monitor.NCMonitor.evaluate`; ``nc4=False``: without
        ``nc4_ncc_mismatch`` (and without a second pass). Collective in distributed mode."""
        if self._state != "done":
            raise RuntimeError(
                "MonitorPass.compute: the measurement pass has not ended (or ended with an error)"
            )
        if self._metrics is None:
            metrics = self._compute(second_pass, forward, nc4)
            if not nc4:
                return metrics
            self._metrics = metrics
        if not nc4:
            # Metrics computed when the pass closed hold NC4: leave it out, as asked.
            without = self._metrics.copy()
            without.pop("nc4_ncc_mismatch", None)
            return without
        return self._metrics

    def _compute(
        self,
        second_pass: PairSource[_Inputs, object] | None,
        forward: Callable[[_Inputs], object] | None,
        nc4: bool = True,
    ) -> NCMetrics:
        mon = self.monitor
        if not _same_fingerprint(
            _fingerprint(mon.classifier.weight, mon.classifier.bias), self._fingerprint
        ):
            raise RuntimeError(
                "NCMonitor: the classifier's weight or bias changed during the measurement pass "
                "(e.g. an optimizer step, or an edit through .data); measure with fixed "
                "parameters"
            )
        features = None
        if second_pass is not None:
            features = _SecondPass(mon, second_pass, forward or mon._default_forward)
        return self._opened().compute(
            second_pass=features,
            distributed=self._distributed,
            group=mon.group,
            nc4=nc4,
            on_degenerate=mon.on_degenerate,
        )


class _SecondPass(Generic[_Inputs]):
    """Iterable of (features, labels) obtained by running ``(inputs, labels)`` batches through
    the model with the monitor's hook capturing the features (no gradients)."""

    def __init__(
        self,
        monitor: ncfast.monitor.NCMonitor,
        batches: PairSource[_Inputs, object],
        forward: Callable[[_Inputs], object],
    ) -> None:
        self.monitor, self.batches, self.forward = monitor, batches, forward

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mon = self.monitor
        captured: list[torch.Tensor] = []
        handle = mon._register(captured.append)
        seen = 0
        try:
            for inputs, labels in iter_pairs(self.batches, "MonitorPass.compute(second_pass)"):
                seen += 1
                with torch.no_grad():
                    self.forward(inputs)
                if len(captured) != 1:
                    raise RuntimeError(
                        f"NCMonitor: the second pass hooked {len(captured)} feature batches for "
                        "one forward pass; hook a module that runs exactly once per forward"
                    )
                features = captured.pop()
                where = "MonitorPass.compute(second_pass)"
                labels = mon._paired_labels(mon._given_labels(labels, where), features, where)
                yield features, labels
            if seen == 0:
                raise ValueError(
                    "NCMonitor: the second pass yielded no batches; pass a re-iterable (a "
                    "DataLoader, a list) or a callable returning a fresh iterable, not a "
                    "generator that the first pass used up"
                )
        finally:
            handle.remove()


# (torch's in-place counters of weight and bias, a digest of their values on their device).
_Fingerprint = tuple[tuple[int, int | None], torch.Tensor]


def _fingerprint(weight: torch.Tensor, bias: torch.Tensor | None) -> _Fingerprint:
    """What tells that the classifier changed: the in-place modification counters
    (``Tensor._version``, which autograd checks; any optimizer step or in-place write) and, for
    writes that bypass them (``weight.data[...] = ...``, ``.data.copy_``), a float64 digest of
    the values computed on their device without a host synchronisation: the sum, the sum of
    squares and the sum weighted by row index. An edit that keeps all three is not detected."""
    values = [weight.detach().to(torch.float64)]
    if bias is not None:
        values.append(bias.detach().to(torch.float64)[:, None])
    rows = torch.arange(weight.shape[0], dtype=torch.float64, device=weight.device)
    digest = torch.stack(
        [torch.stack([v.sum(), v.square().sum(), (v.sum(dim=1) * rows).sum()]) for v in values]
    )
    return (weight._version, None if bias is None else bias._version), digest


def _same_fingerprint(now: _Fingerprint, before: _Fingerprint | None) -> bool:
    """Whether the classifier is as it was (NaN weights compare equal to themselves)."""
    if before is None:
        return False
    return now[0] == before[0] and bool(
        torch.allclose(now[1], before[1], rtol=0.0, atol=0.0, equal_nan=True)
    )
