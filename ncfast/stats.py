"""Streamed, exact per-class statistics (SPEC §1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ncfast.backend import ops
from ncfast.backend.precision import check_precision, resolve_precision
from ncfast.backend.reference import count_invalid_rows_
from ncfast.backend.state import INVALID_LABEL, INVALID_NONFINITE, STATE_KEYS, new_state
from ncfast.checks import check_int, check_label_dtype
from ncfast.errors import NCFastError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_ON_INVALID = ("raise", "skip")


class InvalidInputError(NCFastError, ValueError):
    """Raised when streamed samples had labels out of range or non-finite features."""


class InvalidStateError(NCFastError, ValueError):
    """A saved or merged accumulator state that cannot be statistics of these classes and
    features: missing keys, other shapes (another C or P), NaN/inf sums, or counts that are
    negative or not whole numbers. Raised before anything is changed."""


def check_state(
    state: Mapping[str, object], num_classes: int, dim: int, where: str
) -> dict[str, torch.Tensor]:
    """The accumulator tensors of ``state`` (keys :data:`~ncfast.backend.reference.STATE_KEYS`),
    checked to be statistics of ``num_classes`` classes of ``dim`` features, as int64 counts
    and float64 sums on their device; raises :class:`InvalidStateError` naming what is wrong.

    Reads the values (one host synchronisation): for merges and loads, never per batch.
    """
    if not isinstance(state, Mapping):
        raise InvalidStateError(f"{where}: the state must be a dict, got {type(state).__name__}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise InvalidStateError(f"{where}: the state lacks {missing}")
    shapes = {
        "counts": (num_classes,),
        "shift": (num_classes, dim),
        "sums": (num_classes, dim),
        "scatter": (dim, dim),
        "invalid": (2,),
    }
    tensors = {k: state[k] for k in STATE_KEYS}
    got = {k: getattr(v, "shape", type(v).__name__) for k, v in tensors.items()}
    if any(
        not isinstance(v, torch.Tensor) or tuple(v.shape) != shapes[k] for k, v in tensors.items()
    ):
        given = ", ".join(f"{k} {_shape_text(v)}" for k, v in got.items())
        wanted = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
        raise InvalidStateError(
            f"{where}: the state's tensors have shapes {given}; statistics of "
            f"num_classes={num_classes}, dim={dim} need {wanted}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        assert isinstance(value, torch.Tensor)
        out[key] = _checked_values(key, value, where)
    return out


def _shape_text(shape: object) -> str:
    return str(list(shape)) if isinstance(shape, torch.Size) else f"({shape})"


def _checked_values(key: str, value: torch.Tensor, where: str) -> torch.Tensor:
    """``value`` as int64 counts (``counts``, ``invalid``) or float64 sums, checked."""
    if value.is_complex() or value.dtype == torch.bool:
        raise InvalidStateError(f"{where}: {key!r} has dtype {value.dtype}; expected real numbers")
    if key in ("counts", "invalid"):
        as_float = value.to(torch.float64)
        whole = (as_float >= 0) & (as_float <= 2.0**62) & (as_float == as_float.round())
        if not bool(whole.all()):
            bad = as_float[~whole][:3].tolist()
            raise InvalidStateError(
                f"{where}: {key!r} must hold counts (whole numbers in [0, 2**62]), got {bad}"
            )
        return value.to(torch.int64)
    if not bool(torch.isfinite(value).all()):
        raise InvalidStateError(f"{where}: {key!r} contains NaN or inf")
    return value.to(torch.float64)


def check_batch(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, dim: int, where: str
) -> None:
    """Host-side shape/dtype checks of one batch; never reads tensor values."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{where}: features must be a torch.Tensor, got {type(features).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{where}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(
            f"{where}: features must have shape [B, {dim}] (dim={dim}), got {list(features.shape)}"
        )
    if not features.is_floating_point():
        raise TypeError(
            f"{where}: features must be a floating dtype (float16, bfloat16, float32, float64), "
            f"got {features.dtype}"
        )
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{where}: labels must have shape [B] = [{features.shape[0]}] to match features, "
            f"got {list(labels.shape)}"
        )
    check_label_dtype(labels, "labels", where)
    if labels.device != features.device:
        raise ValueError(
            f"{where}: labels are on {labels.device} but features on {features.device}"
        )
    if num_classes < 1:
        raise ValueError(f"{where}: num_classes must be ≥ 1, got {num_classes}")


