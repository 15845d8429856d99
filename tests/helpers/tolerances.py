"""Error bounds of the comparisons the tests make, each from what is computed: float64
accumulations of N terms (N·eps of the terms' sizes) and the conditioning of the brute force."""

from __future__ import annotations

import math

import numpy as np
import torch

from tests.helpers import oracle

EPS = float(np.finfo(np.float64).eps)

# Keys that are cosines or ratios of norms of O(1) unit-scaled terms: their absolute rounding
# error is a few eps, which matters where the exact value is 0 (two balanced classes: equal
# norms, cosine exactly −1).
DIMENSIONLESS_ATOL = 100 * EPS


def stream_tolerances(
    features: torch.Tensor, labels: torch.Tensor, against_brute_force: bool = False
) -> tuple[float, float]:
    """Absolute error bounds (class means, Σ_W) for comparing two float64 accumulations of the
    same ``features``: two one-pass ncfast streams, or one and tests/helpers/oracle.py.

    ncfast: each deviation h − s from a class's shift rounds by eps·‖h‖ and the sums of N terms
    add N·eps of their terms (SPEC §1: errors scale with ‖h‖ times the spread, not ‖h‖²): means
    ≤ 2·eps·max‖h‖ + N·eps·max‖d‖, Σ_W ≤ 2·eps·max‖h‖·max‖d‖ + N·eps·max‖d‖² (d = h − μ_y).
    Merges and reductions re-express sums about another shift within the spread: terms of the
    same sizes. The brute force sums the features themselves: means ≤ N·eps·max‖h‖, and its
    h − μ_y inherit that: Σ_W ≤ 2·N·eps·max‖h‖·max‖d‖ + N·eps·max‖d‖².
    """
    x = features.to(torch.float64)
    means = torch.zeros(int(labels.max()) + 1, x.shape[1], dtype=torch.float64)
    means.index_add_(0, labels, x)
    means /= torch.bincount(labels).clamp(min=1)[:, None]
    size = float(x.norm(dim=1).max())
    dev = float((x - means[labels]).norm(dim=1).max())
    n = len(labels)
    ours = (2 * EPS * size + n * EPS * dev, 2 * EPS * size * dev + n * EPS * dev**2)
    if against_brute_force:
        theirs = (n * EPS * size, 2 * n * EPS * size * dev + n * EPS * dev**2)
    else:
        theirs = ours
    return ours[0] + theirs[0], ours[1] + theirs[1]


def oracle_rtol(features, labels, num_classes, lam=0.0) -> float:
    """Relative error bound for comparing with tests/helpers/oracle.py: N·eps·κ, with κ the larger
    of cond(Σ_W)·cond(M̄)² (the brute force accumulates N outer products, forms Σ_B's
    pseudo-inverse, which squares cond(M̄), and whitens by Σ_W^{-1/2}) and the condition of the
    uncentered (P+1) normal equations it solves for W̃_LS."""
    s = oracle.statistics(features.numpy(), labels.numpy(), num_classes)
    mbar_sv = np.linalg.svd(s["mbar"], compute_uv=False)
    mbar_sv = mbar_sv[mbar_sv > 1e-10 * mbar_sv[0]]
    kappa = np.linalg.cond(s["sigma_w"]) * (mbar_sv[0] / mbar_sv[-1]) ** 2
    _, normal_matrix, _ = oracle.least_squares(features.numpy(), labels.numpy(), num_classes, lam)
    kappa = max(kappa, np.linalg.cond(normal_matrix))
    rtol = len(labels) * EPS * kappa
    assert rtol < 1e-6, f"test data too ill-conditioned for a sharp check (rtol {rtol:.1e})"
    return rtol


U32 = 2.0**-24  # float32's unit roundoff (round to nearest): |fl32(x) − x| ≤ U32·|x|


def gamma(n: int, u: float) -> float:
    """γ_n(u) = n·u / (1 − n·u): the relative error bound of a sum of n products."""
    assert n * u < 1
    return n * u / (1 - n * u)


def fast_scatter_bound(centered: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """Elementwise bound [P, P] on |S_fast − S_exact|, the scatter of the ``fast`` precision
    policy against the ``exact`` one from the same float64 centred rows ``centered`` [N, P]
    streamed in batches of at most ``batch_rows`` rows (docs/precision.md):

        |ΔS| ≤ (2u + u² + γ_{B+1}(u)·(1 + u)²) · Σ_i |z_i||z_i|ᵀ,   u = U32

    2u + u²: rounding z_i to float32 (each factor by u); γ_B(u)(1 + u)²: the float32 sum of B
    products of rounded factors, in any order; the extra term of γ_{B+1} covers the addition
    of each batch's product into the float64 state and both policies' float64 sums over the
    batches (γ_K(u64) ≪ u32 for any K < 2²⁸ batches).
    """
    u = U32
    absolute = centered.to(torch.float64).abs()
    return (2 * u + u * u + gamma(batch_rows + 1, u) * (1 + u) ** 2) * (absolute.T @ absolute)


def documented_bound(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The threshold documented by ncfast.metrics.check_separation, from the statistics:
    2·√C·γ_{2·max n_c + 2}·max_c r_c with r_c² = ‖μ_c‖² + (N/n_c)·tr Σ_W."""
    x = features.double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    means = torch.stack([x[labels == c].mean(0) for c in range(num_classes)])
    trace_w = float((x - means[labels]).square().sum()) / len(labels)
    r = max(
        math.sqrt(float(means[c].square().sum()) + len(labels) / float(counts[c]) * trace_w)
        for c in range(num_classes)
    )
    terms = 2 * int(counts.max()) + 2
    return 2 * math.sqrt(num_classes) * terms * EPS / (1 - terms * EPS) * r
