"""Every SPEC §1–§4 key against the independent numpy brute force in tests/helpers/oracle.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ncfast
from ncfast.backend import reference
from ncfast.stats import ClassStats
from tests.helpers import oracle
from tests.helpers.assertions import assert_matches_oracle
from tests.helpers.feeding import stats_from, stream
from tests.helpers.synthetic_features import F64, MIX_CONDITION, make_data, orthonormal_columns
from tests.helpers.tolerances import EPS, oracle_rtol, stream_tolerances

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
def test_every_key_matches_numpy_brute_force(case, seed):
    counts, dim, batch_size, lam = CASES[case]
    features, labels, weight, bias = make_data(counts, dim, seed)
    m = stream(features, labels, len(counts), batch_size, weight, bias, lam)
    result = m.compute()
    assert set(result) == set(ncfast.metrics.SPEC_KEYS)
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), len(counts), weight, bias, lam)
    rtol = oracle_rtol(features, labels, len(counts), lam)
    assert_matches_oracle(result, expected, rtol)
    rank_b = min(dim, sum(c > 0 for c in counts) - 1)
    assert result["sigma_b_rank"] == rank_b
    assert result["sigma_w_rank"] == expected["sigma_w_rank"] == dim
    assert result["weight_decay"] == lam
    assert len(result["snr_singular_values"]) == rank_b


def test_statistics_properties_match_numpy(seed):
    counts = [30, 0, 55, 21]
    features, labels, _, _ = make_data(counts, 7, seed)
    stats = ClassStats(4, 7)
    for start in range(0, len(labels), 13):
        stats.update(features[start : start + 13], labels[start : start + 13])
    s = oracle.statistics(features.numpy(), labels.numpy(), 4)
    atol_means, atol_sigma = stream_tolerances(features, labels, against_brute_force=True)
    # Σ_B and Σ_T add products of the centered means: their error adds 2·δμ·max‖μ_c − μ_G‖.
    atol_between = atol_sigma + 2 * atol_means * float(np.linalg.norm(s["mbar"], axis=0).max())
    np.testing.assert_array_equal(stats.counts.numpy(), s["counts"])
    present = s["present"]
    np.testing.assert_allclose(
        stats.class_means.numpy()[present], s["means"][present], rtol=0, atol=atol_means
    )
    assert torch.isnan(stats.class_means[1]).all()
    np.testing.assert_allclose(stats.global_mean.numpy(), s["global_mean"], rtol=0, atol=atol_means)
    np.testing.assert_allclose(stats.sigma_w.numpy(), s["sigma_w"], rtol=0, atol=atol_sigma)
    for name in ("sigma_b", "sigma_t"):
        np.testing.assert_allclose(
            getattr(stats, name).numpy(), s[name], rtol=0, atol=atol_between, err_msg=name
        )
    np.testing.assert_allclose(stats.centered_means.numpy(), s["mbar"], rtol=0, atol=2 * atol_means)
    assert stats.num_samples == sum(counts)
    assert stats.classes_present == 3
    np.testing.assert_allclose(stats.priors.numpy(), np.array(counts) / sum(counts), rtol=EPS)


def test_balanced_total_is_within_plus_between(seed):
    features, labels, _, _ = make_data([40] * 6, 8, seed)
    stats = stats_from(features, labels, 6, 8)
    sigma_t = stats.sigma_t
    # Σ_T = Σ_W + (M̄·π)M̄ᵀ and Σ_B = M̄M̄ᵀ/C with π = 1/C: the same C-term sums, rounded
    # differently; each entry errs by ≤ (C + 2)·eps of the largest entry, plus one addition.
    atol = (6 + 4) * EPS * float(sigma_t.abs().max())
    torch.testing.assert_close(sigma_t, stats.sigma_w + stats.sigma_b, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_exact_on_their_values(dtype, seed):
    """Statistics of fp16/bf16/fp32 features equal float64 statistics of the same values."""
    features, labels, weight, bias = make_data([60, 80, 70], 10, seed)
    low = features.to(dtype)
    m = stream(low, labels, 3, 32, weight, bias, 0.02)
    expected = oracle.nc_metrics(low.double().numpy(), labels.numpy(), 3, weight, bias, 0.02)
    assert_matches_oracle(m.compute(), expected, oracle_rtol(low.double(), labels, 3, 0.02))


def test_non_contiguous_inputs(seed):
    features, labels, weight, bias = make_data([50, 50, 50], 6, seed)
    wide = torch.zeros(len(labels), 12, dtype=torch.float32)
    wide[:, ::2] = features.float()
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    lab = torch.stack([labels, labels], 1)[:, 0]
    assert not lab.is_contiguous()
    m = stream(strided, lab, 3, 16, weight, bias)
    values = features.float().double()
    expected = oracle.nc_metrics(values.numpy(), labels.numpy(), 3, weight, bias)
    assert_matches_oracle(m.compute(), expected, oracle_rtol(values, labels, 3))


def test_empty_batches_change_nothing(seed):
    features, labels, _, _ = make_data([20, 20], 3, seed)
    a = stats_from(features, labels, 2, 3)
    b = ClassStats(2, 3)
    b.update(features[:0], labels[:0])
    b.update(features, labels)
    b.update(torch.empty(0, 3, dtype=torch.float16), torch.empty(0, dtype=torch.int64))
    torch.testing.assert_close(a.sigma_w, b.sigma_w, rtol=0, atol=0)


def test_near_collapse_float64_exact_where_naive_float32_fails(seed):
    """Class means of norm 1e4 offset by a common vector of norm 1e6, within-class spread 1e-2."""
    num_classes, dim, per_class = 5, 16, 400
    offset_norm, spread = 1e6, 1e-2
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=g, dtype=F64)
    means = means / means.norm(dim=1, keepdim=True) * 1e4
    offset = torch.randn(dim, generator=g, dtype=F64)
    offset = offset / offset.norm() * offset_norm
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=g, dtype=F64) * spread / dim**0.5
    features = means[labels] + offset + noise

    stats = ClassStats(num_classes, dim)
    for chunk in torch.split(torch.randperm(len(labels), generator=g), 128):
        stats.update(features[chunk], labels[chunk])
    got = ncfast.nc_metrics(stats)["nc1"]
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), num_classes)["nc1"]
    # The brute force's h − μ_c loses eps·‖h‖∞ ≈ eps·offset per entry against deviations of
    # size spread/√P, so its Σ_W (and NC1, linear in Σ_W) errs by ~2·eps·offset·√P/spread
    # relative (≈ 3.6e-7 here); ours is far more accurate. Allow 4× that.
    rtol = 8 * EPS * offset_norm * dim**0.5 / spread
    assert abs(got - expected) <= rtol * abs(expected)

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


def _normal_matrix_condition(stats: ClassStats, lam: float) -> float:
    """cond of K, the centered normal equations behind W̃_LS and the decomposition (SPEC §3)."""
    means, _ = stats.finalized()
    k, _, _ = reference.centered_normal_equations(means, stats.priors, stats.sigma_w, lam)
    return float(torch.linalg.cond(k))


def test_decomposition_identity_and_ls_perp_zero_at_least_squares(seed):
    features, labels, weight, bias = make_data([40, 75, 52, 66], 11, seed)
    stats = stats_from(features, labels, 4, 11)
    for lam in (0.0, 0.003, 0.5):
        # The solve for W̃_LS errs by ≤ κ(K)·eps relative (first order); the identity of SPEC §3
        # holds to 1e-10 (its contract), far above that bound for this data.
        kappa_eps = _normal_matrix_condition(stats, lam) * EPS
        assert kappa_eps < 1e-10
        r = ncfast.nc_metrics(stats, weight, bias, weight_decay=lam)
        total = r["loss_nc1"] + r["loss_nc23"] + r["loss_ls_perp"]
        assert abs(r["loss_mse"] - total) <= 1e-10 * r["loss_mse"]
        w_ls, b_ls = ncfast.least_squares_classifier(stats, lam)
        r_ls = ncfast.nc_metrics(stats, w_ls, b_ls, weight_decay=lam)
        # ls_perp is quadratic in the solve's error: ≤ (κ·eps)² of the loss scale; κ·eps bounds it.
        assert r_ls["loss_ls_perp"] <= kappa_eps * r_ls["loss_mse"]
        assert abs(r_ls["loss_mse"] - r_ls["loss_ls"]) <= 1e-10 * r_ls["loss_mse"]
        # W_LS minimises: any perturbation raises the loss.
        r_pert = ncfast.nc_metrics(stats, w_ls + 1e-3 * weight, b_ls, weight_decay=lam)
        assert r_pert["loss_mse"] > r_ls["loss_mse"]


def test_mse_loss_is_the_oracle_loss_and_differentiable(seed):
    """reference.mse_loss (shared by the decomposition and ncfast.theory) against the SPEC §3
    loss summed sample by sample in numpy, with λ; and its gradient in the weight is the
    analytic one, the first P columns of W̃ A − R with A = H̃H̃ᵀ/N + λI (HPD22 Eq. 3
    differentiated)."""
    features, labels, weight, bias = make_data([40, 75, 52], 9, seed)
    stats = stats_from(features, labels, 3, 9)
    means, sigma_w = stats.finalized()
    lam = 0.05
    w = weight.clone().requires_grad_(True)
    loss = reference.mse_loss(w, bias, means, stats.priors, sigma_w, lam)
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), 3, weight, bias, lam)
    # Both sum N non-negative terms of the statistics (N·eps·κ, see oracle_rtol).
    rtol = oracle_rtol(features, labels, 3, lam)
    assert float(loss.detach()) == pytest.approx(expected["loss_mse"], rel=rtol)
    (grad,) = torch.autograd.grad(loss, w)
    _, a, r = oracle.least_squares(features.numpy(), labels.numpy(), 3, lam)
    w_tilde = np.hstack([weight.numpy(), bias.numpy()[:, None]])
    analytic = (w_tilde @ a - r)[:, :9]
    # The difference of two terms of the size of W̃A and R, each to the same N·eps·κ.
    atol = rtol * max(np.abs(w_tilde @ a).max(), np.abs(r).max())
    np.testing.assert_allclose(grad.numpy(), analytic, rtol=0, atol=atol)


def test_nc_metrics_type_lists_every_spec_key():
    """NCMetrics (the annotated return type of nc_metrics) names the SPEC_KEYS and
    ``nc_undefined``, the reason of a NaN row (on_degenerate="nan")."""
    expected = {*ncfast.metrics.SPEC_KEYS, "nc_undefined"}
    assert set(ncfast.metrics.NCMetrics.__annotations__) == expected


def test_least_squares_classifier_matches_dense_normal_equations(seed):
    features, labels, _, _ = make_data([30, 45, 38], 7, seed)
    stats = stats_from(features, labels, 3, 7)
    for lam in (0.0, 0.1):
        w_ls, b_ls = ncfast.least_squares_classifier(stats, lam)
        expected, _, _ = oracle.least_squares(features.numpy(), labels.numpy(), 3, lam)
        # Normwise: both solve normal equations of condition κ, each to ~N·eps·κ relative.
        atol = oracle_rtol(features, labels, 3, lam) * np.abs(expected).max()
        np.testing.assert_allclose(w_ls.numpy(), expected[:, :7], rtol=0, atol=atol)
        np.testing.assert_allclose(b_ls.numpy(), expected[:, 7], rtol=0, atol=atol)


def test_least_squares_predictions_invariant_to_full_rank_transform(seed):
    """HPD22 Eq. 7: W_LS(AH̄)·AH̄ does not depend on a symmetric full-rank A (λ = 0)."""
    features, labels, _, _ = make_data([50, 60, 55, 45], 6, seed)
    centered = features - features.mean(0)
    g = torch.Generator().manual_seed(seed + 1)
    basis = orthonormal_columns(6, 6, g)
    transform = basis * torch.logspace(0, -np.log10(MIX_CONDITION), 6, dtype=F64) @ basis.T
    preds, kappas = [], []
    for h in (centered, centered @ transform.T):
        stats = stats_from(h, labels, 4, 6)
        kappas.append(_normal_matrix_condition(stats, 0.0))
        w, b = ncfast.least_squares_classifier(stats, 0.0)
        preds.append(h @ w.T + b)
    # Each prediction errs by ~N·eps·κ(K) of the predictions' size (accumulated statistics,
    # then the solve).
    atol = len(labels) * EPS * max(kappas) * float(preds[0].abs().max())
    torch.testing.assert_close(preds[0], preds[1], rtol=0, atol=atol)


def test_simplex_etf_with_isotropic_noise_is_collapsed(seed):
    num_classes, dim, per_class, sigma = 6, 10, 200, 1e-4
    g = torch.Generator().manual_seed(seed)
    basis = orthonormal_columns(dim, num_classes, g)
    etf = (torch.eye(num_classes) - 1.0 / num_classes).double()
    mbar = 3.0 * basis @ etf  # [P, C]: equal norms, cosines −1/(C−1), zero mean
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=g, dtype=F64) * sigma
    # Exactly zero class means and exactly isotropic pooled covariance σ²I.
    for k in range(num_classes):
        noise[labels == k] -= noise[labels == k].mean(0)
    evals, evecs = torch.linalg.eigh(noise.T @ noise / len(labels))
    noise = noise @ (evecs * evals.rsqrt()) @ evecs.T * sigma
    features = mbar.T[labels] + noise
    stats = stats_from(features, labels, num_classes, dim)
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
        # Zero in exact arithmetic. The class means carry the noise's rounding
        # (eps·‖h‖ against σ per entry), the classifier only rounding: a few eps.
        assert r[key] < 1e-12, (key, r[key])
    assert r["nc1"] < 1e-6  # σ²·tr(Σ_B^†)/C ≈ 1e-9: collapsed
    assert abs(r["snr_condition"] - 1.0) < 1e-9
    # Σ_W of features of size ‖h‖ ≈ 3 with deviations σ: each deviation carries eps·‖h‖ of
    # rounding, so Σ_W errs by ~2·eps·‖h‖·σ per entry (the noise itself is whitened exactly).
    atol = 4 * EPS * float(features.abs().max()) * sigma * dim
    torch.testing.assert_close(
        stats.sigma_w, sigma**2 * torch.eye(dim, dtype=F64), rtol=0, atol=atol
    )
    m = ncfast.Measurement(num_classes, dim, mbar.T.clone(), torch.zeros(num_classes))
    m.update(features, labels)
    assert m.compute()["nc4_ncc_mismatch"] == 0.0


def _informative_classifier(features, labels, num_classes, seed):
    """A classifier close to the nearest-class-center rule (w_c ≈ μ_c, b_c = −‖μ_c‖²/2), so NC4
    is strictly between 0 and 1 (a random classifier disagrees with every sample now and then)."""
    g = torch.Generator().manual_seed(seed + 2)
    means = torch.stack([features[labels == k].mean(0) for k in range(num_classes)])
    noise = torch.randn(means.shape, generator=g, dtype=F64)
    weight = means + 0.5 * noise * means.norm(dim=1).mean() / means.shape[1] ** 0.5
    return weight, -0.5 * means.square().sum(1)


def test_nc4_second_pass_equals_buffered(seed):
    features, labels, _, _ = make_data([80, 90, 70, 60], 5, seed, spread=3.0)
    weight, bias = _informative_classifier(features, labels, 4, seed)
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


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["buffered", "second_pass"])
def test_nc4_counts_only_valid_samples_when_skipping(seed, budget):
    """on_invalid="skip": NC4 is the mismatch fraction of the samples kept, as if the skipped
    ones had never been fed (numerator and denominator alike)."""
    features, labels, _, _ = make_data([80, 90, 70, 60], 5, seed, spread=3.0)
    weight, bias = _informative_classifier(features, labels, 4, seed)
    dirty_f = torch.cat([features, torch.full((30, 5), float("nan")), features[:40] * 3])
    dirty_y = torch.cat([labels, labels[:30], torch.full((40,), 4)])  # NaN rows, label 4 ∉ [0, 4)
    order = torch.randperm(len(dirty_y), generator=torch.Generator().manual_seed(seed))
    dirty_f, dirty_y = dirty_f[order], dirty_y[order]
    m = stream(dirty_f, dirty_y, 4, 32, weight, bias, on_invalid="skip", memory_budget_bytes=budget)
    assert m.needs_second_pass == (budget == 0)
    batches = [(dirty_f[i : i + 32], dirty_y[i : i + 32]) for i in range(0, len(dirty_y), 32)]
    result = m.compute(second_pass=batches if budget == 0 else None)
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), 4, weight, bias)
    assert 0 < expected["nc4_ncc_mismatch"] < 1
    assert result["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]
    assert result["num_samples"] == len(labels)
    assert m.stats.skipped == {"label_out_of_range": 40, "non_finite": 30}


# NC4 ties (SPEC §2: both the classifier's argmax and the nearest center's argmin go to the
# lowest index). Integer features and weights, so every product and sum below is exact and the
# ties are exact in any summation order. Class means (−2, 0), (2, 0), (0, 3); the two samples at
# (0, 0) are equidistant (distance 2) from the means of classes 0 and 1.
TIE_FEATURES = [
    [-4.0, 0.0],
    [0.0, 0.0],
    [-2.0, 0.0],
    [4.0, 0.0],
    [0.0, 0.0],
    [1.0, 3.0],
    [-1.0, 3.0],
]
TIE_LABELS = [0, 0, 0, 1, 1, 2, 2]
TIE_CASES = {
    # name: (weight, bias, the rule the case isolates). Distance ties only: the classifier picks
    # class 0 at (0, 0) without a tie, and no logits tie anywhere.
    "nearest_center_tie": ([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.5, 0.0, 0.0], "argmin"),
    # Logit ties between classes 0 and 1 (identical rows) at the samples on the x axis; class 2
    # wins clearly at (±1, 3).
    "logit_tie": ([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]], [1.0, 1.0, 0.0], "argmax"),
}


def _mismatch_with_tie_rule(features, labels, weight, bias, pick_max, pick_min) -> float:
    """NC4 by hand (numpy, exact here); ``pick_max``/``pick_min`` choose among the tied indices
    of the classifier's argmax and of the nearest center's argmin."""
    x, y = np.asarray(features), np.asarray(labels)
    w, b = np.asarray(weight), np.asarray(bias)
    means = np.stack([x[y == k].mean(0) for k in range(len(b))])
    mismatches = 0
    for h in x:
        logits = w @ h + b
        dists = ((h - means) ** 2).sum(1)
        predicted = pick_max(np.flatnonzero(logits == logits.max()))
        nearest = pick_min(np.flatnonzero(dists == dists.min()))
        mismatches += int(predicted != nearest)
    return mismatches / len(x)


@pytest.mark.parametrize("case", list(TIE_CASES))
def test_nc4_ties_go_to_lowest_index(backend, case):
    weight, bias, rule = TIE_CASES[case]
    args = (TIE_FEATURES, TIE_LABELS, weight, bias)
    lowest = _mismatch_with_tie_rule(*args, min, min)
    # The tie rule this case isolates decides the answer (alone, and with the other flipped
    # too): the test fails if either goes to another index.
    flipped = (max, min) if rule == "argmax" else (min, max)
    assert lowest != _mismatch_with_tie_rule(*args, *flipped)
    assert lowest != _mismatch_with_tie_rule(*args, max, max)
    m = ncfast.Measurement(3, 2, torch.tensor(weight, dtype=F64), torch.tensor(bias, dtype=F64))
    m.update(torch.tensor(TIE_FEATURES, dtype=F64), torch.tensor(TIE_LABELS))
    assert m.compute()["nc4_ncc_mismatch"] == lowest


def test_whiten_and_snr(seed):
    features, labels, _, _ = make_data([40, 50, 60], 5, seed)
    stats = stats_from(features, labels, 3, 5)
    w = ncfast.whiten(stats)
    # The eigendecomposition is backward stable: W Σ_W W − I errs by ≤ P·eps·cond(Σ_W).
    atol = 5 * EPS * float(torch.linalg.cond(stats.sigma_w))
    torch.testing.assert_close(w @ stats.sigma_w @ w, torch.eye(5, dtype=F64), rtol=0, atol=atol)
    s = ncfast.snr(stats)
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), 3)["snr_singular_values"]
    np.testing.assert_allclose(
        torch.linalg.svdvals(s)[:2].numpy(), expected, rtol=oracle_rtol(features, labels, 3)
    )


def test_whiten_singular_within_scatter_reports_rank(seed):
    # P > N − C: Σ_W is singular; the pseudo-inverse square root acts on its range.
    features, labels, _, _ = make_data([4, 4, 4], 20, seed)
    stats = stats_from(features, labels, 3, 20)
    r = ncfast.nc_metrics(stats)
    assert r["sigma_w_rank"] == 12 - 3
    w = ncfast.whiten(stats)
    proj = w @ stats.sigma_w @ w
    # On its range Σ_W has condition ≤ MIX_CONDITION² (make_data); the pseudo-inverse square
    # root is accurate to P·eps·that condition, its rounding off the range adds eps·P·‖Σ_W‖
    # against the smallest kept eigenvalue: together ≤ 2·P·eps·κ_range.
    evals = torch.linalg.eigvalsh(stats.sigma_w)
    kept = evals[evals > 20 * EPS * evals.max()]
    atol = 2 * 20 * EPS * float(kept.max() / kept.min())
    torch.testing.assert_close(proj @ proj, proj, atol=atol, rtol=0)  # a projector
    assert abs(float(torch.trace(proj)) - 9) < 9 * atol


def test_mse_lambda():
    assert ncfast.mse_lambda(5e-4, 10) == pytest.approx(2.5e-3)


@pytest.mark.parametrize("log2_cond", [0, 10, 20, 26, 33])
def test_whitening_accuracy_against_an_exactly_known_inverse_square_root(log2_cond, seed):
    """Σ = H diag(2^-e) Hᵀ with H a scaled Hadamard matrix is exact in float64, and so is its
    inverse square root H diag(2^(e/2)) Hᵀ. Every float64 eigendecomposition is limited by
    cond·eps (the rounding of the smallest eigenvalue against the largest); ours stays within
    10·cond·eps (numpy's eigh: about the same).
    """
    from scipy.linalg import hadamard

    n = 64
    h = hadamard(n).astype(np.float64) / 8.0  # orthogonal, entries ±1/8
    rng = np.random.default_rng(seed)
    e = rng.integers(0, log2_cond // 2 + 1, n) * 2  # even exponents: exact square roots
    e[0], e[-1] = 0, log2_cond - log2_cond % 2
    sigma = (h * 2.0 ** (-e.astype(float))) @ h.T
    truth = (h * 2.0 ** (e / 2)) @ h.T
    whitening, rank = ncfast.backend.ops.psd_inv_sqrt(torch.from_numpy(sigma))
    error = np.linalg.norm(whitening.numpy() - truth) / np.linalg.norm(truth)
    cond = 2.0 ** e.max()
    assert rank == n
    assert error <= 10 * cond * EPS