class ClassStats:
    """One-pass accumulator of class counts, means and within-class scatter, in float64.

    ``update(features [B, P], labels [B])`` takes any float dtype on any device and keeps no
    per-sample data. On CUDA it never synchronises with the host: invalid samples (label outside
    ``[0, num_classes)``, non-finite features) are counted on the device and reported when a
    result is first read, as :class:`InvalidInputError`, unless ``on_invalid="skip"``, which drops
    them and counts them in :attr:`skipped`. On the CPU the check is free and happens at once; the
    offending batch is then not added.

    Args:
        num_classes: C, the number of classes; labels lie in ``0..C-1``.
        dim: P, the feature size (features are ``[B, P]``).
        device: where the state lives; ``None``: the device of the first batch.
        on_invalid: ``"raise"`` (default) or ``"skip"`` (drop and count invalid samples).
        precision: the policy of the per-batch scatter product (docs/precision.md):
            ``"exact"`` (float64), ``"fast"`` (IEEE float32 product of the class-centred rows,
            added into the float64 state) or ``"auto"`` (per device: exact on CPUs and GPUs
            with fast float64, else fast); :attr:`resolved_precision` says which one runs.

    Example:
        >>> import torch, ncfast
        >>> features = torch.tensor([[2.0, 0.0], [2.2, 0.2], [0.0, 2.0], [0.2, 2.2]])
        >>> stats = ncfast.ClassStats(num_classes=2, dim=2)
        >>> stats.update(features, torch.tensor([0, 0, 1, 1]))
        >>> stats.counts
        tensor([2, 2])
        >>> stats.class_means
        tensor([[2.1000, 0.1000],
                [0.1000, 2.1000]], dtype=torch.float64)
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: torch.device | str | None = None,
        on_invalid: str = "raise",
        precision: str = "auto",
    ) -> None:
        self.num_classes = check_int(num_classes, "num_classes", 1, "ClassStats")
        self.precision = check_precision(precision, "ClassStats")
        self.dim = check_int(dim, "dim", 1, "ClassStats")
        if on_invalid not in _ON_INVALID:
            raise ValueError(
                f"ClassStats: on_invalid must be one of {_ON_INVALID}, got {on_invalid!r}"
            )
        self.on_invalid = on_invalid
        # What an InvalidInputError tells the user to do, in the terms of the surface they
        # called (NCMonitor, the Lightning callback, ...: each sets its own, see skip_advice).
        self.invalid_advice = skip_advice("ClassStats(..., on_invalid='skip')", ".skipped")
        self._state: dict[str, torch.Tensor] | None = None
        # (class means, Σ_W) of the current state, until it changes.
        self._final: tuple[torch.Tensor, torch.Tensor] | None = None
        if device is not None:
            self._allocate(torch.device(device))

    # ------------------------------------------------------------------ state
    def _allocate(self, device: torch.device) -> dict[str, torch.Tensor]:
        self._state = new_state(self.num_classes, self.dim, device)
        self._final = None
        return self._state

    @property
    def resolved_precision(self) -> str | None:
        """The policy of the product on the state's device (``exact``/``fast``); None before
        the state exists."""
        device = self.device
        return None if device is None else resolve_precision(self.precision, device)

    @property
    def device(self) -> torch.device | None:
        return None if self._state is None else self._state["counts"].device

    def reset(self) -> ClassStats:
        """Forget everything seen; keep device and settings."""
        if self._state is not None:
            for t in self._state.values():
                t.zero_()
            self._final = None
        return self

    def _require_state(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            return self._allocate(torch.device("cpu"))
        return self._state

    # ----------------------------------------------------------------- update
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch to the statistics (nothing per-sample is kept).

        Args:
            features: ``[B, P]``, any float dtype, on the statistics' device.
            labels: ``[B]`` integer class indices.

        Returns:
            None (as torchmetrics' ``update``).

        Example:
            >>> import torch, ncfast
            >>> stats = ncfast.ClassStats(2, 3)
            >>> stats.update(torch.ones(4, 3), torch.tensor([0, 1, 1, 1]))
            >>> stats.counts.tolist()
            [1, 3]
        """
        check_batch(features, labels, self.num_classes, self.dim, "ClassStats.update")
        self.update_checked(features, labels)

    def update_checked(
        self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """:meth:`update` of a batch its caller has checked (:func:`check_batch`); ``valid``:
        the rows' validity mask (:func:`ncfast.nc4.valid_rows`) when the caller computed it,
        so that the CPU's immediate check does not compute it again."""
        state = self._allocate(features.device) if self._state is None else self._state
        device = state["counts"].device
        if features.device != device:
            raise ValueError(
                f"ClassStats.update: features are on {features.device} but the statistics live "
                f"on {device}; move the batch or create ClassStats(device=...)"
            )
        if features.shape[0] == 0:
            return
        if device.type == "cpu" and self.on_invalid == "raise":
            # Free on the CPU: reject the batch before it touches the state.
            if valid is None or not bool(valid.all()):
                bad = torch.zeros(2, dtype=torch.int64)
                count_invalid_rows_(features, labels, self.num_classes, bad)
                if bad.any():
                    raise InvalidInputError(self._describe_invalid(bad, "this batch"))
        counts, shift, sums, scatter, invalid = (state[k] for k in STATE_KEYS)
        fast = resolve_precision(self.precision, device) == "fast"
        ops.update_stats_(features, labels, counts, shift, sums, scatter, invalid, fast=fast)
        self._final = None

    # ---------------------------------------------------------- merge, reduce
    def merge(self, other: ClassStats) -> ClassStats:
        """Add the statistics of ``other`` (same classes and dim) to these, exactly: the
        result is that of one stream over both sets of samples.

        Args:
            other: a ClassStats of the same ``num_classes`` and ``dim``.

        Returns:
            these statistics (merged in place).

        Example:
            >>> import torch, ncfast
            >>> features = torch.tensor([[2.0, 0.0], [2.2, 0.2], [0.0, 2.0], [0.2, 2.2]])
            >>> labels = torch.tensor([0, 0, 1, 1])
            >>> first, second = ncfast.ClassStats(2, 2), ncfast.ClassStats(2, 2)
            >>> first.update(features[:3], labels[:3])
            >>> second.update(features[3:], labels[3:])
            >>> first.merge(second).counts.tolist()
            [2, 2]
        """
        if not isinstance(other, ClassStats):
            raise TypeError(f"merge: other must be a ClassStats, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(
                f"merge: other has num_classes={other.num_classes}, dim={other.dim}; "
                f"these statistics have num_classes={self.num_classes}, dim={self.dim}"
            )
        if other._state is None:
            return self
        self._state = merged_state(self._require_state(), other._state)
        self._final = None
        return self

    def reduced(self, group: ProcessGroup | None = None) -> ClassStats:
        """A new ClassStats holding the statistics of all the data the processes of ``group``
        saw, as one stream would; these statistics are left as they are, so updating and
        reducing again (every epoch, say) goes on working. Collective: every rank calls it
        (torch.distributed must be initialised). Exact as :meth:`merge`: see
        :func:`all_reduced_state`.

        Args:
            group: the process group (default: the world).

        Returns:
            a new ClassStats of all ranks' samples, the same on every rank.

        Example:
            On every rank, after ``torch.distributed.init_process_group``:

            >>> metrics = ncfast.nc_metrics(stats.reduced())  # doctest: +SKIP
        """
        out = ClassStats(
            self.num_classes, self.dim, on_invalid=self.on_invalid, precision=self.precision
        )
        out.invalid_advice = self.invalid_advice
        out._state = all_reduced_state(self._require_state(), group, "ClassStats.reduced")
        return out

    def all_reduce(self, group: ProcessGroup | None = None) -> ClassStats:
        """In place: make these statistics, on every process of ``group``, those of all the
        data the processes saw (:meth:`reduced` keeps the local ones). Collective."""
        self._state = all_reduced_state(self._require_state(), group, "ClassStats.all_reduce")
        self._final = None
        return self

    @classmethod
    def wrap(
        cls, state: Mapping[str, torch.Tensor], on_invalid: str = "raise", precision: str = "auto"
    ) -> ClassStats:
        """A ClassStats working on the tensors of ``state`` (the accumulator layout of
        :mod:`ncfast.backend.state`, keys :data:`~ncfast.backend.state.STATE_KEYS`) in
        place, without copying them: for holders of the state such as the torchmetrics Metric.
        Updates write into those tensors; results are computed from them."""
        counts = state["counts"]
        stats = cls(
            counts.shape[0], state["shift"].shape[1], on_invalid=on_invalid, precision=precision
        )
        stats._state = {k: state[k] for k in STATE_KEYS}
        return stats

    # ------------------------------------------------------- (de)serialisation
    def state_dict(self) -> dict[str, torch.Tensor | int | str]:
        """Copies of the accumulator tensors (:data:`~ncfast.backend.state.STATE_KEYS`)
        and the settings ``num_classes``, ``dim``, ``on_invalid``."""
        state = self._require_state()
        out: dict[str, torch.Tensor | int | str] = {k: v.clone() for k, v in state.items()}
        out.update(num_classes=self.num_classes, dim=self.dim, on_invalid=self.on_invalid)
        return out

    def load_state_dict(self, state_dict: Mapping[str, object]) -> ClassStats:
        """Restore what :meth:`state_dict` returned (same ``num_classes`` and ``dim``) into these
        statistics, on their device. The state is checked first (:func:`check_state`); on
        :class:`InvalidStateError` these statistics are unchanged."""
        where = "ClassStats.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise InvalidStateError(
                f"{where}: state_dict must be a dict, got {type(state_dict).__name__}"
            )
        missing = [k for k in ("num_classes", "dim") if k not in state_dict]
        if missing:
            raise InvalidStateError(f"{where}: state_dict lacks {missing}")
        if (state_dict["num_classes"], state_dict["dim"]) != (self.num_classes, self.dim):
            raise InvalidStateError(
                f"{where}: state is for num_classes={state_dict['num_classes']}, "
                f"dim={state_dict['dim']}; these statistics have "
                f"num_classes={self.num_classes}, dim={self.dim}"
            )
        checked = check_state(state_dict, self.num_classes, self.dim, where)
        state = self._require_state()
        for k in STATE_KEYS:
            state[k].copy_(checked[k].to(state[k].device))
        self._final = None
        return self

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, object], device: torch.device | str | None = None
    ) -> ClassStats:
        """A new ClassStats holding what :meth:`state_dict` returned, on ``device`` (default:
        where the saved tensors are)."""
        counts = state_dict["counts"]
        if device is None and isinstance(counts, torch.Tensor):
            device = counts.device
        on_invalid = state_dict.get("on_invalid", "raise")
        stats = cls(
            check_int(state_dict["num_classes"], "num_classes", 1, "from_state_dict"),
            check_int(state_dict["dim"], "dim", 1, "from_state_dict"),
            device=device,
            on_invalid=str(on_invalid),
        )
        return stats.load_state_dict(state_dict)

    # ------------------------------------------------------------- validation
    @property
    def skipped(self) -> dict[str, int]:
        """Samples left out so far: ``{"label_out_of_range": n, "non_finite": n}``."""
        invalid = self._require_state()["invalid"].tolist()
        return {
            "label_out_of_range": invalid[INVALID_LABEL],
            "non_finite": invalid[INVALID_NONFINITE],
        }

    def check(self) -> None:
        """Raise :class:`InvalidInputError` if invalid samples arrived (``on_invalid='raise'``)."""
        invalid = self._require_state()["invalid"]
        if self.on_invalid == "raise" and bool(invalid.any()):
            raise InvalidInputError(self._describe_invalid(invalid.cpu(), "the streamed batches"))

    # ---------------------------------------------------------------- results
    def finalized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(class means ``[C, P]`` with zero rows for absent classes, Σ_W ``[P, P]``), float64,
        computed once per state and cached: the tensors themselves, not copies, so callers
        must not modify them. For metric code that reads large statistics without the
        copies (and NaN rows) of :attr:`class_means` and :attr:`sigma_w` (docs/memory.md)."""
        if self._final is None:
            self.check()
            s = self._require_state()
            self._final = ops.finalize_stats(s["counts"], s["shift"], s["sums"], s["scatter"])
        return self._final

    @property
    def counts(self) -> torch.Tensor:
        """n_c, int64 ``[C]``."""
        self.check()
        return self._require_state()["counts"].clone()

    @property
    def num_samples(self) -> int:
        """N = Σ n_c (valid samples only)."""
        return int(self.counts.sum())

    @property
    def present(self) -> torch.Tensor:
        """bool ``[C]``: classes with at least one sample."""
        return self.counts > 0

    @property
    def classes_present(self) -> int:
        return int(self.present.sum())

    @property
    def priors(self) -> torch.Tensor:
        """π_c = n_c / N, float64 ``[C]``."""
        n = self.counts.to(torch.float64)
        return n / n.sum().clamp(min=1)

    @property
    def class_means(self) -> torch.Tensor:
        """μ_c, float64 ``[C, P]``; NaN rows for absent classes."""
        means, _ = self.finalized()
        return torch.where(self.present[:, None], means, torch.full_like(means, float("nan")))

    @property
    def global_mean(self) -> torch.Tensor:
        """μ_G = Σ_c π_c μ_c (sample-weighted), float64 ``[P]``."""
        means, _ = self.finalized()
        return self.priors @ means

    @property
    def centered_means(self) -> torch.Tensor:
        """M̄ = [μ_c − μ_G] over present classes, float64 ``[P, C_present]``."""
        means, _ = self.finalized()
        return (means[self.present] - self.global_mean).T

    @property
    def sigma_w(self) -> torch.Tensor:
        """Σ_W = (1/N) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ, float64 ``[P, P]``."""
        return self.finalized()[1].clone()

    @property
    def sigma_b(self) -> torch.Tensor:
        """Σ_B = M̄ M̄ᵀ / C over present classes, float64 ``[P, P]``."""
        mbar = self.centered_means
        return mbar @ mbar.T / mbar.shape[1]

    @property
    def sigma_t(self) -> torch.Tensor:
        """Σ_T = (1/N) Σ_i (h_i − μ_G)(h_i − μ_G)ᵀ = Σ_W + Σ_c π_c (μ_c − μ_G)(μ_c − μ_G)ᵀ."""
        mbar = self.centered_means
        pi = self.priors[self.present]
        return self.sigma_w + (mbar * pi) @ mbar.T

    def _describe_invalid(self, invalid: torch.Tensor, where: str) -> str:
        bad_labels, non_finite = (int(v) for v in invalid.tolist())
        problems = []
        if bad_labels:
            problems.append(f"{bad_labels} sample(s) with labels outside [0, {self.num_classes})")
        if non_finite:
            problems.append(f"{non_finite} sample(s) with non-finite (NaN/inf) features")
        return (
            f"{' and '.join(problems)} in {where}; they were left out of the statistics. "
            + self.invalid_advice
        )

    def __repr__(self) -> str:
        where = "unallocated" if self._state is None else str(self.device)
        return f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, {where})"


def skip_advice(skipping_call: str, skipped: str) -> str:
    """The advice of an :class:`InvalidInputError` for a surface whose users skip invalid
    samples with ``skipping_call`` and read their counts from ``skipped``."""
    return f"Fix the input, or pass {skipping_call} to skip and count them (see {skipped})."


def _means_or_shift(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-class means where a class was seen, the (unused) shift elsewhere."""
    n = state["counts"].to(torch.float64)
    return state["shift"] + state["sums"] / n.clamp(min=1)[:, None]


