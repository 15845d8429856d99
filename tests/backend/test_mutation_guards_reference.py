"""Mutation guards of the reference backend (ncfast/backend/reference.py, the tests' oracle and
the CPU/fallback path) for what the value tests of test_stats/test_metrics do not reach: the
update on the input's device without a host synchronisation, NC4 near a decision boundary
under a large common offset (the reason the distances are centred), a float32 classifier, a
re-shift with a non-finite new shift for an absent class, and the minimum-norm least-squares
solve at λ = 0 when Cholesky succeeds on rounding noise. Each against numpy float64 or an exact
count; seeds printed (tests/helpers/seeds.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncfast.backend import ops, reference
from ncfast.backend.state import STATE_KEYS, new_state

F64 = torch.float64


def test_the_update_runs_on_the_inputs_device_without_a_host_synchronisation():
    """On the meta device (any CPU tensor mixed in, or any host synchronisation, raises)."""
    state = new_state(3, 4, "meta")
    features = torch.empty(5, 4, device="meta")
    labels = torch.empty(5, dtype=torch.long, device="meta")
    reference.update_stats_(features, labels, *(state[k] for k in STATE_KEYS))
    assert {v.device.type for v in state.values()} == {"meta"}


def test_nc4_near_a_decision_boundary_under_a_large_offset(seed):
    """Two class means 2e-3 apart at (1e4, 1e4), rows 1e-6 to 1e-5 on either side of the
    boundary between them. Centred on the mean of the means the distances are exact; centred
    anywhere farther (tens of thousands) their difference, 4e-8 or less, drowns in the rounding
    of squares of 1e9. The classifier (float32) always says class 0, so the count is the number
    of rows on class 1's side, exactly."""
    rng = np.random.default_rng(seed)
    delta = 1e-3
    means = torch.tensor([[1e4 + delta, 1e4], [1e4 - delta, 1e4]], dtype=F64)
    side = rng.choice([-1.0, 1.0], size=400)
    offset = side * rng.uniform(1e-6, 1e-5, size=400)
    features = torch.tensor(np.stack([1e4 + offset, np.full(400, 1e4)], axis=1))
    assert ((features[:, 0] - 1e4).sign() == torch.tensor(side)).all()  # sides kept exactly
    weight = torch.zeros(2, 2, dtype=torch.float32)
    bias = torch.tensor([1.0, 0.0], dtype=torch.float32)
    valid = torch.ones(400, dtype=torch.bool)
    present = torch.ones(2, dtype=torch.bool)
    expected = int((side < 0).sum())
    for backend in ("reference", "native"):
        with ops.use_backend(backend):
            got = ops.ncc_mismatch_count(features, valid, weight, bias, means, present)
        assert int(got) == expected, backend


def test_a_reshift_ignores_the_new_shift_of_an_absent_class():
    """An absent class (count 0) adds nothing, whatever its new shift (here infinite)."""
    counts = torch.tensor([3, 0])
    shift = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=F64)
    sums = torch.tensor([[0.5, -0.5], [0.0, 0.0]], dtype=F64)
    scatter = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    new_shift = torch.tensor([[1.5, 1.0], [np.inf, -np.inf]], dtype=F64)
    new_sums, new_scatter = reference.reshift(counts, shift, sums, scatter, new_shift)
    d = np.array([-0.5, 1.0])  # s_0 − s'_0
    s0 = np.array([0.5, -0.5])
    assert np.allclose(new_sums.numpy(), [s0 + 3 * d, [0.0, 0.0]], rtol=0, atol=1e-15)
    want = scatter.numpy() + np.outer(d, s0) + np.outer(s0, d) + 3 * np.outer(d, d)
    assert np.allclose(new_scatter.numpy(), want, rtol=0, atol=1e-15)


