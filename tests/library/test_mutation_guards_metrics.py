"""Guards of ncfast/metrics.py that mutmut found missing (issue 21): each test fails on the
surviving mutants that bench/results/mutation.md lists with it (checked by running the mutant)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from ncfast.metrics import (
    SPEC_KEYS,
    DegenerateFeaturesError,
    check_separation,
    least_squares_classifier,
    mse_lambda,
    nc_metrics,
    nc_metrics_or_nan,
    snr,
    undefined_reason,
    whiten,
)
from ncfast.stats import ClassStats
from tests.helpers.synthetic_features import F64, make_data
from tests.helpers.tolerances import EPS, documented_bound


def fed(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassStats:
    stats = ClassStats(num_classes, features.shape[1])
    stats.update(features, labels)
    return stats


def one_class(seed: int) -> ClassStats:
    features, labels, _, _ = make_data([6, 0], 3, seed)
    return fed(features, labels, 2)


def identical_samples() -> ClassStats:
    return fed(torch.ones(4, 2, dtype=F64), torch.tensor([0, 1, 0, 1]), 2)


def assert_same_metrics(got, expected) -> None:
    """The same keys and values, bit for bit (the same float64 computation)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def test_mse_lambda_is_c_times_the_sgd_weight_decay_over_two():
    assert mse_lambda(0.01, 10) == pytest.approx(0.05, rel=4 * EPS)  # two roundings


def test_errors_name_the_function_called(seed):
    """Fewer than two classes, means that do not separate, a negative weight decay: the message
    starts with the function the user called."""
    name_ls = "least_squares_classifier"
    single = one_class(seed)
    for function, name in ((nc_metrics, "nc_metrics"), (snr, "snr")):
        with pytest.raises(ValueError, match=rf"^{name}: needs at least two classes"):
            function(single)
    with pytest.raises(ValueError, match=r"^least_squares_classifier: needs at least two"):
        least_squares_classifier(single)
    for function, name in ((snr, "snr"), (nc_metrics, "nc_metrics")):
        with pytest.raises(DegenerateFeaturesError, match=rf"^{name}: the class means do not"):
            function(identical_samples())
    features, labels, _, _ = make_data([7, 9], 3, seed)
    for function, name in ((nc_metrics, "nc_metrics"), (least_squares_classifier, name_ls)):
        with pytest.raises(ValueError, match=rf"^{name}: weight_decay \(λ of SPEC §3\) must be"):
            function(fed(features, labels, 2), weight_decay=-1.0)
    error = DegenerateFeaturesError("here", "the reason")
    assert (str(error), error.reason) == ("here: the reason", "the reason")


def test_two_classes_are_enough(seed):
    features, labels, weight, bias = make_data([7, 9], 3, seed)
    stats = fed(features, labels, 2)
    assert undefined_reason(stats, weight, bias) is None
    assert least_squares_classifier(stats)[0].shape == (2, 3)
    assert snr(stats).shape == (3, 2)
    assert nc_metrics(stats)["classes_present"] == 2


def test_whiten_is_the_inverse_square_root_of_sigma_w(seed):
    features, labels, _, _ = make_data([20, 25, 30], 4, seed)
    stats = fed(features, labels, 3)
    inv_sqrt = whiten(stats)
    sigma_w = stats.sigma_w
    # inv_sqrt·Σ_W·inv_sqrt = I up to cond(Σ_W)·P·eps (an eigendecomposition of Σ_W).
    tolerance = 100 * 4 * EPS * float(torch.linalg.cond(sigma_w))
    torch.testing.assert_close(
        inv_sqrt @ sigma_w @ inv_sqrt, torch.eye(4, dtype=F64), rtol=0, atol=tolerance
    )
    assert torch.equal(snr(stats), inv_sqrt @ stats.centered_means)  # the same operations