def _divide_or_keep(
    weighted: torch.Tensor, counts: torch.Tensor, fallback: torch.Tensor
) -> torch.Tensor:
    n = counts.to(torch.float64)
    return torch.where((n > 0)[:, None], weighted / n.clamp(min=1)[:, None], fallback)


def _reshifted(state: dict[str, torch.Tensor], new_shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """A new state holding the samples of ``state`` about ``new_shift`` (``state`` untouched)."""
    sums, scatter = ops.reshift(
        state["counts"], state["shift"], state["sums"], state["scatter"], new_shift
    )
    return {
        "counts": state["counts"].clone(),
        "shift": new_shift.clone(),
        "sums": sums,
        "scatter": scatter,
        "invalid": state["invalid"].clone(),
    }


def merged_state(
    mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state (keys of :data:`~ncfast.backend.state.STATE_KEYS`) holding the samples
    of both, on ``mine``'s device; the inputs are left as they are.

    Exact: both are re-expressed about the pooled class means, which lie within the class's
    spread of either's shift, so the re-shift adds terms of the size of the scatter (never of
    ‖μ_c‖², which would cancel), and the sums then add as sums about one shift.
    """
    theirs = {k: v.to(mine["counts"].device) for k, v in theirs.items()}
    mine_means = _means_or_shift(mine)
    weighted = mine_means * mine["counts"].to(torch.float64)[:, None]
    weighted += _means_or_shift(theirs) * theirs["counts"].to(torch.float64)[:, None]
    common = _divide_or_keep(weighted, mine["counts"] + theirs["counts"], mine_means)
    out = _reshifted(mine, common)
    sums, scatter = ops.reshift(
        theirs["counts"], theirs["shift"], theirs["sums"], theirs["scatter"], common
    )
    out["sums"] += sums
    out["scatter"] += scatter
    out["counts"] += theirs["counts"]
    out["invalid"] += theirs["invalid"]
    return out


def all_reduced_state(
    state: dict[str, torch.Tensor],
    group: ProcessGroup | None = None,
    where: str = "all_reduce",
) -> dict[str, torch.Tensor]:
    """A new state holding the samples of ``state`` on every rank of ``group``; ``state`` is
    left as it is. Collective (every rank calls it); the same on every rank.

    Three all-reduces of sums, no gather: the counts, the count-weighted class means (C×P), then
    each rank re-expresses its sums and scatter about the pooled class means (the common shift)
    and the P×P scatters are summed. Exact as :func:`merged_state`: every rank's shift lies
    within its class's spread of the pooled mean.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{where} needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group)"
        )
    counts = state["counts"].clone()
    dist.all_reduce(counts, group=group)
    weighted = _means_or_shift(state) * state["counts"].to(torch.float64)[:, None]
    dist.all_reduce(weighted, group=group)
    common = _divide_or_keep(weighted, counts, state["shift"])
    out = _reshifted(state, common)
    for key in ("sums", "scatter", "invalid"):
        dist.all_reduce(out[key], group=group)
    out["counts"] = counts
    return out
