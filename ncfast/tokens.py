"""Token-level Neural Collapse: features ``[B, T, P]`` and labels ``[B, T]`` of a sequence model.

For a language model the classes are the vocabulary: every position of every sequence is a
sample whose class is the token that follows it (Wu & Papyan, "Linguistic Collapse", NeurIPS
2024). This module is a thin layer over :class:`ncfast.Measurement`: it flattens the positions
into rows, drops the ignored ones, and feeds the rows to the usual one-pass statistics, so every
number is the SPEC's (docs/SPEC.md) on the flattened samples.

- :func:`next_token_labels`: the labels of a causal LM, aligned with its positions (the shift
  done here: the feature at position t predicts the token at t + 1).
- :func:`token_rows`: ``(features [N, P], labels [N])`` of the positions that are not ignored.
- :class:`TokenMeasurement`: ``update(features [B, T, P], labels [B, T])`` per batch, then
  ``compute()``.

Ignored positions (label ``ignore_index``, −100 by default as in torch's ``cross_entropy`` and
Hugging Face) are neither counted nor "invalid": they never reach the statistics. Labels outside
``[0, vocab_size)`` that are not ``ignore_index`` are invalid input, as in
:class:`~ncfast.stats.ClassStats`. The vocabulary size sizes the accumulators (``C × P`` float64
sums, see docs/memory.md); the metrics are over the classes present (SPEC §1), and
:attr:`TokenMeasurement.counts` holds the count of every class.

Dropping the ignored positions is a boolean-mask selection: its output size depends on the
labels' values, so on CUDA it synchronises with the host once per batch (a few microseconds, far
below a language model's forward pass). Rewriting ignored labels to an out-of-range value would
avoid it but count them as invalid, which they are not.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ncfast.checks import PairSource, check_int, check_label_dtype, iter_pairs
from ncfast.measure import Measurement
from ncfast.metrics import NCMetrics
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET
from ncfast.stats import ClassStats, InvalidInputError

IGNORE_INDEX = -100


def next_token_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Labels ``[B, T]`` aligned with a causal LM's positions: ``labels[:, t] = input_ids[:, t+1]``.

    The last position has no next token and gets ``ignore_index``; so does every position t
    where ``attention_mask`` is 0 at t (a padding position's feature) or at t + 1 (a padding
    target), so left and right padding both drop out. ``input_ids`` may also be Hugging Face
    ``labels`` (the unshifted token ids with ``ignore_index`` where the loss is off): their
    ignored entries stay ignored, and the result is what the model's own loss compares with its
    logits (Hugging Face shifts inside the loss; ncfast's features are per position, so the shift
    is done here, once). No host synchronisation.
    """
    where = "next_token_labels"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"{where}: input_ids must be a [B, T] tensor of token ids, got "
            f"{list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}"
        )
    check_label_dtype(input_ids, "input_ids", where)
    ignore_index = check_int(ignore_index, "ignore_index", -(2**62), where)
    labels = torch.full_like(input_ids, ignore_index, dtype=torch.int64)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"{where}: attention_mask must be a tensor of the shape of input_ids "
                f"{list(input_ids.shape)}, got "
                f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}"
            )
        attended = attention_mask.to(input_ids.device) != 0
        keep = torch.zeros_like(attended)
        keep[:, :-1] = attended[:, :-1] & attended[:, 1:]
        labels.masked_fill_(~keep, ignore_index)
    return labels


