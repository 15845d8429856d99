"""Every SPEC §1–§4 key against the independent numpy brute force in tests/oracle.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ncfast
from ncfast.stats import ClassStats
from tests import oracle

NON_SCALAR_KEYS = (
    "snr_singular_values",
    "sigma_b_rank",
    "sigma_w_rank",
    "classes_present",
    "weight_decay",
    "num_samples",
)
SCALAR_KEYS = [k for k in ncfast.metrics.SPEC_KEYS if k not in NON_SCALAR_KEYS]


def make_data(counts, dim, seed, spread=1.0, offset=0.0, mean_scale=3.0):
    """Features with class means of norm ~mean_scale·√P, within-class spread `spread`."""
    g = torch.Generator().manual_seed(seed)
    num_classes = len(counts)
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * mean_scale
    common = torch.randn(dim, generator=g, dtype=torch.float64)
    common = common / common.norm() * offset
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    # Anisotropic within-class noise so Σ_W is not a multiple of I.
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5 + torch.eye(dim)
    noise = torch.randn(len(labels), dim, generator=g, dtype=torch.float64) @ mix * spread
    features = means[labels] + common + noise
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=g, dtype=torch.float64)
    return features, labels, weight, bias


def stream(features, labels, num_classes, batch_size, weight=None, bias=None, lam=0.0):
    m = ncfast.Measurement(num_classes, features.shape[1], weight, bias, weight_decay=lam)
    for start in range(0, len(labels), batch_size):
        m.update(features[start : start + batch_size], labels[start : start + batch_size])
    return m


def assert_matches_oracle(result, expected, rtol, keys=SCALAR_KEYS):
    for key in keys:
        if key not in expected:
            continue
        assert key in result, key
        np.testing.assert_allclose(result[key], expected[key], rtol=rtol, atol=1e-13, err_msg=key)
    np.testing.assert_allclose(
        result["snr_singular_values"].numpy(), expected["snr_singular_values"], rtol=rtol
    )
    assert result["classes_present"] == expected["classes_present"]
    assert result["num_samples"] == expected["num_samples"]


CASES = {
    # name: (class counts, dim, batch size, λ)
    "balanced_c2": ([300, 300], 5, 64, 0.0),
    "unbalanced_c5": ([40, 200, 17, 90, 133], 12, 50, 0.01),
    "c100_p_gt_c": ([25] * 100, 120, 256, 0.005),
    "c100_p_lt_c": ([12] * 100, 30, 97, 0.0),
    "missing_class": ([50, 0, 70, 40, 0, 60], 9, 33, 0.1),
    "batches_of_one": ([7, 9, 6], 4, 1, 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_key_matches_numpy_brute_force(case):
    counts, dim, batch_size, lam = CASES[case]
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh data each run; the seed is in the id
    features, labels, weight, bias = make_data(counts, dim, seed)
    m = stream(features, labels, len(counts), batch_size, weight, bias, lam)
    result = m.compute()
    assert set(result) == set(ncfast.metrics.SPEC_KEYS)
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), len(counts), weight, bias, lam)
    assert_matches_oracle(result, expected, rtol=1e-8), f"seed {seed}"
    rank_b = min(dim, sum(c > 0 for c in counts) - 1)
    assert result["sigma_b_rank"] == rank_b
    assert result["sigma_w_rank"] == expected["sigma_w_rank"] == dim
    assert result["weight_decay"] == lam
    assert len(result["snr_singular_values"]) == rank_b


def test_statistics_properties_match_numpy():
    counts = [30, 0, 55, 21]
    features, labels, _, _ = make_data(counts, 7, seed=1)
    stats = ClassStats(4, 7)
    for start in range(0, len(labels), 13):
        stats.update(features[start : start + 13], labels[start : start + 13])
    s = oracle.statistics(features.numpy(), labels.numpy(), 4)
    np.testing.assert_array_equal(stats.counts.numpy(), s["counts"])
    np.testing.assert_allclose(stats.class_means.numpy(), s["means"], rtol=1e-12)
    assert torch.isnan(stats.class_means[1]).all()
    np.testing.assert_allclose(stats.global_mean.numpy(), s["global_mean"], rtol=1e-12)
    for name in ("sigma_w", "sigma_b", "sigma_t"):
        np.testing.assert_allclose(getattr(stats, name).numpy(), s[name], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(stats.centered_means.numpy(), s["mbar"], rtol=1e-10)
    assert stats.num_samples == sum(counts)
    assert stats.classes_present == 3
    np.testing.assert_allclose(stats.priors.numpy(), np.array(counts) / sum(counts))


def test_balanced_total_is_within_plus_between():
    features, labels, _, _ = make_data([40] * 6, 8, seed=2)
    stats = ClassStats(6, 8).update(features, labels)
    torch.testing.assert_close(stats.sigma_t, stats.sigma_w + stats.sigma_b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_exact_on_their_values(dtype):
    """Statistics of fp16/bf16/fp32 features equal float64 statistics of the same values."""
    features, labels, weight, bias = make_data([60, 80, 70], 10, seed=3)
    low = features.to(dtype)
    m = stream(low, labels, 3, 32, weight, bias, 0.02)
    expected = oracle.nc_metrics(low.double().numpy(), labels.numpy(), 3, weight, bias, 0.02)
    assert_matches_oracle(m.compute(), expected, rtol=1e-8)


def test_non_contiguous_inputs():
    features, labels, weight, bias = make_data([50, 50, 50], 6, seed=4)
    wide = torch.zeros(len(labels), 12, dtype=torch.float32)
    wide[:, ::2] = features.float()
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    lab = torch.stack([labels, labels], 1)[:, 0]
    assert not lab.is_contiguous()
    m = stream(strided, lab, 3, 16, weight, bias)
    expected = oracle.nc_metrics(features.float().double().numpy(), labels.numpy(), 3, weight, bias)
    assert_matches_oracle(m.compute(), expected, rtol=1e-8)


def test_empty_batches_change_nothing():
    features, labels, _, _ = make_data([20, 20], 3, seed=5)
    a = ClassStats(2, 3).update(features, labels)
    b = ClassStats(2, 3)
    b.update(features[:0], labels[:0])
    b.update(features, labels)
    b.update(torch.empty(0, 3, dtype=torch.float16), torch.empty(0, dtype=torch.int64))
    torch.testing.assert_close(a.sigma_w, b.sigma_w, rtol=0, atol=0)


def test_near_collapse_float64_exact_where_naive_float32_fails():
    """Class means of norm 1e4 offset by a common vector of norm 1e6, within-class spread 1e-2."""
    num_classes, dim, per_class = 5, 16, 400
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    means = means / means.norm(dim=1, keepdim=True) * 1e4
    offset = torch.randn(dim, generator=g, dtype=torch.float64)
    offset = offset / offset.norm() * 1e6
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=g, dtype=torch.float64) * 1e-2 / dim**0.5
    features = means[labels] + offset + noise

    stats = ClassStats(num_classes, dim)
    for chunk in torch.split(torch.randperm(len(labels), generator=g), 128):
        stats.update(features[chunk], labels[chunk])
    got = ncfast.nc_metrics(stats)["nc1"]
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), num_classes)["nc1"]
    assert abs(got - expected) <= 1e-6 * abs(expected)

    # Naive float32 accumulation: Σ h hᵀ − N μ μᵀ per class.
    x = features.float()
    scatter = torch.zeros(dim, dim)
    class_means = torch.zeros(num_classes, dim)
    for k in range(num_classes):
        xk = x[labels == k]
        mk = xk.sum(0) / len(xk)
        scatter += xk.T @ xk - len(xk) * torch.outer(mk, mk)
        class_means[k] = mk
    sigma_w = scatter / len(labels)
    mbar = (class_means - class_means.mean(0)).T
    naive = float(torch.trace(sigma_w @ torch.linalg.pinv(mbar @ mbar.T / num_classes)))
    naive /= num_classes
    # Measured: naive is ~1e9× too large (float32 cancellation of Σhhᵀ − Nμμᵀ at norm 1e6).
    assert abs(naive - expected) > 1e3 * abs(expected), "naive float32 should fail here"


def test_decomposition_identity_and_ls_perp_zero_at_least_squares():
    for lam in (0.0, 0.003, 0.5):
        features, labels, weight, bias = make_data([40, 75, 52, 66], 11, seed=7)
        stats = ClassStats(4, 11).update(features, labels)
        r = ncfast.nc_metrics(stats, weight, bias, weight_decay=lam)
        total = r["loss_nc1"] + r["loss_nc23"] + r["loss_ls_perp"]
        assert abs(r["loss_mse"] - total) <= 1e-10 * r["loss_mse"]
        w_ls, b_ls = ncfast.least_squares_classifier(stats, lam)
        r_ls = ncfast.nc_metrics(stats, w_ls, b_ls, weight_decay=lam)
        assert r_ls["loss_ls_perp"] <= 1e-12 * r_ls["loss_mse"]
        assert abs(r_ls["loss_mse"] - r_ls["loss_ls"]) <= 1e-10 * r_ls["loss_mse"]
        # W_LS minimises: any perturbation raises the loss by exactly loss_ls_perp.
        r_pert = ncfast.nc_metrics(stats, w_ls + 1e-3 * weight, b_ls, weight_decay=lam)
        assert r_pert["loss_mse"] > r_ls["loss_mse"]


def test_least_squares_classifier_matches_dense_normal_equations():
    features, labels, _, _ = make_data([30, 45, 38], 7, seed=8)
    stats = ClassStats(3, 7).update(features, labels)
    for lam in (0.0, 0.1):
        w_ls, b_ls = ncfast.least_squares_classifier(stats, lam)
        expected, _, _ = oracle.least_squares(features.numpy(), labels.numpy(), 3, lam)
        np.testing.assert_allclose(w_ls.numpy(), expected[:, :7], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b_ls.numpy(), expected[:, 7], rtol=1e-9, atol=1e-12)


def test_least_squares_predictions_invariant_to_full_rank_transform():
    """Seed Eq. 7: W_LS(AH̄)·AH̄ does not depend on a symmetric full-rank A (λ = 0)."""
    features, labels, _, _ = make_data([50, 60, 55, 45], 6, seed=9)
    centred = features - features.mean(0)
    g = torch.Generator().manual_seed(10)
    q = torch.randn(6, 6, generator=g, dtype=torch.float64)
    transform = q @ q.T + 0.5 * torch.eye(6, dtype=torch.float64)
    preds = []
    for h in (centred, centred @ transform.T):
        stats = ClassStats(4, 6).update(h, labels)
        w, b = ncfast.least_squares_classifier(stats, 0.0)
        preds.append(h @ w.T + b)
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-9, atol=1e-11)


def test_simplex_etf_with_isotropic_noise_is_collapsed():
    num_classes, dim, per_class, sigma = 6, 10, 200, 1e-4
    g = torch.Generator().manual_seed(11)
    basis, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=g, dtype=torch.float64))
    etf = (torch.eye(num_classes) - 1.0 / num_classes).double()
    mbar = 3.0 * basis @ etf  # [P, C]: equal norms, cosines −1/(C−1), zero mean
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=g, dtype=torch.float64) * sigma
    # Exactly zero class means and exactly isotropic pooled covariance σ²I.
    for k in range(num_classes):
        noise[labels == k] -= noise[labels == k].mean(0)
    evals, evecs = torch.linalg.eigh(noise.T @ noise / len(labels))
    noise = noise @ (evecs * evals.rsqrt()) @ evecs.T * sigma
    features = mbar.T[labels] + noise
    stats = ClassStats(num_classes, dim).update(features, labels)
    r = ncfast.nc_metrics(stats, mbar.T.clone(), torch.zeros(num_classes))
    for key in (
        "nc2_equinorm_means",
        "nc2_equiangular_means",
        "nc2_maxangle_means",
        "nc2_equinorm_classifiers",
        "nc2_equiangular_classifiers",
        "nc2_maxangle_classifiers",
        "nc3_self_duality",
    ):
        assert r[key] < 1e-12, (key, r[key])
    assert r["nc1"] < 1e-6
    assert abs(r["snr_condition"] - 1.0) < 1e-9
    torch.testing.assert_close(stats.sigma_w, sigma**2 * torch.eye(dim, dtype=torch.float64))
    m = ncfast.Measurement(num_classes, dim, mbar.T.clone(), torch.zeros(num_classes))
    m.update(features, labels)
    assert m.compute()["nc4_ncc_mismatch"] == 0.0


def test_nc4_second_pass_equals_buffered():
    features, labels, weight, bias = make_data([80, 90, 70, 60], 5, seed=12, spread=3.0)
    buffered = stream(features, labels, 4, 50, weight, bias)
    small = ncfast.Measurement(4, 5, weight, bias, memory_budget_bytes=1000)
    batches = [(features[i : i + 50], labels[i : i + 50]) for i in range(0, len(labels), 50)]
    for f, y in batches:
        small.update(f, y)
    assert small.needs_second_pass and not buffered.needs_second_pass
    with pytest.raises(ValueError, match="second pass"):
        small.compute()
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), 4, weight, bias)
    assert 0 < expected["nc4_ncc_mismatch"] < 1
    assert buffered.compute()["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]
    assert (
        small.compute(second_pass=lambda: iter(batches))["nc4_ncc_mismatch"]
        == (expected["nc4_ncc_mismatch"])
    )


def test_nc4_ties_go_to_lowest_index():
    # Two classes with identical logits for every sample: argmax picks class 0.
    labels = torch.tensor([0, 0, 1, 1])
    features = torch.tensor([[-1.0, 0.0], [-1.2, 0.1], [1.0, 0.0], [1.1, -0.1]])
    weight = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    m = ncfast.Measurement(2, 2, weight, torch.zeros(2))
    m.update(features, labels)
    # NCC is right for all; the classifier says class 0 everywhere: mismatches are the class-1 rows.
    assert m.compute()["nc4_ncc_mismatch"] == 0.5


def test_whiten_and_snr():
    features, labels, _, _ = make_data([40, 50, 60], 5, seed=13)
    stats = ClassStats(3, 5).update(features, labels)
    w = ncfast.whiten(stats)
    torch.testing.assert_close(w @ stats.sigma_w @ w, torch.eye(5, dtype=torch.float64))
    s = ncfast.snr(stats)
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), 3)["snr_singular_values"]
    np.testing.assert_allclose(torch.linalg.svdvals(s)[:2].numpy(), expected, rtol=1e-10)


def test_whiten_singular_within_scatter_reports_rank():
    # P > N − C: Σ_W is singular; the pseudo-inverse square root acts on its range.
    features, labels, _, _ = make_data([4, 4, 4], 20, seed=14)
    stats = ClassStats(3, 20).update(features, labels)
    r = ncfast.nc_metrics(stats)
    assert r["sigma_w_rank"] == 12 - 3
    w = ncfast.whiten(stats)
    proj = w @ stats.sigma_w @ w
    torch.testing.assert_close(proj @ proj, proj, atol=1e-9, rtol=0)  # a projector
    assert abs(float(torch.trace(proj)) - 9) < 1e-8


def test_mse_lambda():
    assert ncfast.mse_lambda(5e-4, 10) == pytest.approx(2.5e-3)


@pytest.mark.parametrize("log2_cond", [0, 10, 20, 26, 33])
def test_whitening_accuracy_against_an_exactly_known_inverse_square_root(log2_cond):
    """Σ = H diag(2^-e) Hᵀ with H a scaled Hadamard matrix is exact in float64, and so is its
    inverse square root H diag(2^(e/2)) Hᵀ. Up to condition 2^26 ≈ 7e7 the whitening is within
    1e-8 of it; beyond, every float64 eigendecomposition is limited by cond·eps (the rounding of
    the smallest eigenvalue), and ours stays within 10·cond·eps (numpy's eigh: about the same).
    """
    from scipy.linalg import hadamard

    n = 64
    h = hadamard(n).astype(np.float64) / 8.0  # orthogonal, entries ±1/8
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
    e = rng.integers(0, log2_cond // 2 + 1, n) * 2  # even exponents: exact square roots
    e[0], e[-1] = 0, log2_cond - log2_cond % 2
    sigma = (h * 2.0 ** (-e.astype(float))) @ h.T
    truth = (h * 2.0 ** (e / 2)) @ h.T
    whitening, rank = ncfast.ops.psd_inv_sqrt(torch.from_numpy(sigma))
    error = np.linalg.norm(whitening.numpy() - truth) / np.linalg.norm(truth)
    cond = 2.0 ** e.max()
    assert rank == n
    assert error <= max(1e-8 if cond <= 2**26 else 0.0, 10 * cond * np.finfo(np.float64).eps)
