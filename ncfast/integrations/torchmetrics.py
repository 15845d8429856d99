"""Neural Collapse as a ``torchmetrics.Metric``: ``update(features, labels)``, ``compute()``,
``reset()``, in a ``MetricCollection``, synced across processes without touching local state::

    from ncfast.integrations.torchmetrics import NeuralCollapse

    nc = NeuralCollapse(num_classes=10, dim=512, classifier=model.fc).to(device)
    for x, y in val_loader:
        h = model.features(x)                   # penultimate features [B, 512]
        nc.update(h, y)
    metrics = nc.compute()                      # the SPEC dict: nc1, nc2_*, ..., snr_*
    nc.reset()

torchmetrics is optional (``pip install 'ncfast[torchmetrics]'``).

**States.** The streamed statistics of :class:`ncfast.ClassStats` (SPEC §1): class counts,
per-class shifts, sums and the P×P scatter about the shifts, in float64. ``update`` runs the
same fused op as ``ClassStats.update``; nothing per-sample is kept except the NC4 buffer below.

**Distributed sync, exact.** The shifts differ per rank (each is the class mean of the first
batch that rank saw), so the sums and scatters of two ranks cannot simply be added. The sync
(:func:`ncfast.stats.all_reduced_state`) all-reduces the counts and the count-weighted class
means (C×P), re-expresses each rank's sums and scatter about those pooled means (the common
shift) and all-reduces them: one all-reduce of the P×P scatter, no gather of world×P² states.
Every rank's shift lies within its class's spread of the pooled mean, so the re-shift adds
terms of the size of the scatter and never cancels terms of size ‖μ_c‖² (which would lose
everything near collapse, SPEC §1): the result is that of one stream over all samples, to
float64 rounding of the within-class spread. The local state is cached and restored around the
sync by torchmetrics, so ``compute()`` can be called every epoch while accumulation goes on.
``merge_state`` uses the same exact merge. ``dist_sync_fn`` is not used: the sync talks to
``torch.distributed`` directly (``process_group`` is honoured).

**NC4** (``nc4_ncc_mismatch``) compares each sample's classifier decision with its nearest
class mean, known only at the end. With a classifier and ``nc4=True`` the features of the pass
are buffered on their device in their dtype, up to ``memory_budget_bytes`` per process (as
:class:`ncfast.Measurement`; ``compute_on_cpu=True`` moves them to host memory); the sync counts
each rank's samples against the global means and sums the counts. Past the budget the buffer is
dropped and ``nc4_ncc_mismatch`` is NaN (with a warning): a Metric has no second pass. Pass
``nc4=False`` to keep nothing per-sample.

``forward(features, labels)`` (``metric(h, y)``) only updates and returns None: NC metrics of
one batch (a few samples per class) mean little and cost a P×P eigendecomposition each.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ncfast.backend.state import STATE_KEYS
from ncfast.checks import check_int, check_weight_decay
from ncfast.errors import user_stacklevel
from ncfast.metrics import ON_DEGENERATE, nc_metrics, nc_metrics_or_nan
from ncfast.nc4 import (
    DEFAULT_MEMORY_BUDGET,
    FeatureBuffer,
    check_buffer,
    count_mismatches,
    mismatch_fraction,
    valid_rows,
)
from ncfast.stats import (
    ClassStats,
    InvalidStateError,
    all_reduced_state,
    check_batch,
    check_state,
    merged_state,
    skip_advice,
)

try:
    from torchmetrics import Metric
except ImportError as exc:  # an optional dependency: say which extra brings it
    raise ImportError(
        "ncfast.integrations.torchmetrics needs the torchmetrics package, which is not "
        "installed: pip install 'ncfast[torchmetrics]' (or pip install torchmetrics)"
    ) from exc

__all__ = ["NeuralCollapse"]

_NC4_KEYS = ("nc4_features", "nc4_valid")


class NeuralCollapse(Metric):
    """Every SPEC §2–§4 key of the features streamed through ``update(features, labels)``.

    - ``num_classes``, ``dim``: C and P (features ``[B, P]``, labels ``[B]`` in ``0..C-1``).
    - ``classifier``: ``None`` (feature-only keys), the model's final ``nn.Linear`` (its
      weight and bias are read at each ``compute``, not copied: the metric does not own it),
      a weight tensor ``[C, P]``, or a ``(weight, bias)`` pair (copied into buffers that move
      with ``.to()``).
    - ``weight_decay``: λ of HPD22 Eq. 3 for the MSE decomposition
      (:func:`ncfast.mse_lambda` converts an SGD weight decay).
    - ``nc4``, ``memory_budget_bytes``: see the module docstring; ``on_invalid`` as in
      :class:`ncfast.ClassStats` (``"skip"`` drops and counts samples with bad labels or
      non-finite features).
    - other keyword arguments go to ``torchmetrics.Metric`` (``sync_on_compute``,
      ``process_group``, ``compute_on_cpu``, ...).

    ``compute()`` returns the dict of :func:`ncfast.nc_metrics`, every scalar a 0-d float64
    tensor on the metric's device (counts too, for loggers) and ``snr_singular_values`` a 1-d
    float64 tensor. Degenerate features raise :class:`ncfast.DegenerateFeaturesError`; with
    ``on_degenerate="nan"`` every metric is NaN instead and ``nc_undefined`` (a string) says why
    (as :meth:`ncfast.Measurement.compute`).

    Example:
        >>> import torch
        >>> from ncfast.integrations.torchmetrics import NeuralCollapse
        >>> features = torch.tensor(
        ...     [[2.0, 0.0], [2.2, 0.2], [0.0, 2.0], [0.2, 2.2], [-2.0, -2.0], [-2.2, -1.8]]
        ... )
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> metric = NeuralCollapse(num_classes=3, dim=2, classifier=torch.nn.Linear(2, 3))
        >>> metric.update(features[:3], labels[:3])
        >>> metric.update(features[3:], labels[3:])
        >>> round(float(metric.compute()["nc1"]), 4)
        0.0027
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        dim: int,
        classifier: nn.Linear | torch.Tensor | tuple | None = None,
        weight_decay: float = 0.0,
        *,
        nc4: bool = True,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
        on_invalid: str = "raise",
        on_degenerate: str = "raise",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = check_int(num_classes, "num_classes", 1, "NeuralCollapse")
        self.dim = check_int(dim, "dim", 1, "NeuralCollapse")
        self.weight_decay = check_weight_decay(weight_decay, "NeuralCollapse")
        self.memory_budget_bytes = check_int(
            memory_budget_bytes, "memory_budget_bytes", 0, "NeuralCollapse"
        )
        ClassStats(self.num_classes, self.dim, on_invalid=on_invalid)  # checks on_invalid
        self.on_invalid = on_invalid
        if on_degenerate not in ON_DEGENERATE:
            raise ValueError(
                f"NeuralCollapse: on_degenerate must be one of {ON_DEGENERATE}, got "
                f"{on_degenerate!r}"
            )
        self.on_degenerate = on_degenerate
        self._linear = _classifier(classifier, self.num_classes, self.dim, self)
        self.nc4 = bool(nc4) and classifier is not None
        self._nc4_dropped = False  # read per batch without a device sync; nc4_counts[0] mirrors it
        c, p = self.num_classes, self.dim
        f64 = torch.float64
        # Registered for .to(), reset() and state_dict(), without a dist_reduce_fx:
        # _sync_dist and _reduce_states below do the reductions (exact merges about a common
        # shift), torchmetrics' reduce functions are never called.
        self.add_state("counts", torch.zeros(c, dtype=torch.int64))
        self.add_state("shift", torch.zeros(c, p, dtype=f64))
        self.add_state("sums", torch.zeros(c, p, dtype=f64))
        self.add_state("scatter", torch.zeros(p, p, dtype=f64))
        self.add_state("invalid", torch.zeros(2, dtype=torch.int64))
        if self.nc4:
            self.add_state("nc4_features", [])
            self.add_state("nc4_valid", [])
            # [buffer dropped (0/1), mismatches, valid samples] (int64); the counts are filled
            # by the sync (all ranks' samples against the global means), -1 until then.
            self.add_state("nc4_counts", torch.tensor([0, -1, -1]))

    # ---------------------------------------------------------------- update
    def _stats(self) -> ClassStats:
        """A ClassStats working on this metric's state tensors (no copy)."""
        stats = ClassStats.wrap({k: getattr(self, k) for k in STATE_KEYS}, self.on_invalid)
        stats.invalid_advice = skip_advice(
            "NeuralCollapse(..., on_invalid='skip')", "the metric's `invalid` state"
        )
        return stats

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        check_batch(features, labels, self.num_classes, self.dim, "NeuralCollapse.update")
        if features.device != self.counts.device:
            raise ValueError(
                f"NeuralCollapse.update: features are on {features.device} but the metric is "
                f"on {self.counts.device}; move the metric with .to({str(features.device)!r})"
            )
        features = features.detach()
        buffer = self._nc4_buffer() if self.nc4 else None
        valid = None
        if buffer is not None and buffer.fits(features):
            valid = valid_rows(features, labels, self.num_classes)  # once, for both
        self._stats().update_checked(features, labels, valid)
        if buffer is not None:
            if valid is not None:
                buffer.add(features, valid)
            elif features.shape[0]:
                buffer.drop()
            self._note_dropped(buffer)

    def _nc4_buffer(self) -> FeatureBuffer:
        """The NC4 buffer (:class:`ncfast.nc4.FeatureBuffer`) on this metric's list states."""
        return FeatureBuffer(
            self.memory_budget_bytes, self.nc4_features, self.nc4_valid, self._nc4_dropped
        )

    def _note_dropped(self, buffer: FeatureBuffer) -> None:
        """Mirror a dropped buffer in the host flag and ``nc4_counts[0]`` (synced state)."""
        if buffer.overflowed and not self._nc4_dropped:
            self._nc4_dropped = True
            self.nc4_counts = torch.tensor([1, -1, -1], device=self.nc4_counts.device)

    def reset(self) -> None:
        super().reset()
        self._nc4_dropped = False

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Update only (see the module docstring); returns None."""
        self.update(features, labels)

    # ------------------------------------------------------- merge and sync
    def _reduce_states(self, incoming_state: dict) -> None:
        """``merge_state``: add another metric's samples exactly (about a common shift). The
        incoming state is checked first; on an error this metric is unchanged."""
        where = "NeuralCollapse.merge_state"
        theirs = self._checked_state(incoming_state, where)
        mine = {k: getattr(self, k) for k in STATE_KEYS}
        merged = merged_state(mine, theirs)
        for key, value in merged.items():
            setattr(self, key, value)
        if self.nc4:
            self._nc4_dropped = self._nc4_dropped or bool(self.nc4_counts[0])
            buffer = self._nc4_buffer()
            buffer.extend(
                list(incoming_state["nc4_features"]),
                list(incoming_state["nc4_valid"]),
                bool(incoming_state["nc4_counts"][0]),
            )
            self._note_dropped(buffer)

    def _checked_state(self, state: Mapping[str, object], where: str) -> dict[str, torch.Tensor]:
        """The statistics of another metric's ``state``, checked to fit this metric (classes,
        dim, finite sums, whole counts, the NC4 buffer when this metric keeps one)."""
        theirs = check_state(state, self.num_classes, self.dim, where)
        if not self.nc4:
            return theirs
        missing = [k for k in (*_NC4_KEYS, "nc4_counts") if k not in state]
        if missing:
            raise InvalidStateError(
                f"{where}: this metric measures NC4 (it has a classifier and nc4=True) but the "
                f"incoming state lacks {missing}: merge metrics made with the same classifier "
                "and nc4 setting"
            )
        check_buffer(state["nc4_features"], state["nc4_valid"], self.dim, where)
        counts = state["nc4_counts"]
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (3,):
            raise InvalidStateError(f"{where}: 'nc4_counts' must be a tensor of 3 counts")
        return theirs

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """``load_state_dict`` of persistent states (``metric.persistent(True)``): checked to
        fit this metric before torchmetrics sets any of them."""
        names = [k for k in STATE_KEYS if prefix + k in state_dict]
        if names:
            state = {k: state_dict[prefix + k] for k in STATE_KEYS if prefix + k in state_dict}
            if self.nc4:
                state.update(
                    (k, state_dict[prefix + k])
                    for k in (*_NC4_KEYS, "nc4_counts")
                    if prefix + k in state_dict
                )
            self._checked_state(state, "NeuralCollapse.load_state_dict")
        restores_nc4 = self.nc4 and prefix + "nc4_counts" in state_dict
        super()._load_from_state_dict(  # torchmetrics pops the states it sets
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if restores_nc4:
            # The restored buffer, held to this metric's budget (new lists: those loaded are
            # the caller's); a dropped one stays dropped and later updates buffer nothing more.
            restored = list(self.nc4_features), list(self.nc4_valid), bool(self.nc4_counts[0])
            self.nc4_features, self.nc4_valid = [], []
            self._nc4_dropped = False
            buffer = self._nc4_buffer()
            buffer.extend(*restored)
            self._note_dropped(buffer)

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        """All ranks' samples, exactly: see the module docstring. Collective."""
        import torch.distributed as dist

        group = process_group or self.process_group
        local = {k: getattr(self, k) for k in STATE_KEYS}
        reduced = all_reduced_state(local, group, "NeuralCollapse sync")
        for key, value in reduced.items():
            setattr(self, key, value)
        if self.nc4:
            counts = self._local_nc4_counts()
            dist.all_reduce(counts, group=group)
            self.nc4_counts = counts

    def _local_nc4_counts(self) -> torch.Tensor:
        """[buffer dropped on some rank, mismatches, valid samples] of this rank's buffer
        against the means of the current (local or synced) statistics."""
        device = self.counts.device
        dropped = int(bool(self.nc4_counts[0]))
        if dropped or int(self.counts.sum()) == 0:
            return torch.tensor([dropped, 0, 0], device=device)
        stats = self._stats()
        means, _ = stats.finalized()
        weight, bias = self._weight_bias(device)
        pairs = self._nc4_buffer().pairs()
        mismatches, total = count_mismatches(pairs, weight, bias, means, stats.present)
        return torch.stack([torch.zeros_like(total), mismatches, total])

    def _copy_state_dict(self) -> dict:
        """The cache torchmetrics keeps across a sync: the NC4 buffer's tensors are shared,
        not cloned (the sync never modifies them), so a sync does not double its memory."""
        cache = {}
        for attr in self._defaults:
            value = getattr(self, attr)
            cache[attr] = list(value) if attr in _NC4_KEYS else value.detach().clone()
        return cache

    # --------------------------------------------------------------- compute
    def _weight_bias(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._linear is not None:
            linear = self._linear[0]
            weight = linear.weight.detach()
            bias = linear.bias.detach() if linear.bias is not None else None
        else:
            weight, bias = self.classifier_weight, self.classifier_bias
        bias = weight.new_zeros(self.num_classes) if bias is None else bias
        return weight.to(device, torch.float64), bias.to(device, torch.float64)

    @property
    def has_classifier(self) -> bool:
        return self._linear is not None or hasattr(self, "classifier_weight")

    def compute(self) -> dict:
        stats = self._stats()
        weight = bias = None
        if self.has_classifier:
            weight, bias = self._weight_bias(stats.device)
        mismatch = None
        if self.nc4:
            # After a sync, the counts of every rank; without one, this process's.
            counts = self.nc4_counts if self._is_synced else self._local_nc4_counts()
            if bool(counts[0]):
                warnings.warn(
                    "NeuralCollapse: the features of this pass exceeded memory_budget_bytes="
                    f"{self.memory_budget_bytes}, so nc4_ncc_mismatch is NaN; raise the budget "
                    "or pass nc4=False",
                    RuntimeWarning,
                    stacklevel=user_stacklevel("torchmetrics"),
                )
                mismatch = math.nan
            else:
                mismatch = mismatch_fraction(counts[1], counts[2], stats)
        metrics = nc_metrics_or_nan if self.on_degenerate == "nan" else nc_metrics
        result = metrics(stats, weight, bias, self.weight_decay, ncc_mismatch=mismatch)
        device = stats.device
        return {
            key: value
            if isinstance(value, str)
            else torch.as_tensor(value, dtype=torch.float64).to(device)
            for key, value in result.items()
        }


def _classifier(classifier, num_classes: int, dim: int, metric: NeuralCollapse):
    """Register tensors as buffers of ``metric``; an nn.Linear is referenced, not owned (a
    submodule would put its parameters into the metric's, and into the model's twice)."""
    if classifier is None:
        return None
    if isinstance(classifier, nn.Linear):
        if (classifier.out_features, classifier.in_features) != (num_classes, dim):
            raise ValueError(
                f"NeuralCollapse: classifier maps {classifier.in_features} features to "
                f"{classifier.out_features} outputs; expected dim={dim} to num_classes="
                f"{num_classes}"
            )
        return (classifier,)  # a tuple: not registered as a submodule
    if isinstance(classifier, torch.Tensor):
        weight, bias = classifier, None
    elif isinstance(classifier, (tuple, list)) and len(classifier) == 2:
        weight, bias = classifier
    else:
        raise TypeError(
            "NeuralCollapse: classifier must be None, an nn.Linear, a weight tensor [C, P] or a "
            f"(weight, bias) pair, got {type(classifier).__name__}"
        )
    if not isinstance(weight, torch.Tensor) or weight.shape != (num_classes, dim):
        raise ValueError(
            f"NeuralCollapse: classifier weight must have shape [num_classes, dim] = "
            f"[{num_classes}, {dim}], got {list(getattr(weight, 'shape', [])) or weight!r}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (num_classes,)):
        raise ValueError(
            f"NeuralCollapse: classifier bias must have shape [{num_classes}] or be None, got "
            f"{list(getattr(bias, 'shape', [])) or type(bias).__name__}"
        )
    metric.register_buffer("classifier_weight", weight.detach().clone(), persistent=False)
    metric.register_buffer(
        "classifier_bias", None if bias is None else bias.detach().clone(), persistent=False
    )
    return None