def test_least_squares_at_lambda_zero_is_the_minimum_norm_solution(seed):
    """Collapsed features (Σ_W = 0) and C = 3 < P = 4: Σ_T has rank 2. Without λ the solve must
    not trust a Cholesky factorisation that succeeds on rounding noise (a huge W along the null
    space); numpy's pseudo-inverse in centred coordinates is the reference: W = R Σ_T⁺,
    b = π − W μ_G. Twenty random problems, so that some factorisations succeed."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        means = rng.normal(size=(3, 4))
        priors = rng.dirichlet(np.ones(3))
        mu_g = priors @ means
        centred = means - mu_g
        sigma_t = (centred * priors[:, None]).T @ centred
        r = (np.eye(3) * priors[:, None]) @ centred
        w_ref = r @ np.linalg.pinv(sigma_t, rcond=1e-10)
        b_ref = priors - w_ref @ mu_g
        weight, bias = reference.least_squares(
            torch.tensor(means), torch.tensor(priors), torch.zeros(4, 4, dtype=F64), 0.0
        )
        # A backward-stable solve on Σ_T's range: error ≲ P·eps·cond·‖W‖, with cond the ratio
        # of Σ_T's extreme non-zero eigenvalues (up to 1e5 here); 64·eps·cond·max|W| holds it.
        evals = np.linalg.eigvalsh(sigma_t)
        kept = evals[evals > 1e-10 * evals.max()]
        tol = 64 * np.finfo(float).eps * (kept.max() / kept.min()) * max(1.0, np.abs(w_ref).max())
        assert np.allclose(weight.numpy(), w_ref, rtol=0, atol=tol)
        assert np.allclose(bias.numpy(), b_ref, rtol=0, atol=tol * max(1.0, np.abs(mu_g).sum()))
        # The SPEC §3 terms of that exact LS classifier: nothing off the LS solution.
        terms = reference.mse_decomposition(
            torch.tensor(w_ref),
            torch.tensor(b_ref),
            torch.tensor(means),
            torch.tensor(priors),
            torch.zeros(4, 4, dtype=F64),
            0.0,
        )
        assert abs(terms["loss_ls_perp"]) < 1e-12 and abs(terms["loss_nc1"]) < 1e-12, terms


def test_least_squares_at_lambda_zero_on_large_features_is_the_minimum_norm_solution(seed):
    """As above with the means scaled by 1e3 (Σ_T of size 1e6): the threshold that decides
    whether to trust Cholesky is relative to the largest pivot, so scale does not change it.
    The SPEC §3 terms of the reference classifier (the exact LS solution): loss_ls_perp 0 and
    loss_nc1 0 (collapsed, λ = 0)."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        means = 1e3 * rng.normal(size=(3, 4))
        priors = rng.dirichlet(np.ones(3))
        mu_g = priors @ means
        centred = means - mu_g
        sigma_t = (centred * priors[:, None]).T @ centred
        w_ref = ((np.eye(3) * priors[:, None]) @ centred) @ np.linalg.pinv(sigma_t, rcond=1e-10)
        evals = np.linalg.eigvalsh(sigma_t)
        kept = evals[evals > 1e-10 * evals.max()]
        tol = 64 * np.finfo(float).eps * (kept.max() / kept.min()) * np.abs(w_ref).max()
        args = (torch.tensor(means), torch.tensor(priors), torch.zeros(4, 4, dtype=F64), 0.0)
        weight, _ = reference.least_squares(*args)
        assert np.allclose(weight.numpy(), w_ref, rtol=0, atol=tol)
        terms = reference.mse_decomposition(
            torch.tensor(w_ref), torch.tensor(priors - w_ref @ mu_g), *args
        )
        assert abs(terms["loss_ls_perp"]) < 1e-12 and abs(terms["loss_nc1"]) < 1e-12, terms


def test_least_squares_is_differentiable_where_sigma_t_has_repeated_eigenvalues():
    """λ = 0 and Σ_W = I (P = 4 > C − 1 = 2: Σ_T repeats an eigenvalue): the gradient of the LS
    loss through the solve is finite and matches central differences (the Cholesky path; the
    eigendecomposition's backward is undefined on repeated eigenvalues)."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    priors = torch.full((3,), 1 / 3, dtype=F64)
    sigma_w = torch.eye(4, dtype=F64)

    def loss(m):
        weight, bias = reference.least_squares(m, priors, sigma_w, 0.0)
        return reference.mse_loss(weight, bias, m, priors, sigma_w, 0.0)

    (grad,) = torch.autograd.grad(loss(means), means)
    assert torch.isfinite(grad).all()
    step = 1e-6
    numeric = torch.zeros_like(means)
    with torch.no_grad():
        for i in range(3):
            for j in range(4):
                e = torch.zeros_like(means)
                e[i, j] = step
                numeric[i, j] = (loss(means + e) - loss(means - e)) / (2 * step)
    # Central differences: O(step²) truncation and eps/step rounding, 1e-8 absolute here.
    assert torch.allclose(grad, numeric, rtol=0, atol=1e-7)


def test_the_mse_terms_of_a_float32_classifier_are_computed_in_float64(seed):
    """A float32 classifier gives the terms of its float64 copy (the same values), to float64
    rounding: nothing is squared or summed in float32."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(5, 6, generator=gen, dtype=F64)
    priors = torch.full((5,), 0.2, dtype=F64)
    a = torch.randn(6, 6, generator=gen, dtype=F64)
    sigma_w = a @ a.T / 6
    weight = torch.randn(5, 6, generator=gen)
    bias = torch.randn(5, generator=gen)
    got = reference.mse_decomposition(weight, bias, means, priors, sigma_w, 0.05)
    want = reference.mse_decomposition(weight.double(), bias.double(), means, priors, sigma_w, 0.05)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-13, abs=1e-15), key


