"""Degenerate features (SPEC §2): class means that do not separate beyond the rounding of their
float64 accumulation, or all-zero features, are a named error in the library and a row of NaN
metrics with the reason in what training logs; near-collapse data that does separate keeps exact
metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import ncfast
from ncfast.metrics import SPEC_KEYS
from ncfast.paper.data import LabeledImages
from ncfast.paper.evaluate import measure_split
from tests.helpers import oracle
from tests.helpers.feeding import stats_from, stream
from tests.helpers.synthetic_features import F64, orthonormal_columns
from tests.helpers.tolerances import DIMENSIONLESS_ATOL, EPS

# Every test here that takes the `backend` fixture (tests/conftest.py) runs on the reference and
# on the native backend.
BOOKKEEPING = ("classes_present", "weight_decay", "num_samples")


def streamed(features, labels, num_classes, batch=37, weight=None):
    bias = None if weight is None else torch.zeros(num_classes)
    return stream(features, labels, num_classes, batch, weight, bias)


def rounding_bound(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The documented threshold of ncfast.metrics.check_separation with the exact class RMS
    norms: 2·√C·γ_{2·max n_c + 2}·max_c r_c."""
    x = features.double()
    counts = torch.bincount(labels, minlength=num_classes)
    rms = max(float(x[labels == k].square().sum(1).mean().sqrt()) for k in range(num_classes))
    terms = 2 * int(counts.max()) + 2
    return 2 * math.sqrt(num_classes) * terms * EPS / (1 - terms * EPS) * rms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [3.7e-5, 1.0, 1e6])
def test_identical_samples_are_an_error_not_perfect_collapse(backend, seed, dtype, scale):
    """Every sample the same point: NC1 would read 0 and sigma_b_rank 1 from rounding noise."""
    g = torch.Generator().manual_seed(seed)
    point = (torch.randn(6, generator=g, dtype=F64) * scale).to(dtype)
    labels = torch.randint(0, 4, (500,), generator=g)
    labels[:4] = torch.arange(4)  # every class present
    m = streamed(point.expand(500, 6), labels, 4, weight=torch.randn(4, 6, generator=g))
    with pytest.raises(ncfast.DegenerateFeaturesError, match="class means do not separate") as info:
        m.compute()
    message = str(info.value)
    assert "\n" not in message and "500 samples of 4 classes" in message
    assert "undefined" in message and info.value.reason in message
    with pytest.raises(ncfast.DegenerateFeaturesError):
        ncfast.snr(m.stats)


def test_all_zero_features_are_an_error_not_nan(backend):
    stats = stats_from(torch.zeros(30, 5), torch.arange(30) % 3, 3, 5)
    with pytest.raises(ncfast.DegenerateFeaturesError, match="every feature is zero"):
        ncfast.nc_metrics(stats)
    assert issubclass(ncfast.DegenerateFeaturesError, ValueError)