def _check_token_batch(
    features: torch.Tensor, labels: torch.Tensor, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``features [B, T, P]`` (or ``[N, P]``) and ``labels [B, T]`` (``[N]``), flattened."""
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"{where}: features and labels must be torch.Tensors, got "
            f"{type(features).__name__} and {type(labels).__name__}"
        )
    if features.dim() not in (2, 3) or labels.shape != features.shape[:-1]:
        raise ValueError(
            f"{where}: features must be [B, T, P] with labels [B, T] (or [N, P] with [N]); got "
            f"features {list(features.shape)} and labels {list(labels.shape)}"
        )
    check_label_dtype(labels, "labels", where)
    if labels.device != features.device:
        raise ValueError(
            f"{where}: labels are on {labels.device} but features on {features.device}"
        )
    return features.reshape(-1, features.shape[-1]), labels.reshape(-1)


def token_rows(
    features: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose label is not ``ignore_index``, as rows: ``(features [N, P],
    labels [N])`` from ``features [B, T, P]`` and ``labels [B, T]`` (``[N, P]`` and ``[N]`` are
    taken as they are). One host synchronisation on CUDA (the selection's size)."""
    flat_features, flat_labels = _check_token_batch(features, labels, "token_rows")
    keep = flat_labels != ignore_index
    return flat_features[keep], flat_labels[keep]


class TokenMeasurement:
    """:class:`ncfast.Measurement` of token positions: ``update(features [B, T, P], labels
    [B, T])`` for every batch of a pass, then :meth:`compute`.

    ``vocab_size`` is the number of classes (the rows of the output head); ``weight
    [vocab_size, P]`` and ``bias`` are the head (``bias=None``: a head without bias, e.g. one
    tied to the input embedding). Positions labelled ``ignore_index`` are skipped (see the module
    docstring); the other arguments are :class:`ncfast.Measurement`'s. With ``nc4`` the features
    of the pass are buffered up to ``memory_budget_bytes`` (1 GiB: 350k tokens at P = 768 in
    float32), past which :meth:`compute` needs a ``second_pass``.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        ignore_index: int = IGNORE_INDEX,
        weight_decay: float = 0.0,
        device: torch.device | str | None = None,
        on_invalid: str = "raise",
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self.vocab_size = check_int(vocab_size, "vocab_size", 1, "TokenMeasurement")
        self.ignore_index = check_int(ignore_index, "ignore_index", -(2**62), "TokenMeasurement")
        if 0 <= self.ignore_index < self.vocab_size:
            raise ValueError(
                f"TokenMeasurement: ignore_index={ignore_index} is a token id of the vocabulary "
                f"[0, {vocab_size}); use a value outside it (-100 by default)"
            )
        self.measurement = Measurement(
            vocab_size,
            dim,
            weight,
            bias,
            weight_decay=weight_decay,
            device=device,
            on_invalid=on_invalid,
            memory_budget_bytes=memory_budget_bytes,
        )
        self._ignored: torch.Tensor | None = None

    @property
    def stats(self) -> ClassStats:
        """The class statistics of the measured positions (:class:`ncfast.ClassStats`)."""
        return self.measurement.stats

    @property
    def counts(self) -> torch.Tensor:
        """Tokens measured per class, int64 ``[vocab_size]`` (the Zipf distribution of the
        targets; classes with count 0 are left out of the metrics)."""
        return self.stats.counts

    @property
    def num_tokens(self) -> int:
        """Positions measured (not ignored, valid)."""
        return self.stats.num_samples

    @property
    def ignored_tokens(self) -> int:
        """Positions skipped because their label was ``ignore_index``."""
        return 0 if self._ignored is None else int(self._ignored)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch of positions: ``features [B, T, P]``, ``labels [B, T]`` (already
        aligned, e.g. by :func:`next_token_labels`), or ``[N, P]`` and ``[N]``."""
        where = "TokenMeasurement.update"
        flat_features, flat_labels = _check_token_batch(features, labels, where)
        keep = flat_labels != self.ignore_index
        ignored = (~keep).sum()
        self._ignored = ignored if self._ignored is None else self._ignored + ignored
        rows, row_labels = flat_features[keep], flat_labels[keep]
        if row_labels.device.type == "cpu" and self.measurement.stats.on_invalid == "raise":
            self._check_vocabulary(row_labels, where)
        self.measurement.update(rows, row_labels)

    def _check_vocabulary(self, labels: torch.Tensor, where: str) -> None:
        """Free on the CPU: labels out of the vocabulary get a message about tokens (on CUDA
        :class:`~ncfast.stats.ClassStats` counts them on the device and raises when read)."""
        bad = (labels < 0) | (labels >= self.vocab_size)
        if bool(bad.any()):
            example = int(labels[bad][0])
            raise InvalidInputError(
                f"{where}: labels must be token ids in [0, vocab_size={self.vocab_size}) or "
                f"ignore_index={self.ignore_index}; {int(bad.sum())} label(s) are not, e.g. "
                f"{example} (does the tokenizer's vocabulary match the model's output head?)"
            )

    def _rows(
        self, batches: PairSource[torch.Tensor, torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for features, labels in iter_pairs(batches, "TokenMeasurement.compute", "features"):
            flat_features, flat_labels = _check_token_batch(
                features, labels, "TokenMeasurement.compute(second_pass)"
            )
            keep = flat_labels != self.ignore_index
            yield flat_features[keep], flat_labels[keep]

    def compute(
        self,
        second_pass: PairSource[torch.Tensor, torch.Tensor] | None = None,
        distributed: bool = False,
        nc4: bool = True,
        on_degenerate: str = "raise",
    ) -> NCMetrics:
        """The SPEC dict of the measured positions (:meth:`ncfast.Measurement.compute`, whose
        ``on_degenerate`` this passes on); ``second_pass`` yields the same ``(features
        [B, T, P], labels [B, T])`` batches again (or is a callable returning such an
        iterable), needed only past the NC4 buffer."""
        if second_pass is None:
            return self.measurement.compute(
                None, distributed=distributed, nc4=nc4, on_degenerate=on_degenerate
            )
        source = second_pass

        def rows() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return self._rows(source)  # a fresh iterator per call, as a DataLoader gives

        return self.measurement.compute(
            rows, distributed=distributed, nc4=nc4, on_degenerate=on_degenerate
        )

    def reset(self) -> None:
        """Forget every position (a new pass); keep the head and settings."""
        self.measurement.reset()
        self._ignored = None