def test_undefined_reason_names_each_cause(seed):
    features, labels, weight, bias = make_data([7, 9, 8], 3, seed)
    stats = fed(features, labels, 3)
    diverged = "the classifier's weight or bias is not finite (training diverged)"
    assert undefined_reason(stats) is None
    assert undefined_reason(stats, weight) is None  # no bias: only the weight is read
    assert undefined_reason(stats, weight, bias) is None
    bad_bias = bias.clone()
    bad_bias[1] = math.inf
    bad_weight = weight.clone()
    bad_weight[0, 2] = math.nan
    assert undefined_reason(stats, weight, bad_bias) == diverged
    assert undefined_reason(stats, bad_weight, bias) == diverged
    assert undefined_reason(stats, bad_weight) == diverged
    assert undefined_reason(one_class(seed)) == (
        "1 of 2 classes had samples (at least two are needed; 6 samples)"
    )


def test_nc_metrics_with_a_finite_weight_and_a_non_finite_bias_is_an_error(seed):
    features, labels, weight, bias = make_data([7, 9, 8], 3, seed)
    bias[0] = math.nan
    with pytest.raises(ValueError, match=r"^nc_metrics: weight or bias contains NaN/inf"):
        nc_metrics(fed(features, labels, 3), weight, bias)


def test_nc_metrics_or_nan_passes_every_argument_on(seed):
    """Where defined: exactly nc_metrics of the same arguments (the same computation)."""
    features, labels, weight, bias = make_data([7, 9, 8], 3, seed)
    stats = fed(features, labels, 3)
    got = nc_metrics_or_nan(stats, weight, 3 * bias, 0.3, ncc_mismatch=0.25)
    expected = nc_metrics(stats, weight, 3 * bias, 0.3, ncc_mismatch=0.25)
    assert_same_metrics(got, expected)
    assert "nc4_ncc_mismatch" in got
    assert nc_metrics_or_nan(stats)["weight_decay"] == 0.0


def test_the_default_weight_decay_is_zero(seed):
    features, labels, weight, bias = make_data([7, 9, 8], 3, seed)
    stats = fed(features, labels, 3)
    default, explicit = least_squares_classifier(stats), least_squares_classifier(stats, 0.0)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
    metrics = nc_metrics(stats, weight, bias)
    assert metrics["weight_decay"] == 0.0
    assert_same_metrics(metrics, nc_metrics(stats, weight, bias, 0.0))


def test_nc_metrics_or_nan_of_undefined_metrics(seed):
    """Every metric NaN, the bookkeeping as measured, and the reason: from undefined_reason
    (a non-finite classifier) or from the DegenerateFeaturesError (identical samples)."""
    features, labels, weight, bias = make_data([7, 9, 8], 3, seed)
    bad_bias = bias.clone()
    bad_bias[0] = math.nan  # with a finite weight: undefined_reason must see the bias
    reason = nc_metrics_or_nan(fed(features, labels, 3), weight, bad_bias)["nc_undefined"]
    assert reason == "the classifier's weight or bias is not finite (training diverged)"
    weight[1, 1] = math.inf
    diverged = nc_metrics_or_nan(fed(features, labels, 3), weight, bias, weight_decay=0.5)
    degenerate = nc_metrics_or_nan(identical_samples(), weight_decay=2)
    assert diverged["nc_undefined"] == undefined_reason(fed(features, labels, 3), weight, bias)
    assert degenerate["nc_undefined"].startswith("the class means do not separate")
    for row, samples, classes, decay in ((diverged, 24, 3, 0.5), (degenerate, 4, 2, 2.0)):
        assert (row["num_samples"], row["classes_present"]) == (samples, classes)
        assert row["weight_decay"] == decay and isinstance(row["weight_decay"], float)
        empty = row["snr_singular_values"]
        assert empty.shape == (0,) and empty.dtype == torch.float64
        bookkeeping = ("snr_singular_values", "num_samples", "classes_present", "weight_decay")
        for key in SPEC_KEYS:
            if key not in bookkeeping:
                assert math.isnan(row[key]), key


