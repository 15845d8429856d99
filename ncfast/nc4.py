"""NC4 (nearest-class-center mismatch) in the same pass as the class statistics.

NC4 compares each sample's classifier decision with its nearest class mean, and those means are
only known at the end of the pass. While the features fit ``memory_budget_bytes`` they are kept,
in their input dtype, on their own device for the duration of one measurement (never written to
disk or host memory) and NC4 is finished from them once the means are known. Past the budget the
buffer is dropped and :meth:`NCCMismatch.compute` asks for a second streaming pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from ncfast.backend import ops
from ncfast.backend.reference import count_invalid_rows_
from ncfast.checks import PairSource, check_classifier, check_int, iter_pairs
from ncfast.stats import ClassStats, InvalidStateError, check_batch

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes


class FeatureBuffer:
    """NC4's per-sample memory, the one implementation (:class:`NCCMismatch`, the torchmetrics
    metric): the features of a pass in their dtype on their device, with each batch's validity
    mask, up to ``budget`` bytes; past it everything is dropped and :attr:`overflowed` set (NC4
    then needs a second pass). ``features`` and ``valid`` are the lists given, held and changed
    in place (a torchmetrics metric's list states)."""

    def __init__(
        self,
        budget: int,
        features: list[torch.Tensor] | None = None,
        valid: list[torch.Tensor] | None = None,
        overflowed: bool = False,
    ) -> None:
        self.budget = budget
        self.features = [] if features is None else features
        self.valid = [] if valid is None else valid
        self.overflowed = overflowed
        self.nbytes = sum(_nbytes(f) for f in self.features)

    def fits(self, features: torch.Tensor) -> bool:
        """Whether :meth:`add` would keep ``features`` (known without a device sync)."""
        return not self.overflowed and self.nbytes + _nbytes(features) <= self.budget

    def add(self, features: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep a copy of ``features`` (detached) and their validity mask, or drop everything
        when the budget is exceeded."""
        if self.overflowed or features.shape[0] == 0:
            return
        if not self.fits(features):
            self.drop()
            return
        self.features.append(features.detach().clone())
        self.valid.append(valid)
        self.nbytes += _nbytes(features)

    def extend(
        self, features: list[torch.Tensor], valid: list[torch.Tensor], dropped: bool
    ) -> None:
        """Add another buffer's tensors (shared, not copied: they are never modified)."""
        if self.overflowed:
            return
        size = sum(_nbytes(f) for f in features)
        if dropped or self.nbytes + size > self.budget:
            self.drop()
            return
        self.features.extend(features)
        self.valid.extend(valid)
        self.nbytes += size

    def drop(self) -> None:
        self.clear()
        self.overflowed = True

    def clear(self) -> None:
        self.features.clear()
        self.valid.clear()
        self.nbytes = 0
        self.overflowed = False

    def pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return zip(self.features, self.valid, strict=True)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class NCCMismatch:
    """Streaming NC4: ``update(features, labels)`` per batch, then ``compute(stats)``.

    ``weight [C, P]`` and ``bias [C]`` are the classifier whose argmax is compared with the
    nearest class center; samples with invalid labels or non-finite features are ignored, as in
    :class:`~ncfast.stats.ClassStats`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        weight, bias = check_classifier(weight, bias, "NCCMismatch")
        budget = check_int(memory_budget_bytes, "memory_budget_bytes", 0, "NCCMismatch")
        self._setup(weight, bias, budget)

    @classmethod
    def of_checked(cls, weight: torch.Tensor, bias: torch.Tensor, budget: int) -> NCCMismatch:
        """An NCCMismatch of a classifier and budget its caller has checked
        (:func:`~ncfast.checks.check_classifier`), so they are checked once."""
        ncc = cls.__new__(cls)
        ncc._setup(weight, bias, budget)
        return ncc

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor, budget: int) -> None:
        self.num_classes, self.dim = weight.shape
        self.memory_budget_bytes = budget
        self.weight = weight.to(torch.float64)
        self.bias = bias.to(weight.device, torch.float64)
        self.buffer = FeatureBuffer(budget)

    @property
    def overflowed(self) -> bool:
        return self.buffer.overflowed

    @property
    def needs_second_pass(self) -> bool:
        """True once the features seen exceed the memory budget (known without a device sync)."""
        return self.buffer.overflowed

    def _valid(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return valid_rows(features, labels, self.num_classes)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        check_batch(features, labels, self.num_classes, self.dim, "NCCMismatch.update")
        self.add_checked(features, labels)

    def add_checked(
        self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """:meth:`update` of a batch already checked (``check_batch``); ``valid``: its
        validity mask when the caller has it (:func:`valid_rows`), so it is computed once."""
        if not self.buffer.fits(features):
            self.buffer.drop()
        elif features.shape[0]:
            self.buffer.add(features, self._valid(features, labels) if valid is None else valid)

    def count(
        self,
        stats: ClassStats,
        second_pass: PairSource[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mismatches, valid samples) of the samples this object saw, as device int64 scalars,
        with the means of ``stats``. :meth:`compute` divides them; a distributed measurement sums
        them over ranks first (the means then come from the all-reduced statistics).
        """
        # Read-only, as cached: nan_to_num(stats.class_means) would make two [C, P] copies
        # (docs/memory.md). Absent classes have zero rows.
        means = stats.finalized()[0]
        present = stats.present
        device = means.device
        weight, bias = self.weight.to(device), self.bias.to(device)
        pairs: Iterator[tuple[torch.Tensor, torch.Tensor]]
        if self.overflowed:
            if second_pass is None:
                raise ValueError(
                    "NCCMismatch.compute: the features exceeded memory_budget_bytes="
                    f"{self.memory_budget_bytes}, so NC4 needs a second pass: pass second_pass="
                    "an iterable (or a callable returning one) of (features, labels) batches"
                )
            pairs = (
                (features, self._valid(features, labels))
                for features, labels in self._checked(second_pass)
            )
        else:
            pairs = self.buffer.pairs()
        return count_mismatches(pairs, weight, bias, means, present)

    def _checked(
        self, second_pass: PairSource[torch.Tensor, torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        where = "NCCMismatch.compute(second_pass)"
        for features, labels in iter_pairs(second_pass, where, "features"):
            check_batch(features, labels, self.num_classes, self.dim, where)
            yield features, labels

    def compute(
        self,
        stats: ClassStats,
        second_pass: PairSource[torch.Tensor, torch.Tensor] | None = None,
    ) -> float:
        """Fraction of valid samples whose classifier decision differs from the nearest class
        center, with the means of ``stats`` (which must come from the same samples).

        ``second_pass`` (needed only when :attr:`needs_second_pass`): an iterable of
        ``(features, labels)`` batches over the same samples, or a callable returning one.
        """
        mismatches, total = self.count(stats, second_pass)
        return mismatch_fraction(mismatches, total, stats)

    def reset(self) -> None:
        self.buffer.clear()

    def merge(self, other: NCCMismatch) -> None:
        """Add the buffered samples of ``other`` (same classifier: the caller checks), within
        this object's budget; past it, both buffers are dropped and NC4 needs a second pass."""
        if not isinstance(other, NCCMismatch):
            raise TypeError(f"NCCMismatch.merge: other must be an NCCMismatch, got {type(other)}")
        theirs = other.buffer
        self.buffer.extend(list(theirs.features), list(theirs.valid), theirs.overflowed)

    def state_dict(self) -> dict[str, list[torch.Tensor] | bool]:
        """The buffer (features in their dtype and validity masks, on their device; the
        tensors themselves, not copies: they are never modified) and the overflow flag."""
        return {
            "features": list(self.buffer.features),
            "valid": list(self.buffer.valid),
            "overflowed": self.buffer.overflowed,
        }

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Restore what :meth:`state_dict` returned (for a classifier of the same ``dim``); on
        :class:`~ncfast.stats.InvalidStateError` nothing is changed."""
        features, valid, overflowed = self.checked_state(state_dict)
        self.buffer = FeatureBuffer(self.memory_budget_bytes, features, valid, overflowed)

    def checked_state(
        self, state_dict: Mapping[str, object]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
        """(features, validity masks, overflowed) of a :meth:`state_dict`, checked against this
        object's ``dim``; raises :class:`~ncfast.stats.InvalidStateError`."""
        where = "NCCMismatch.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise InvalidStateError(f"{where}: the NC4 state must be a dict")
        missing = [k for k in ("features", "valid", "overflowed") if k not in state_dict]
        if missing:
            raise InvalidStateError(f"{where}: state_dict lacks {missing}")
        features, valid = check_buffer(state_dict["features"], state_dict["valid"], self.dim, where)
        overflowed = state_dict["overflowed"]
        if not isinstance(overflowed, bool):
            raise InvalidStateError(f"{where}: 'overflowed' must be True or False")
        return features, valid, overflowed


def count_mismatches(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    weight: torch.Tensor,
    bias: torch.Tensor,
    means: torch.Tensor,
    present: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mismatches, valid samples) over ``(features, valid mask)`` pairs, as int64 scalars on
    the device of ``means`` (float64 ``weight``, ``bias`` and ``means`` on that device)."""
    device = means.device
    mismatches = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    for features, valid in pairs:
        features, valid = features.to(device), valid.to(device)
        mismatches += ops.ncc_mismatch_count(features, valid, weight, bias, means, present)
        total += valid.sum()
    return mismatches, total


def valid_rows(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """bool ``[B]``: samples with a label in range and finite features (no host sync)."""
    scratch = torch.zeros(2, dtype=torch.int64, device=features.device)
    return count_invalid_rows_(features, labels, num_classes, scratch)


def mismatch_fraction(mismatches: torch.Tensor, total: torch.Tensor, stats: ClassStats) -> float:
    """mismatches / total, after checking that ``total`` is the number of samples in ``stats``."""
    n_total = int(total)
    if n_total != stats.num_samples:
        raise ValueError(
            f"NCCMismatch.compute: saw {n_total} valid samples but the statistics hold "
            f"{stats.num_samples}; NC4 needs the means of the same samples"
        )
    return int(mismatches) / max(n_total, 1)


def check_buffer(
    features: object, valid: object, dim: int, where: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A saved NC4 buffer, checked: ``features`` a list of ``[B, dim]`` tensors, ``valid`` one
    bool ``[B]`` mask per tensor; raises :class:`~ncfast.stats.InvalidStateError`."""
    feature_list, valid_list = _tensors(features), _tensors(valid)
    if (
        feature_list is None
        or valid_list is None
        or len(feature_list) != len(valid_list)
        or any(f.dim() != 2 or f.shape[1] != dim for f in feature_list)
        or any(
            v.dtype != torch.bool or tuple(v.shape) != (f.shape[0],)
            for f, v in zip(feature_list, valid_list, strict=True)
        )
    ):
        raise InvalidStateError(
            f"{where}: the NC4 features must be [B, {dim}] tensors, each with a bool [B] "
            "validity mask"
        )
    return feature_list, valid_list


def _tensors(value: object) -> list[torch.Tensor] | None:
    """``value`` as a list of tensors, or None when it is not a sequence of tensors."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in value):
        return None
    return list(value)
