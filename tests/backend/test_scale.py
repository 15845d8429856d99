"""Large C and P: no per-batch [C, P], no C×C for many classes, no [P, C] right factor, and the
memory-saving code paths (tiled symmetrisation, tiled inverse square root, QR before the SVD)
against direct float64 computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ncfast
from ncfast.backend import reference
from tests.helpers import oracle
from tests.helpers.feeding import stats_from
from tests.helpers.synthetic_features import make_data
from tests.helpers.tolerances import EPS, oracle_rtol, stream_tolerances


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op allocates (outputs that are not views of, or in-place
    results on, its inputs)."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                if t.numel() > self.numel:
                    self.numel, self.op = t.numel(), func
        return out


def test_update_allocates_nothing_of_size_classes_by_dim(seed):
    num_classes, dim, batch = 2000, 64, 64
    g = torch.Generator().manual_seed(seed)
    stats = ncfast.ClassStats(num_classes, dim)
    labels = torch.randint(0, 40, (batch,), generator=g)
    stats.update(torch.randn(batch, dim, generator=g), labels)  # allocates the state
    with LargestAllocation() as probe:
        stats.update(torch.randn(batch, dim, generator=g), labels.flip(0))
    # The largest temporaries are [B, P] rows and [C] counters, never [C, P].
    assert probe.numel <= max(batch * dim, num_classes) < num_classes * dim, (probe.numel, probe.op)


def test_update_leaves_float64_input_untouched(seed):
    """The update works in place on its own float64 copy, never on the caller's batch."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(40, 5, generator=g, dtype=torch.float64)
    features[3, 1] = float("nan")
    labels = torch.randint(0, 3, (40,), generator=g)
    before = features.clone()
    stats_from(features, labels, 3, 5, on_invalid="skip")
    torch.testing.assert_close(features, before, equal_nan=True, rtol=0, atol=0)


def test_update_with_repeated_new_classes_and_skipped_rows_matches_numpy(seed):
    """First-seen shifts come from the batch's own class means; rows of one class in one batch,
    invalid rows mapped to class 0 and classes first seen later must all come out exact."""
    features, labels, _, _ = make_data([30, 25, 40, 35, 20], 6, seed, offset=50.0)
    bad = labels.clone()
    bad[::7] = -1  # dropped
    bad[3::11] = 9  # out of range, dropped
    stats = ncfast.ClassStats(5, 6, on_invalid="skip")
    order = torch.argsort(labels, stable=True)  # classes arrive one after another
    for chunk in torch.split(order, 17):
        stats.update(features[chunk], bad[chunk])
    keep = (bad >= 0) & (bad < 5)
    expected = oracle.statistics(features[keep].numpy(), labels[keep].numpy(), 5)
    atol_means, atol_sigma = stream_tolerances(features[keep], labels[keep], True)
    np.testing.assert_allclose(
        stats.class_means.numpy(), expected["means"], rtol=0, atol=atol_means
    )
    np.testing.assert_allclose(stats.sigma_w.numpy(), expected["sigma_w"], rtol=0, atol=atol_sigma)
    assert stats.num_samples == int(keep.sum())


@pytest.mark.parametrize("size, tile", [(10, 3), (1030, 512), (7, 512)])
def test_symmetrize_in_tiles_equals_half_sum(size, tile, seed):
    a = torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = (a + a.T) / 2  # exact equality: one commutative addition and an exact halving
    reference.symmetrize_(a, tile)
    assert torch.equal(a, a.T)
    torch.testing.assert_close(a, expected, rtol=0, atol=0)


def test_finalize_and_inverse_square_root_beyond_one_tile(seed):
    """P = 560 > 512 rows per tile: Σ_W and Σ_W^{-1/2} against numpy."""
    g = torch.Generator().manual_seed(seed)
    dim, n = 560, 800
    labels = torch.randint(0, 3, (n,), generator=g)
    features = torch.randn(n, dim, generator=g, dtype=torch.float64) + labels[:, None] * 0.5
    stats = ncfast.ClassStats(3, dim)
    for chunk in torch.split(torch.arange(n), 300):
        stats.update(features[chunk], labels[chunk])
    expected = oracle.statistics(features.numpy(), labels.numpy(), 3)
    sigma_w = stats.sigma_w
    assert torch.equal(sigma_w, sigma_w.T)
    # Entrywise, as tests.tolerances.stream_tolerances: each entry averages N products of
    # deviations |d| ≤ max|h − μ_y|, both sides' sums err by ≤ N·eps·max|d|²; the centering adds
    # 2·eps·max|h|·max|d| here and 2·N·eps·max|h|·max|d| in the brute force (means from raw sums).
    x = features.numpy()
    size, dev = np.abs(x).max(), np.abs(x - expected["means"][labels.numpy()]).max()
    atol = 2 * n * EPS * dev**2 + 2 * (1 + n) * EPS * size * dev
    np.testing.assert_allclose(sigma_w.numpy(), expected["sigma_w"], rtol=0, atol=atol)
    inv_sqrt, rank = reference.psd_inv_sqrt(sigma_w)
    expected_inv, expected_rank = oracle.inv_sqrt(expected["sigma_w"])
    assert rank == expected_rank == dim
    # Two backward-stable eigendecompositions: Σ_W^{-1/2} errs by ≤ P·cond(Σ_W)·eps of its norm.
    evals = np.linalg.eigvalsh(expected["sigma_w"])
    atol_inv = 2 * dim * EPS * evals[-1] / evals[0] * evals[0] ** -0.5
    np.testing.assert_allclose(inv_sqrt.numpy(), expected_inv, rtol=0, atol=atol_inv)