def test_the_rank_thresholds_default_to_a_relative_1e_10_and_no_absolute_floor():
    """nc1, snr_singular_values and left_singular_pairs keep singular values above 1e-10 of
    the largest and above 0 by default: a spectrum 1, 1e-9, 1e-11 keeps its first two."""
    u = torch.linalg.qr(torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64))[0]
    mbar = u @ torch.diag(torch.tensor([1.0, 1e-9, 1e-11], dtype=F64))
    _, s = reference.left_singular_pairs(mbar)
    assert s.numel() == 2 and s[1] == pytest.approx(1e-9, rel=1e-6)
    eye = torch.eye(4, dtype=F64)
    assert reference.snr_singular_values(eye, mbar).numel() == 2
    assert reference.nc1(eye, mbar) == reference.nc1(eye, mbar, 1e-10, 0.0)
    assert reference.nc1(eye, mbar)[1] == 2


def test_pairwise_cosines_of_float32_vectors_are_computed_in_float64(seed):
    """Near a simplex ETF (the cosines' deviations ~1e-6) float32 arithmetic would lose them:
    float32 rows give exactly the statistics of their float64 copy."""
    gen = torch.Generator().manual_seed(seed)
    c = 10
    etf = torch.eye(c, dtype=F64) - 1.0 / c  # a simplex ETF in R^c
    vectors = (etf + 1e-6 * torch.randn(c, c, generator=gen, dtype=F64)).float()
    got = reference.pairwise_cosine_stats(vectors)
    want = reference.pairwise_cosine_stats(vectors.double())
    assert got == want  # the same float64 values in: the same arithmetic, exactly


def test_kept_singular_values_are_strictly_above_both_thresholds():
    """SPEC §2: a singular value counts when it is *above* rtol · max and *above* atol, so one
    equal to either threshold is dropped, as is one that passes only one of them. M̄ = diag(4,
    2, 1) has these singular values exactly (the SVD of a diagonal matrix is exact), so each
    threshold can sit on a singular value."""
    eye = torch.eye(3, dtype=F64)
    mbar = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=F64))
    assert torch.linalg.svdvals(mbar).tolist() == [4.0, 2.0, 1.0]  # the premise: exact

    def kept(m, rtol, atol):
        return reference.snr_singular_values(torch.eye(m.shape[0], dtype=F64), m, rtol, atol)

    assert kept(mbar, 0.25, 0.0).tolist() == [4.0, 2.0]  # 1 = 0.25 · 4: dropped
    assert kept(mbar, 0.0, 2.0).tolist() == [4.0]  # 2 = atol: dropped
    assert kept(mbar, 0.125, 2.0).tolist() == [4.0]  # 2 passes rtol only, 1 neither
    assert kept(mbar, 0.5, 0.5).tolist() == [4.0]  # 2 and 1 pass atol only
    assert kept(2.0 * mbar, 0.25, 0.0).tolist() == [8.0, 4.0]  # rtol scales with the max
    # One singular value under atol; none at all (C = 0): nothing kept, no error.
    assert kept(eye[:, :1], 1e-10, 2.0).numel() == 0
    assert kept(eye[:, :0], 1e-10, 0.0).numel() == 0
    # NC1 counts the same directions.
    assert reference.nc1(eye, mbar, 0.25, 0.0)[1] == 2
    assert reference.nc1(eye, mbar, 0.0, 2.0)[1] == 1


