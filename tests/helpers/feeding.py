"""ncfast's accumulators fed with test data: one batch (``stats_from``, ``fed``) or a stream of
batches (``stream``)."""

from __future__ import annotations

import torch

import ncfast
from ncfast.stats import ClassStats


def stats_from(features, labels, num_classes: int, dim: int | None = None, **kwargs) -> ClassStats:
    """A ClassStats that has seen one batch (``update`` returns None, as torchmetrics' does)."""
    stats = ClassStats(num_classes, features.shape[1] if dim is None else dim, **kwargs)
    return fed(stats, features, labels)


def fed(stats: ClassStats, features: torch.Tensor, labels: torch.Tensor) -> ClassStats:
    """``stats`` after ``update(features, labels)`` (update returns None, as torchmetrics')."""
    stats.update(features, labels)
    return stats


def stream(features, labels, num_classes, batch_size, weight=None, bias=None, lam=0.0, **kw):
    """A Measurement fed ``features`` in consecutive batches of ``batch_size`` rows."""
    m = ncfast.Measurement(num_classes, features.shape[1], weight, bias, weight_decay=lam, **kw)
    for start in range(0, len(labels), batch_size):
        m.update(features[start : start + batch_size], labels[start : start + batch_size])
    return m