def rank_one_at(counts: tuple[int, int, int], factor: float) -> ClassStats:
    """Three classes apart along e1 only, σ_max(M̄) at ``factor`` times the documented bound of
    check_separation. Every sample of a class has the same e1 coordinate (exact class means
    there), every sample e2 = 1, and class 0's samples alternate ±1 in e3 (Σ_W's trace)."""
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    features = torch.zeros(len(labels), 3, dtype=F64)
    features[:, 1] = 1.0
    features[: counts[0], 2] = torch.tensor([1.0, -1.0], dtype=F64).repeat(counts[0] // 2)
    bound = documented_bound(features, labels, 3)
    shape = torch.tensor([0.0, 1.0, -0.5], dtype=F64)
    priors = torch.tensor(counts, dtype=F64) / len(labels)
    sigma_max = float((shape - priors @ shape).norm())  # rank 1: the column's norm
    features[:, 0] = (factor * bound / sigma_max * shape)[labels]
    # The e1 coordinates (~1e-13) add nothing to ‖μ_c‖² = 1 in float64: the same bound.
    assert documented_bound(features, labels, 3) == bound
    return fed(features, labels, 3)


@pytest.mark.parametrize(("factor", "degenerate"), [(1.1, False), (0.9, True)])
def test_the_bound_of_classes_of_one_and_two_samples(factor, degenerate):
    """Classes of 2, 1 and 1 samples at 1.1 and 0.9 times the bound: with so few samples the γ
    of the bound (2·max n_c + 2 = 6 terms) differs from its neighbours (5 or 7 terms) by more
    than the margin."""
    stats = rank_one_at((2, 1, 1), factor)
    if degenerate:
        with pytest.raises(DegenerateFeaturesError, match="do not separate"):
            nc_metrics(stats)
    else:
        assert nc_metrics(stats)["sigma_b_rank"] == 1


K_500 = 2 * 500 + 2  # the terms of γ for a class of 500 samples


@pytest.mark.parametrize(
    ("factor", "degenerate"), [(1 + K_500 * EPS / 2, False), (1 - K_500 * EPS / 2, True)]
)
def test_the_bound_holds_to_a_fraction_of_k_eps(factor, degenerate):
    """Classes of 500, 6 and 6 samples at 1 ± k·eps/2 = 1 ± 1.1e-13 times the bound (k = 1002):
    the class means are exact and N = 512 makes the priors exact (μ_G = 1 in e2 exactly: with
    N = 506 M̄'s e2 row rounds to ~eps, moving ‖M̄‖ by 1e-10), so the bound and σ_max round by
    a few eps only, 50 times less than the margin. The bound is then the documented one to
    1.1e-13: γ_k = k·eps/(1 − k·eps) (k·eps·(1 − k·eps) or k·eps/(1 + k·eps) is 2k·eps =
    4.4e-13 smaller), and r_c² with N/n_c = 512/6 in float64 (float32 moves r by 1.5e-8)."""
    stats = rank_one_at((500, 6, 6), factor)
    if degenerate:
        with pytest.raises(DegenerateFeaturesError, match="do not separate"):
            nc_metrics(stats)
    else:
        assert nc_metrics(stats)["sigma_b_rank"] == 1


def two_classes_apart(half_gap: float) -> ClassStats:
    """Two classes of two samples at e1 = ±``half_gap``, every sample at e2 = 3: M̄ = [[a, −a],
    [0, 0]] exactly (μ_G = (0, 3) exactly), and r = 3 for any a below 1e-9 (a² vanishes
    against 9): the bound of check_separation does not depend on a."""
    features = torch.tensor([[half_gap, 3.0]] * 2 + [[-half_gap, 3.0]] * 2, dtype=F64)
    return fed(features, torch.tensor([0, 0, 1, 1]), 2)


def apart_at_norm(size: float) -> ClassStats:
    """two_classes_apart with ‖M̄‖_F, as check_separation computes it, exactly ``size``: the
    half gap a searched within 64 ulps of size/√2."""
    candidates = [size / math.sqrt(2)]
    up = down = candidates[0]
    for _ in range(64):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, 0.0)
        candidates += [up, down]
    for half_gap in candidates:
        stats = two_classes_apart(half_gap)
        if float(torch.linalg.matrix_norm(stats.centered_means)) == size:
            return stats
    raise AssertionError(f"no half gap gives ‖M̄‖_F = {size!r}")