def test_psd_inv_sqrt_edge_cases_against_the_exact_result():
    """The pseudo-inverse square root where its definition decides: a zero matrix (every
    eigenvalue is ≤ rel_eps · λ_max = 0, so none is inverted), an empty one, a float32 input
    (worked in float64), and P = 1100, past two of its 512-row tiles. Diagonal inputs have
    the exact answer diag(d^{-1/2}); eigh's error on them is of order eps · ‖A‖ / gap, with
    gaps ≥ 1e-3 here, so 1e-10 relative is a wide margin."""
    out, rank = reference.psd_inv_sqrt(torch.zeros(3, 3, dtype=F64))
    assert rank == 0 and torch.equal(out, torch.zeros(3, 3, dtype=F64))
    out, rank = reference.psd_inv_sqrt(torch.zeros(0, 0, dtype=F64))
    assert rank == 0 and out.shape == (0, 0)
    d32 = torch.tensor([1.0, 3.0, 7.0], dtype=torch.float32)
    out, rank = reference.psd_inv_sqrt(torch.diag(d32))
    assert rank == 3 and out.dtype == F64
    want = torch.diag(d32.to(F64).rsqrt())  # float32's 1/√3 is off by 1e-8: float64 is needed
    assert torch.allclose(out, want, rtol=1e-14, atol=1e-15)
    d = torch.linspace(1.0, 2.0, 1100, dtype=F64)
    out, rank = reference.psd_inv_sqrt(torch.diag(d))
    assert rank == 1100
    assert torch.allclose(out, torch.diag(d.rsqrt()), rtol=0, atol=1e-10)


def test_finalize_stats_follows_its_formula_on_any_state(seed):
    """Means = shift + sums / n (zero rows for absent classes) and Σ_W = (S − Σ_c d_c d_cᵀ / n_c)
    / N, checked in numpy on a random state: classes seen once (whose sums are nonzero after a
    re-shift), absent classes with a nonzero shift, and a state of one sample in all."""
    rng = np.random.default_rng(seed)
    counts = np.array([0, 1, 1, 2, 5, 0])
    shift = rng.normal(size=(6, 3))
    sums = rng.normal(size=(6, 3)) * (counts > 0)[:, None]  # an absent class sums nothing
    scatter = rng.normal(size=(3, 3))
    scatter = scatter @ scatter.T + 10 * np.eye(3)
    for n in (counts, np.array([0, 1, 0, 0, 0, 0])):
        s = sums * (n > 0)[:, None]
        means, within = reference.finalize_stats(
            torch.tensor(n), torch.tensor(shift), torch.tensor(s), torch.tensor(scatter)
        )
        safe = np.maximum(n, 1)[:, None]
        want_means = np.where((n > 0)[:, None], shift + s / safe, 0.0)
        want_within = (scatter - (s / safe).T @ s) / n.sum()
        # A few float64 operations on values of order 10: 1e-13 absolute is ~100 eps.
        np.testing.assert_allclose(means.numpy(), want_means, rtol=0, atol=1e-13)
        np.testing.assert_allclose(within.numpy(), want_within, rtol=0, atol=1e-13)
        assert torch.equal(within, within.T)


def test_the_least_squares_solve_drops_an_eigenvalue_at_its_cut_off():
    """K = diag(1, t): Cholesky succeeds but its pivots (ratio t) are far below 1e-8, so the
    eigendecomposition decides. An eigenvalue at the cut-off (P+1) · eps · λ_max = 2 eps counts
    as zero (the minimum-norm solution leaves that direction out); one at twice it is inverted.
    The eigendecomposition of a diagonal matrix is exact, so t sits on the cut-off."""
    eps = torch.finfo(F64).eps
    rhs = torch.tensor([[1.0, 1.0]], dtype=F64)
    at = reference._solve_psd_right(torch.diag(torch.tensor([1.0, 2 * eps], dtype=F64)), rhs, False)
    assert at.tolist() == [[1.0, 0.0]]
    above = reference._solve_psd_right(
        torch.diag(torch.tensor([1.0, 4 * eps], dtype=F64)), rhs, False
    )
    assert above.tolist() == [[1.0, 1.0 / (4 * eps)]]


def test_the_mse_loss_of_a_float32_classifier_is_its_float64_loss(seed):
    """mse_loss (the LS loss the theory differentiates) of a float32 classifier: the float64
    loss of the same (exactly widened) values, a float64 tensor, not an error of mixed
    dtypes. Both sides run the same float64 operations, so they agree to the last bit."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 5, dtype=F64, generator=gen)
    priors = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    a = torch.randn(5, 5, dtype=F64, generator=gen)
    sigma_w = a @ a.T / 5
    weight = torch.randn(3, 5, generator=gen)
    bias = torch.randn(3, generator=gen)
    for lam in (0.0, 0.1):
        got = reference.mse_loss(weight, bias, means, priors, sigma_w, lam)
        want = reference.mse_loss(weight.double(), bias.double(), means, priors, sigma_w, lam)
        assert got.dtype == F64 and torch.equal(got, want)
