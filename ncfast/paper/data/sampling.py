"""Seeded, version-stable orderings, balanced per-class subsets and exact per-channel statistics."""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a bijection of uint64 (array arithmetic wraps without warnings).
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def seeded_order(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``seed`` alone.

    Built from an integer hash rather than a library RNG, so it is the same on every platform,
    device and numpy/torch version (a dataset subset must never change under a user's feet).
    """
    key = _mix64(np.array([(int(seed) * _GOLDEN) & _MASK64], dtype=np.uint64))
    keys = _mix64(np.arange(n, dtype=np.uint64) + key)  # distinct: both steps are bijections
    return np.argsort(keys, kind="stable")


def balanced_indices(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of each class in ``seeded_order``, ascending.

    Every class must have at least ``per_class`` samples (the caller checks and explains).
    """
    order = seeded_order(labels.shape[0], seed)
    ordered_labels = labels[order]
    chosen = [order[ordered_labels == c][:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def channel_mean_std(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) standard deviation of uint8 images ``[N, C, H, W]``.

    In units of pixels scaled to [0, 1] (as after torchvision's ToTensor). Exact: a 256-bin
    histogram per channel, then float64 moments, so no large float copy is ever made.
    """
    values = torch.arange(256, dtype=torch.float64, device=images.device) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = (hist * values).sum() / total
        var = (hist * (values - mean) ** 2).sum() / total
        means.append(mean)
        stds.append(var.sqrt())
    return torch.stack(means).float(), torch.stack(stds).float()