def test_sigma_max_is_computed_only_within_root_rank_of_the_bound(monkeypatch):
    """check_separation's documented decision: ‖M̄‖_F (one pass) decides above √min(P, C)·bound
    (then σ_max > bound) and at or below the bound (then σ_max ≤ bound: degenerate, equality
    included); σ_max, an SVD, is computed only in between. Checked exactly at √2·bound, one ulp
    above it and exactly at the bound (P = C = 2), and at 1.2·bound."""
    separated = two_classes_apart(1e-12)
    bound = check_separation(separated, separated.centered_means, "here")
    root_two = math.sqrt(min(separated.centered_means.shape)) * bound  # as computed there
    above = apart_at_norm(math.nextafter(root_two, math.inf))
    at_root_two = apart_at_norm(root_two)
    between = two_classes_apart(1.2 * bound / math.sqrt(2))
    at_bound = apart_at_norm(bound)
    norms_taken = []
    matrix_norm = torch.linalg.matrix_norm

    def recording_norm(matrix, *args, **kwargs):
        norms_taken.append(kwargs.get("ord", "fro"))
        return matrix_norm(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "matrix_norm", recording_norm)
    for stats, norms in ((above, ["fro"]), (at_root_two, ["fro", 2]), (between, ["fro", 2])):
        norms_taken.clear()
        assert check_separation(stats, stats.centered_means, "here") == bound
        assert norms_taken == norms
    norms_taken.clear()
    with pytest.raises(DegenerateFeaturesError, match=r"^here: the class means do not separate"):
        check_separation(at_bound, at_bound.centered_means, "here")
    assert norms_taken == ["fro"]


def test_a_classifier_of_the_wrong_shape_is_an_error_naming_nc_metrics(seed):
    features, labels, weight, bias = make_data([7, 9, 8], 4, seed)
    stats = fed(features, labels, 3)
    wrong_shapes = (
        weight[:2],
        torch.cat([weight, weight[:1]]),
        weight[:, :3],
        torch.cat([weight, weight[:, :1]], dim=1),
    )
    for wrong in wrong_shapes:
        message = "nc_metrics: weight must have shape [num_classes, dim] = [3, 4], got "
        with pytest.raises(ValueError, match="^" + re.escape(message + str(list(wrong.shape)))):
            nc_metrics(stats, wrong, bias[: len(wrong)])


def test_a_float32_or_float16_classifier_gives_the_metrics_of_its_values(seed):
    """The classifier is read in float64: a float32 or float16 weight and bias, whose values
    float64 holds exactly, give the metrics of those values in float64 bit for bit."""
    features, labels, weight, bias = make_data([7, 9, 8], 4, seed)
    stats = fed(features, labels, 3)
    for dtype in (torch.float32, torch.float16):
        low_weight, low_bias = weight.to(dtype), bias.to(dtype)
        expected = nc_metrics(stats, low_weight.double(), low_bias.double(), 0.1)
        assert_same_metrics(nc_metrics(stats, low_weight, low_bias.double(), 0.1), expected)
        assert_same_metrics(nc_metrics(stats, low_weight.double(), low_bias, 0.1), expected)


def test_the_classifier_is_copied_to_the_statistics_device(seed):
    """The meta device stands in for a second device (it holds no data): a weight or a bias
    there is copied to the statistics' device (the CPU), and that copy is what fails. Left on
    its device, the classifier would reach the metrics there (here: an error of another kind,
    reading a meta tensor)."""
    features, labels, weight, bias = make_data([7, 9, 8], 4, seed)
    stats = fed(features, labels, 3)
    for on_meta in ((weight.to("meta"), bias), (weight, bias.to("meta"))):
        with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
            nc_metrics(stats, *on_meta)


def test_rtol_sets_which_snr_singular_values_count(seed):
    """With ``rtol`` between the 2nd and 3rd singular values of the SNR (relative to the 1st),
    the two largest count; by default, all three (rank C − 1 = 3 < P)."""
    features, labels, _, _ = make_data([20, 25, 30, 35], 4, seed)
    stats = fed(features, labels, 4)
    values = torch.linalg.svdvals(snr(stats)).tolist()
    # The geometric midpoint: a gap far above the rounding of either (eps-relative).
    rtol = math.sqrt(values[1] * values[2]) / values[0]
    assert len(nc_metrics(stats)["snr_singular_values"]) == 3
    assert len(nc_metrics(stats, rtol=rtol)["snr_singular_values"]) == 2
