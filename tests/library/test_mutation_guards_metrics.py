"""Guards of ncfast/metrics.py that mutmut found missing (issue 21): each test fails on the
surviving mutants that bench/results/mutation.md lists with it (checked by running the mutant)."""

from __future__ import annotations

import math

import pytest
import torch

from ncfast.metrics import (
    SPEC_KEYS,
    DegenerateFeaturesError,
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


def test_mse_lambda_is_c_times_the_sgd_weight_decay_over_two():
    assert mse_lambda(0.01, 10) == pytest.approx(0.05, rel=4 * EPS)  # two roundings


def test_errors_name_the_function_called(seed):
    """Fewer than two classes, or means that do not separate: the message starts with the
    function the user called."""
    single = one_class(seed)
    for function, name in ((nc_metrics, "nc_metrics"), (snr, "snr")):
        with pytest.raises(ValueError, match=rf"^{name}: needs at least two classes"):
            function(single)
    with pytest.raises(ValueError, match=r"^least_squares_classifier: needs at least two"):
        least_squares_classifier(single)
    with pytest.raises(DegenerateFeaturesError, match=r"^snr: the class means do not separate"):
        snr(identical_samples())
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
    assert got.keys() == expected.keys() and "nc4_ncc_mismatch" in got
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key
    assert nc_metrics_or_nan(stats)["weight_decay"] == 0.0


def test_nc_metrics_or_nan_of_undefined_metrics(seed):
    """Every metric NaN, the bookkeeping as measured, and the reason: from undefined_reason
    (a non-finite classifier) or from the DegenerateFeaturesError (identical samples)."""
    features, labels, weight, bias = make_data([7, 9, 8], 3, seed)
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


@pytest.mark.parametrize(("factor", "degenerate"), [(1.1, False), (0.9, True)])
def test_the_bound_of_classes_of_one_and_two_samples(factor, degenerate):
    """Classes of 2, 1 and 1 samples apart along e1 only, at 1.1 and 0.9 times the bound: with
    so few samples the γ of the bound (2·max n_c + 2 = 6 terms) differs from its neighbours
    (5 or 7 terms) by more than the margin. Every sample of a class has the same e1 coordinate
    (exact class means there); class 0's ±1 in e3 gives Σ_W its trace."""
    labels = torch.tensor([0, 0, 1, 2])
    features = torch.zeros(4, 3, dtype=F64)
    features[:, 1] = 1.0
    features[:2, 2] = torch.tensor([1.0, -1.0], dtype=F64)
    bound = documented_bound(features, labels, 3)
    shape = torch.tensor([0.0, 1.0, -0.5], dtype=F64)
    priors = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    sigma_max = float((shape - priors @ shape).norm())  # rank 1: the column's norm
    features[:, 0] = (factor * bound / sigma_max * shape)[labels]
    assert documented_bound(features, labels, 3) == pytest.approx(bound, rel=1e-9)
    stats = fed(features, labels, 3)
    if degenerate:
        with pytest.raises(DegenerateFeaturesError, match="do not separate"):
            nc_metrics(stats)
    else:
        assert nc_metrics(stats)["sigma_b_rank"] == 1