def separated_by(separation: float, seed: int, num_classes=3, per_class=100, dim=5):
    """Features at a common point of norm 1, class means ``separation`` apart from it (unit
    directions), within-class spread separation/100 (Σ_W nonzero)."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(dim, generator=g, dtype=F64)
    center /= center.norm()
    directions = orthonormal_columns(dim, num_classes, g).T
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=g, dtype=F64) * separation / 100
    return center + separation * directions[labels] + noise, labels


@pytest.mark.parametrize(("factor", "degenerate"), [(1e3, False), (1e-2, True)])
def test_both_sides_of_the_rounding_threshold(backend, seed, factor, degenerate):
    """Class means 1000× the rounding bound of their float64 accumulation apart are measured;
    1/100 of it (a few ulps of the features) is degenerate."""
    features, labels = separated_by(1e-13, seed)
    bound = rounding_bound(features, labels, 3)
    features, labels = separated_by(factor * bound, seed)
    stats = ncfast.ClassStats(3, 5)
    for start in range(0, len(labels), 64):
        stats.update(features[start : start + 64], labels[start : start + 64])
    if degenerate:
        with pytest.raises(ncfast.DegenerateFeaturesError, match="do not separate"):
            ncfast.nc_metrics(stats)
    else:
        result = ncfast.nc_metrics(stats)
        # Only the two real directions of M̄ count: its rounding noise in the third stays
        # below the bound (above SPEC's rtol·max σ here, 1e3× the bound being 1e-10 of r).
        assert result["sigma_b_rank"] == 2
        assert all(math.isfinite(result[k]) for k in ("nc1", "nc2_equinorm_means"))


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_near_collapse_with_a_large_offset_keeps_exact_metrics(backend, seed, offset):
    """Within-class spread 1e-4 of the class-mean norm, a common offset of norm 1e6: not
    degenerate (the means separate by 1e-6 of the feature norm, 1e6× the rounding bound), and
    every metric matches the float64 brute force to the brute force's own accuracy."""
    num_classes, dim, per_class, spread = 4, 8, 150, 1e-4
    g = torch.Generator().manual_seed(seed)
    means = orthonormal_columns(dim, num_classes, g).T  # norm 1, well separated
    direction = torch.randn(dim, generator=g, dtype=F64)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=g, dtype=F64) * spread / dim**0.5
    features = means[labels] + offset * direction / direction.norm() + noise
    weight = torch.randn(num_classes, dim, generator=g, dtype=F64)
    order = torch.randperm(len(labels), generator=g)
    m = streamed(features[order], labels[order], num_classes, weight=weight)
    result = m.compute()
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), num_classes, weight)
    # The brute force rounds h − μ_c at eps·max|h| against deviations of size spread/√P: its
    # Σ_W (and everything whitened by it) errs by ~2·eps·max|h|·√P/spread relative, its means
    # by eps·max|h| against a separation of 1. Allow 4× the first (the larger).
    rtol = max(8 * EPS * float(features.abs().max()) * dim**0.5 / spread, 1e-12)
    np.testing.assert_allclose(result["nc1"], expected["nc1"], rtol=rtol, err_msg="nc1")
    # NC2/NC3 normalise the columns of M̄ (norm ≈ 1, and near 0 here: orthonormal means): the
    # brute force's class means, sums of n_c features, err by ≤ n_c·eps·max‖h‖ absolute.
    atol = per_class * EPS * float(features.norm(dim=1).max()) + DIMENSIONLESS_ATOL
    for key in ("nc2_equinorm_means", "nc2_equiangular_means", "nc3_self_duality"):
        np.testing.assert_allclose(result[key], expected[key], rtol=rtol, atol=atol, err_msg=key)
    # The brute force (SPEC's rtol alone) keeps a C-th singular value at the offset's rounding
    # level (ω ~ 1e-5 against 3e4); ncfast drops it with M̄'s rounding bound.
    omega, expected_omega = result["snr_singular_values"].numpy(), expected["snr_singular_values"]
    assert len(omega) == result["sigma_b_rank"] == num_classes - 1
    np.testing.assert_allclose(omega, expected_omega[: num_classes - 1], rtol=rtol)
    assert (expected_omega[num_classes - 1 :] < 1e-6 * omega[0]).all()
    assert result["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]


# --------------------------------------------------------------------- what training logs
class PointFeatures(nn.Module):
    """A network whose features collapsed to one point (or died: the point is zero)."""

    def __init__(self, point: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("point", point)
        self.classifier = nn.Linear(point.numel(), num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.point.expand(x.shape[0], -1) + 0 * x.flatten(1)[:, :1]


class MeanPixelFeatures(nn.Module):
    """A healthy network: features differ between images."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(2, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return torch.stack([flat.mean(1), flat[:, ::2].mean(1)], dim=1)


def tiny_split(seed: int, num_classes: int = 3, per_class: int = 20) -> LabeledImages:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 1, 4, 4), generator=g, dtype=torch.uint8)
    half = torch.full((1,), 0.5)
    return LabeledImages(images, labels, num_classes, half, half, "synthetic", "train")


@pytest.mark.parametrize(
    ("point", "reason"),
    [(torch.tensor([0.3, -1.2, 5.0, 0.7]), "do not separate"), (torch.zeros(4), "feature is zero")],
)
def test_measure_split_logs_nan_metrics_with_the_reason(seed, point, reason):
    torch.manual_seed(seed)
    data = tiny_split(seed)
    row = measure_split(
        PointFeatures(point, 3), data, loss="mse", sgd_weight_decay=5e-4, batch_size=16
    )
    assert reason in row["nc_undefined"]
    for key in SPEC_KEYS:
        if key == "snr_singular_values":
            assert row[key].numel() == 0
        elif key not in BOOKKEEPING:
            assert math.isnan(row[key]), key
    assert row["num_samples"] == len(data) and row["classes_present"] == 3
    assert row["weight_decay"] == ncfast.mse_lambda(5e-4, 3)
    # The loss and error of the network are still measured.
    assert math.isfinite(row["loss"]) and 0 <= row["error"] <= 1


def test_measure_split_of_a_healthy_network_has_no_reason(seed):
    torch.manual_seed(seed)
    row = measure_split(
        MeanPixelFeatures(3), tiny_split(seed), loss="mse", sgd_weight_decay=5e-4, batch_size=16
    )
    assert "nc_undefined" not in row
    assert math.isfinite(row["nc1"]) and row["sigma_b_rank"] == 2


def test_measure_split_of_a_diverged_network_says_so_not_library_advice(seed):
    """Issue 19 item 17: analyze of a checkpoint with NaN features tells the user that the
    network diverged, not to create a ClassStats (which a CLI user cannot do)."""
    torch.manual_seed(seed)
    data = tiny_split(seed)
    model = PointFeatures(torch.tensor([0.3, math.nan, 5.0, 0.7]), 3)
    with pytest.raises(ncfast.InvalidInputError, match="non-finite.*weights diverged") as caught:
        measure_split(model, data, loss="mse", sgd_weight_decay=5e-4, batch_size=16)
    assert "ClassStats(" not in str(caught.value) and "on_invalid" not in str(caught.value)
