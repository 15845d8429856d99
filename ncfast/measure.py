"""One measurement pass: class statistics and NC4 from the same batches, then every SPEC key."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ncfast.checks import PairSource, check_classifier, check_int, check_weight_decay
from ncfast.metrics import (
    ON_DEGENERATE,
    NCMetrics,
    nc_metrics,
    nc_metrics_or_nan,
    undefined_reason,
)
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET, NCCMismatch, mismatch_fraction, valid_rows
from ncfast.stats import ClassStats, InvalidStateError, check_batch, skip_advice

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class Measurement:
    """Feed ``update(features, labels)`` for every batch of a pass, then ``compute()``.

    With a classifier (``weight [C, P]``, ``bias [C]``) the result holds every key of SPEC
    §2–§4 including ``nc4_ncc_mismatch``; ``weight_decay`` is λ of HPD22 Eq. 3 (see
    :func:`ncfast.metrics.mse_lambda`). Without one, the feature-only keys.

    ``compute`` leaves the accumulated state as it is (also with ``distributed=True``), so a
    measurement can be computed, fed more batches and computed again; ``reset`` starts a new
    pass, ``merge`` adds another measurement's samples, ``state_dict``/``load_state_dict``
    save and restore the accumulated state.

    Args:
        num_classes: C; labels lie in ``0..C-1``.
        dim: P, the feature size.
        weight: the classifier's weight ``[C, P]`` (None: the feature-only keys, no NC4).
        bias: its bias ``[C]`` (default zero).
        weight_decay: λ of HPD22 Eq. 3 (:func:`ncfast.mse_lambda`).
        device: where the statistics live (default: the first batch's device).
        on_invalid: ``"raise"`` or ``"skip"``, as in :class:`ClassStats`.
        memory_budget_bytes: how many bytes of features NC4 may keep per pass (past it,
            ``compute`` needs a second pass).
        precision: the per-batch scatter product's policy, ``"exact"``, ``"fast"`` or
            ``"auto"`` (:class:`ncfast.ClassStats`, docs/precision.md).

    Example:
        >>> import torch, ncfast
        >>> features = torch.tensor(
        ...     [[2.0, 0.0], [2.2, 0.2], [0.0, 2.0], [0.2, 2.2], [-2.0, -2.0], [-2.2, -1.8]]
        ... )
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
        >>> measurement = ncfast.Measurement(3, 2, weight=weight)
        >>> measurement.update(features[:4], labels[:4])
        >>> measurement.update(features[4:], labels[4:])
        >>> metrics = measurement.compute()
        >>> metrics["nc4_ncc_mismatch"], round(metrics["nc3_self_duality"], 4)
        (0.0, 0.001)
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        weight_decay: float = 0.0,
        device: torch.device | str | None = None,
        on_invalid: str = "raise",
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
        precision: str = "auto",
    ) -> None:
        num_classes = check_int(num_classes, "num_classes", 1, "Measurement")
        dim = check_int(dim, "dim", 1, "Measurement")
        check_int(memory_budget_bytes, "memory_budget_bytes", 0, "Measurement")
        self.stats = ClassStats(
            num_classes, dim, device=device, on_invalid=on_invalid, precision=precision
        )
        self.stats.invalid_advice = skip_advice(
            "Measurement(..., on_invalid='skip')", "measurement.stats.skipped"
        )
        self.weight_decay = check_weight_decay(weight_decay, "Measurement")
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.ncc: NCCMismatch | None = None
        if weight is not None:
            self.weight, self.bias = check_classifier(weight, bias, "Measurement", num_classes, dim)
            self.ncc = NCCMismatch.of_checked(self.weight, self.bias, memory_budget_bytes)
        elif bias is not None:
            raise ValueError("Measurement: bias was given without weight")
        # The statistics the last compute() used: self.stats, or their all-rank reduction.
        self.computed_stats: ClassStats | None = None

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: ``features [B, dim]`` (any float dtype, on the statistics' device),
        ``labels [B]`` in ``0..num_classes-1``. Checked once, its rows' validity computed once
        for the statistics and NC4."""
        check_batch(features, labels, self.stats.num_classes, self.stats.dim, "Measurement.update")
        valid = None
        if self.ncc is not None and features.shape[0] and self.ncc.buffer.fits(features):
            valid = valid_rows(features, labels, self.stats.num_classes)
        self.stats.update_checked(features, labels, valid)
        if self.ncc is not None:
            self.ncc.add_checked(features, labels, valid)

    def reset(self) -> None:
        """Forget every sample (a new pass); keep the classifier and settings."""
        self.stats.reset()
        if self.ncc is not None:
            self.ncc.reset()
        self.computed_stats = None

    def merge(self, other: Measurement) -> Measurement:
        """Add the samples of ``other`` (same classes, dim and classifier) to these, exactly.
        Everything is checked before anything changes."""
        if not isinstance(other, Measurement):
            raise TypeError(f"Measurement.merge: other must be a Measurement, got {type(other)}")
        mine, theirs = self.stats, other.stats
        if (theirs.num_classes, theirs.dim) != (mine.num_classes, mine.dim):
            raise InvalidStateError(
                f"Measurement.merge: other has num_classes={theirs.num_classes}, "
                f"dim={theirs.dim}; this measurement has num_classes={mine.num_classes}, "
                f"dim={mine.dim}"
            )
        if (other.ncc is None) != (self.ncc is None):
            raise ValueError(
                "Measurement.merge: one measurement has a classifier and the other not; NC4 "
                "and the classifier keys need the same classifier in both"
            )
        if self.ncc is not None and other.ncc is not None:
            if not _same_classifier(self.ncc, other.ncc):
                raise ValueError(
                    "Measurement.merge: the two measurements have different classifiers (weight "
                    "or bias); NC4 compares every sample with one classifier"
                )
            self.ncc.merge(other.ncc)
        self.stats.merge(other.stats)
        self.computed_stats = None
        return self

    def state_dict(self) -> dict[str, object]:
        """The accumulated state: ``stats`` (:meth:`ClassStats.state_dict`) and, with a
        classifier, ``nc4`` (the buffered features of this pass, on their device, or the note
        that they exceeded the budget). Settings and the classifier are not included."""
        return {
            "stats": self.stats.state_dict(),
            "nc4": None if self.ncc is None else self.ncc.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, object]) -> Measurement:
        """Restore what :meth:`state_dict` returned (into a Measurement of the same classes,
        dim, and classifier or none). Both parts are checked before either is loaded: on
        :class:`~ncfast.stats.InvalidStateError` this measurement is unchanged."""
        where = "Measurement.load_state_dict"
        if not isinstance(state_dict, Mapping) or "stats" not in state_dict:
            raise InvalidStateError(f"{where}: state_dict lacks 'stats'")
        stats, nc4 = state_dict["stats"], state_dict.get("nc4")
        if not isinstance(stats, Mapping) or not (nc4 is None or isinstance(nc4, Mapping)):
            raise InvalidStateError(
                f"{where}: 'stats' and 'nc4' must be the dicts that state_dict() returned"
            )
        if (nc4 is None) != (self.ncc is None):
            have = "has a classifier" if self.ncc is not None else "has no classifier"
            raise InvalidStateError(
                f"{where}: this measurement {have} but the state "
                + ("holds no NC4 buffer" if nc4 is None else "holds an NC4 buffer")
            )
        if self.ncc is not None and nc4 is not None:
            self.ncc.checked_state(nc4)
        self.stats.load_state_dict(stats)  # checks before it changes anything
        if self.ncc is not None and nc4 is not None:
            self.ncc.load_state_dict(nc4)
        self.computed_stats = None
        return self

    @property
    def needs_second_pass(self) -> bool:
        return self.ncc is not None and self.ncc.needs_second_pass

    def compute(
        self,
        second_pass: PairSource[torch.Tensor, torch.Tensor] | None = None,
        distributed: bool = False,
        group: ProcessGroup | None = None,
        nc4: bool = True,
        on_degenerate: str = "raise",
    ) -> NCMetrics:
        """The SPEC dict of the samples fed so far (the state is kept).

        ``distributed=True`` (torch.distributed initialised; collective, every rank of ``group``
        calls it): the statistics of all ranks are reduced into a copy
        (:meth:`ClassStats.reduced`; the local ones stay, so later batches and computes go on),
        NC4 counts each rank's own samples against those global means and sums the counts, so
        every rank returns the metrics of all the samples of all ranks.

        ``nc4=False`` leaves ``nc4_ncc_mismatch`` out (and needs no second pass).

        ``on_degenerate``: where the metrics are undefined (fewer than two classes seen, class
        means that do not separate, a classifier with NaN/inf), ``"raise"`` (default) raises
        (:class:`~ncfast.metrics.DegenerateFeaturesError` for the features) and ``"nan"``
        returns the row of NaN metrics with the reason in ``nc_undefined``
        (:func:`~ncfast.metrics.nc_metrics_or_nan`: the policy of logs and monitors).

        Args:
            second_pass: the batches again, as in :meth:`ncfast.nc4.NCCMismatch.compute`
                (needed only when the features exceeded ``memory_budget_bytes``).
            distributed: reduce over the ranks of ``group`` (collective).
            group: the process group (default: the world).
            nc4: compute ``nc4_ncc_mismatch``.
            on_degenerate: ``"raise"`` or ``"nan"``.

        Returns:
            the SPEC dict (:class:`ncfast.metrics.NCMetrics`).

        Example:
            >>> import torch, ncfast
            >>> measurement = ncfast.Measurement(3, 2)
            >>> measurement.update(torch.ones(4, 2), torch.zeros(4, dtype=torch.int64))
            >>> measurement.compute(on_degenerate="nan")["nc_undefined"]
            '1 of 3 classes had samples (at least two are needed; 4 samples)'
        """
        if on_degenerate not in ON_DEGENERATE:
            raise ValueError(
                f"Measurement.compute: on_degenerate must be one of {ON_DEGENERATE}, got "
                f"{on_degenerate!r}"
            )
        stats = self.stats.reduced(group) if distributed else self.stats
        self.computed_stats = stats
        nan = on_degenerate == "nan"
        if nan and undefined_reason(stats, self.weight, self.bias) is not None:
            return nc_metrics_or_nan(stats, self.weight, self.bias, self.weight_decay)
        mismatch = None
        if self.ncc is not None and nc4:
            counts = torch.stack(self.ncc.count(stats, second_pass))
            if distributed:
                import torch.distributed as dist

                dist.all_reduce(counts, group=group)
            mismatch = mismatch_fraction(counts[0], counts[1], stats)
        metrics = nc_metrics_or_nan if nan else nc_metrics
        return metrics(stats, self.weight, self.bias, self.weight_decay, ncc_mismatch=mismatch)


def _same_classifier(a: NCCMismatch, b: NCCMismatch) -> bool:
    return (
        a.weight.shape == b.weight.shape
        and torch.equal(a.weight, b.weight.to(a.weight.device))
        and torch.equal(a.bias, b.bias.to(a.bias.device))
    )


def scalars(metrics: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    """Every number of a SPEC dict as ``{prefix + key: float}``, for loggers: a vector value
    (``snr_singular_values``, a tensor or list) becomes ``{key}/1``, ``{key}/2``, … (j from 1,
    as ncfast's logs and plots count singular values); 0-d tensors and bools become floats.
    Text values (``nc_undefined``, the reason metrics are NaN) are left out.

    Args:
        metrics: a SPEC dict (of :func:`ncfast.nc_metrics`, a monitor or a log row).
        prefix: put before every key (e.g. ``"val/"``).

    Returns:
        ``{name: float}``.

    Example:
        >>> import torch, ncfast
        >>> ncfast.scalars({"nc1": 0.5, "snr_singular_values": torch.tensor([3.0, 1.0])}, "val/")
        {'val/nc1': 0.5, 'val/snr_singular_values/1': 3.0, 'val/snr_singular_values/2': 1.0}
    """
    return flat_scalars(metrics, prefix, "scalars", text_allowed=True)


def flat_scalars(
    metrics: Mapping[str, object], prefix: str, where: str, text_allowed: bool
) -> dict[str, float]:
    """:func:`scalars`, with errors that name ``where``; text values raise unless allowed."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{where}: metrics must be a dict, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, str) and text_allowed:
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            value = value.item()
        if isinstance(value, numbers.Real):  # bool and numpy scalars included
            out[name] = _as_float(value)
            continue
        values = _vector(value)
        if values is None:
            raise TypeError(
                f"{where}: metrics[{key!r}] is a {type(value).__name__}; only numbers and 1-d "
                "sequences of numbers can be logged"
            )
        for j, v in enumerate(values, start=1):
            out[f"{name}/{j}"] = v
    return out


def _as_float(value: numbers.Real) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float64 (e.g. 10**400 in a hand-edited log)
        return -math.inf if value < 0 else math.inf


def _vector(value: object) -> list[float] | None:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            return None
        values: list[float] = value.detach().double().cpu().tolist()
        return values
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # a numpy array
        return [float(v) for v in value.tolist()] if value.ndim == 1 else None
    if isinstance(value, (list, tuple)) and all(
        v is None or isinstance(v, numbers.Real) for v in value
    ):
        return [math.nan if v is None else _as_float(v) for v in value]
    return None