@pytest.mark.parametrize("dim, classes", [(30, 200), (50, 20)])
def test_left_singular_pairs_match_svd(dim, classes, seed):
    """C > P goes through R of M̄ᵀ = QR; U and s as the direct SVD's (signs free), rank-deficient
    M̄ (centered: rank ≤ C − 1) keeps only the nonzero directions."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(dim, classes, generator=g, dtype=torch.float64)
    mbar = raw - raw.mean(dim=1, keepdim=True)
    u, s = reference.left_singular_pairs(mbar)
    u_ref, s_ref, _ = np.linalg.svd(mbar.numpy(), full_matrices=False)
    rank = min(dim, classes - 1)
    assert s.numel() == rank
    # Backward-stable SVDs (and QR): each singular value within P·eps·σ_max, each singular
    # vector within P·eps·σ_max / (gap to its neighbours) (Weyl, Wedin).
    s_ref = s_ref[:rank]
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=0, atol=2 * dim * EPS * s_ref[0])
    gaps = np.abs(np.diff(s_ref))
    gap = np.minimum(np.append(gaps, s_ref[-1]), np.insert(gaps, 0, np.inf))
    overlap = np.abs(u.T.numpy() @ u_ref[:, :rank])
    atol = 2 * dim * EPS * s_ref[0] / gap
    assert (np.abs(np.diag(overlap) - 1.0) <= atol).all()
    off_diagonal = overlap - np.diag(np.diag(overlap))
    assert (off_diagonal <= atol[:, None] + atol[None, :]).all()


def test_nc1_with_more_classes_than_dimensions_matches_dense_pinv(seed):
    features, labels, _, _ = make_data([6] * 150, 20, seed)
    stats = stats_from(features, labels, 150, 20)
    got = ncfast.nc_metrics(stats)
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), 150)
    np.testing.assert_allclose(got["nc1"], expected["nc1"], rtol=oracle_rtol(features, labels, 150))
    assert got["sigma_b_rank"] == 20


def test_pairwise_cosines_in_tiles_never_form_classes_by_classes(seed):
    """C = 4500: the default tile keeps every block under 2^24 entries, so no C×C matrix (and for
    C ≥ 20,000 none either: blocks are ⌊2^24 / C⌋ × C). Against a direct dense computation."""
    classes, dim = 4500, 6
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    vectors[:, 0] += 0.3  # cosines not centered on -1/(C-1)
    with LargestAllocation() as probe:
        std, max_angle = reference.pairwise_cosine_stats(vectors)
    assert probe.numel <= 1 << 24 < classes * classes, (probe.numel, probe.op)
    unit = vectors.numpy() / np.linalg.norm(vectors.numpy(), axis=1, keepdims=True)
    cos = unit @ unit.T
    upper = cos[np.triu_indices(classes, 1)]
    # Sums over all C(C−1)/2 pairs, in different orders: ≤ pairs·eps relative (recursive
    # summation's worst case; the variance is not small against the squares summed).
    rtol = len(upper) * EPS
    np.testing.assert_allclose(std, np.std(upper, ddof=1), rtol=rtol)
    np.testing.assert_allclose(max_angle, np.mean(np.abs(upper + 1 / (classes - 1))), rtol=rtol)
    assert (1 << 24) // 20_000 * 20_000 < 20_000**2


def test_mse_decomposition_with_many_classes_never_forms_classes_by_classes(seed):
    """C = 4200 > 4096: the fit terms Σ_c π_c ‖W μ_c + b − e_c‖² run in class tiles; against the
    dense uncentered formulas of SPEC §3 (numpy, with the C×C identity)."""
    classes, dim, lam = 4200, 4, 0.05
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    priors = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5
    priors /= priors.sum()
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    sigma_w = mix @ mix.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    bias = torch.randn(classes, generator=g, dtype=torch.float64)
    with LargestAllocation() as probe:
        got = reference.mse_decomposition(weight, bias, means, priors, sigma_w, lam)
    assert probe.numel <= 1 << 24 < classes * classes, (probe.numel, probe.op)

    mu, pi, sw = means.numpy(), priors.numpy(), sigma_w.numpy()
    eye = np.eye(classes)

    def loss(w, b):
        fit = np.sum(pi * np.sum((mu @ w.T + b - eye) ** 2, axis=1))
        return 0.5 * (fit + np.trace(w @ sw @ w.T) + lam * (np.sum(w**2) + np.sum(b**2)))

    w_ls, b_ls = (t.numpy() for t in reference.least_squares(means, priors, sigma_w, lam))
    # The same sums of C² non-negative terms, tiled and centered here, dense and uncentered in
    # numpy: ≤ C²·eps relative (recursive summation's worst case) at the same W.
    rtol = classes**2 * EPS
    np.testing.assert_allclose(got["loss_mse"], loss(weight.numpy(), bias.numpy()), rtol=rtol)
    np.testing.assert_allclose(got["loss_ls"], loss(w_ls, b_ls), rtol=rtol)
    nc23 = 0.5 * np.sum(pi * np.sum((mu @ w_ls.T + b_ls - eye) ** 2, axis=1))
    np.testing.assert_allclose(got["loss_nc23"], nc23, rtol=rtol)
    total = got["loss_nc1"] + got["loss_nc23"] + got["loss_ls_perp"]
    np.testing.assert_allclose(total, got["loss_mse"], rtol=1e-10)  # SPEC §3's contract
