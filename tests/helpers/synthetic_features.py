"""Synthetic float64 features with known structure and bounded conditioning (``make_data``),
for comparing ncfast with tests/helpers/oracle.py and with itself."""

from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64

# Bounded conditioning of the test data (make_data): the within-class mixing matrix has singular
# values log-spaced in [1/MIX_CONDITION, 1], so cond(Σ_W) = MIX_CONDITION² = 16 exactly (the
# within-class deviations are whitened before mixing), and the nonzero singular values of M̄
# are log-spaced over a ratio MEANS_CONDITION = 10. A Gaussian mixing matrix, as before, is
# nearly singular now and then (condition 2.6e9 seen), which made exact checks flaky.
MIX_CONDITION = 4.0
MEANS_CONDITION = 10.0


def orthonormal_columns(rows: int, cols: int, g: torch.Generator, against=None) -> torch.Tensor:
    """Haar-random ``[rows, cols]`` with orthonormal columns, orthogonal to ``against`` if given."""
    extra = 0 if against is None else 1
    a = torch.randn(rows, cols + extra, generator=g, dtype=F64)
    if against is not None:
        a[:, 0] = against
    return torch.linalg.qr(a).Q[:, extra:]


def make_data(
    counts, dim, seed, spread=1.0, offset=None, mean_scale=3.0, mix_condition=MIX_CONDITION
):
    """Features with class means of RMS norm mean_scale·√P, within-class spread ``spread``, a
    common offset of norm ``offset`` (default: the size of a class mean), and bounded
    conditioning: cond(Σ_W) = mix_condition², nonzero singular values of M̄ spread over
    MEANS_CONDITION (rank min(C_present − 1, P)). Returns (features, labels, weight, bias)."""
    g = torch.Generator().manual_seed(seed)
    num_classes = len(counts)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    num_samples = len(labels)
    present = torch.tensor(counts) > 0
    num_present = int(present.sum())
    priors = torch.tensor(counts, dtype=F64)[present] / num_samples
    # Centered means M̄ = Q diag(s) Rᵀ with πᵀQ = 0, so the prior-weighted mean of the rows is 0
    # and the measured M̄ has exactly the singular values s.
    rank = min(num_present - 1, dim)
    singular = torch.logspace(0, -np.log10(MEANS_CONDITION), rank, dtype=F64)
    singular *= mean_scale * (dim * num_present / singular.square().sum()) ** 0.5
    centered = orthonormal_columns(num_present, rank, g, against=priors) * singular
    means = torch.randn(num_classes, dim, generator=g, dtype=F64) * mean_scale  # absent: unused
    means[present] = centered @ orthonormal_columns(dim, rank, g).T
    offset = mean_scale * dim**0.5 if offset is None else offset
    common = torch.randn(dim, generator=g, dtype=F64)
    common = common / common.norm() * offset
    # Within-class deviations with zero class means and pooled covariance exactly the identity
    # on a subspace of dimension min(N − C, P) (all of R^P when N − C ≥ P), then mixed.
    deviations = torch.randn(num_samples, dim, generator=g, dtype=F64)
    for k in range(num_classes):
        deviations[labels == k] -= deviations[labels == k].mean(0)
    u, _, vh = torch.linalg.svd(deviations, full_matrices=False)
    kept = min(num_samples - num_present, dim)
    deviations = u[:, :kept] @ vh[:kept] * num_samples**0.5
    mix_singular = torch.logspace(0, -np.log10(mix_condition), dim, dtype=F64)
    mix = orthonormal_columns(dim, dim, g) * mix_singular @ orthonormal_columns(dim, dim, g).T
    features = means[labels] + common + deviations @ mix * spread
    weight = torch.randn(num_classes, dim, generator=g, dtype=F64)
    bias = torch.randn(num_classes, generator=g, dtype=F64)
    return features, labels, weight, bias
