"""Guards of ncfast.paper.robustness against small mutants (SPEC §7): DeepFool against
independent references (the closed-form distance of a linear classifier, a 1-D DeepFool on a
piecewise-linear gap, a never-reachable class, a flat and a tied network), the images it
evaluates again (only those not yet fooled, never an empty batch), ``tight_scales`` on rays
whose flip points are set by hand (coarse grids, one scan point, a flip and flip back, the
attack's own endpoint), the valid range and the out-of-range count at the slack's edge, the
seeded sample, and every key of ``robustness``'s summary against a float64 recomputation,
with the argument checks (the error and the argument it names, and the boundary accepted).

Tiny models on CPU; the whole file runs in a few seconds."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ncfast.paper.robustness import (
    DeepFoolResult,
    deepfool,
    out_of_range_fractions,
    robustness,
    sample_indices,
    tight_scales,
    valid_range_of,
)
from tests.helpers.tolerances import EPS

F64 = torch.float64
MARGIN = 1e-4  # the original DeepFool's margin on each step's distance (not read from ncfast)


# ------------------------------------------------------------------------- reference models
def _linear(dim: int, classes: int, seed: int, dtype=F64) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(dim, classes).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, dim, generator=gen, dtype=dtype))
        lin.bias.copy_(torch.randn(classes, generator=gen, dtype=dtype))
    return nn.Sequential(nn.Flatten(), lin).eval()


def _linear_attack(model: nn.Module, images: torch.Tensor, overshoot: float):
    """numpy float64 closed form: DeepFool's one step on a linear classifier goes to the nearest
    hyperplane f_k = f_y along w_k − w_y, by its distance |f_k − f_y|/‖w_k − w_y‖ plus the margin.
    Returns (perturbation [B, D], distance, clean class)."""
    w = model[1].weight.detach().double().numpy()
    b = model[1].bias.detach().double().numpy()
    x = images.detach().double().reshape(images.shape[0], -1).numpy()
    f = x @ w.T + b
    y = f.argmax(axis=1)
    perturbation, distance = np.zeros_like(x), np.zeros(len(x))
    for i in range(len(x)):
        best = (math.inf, None)
        for c in range(w.shape[0]):
            if c != y[i]:
                normal = w[c] - w[y[i]]
                best = min(best, (abs(f[i, c] - f[i, y[i]]) / np.linalg.norm(normal), c))
        normal = w[best[1]] - w[y[i]]
        distance[i] = best[0]
        perturbation[i] = (1 + overshoot) * (best[0] + MARGIN) * normal / np.linalg.norm(normal)
    return perturbation, distance, y


class _Recording(nn.Module):
    """Wraps a model: records the batch size of every forward pass and the training flag, and
    raises on an empty batch (some networks do)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []
        self.modes: list[bool] = []

    def forward(self, x):
        if x.shape[0] == 0:
            raise RuntimeError("empty batch")
        self.sizes.append(int(x.shape[0]))
        self.modes.append(self.training)
        return self.inner(x)


class _Ramp(nn.Module):
    """Inputs [B, 1]; logits [0, h(x)] with the concave h(x) = −1 + x − 0.5·relu(x − 0.5): slope
    1 below 0.5, 0.5 above. A linear step from x < 0.5 falls short of the root 1.5."""

    def forward(self, x):
        h = -1.0 + x[:, 0] - 0.5 * torch.relu(x[:, 0] - 0.5)
        return torch.stack([torch.zeros_like(h), h], dim=1)


def _ramp_reference(x0: float, overshoot: float, max_iter: int):
    """The 1-D DeepFool (two classes, gap h): step (|h|/|h'| + margin)·sign(h') at the point
    x0 + (1 + overshoot)·r until h > 0 there. Returns (r, iterations)."""
    r, iterations = 0.0, 0
    for _ in range(max_iter):
        p = x0 + (1 + overshoot) * r
        h = -1.0 + p - 0.5 * max(p - 0.5, 0.0)
        if h > 0:
            break
        slope = 1.0 if p < 0.5 else 0.5
        r += abs(h) / slope + MARGIN
        iterations += 1
    return r, iterations


class _Unreachable(nn.Module):
    """Logits [0, −exp(−x)]: class 1 never wins, and every DeepFool step has distance exactly
    |h|/|h'| = 1 (so r grows by 1 + margin per step)."""

    def forward(self, x):
        h = -torch.exp(-x[:, 0])
        return torch.stack([torch.zeros_like(h), h], dim=1)


class _Flat(nn.Module):
    """Logits [1, 0] whatever the input: every gradient difference is zero."""

    def forward(self, x):
        zero = 0.0 * x.flatten(1).sum(dim=1)
        return torch.stack([zero + 1.0, zero], dim=1)


class _Tied(nn.Module):
    """Inputs [B, 2]; logits [x1, x1, x2 − 1]: classes 0 and 1 tie with the same gradient
    (a 0/0 distance), class 2's boundary x2 − x1 = 1 lies 1/√2 away from 0."""

    def forward(self, x):
        return torch.stack([x[:, 0], x[:, 0], x[:, 1] - 1.0], dim=1)


class _Intervals(nn.Module):
    """Inputs [B, ...]: t = the first value of each image; class 1 exactly where t lies in one of
    the open intervals (lo, hi) of ``bands`` (one list per image)."""

    def __init__(self, bands: list[list[tuple[float, float]]]):
        super().__init__()
        self.bands = bands

    def forward(self, x):
        batch = len(self.bands)
        t = x.flatten(1)[:, 0].double().reshape(-1, batch)  # copies of the batch, image i at i
        inside = torch.zeros_like(t, dtype=torch.bool)
        for i, bands in enumerate(self.bands):
            for lo, hi in bands:
                inside[:, i] |= (t[:, i] > lo) & (t[:, i] < hi)
        gap = torch.where(inside, 1.0, -1.0).to(x.dtype).flatten()
        return torch.stack([torch.zeros_like(gap), gap], dim=1)


def _ray_result(model, images, total, overshoot, perturbation=None) -> DeepFoolResult:
    """A DeepFoolResult for the ray x + s·total, its verdict taken from the model."""
    if perturbation is None:
        perturbation = (1 + overshoot) * total
    with torch.no_grad():
        original = model(images).argmax(1)
        adversarial = model(images + perturbation).argmax(1)
    n = images.shape[0]
    return DeepFoolResult(
        perturbation=perturbation,
        total=total,
        original=original,
        adversarial=adversarial,
        fooled=adversarial != original,
        iterations=torch.ones(n, dtype=torch.long),
        overshoot=overshoot,
    )


def _unit_rays(n: int, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images at t = 0 and r = the unit step along t, shape [n, 1]."""
    return torch.zeros(n, 1, dtype=dtype), torch.ones(n, 1, dtype=dtype)


# -------------------------------------------------------------------------------- DeepFool
@pytest.mark.parametrize("classes", [2, 5])
def test_linear_model_one_step_to_the_nearest_hyperplane(classes, seed):
    model = _linear(2 * 3 * 2, classes, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(5, 2, 3, 2, generator=gen, dtype=F64)
    expected, _, y = _linear_attack(model, images, 0.02)
    res = deepfool(model, images)  # the defaults: overshoot 0.02, 50 steps
    # A handful of float64 operations on O(1) values (the Jacobian is exact: W): 1e-12.
    np.testing.assert_allclose(res.perturbation.flatten(1).numpy(), expected, atol=1e-12)
    torch.testing.assert_close(res.total, res.perturbation / 1.02, rtol=1e-15, atol=0)
    assert res.perturbation.shape == images.shape and res.total.shape == images.shape
    assert res.original.tolist() == y.tolist()
    with torch.no_grad():
        landed = model(images + res.perturbation).argmax(1)
    assert res.adversarial.tolist() == landed.tolist()
    assert res.fooled.all() and res.iterations.tolist() == [1] * 5
    assert res.overshoot == 0.02 and isinstance(res.overshoot, float)
    # One image, no overshoot, a single step allowed: the same hyperplane.
    one = deepfool(model, images[:1], overshoot=0, max_iter=1)
    expected0, _, _ = _linear_attack(model, images[:1], 0.0)
    np.testing.assert_allclose(one.perturbation.flatten(1).numpy(), expected0, atol=1e-12)
    assert one.overshoot == 0.0 and one.fooled.item()


@pytest.mark.parametrize("overshoot", [0.02, 0.0])
def test_several_steps_on_a_concave_gap_match_the_1d_reference(overshoot):
    """x0 = 0 needs two steps (the first lands short of the root), x0 = 0.9 one; linearised at
    x0 + (1 + overshoot)·r, as the original. Image 0 is then evaluated once more alone."""
    model = _Recording(_Ramp())
    images = torch.tensor([[0.0], [0.9]], dtype=F64)
    res = deepfool(model, images, overshoot=overshoot)
    for i, x0 in enumerate([0.0, 0.9]):
        r, iterations = _ramp_reference(x0, overshoot, 50)
        # A few float64 operations on O(1) numbers.
        assert float(res.total[i, 0]) == pytest.approx(r, rel=1e-13)
        assert float(res.perturbation[i, 0]) == pytest.approx((1 + overshoot) * r, rel=1e-13)
        assert int(res.iterations[i]) == iterations
    assert res.iterations.tolist() == [2, 1]
    assert res.original.tolist() == [0, 0] and res.adversarial.tolist() == [1, 1]
    assert res.fooled.tolist() == [True, True]
    # Forward passes: clean, step 1 (both, then the Jacobian of 2 classes × 2), step 2 (both;
    # image 1 is fooled, the Jacobian of image 0 only), step 3 (image 0 alone), the verdict.
    assert model.sizes == [2, 2, 4, 2, 2, 1, 2]
    if overshoot:
        # At r itself (no overshoot) image 0 is not across yet: the verdict is at 1.02·r.
        with torch.no_grad():
            assert int(model(images[:1] + res.total[:1]).argmax(1)) == 0


def test_max_iter_bounds_the_steps_of_an_unreachable_class():
    images = torch.tensor([[0.0], [2.0]], dtype=F64)
    for max_iter in (50, 3, 1):
        kwargs = {} if max_iter == 50 else {"max_iter": max_iter}  # 50: the default
        res = deepfool(_Unreachable(), images, **kwargs)
        assert res.iterations.tolist() == [max_iter, max_iter]
        # Each step adds exactly 1 + margin (distance 1 up to a rounding of e^−x / e^−x).
        expected = torch.full((2, 1), max_iter * (1 + MARGIN), dtype=F64)
        torch.testing.assert_close(res.total, expected, rtol=1e-13, atol=0)
        torch.testing.assert_close(res.perturbation, 1.02 * expected, rtol=1e-13, atol=0)
        assert res.fooled.tolist() == [False, False]
        assert res.original.tolist() == [0, 0] and res.adversarial.tolist() == [0, 0]


def test_a_flat_network_is_not_moved_and_not_stepped_again():
    model = _Recording(_Flat())
    images = torch.randn(3, 2, 2, dtype=F64)
    res = deepfool(model, images)
    assert torch.equal(res.perturbation, torch.zeros_like(images))
    assert torch.equal(res.total, torch.zeros_like(images))
    assert res.iterations.tolist() == [0, 0, 0] and res.fooled.tolist() == [False] * 3
    # Clean pass, one step's pass and Jacobian, the verdict: the unmovable images leave the loop.
    assert model.sizes == [3, 3, 6, 3]


def test_a_tied_class_with_the_same_gradient_does_not_stop_the_attack():
    """Class 1 ties class 0 with the same gradient: its distance is 0/0, which must count as
    unreachable, not poison the minimum: the step goes to class 2's boundary."""
    images = torch.zeros(1, 2, dtype=F64)
    res = deepfool(_Tied(), images)
    step = (1 / math.sqrt(2) + MARGIN) / math.sqrt(2)
    expected = torch.tensor([[-step, step]], dtype=F64)
    torch.testing.assert_close(res.total, expected, rtol=1e-14, atol=0)
    assert res.original.tolist() == [0] and res.adversarial.tolist() == [2]
    assert res.fooled.tolist() == [True] and res.iterations.tolist() == [1]


def test_relative_norms_on_hand_made_tensors():
    images = torch.zeros(2, 1, 2, 2, dtype=torch.float32)
    images[0, 0, 0, 0], images[1, 0, 1, 1] = 5.0, 2.0
    perturbation = torch.zeros_like(images)
    perturbation[0, 0, 0, 1], perturbation[0, 0, 1, 0] = 3.0, 4.0
    perturbation[1, 0, 0, 0] = 1.0
    res = DeepFoolResult(
        perturbation=perturbation,
        total=perturbation,
        original=torch.zeros(2, dtype=torch.long),
        adversarial=torch.ones(2, dtype=torch.long),
        fooled=torch.ones(2, dtype=torch.bool),
        iterations=torch.ones(2, dtype=torch.long),
        overshoot=0.0,
    )
    rel = res.relative_norms(images)
    assert rel.dtype == F64 and rel.tolist() == [1.0, 0.5]


def test_deepfool_argument_checks():
    model = _linear(4, 3, 0)
    x = torch.randn(2, 4, dtype=F64)
    with pytest.raises(ValueError, match="deepfool: overshoot"):
        deepfool(model, x, overshoot=-0.01)
    with pytest.raises(ValueError, match="deepfool: max_iter"):
        deepfool(model, x, max_iter=0)
    with pytest.raises(TypeError, match="images"):
        deepfool(model, x.long())
    with pytest.raises(TypeError, match="images"):
        deepfool(model, [[0.0, 1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="shape"):
        deepfool(model, torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        deepfool(model, torch.zeros(0, 4, dtype=F64))
    with pytest.raises(ValueError, match="logits"):
        deepfool(nn.Flatten(0), x)  # logits [8]
    with pytest.raises(ValueError, match="logits"):
        deepfool(lambda t: torch.zeros(3, 3, dtype=F64), x)  # 3 rows for 2 images
    with pytest.raises(ValueError, match="logits"):
        deepfool(_linear(4, 1, 0), x)  # one class


# ---------------------------------------------------------------------------- tight_scales
def test_tight_scale_on_a_fine_grid_with_hand_made_flips(seed):
    """Rays t = s: a single crossing at a (s* = the first grid point past a); a flip and flip
    back inside (0, 1.02) of an unfooled image (keeps 1.02); a crossing in the grid's last
    step (s* = 1.02 exactly). The same with any number of scan points."""
    gen = torch.Generator().manual_seed(seed)
    # Crossings half way between grid points k·1e-3: no rounding question.
    a = (torch.randint(1, 1019, (4,), generator=gen).double() + 0.5) * 1e-3
    bands = [[(float(v), math.inf)] for v in a] + [[(0.3, 0.5)], [(1.0195, math.inf)]]
    model = _Intervals(bands)
    images, total = _unit_rays(6)
    res = _ray_result(model, images, total, 0.02)
    assert res.fooled.tolist() == [True] * 4 + [False, True]
    expected = torch.cat([torch.ceil(a / 1e-3) * 1e-3, torch.tensor([1.02, 1.02], dtype=F64)])
    for scan_points in (16, 1, 5):
        kwargs = {} if scan_points == 16 else {"scan_points": scan_points}
        scale = tight_scales(model, images, res, **kwargs)
        assert scale.dtype == F64 and scale.shape == (6,)
        # k·1e-3 in float64 against ceil(a/1e-3)·1e-3: equal up to one rounding.
        torch.testing.assert_close(scale, expected, rtol=0, atol=4 * EPS)
        assert scale[4].item() == 1.02 and scale[5].item() == 1.02


@pytest.mark.parametrize(
    ("tolerance", "overshoot", "flip", "expected"),
    [
        (0.25, 0.02, 0.8, 1.0),  # grid .25 .5 .75 1 1.02: one scan point, 3 bisections
        (0.25, 0.0, 0.9, 1.0),  # grid .25 .5 .75 1: the last grid point is 1 exactly
        (0.6, 0.02, 0.3, 0.6),  # grid .6 1.02: one bisection
        (0.25, 0.02, 0.1, 0.25),  # the first grid point
    ],
)
def test_tight_scale_on_coarse_grids_with_one_scan_point(tolerance, overshoot, flip, expected):
    model = _Intervals([[(flip, math.inf)], [(0.3, 0.45)]])
    images, total = _unit_rays(2)
    res = _ray_result(model, images, total, overshoot)
    assert res.fooled.tolist() == [True, False]
    scale = tight_scales(model, images, res, tolerance=tolerance, scan_points=1)
    # Image 1 was not fooled: its full r, 1 + overshoot, exactly (not the grid's 1.25).
    assert scale.tolist() == [expected, 1.0 + overshoot]
    assert tight_scales(model, images, res, tolerance=tolerance).tolist() == scale.tolist()


def test_tight_scale_on_images_of_several_dimensions_in_float32():
    images = torch.zeros(3, 2, 2, 2, dtype=torch.float32)
    total = torch.zeros_like(images)
    total[:, 0, 0, 0] = 1.0
    total[:, 1] = 7.0  # moves only coordinates the model does not read
    model = _Intervals([[(0.45, math.inf)], [(0.05, 0.07)], [(0.75, math.inf)]])
    res = _ray_result(model, images, total, 0.02)
    scale = tight_scales(model, images, res, tolerance=0.1)
    torch.testing.assert_close(scale, torch.tensor([0.5, 1.02, 0.8], dtype=F64), rtol=0, atol=EPS)


def test_the_grid_ends_at_the_attacks_own_perturbation():
    """The last grid point is the perturbation deepfool evaluated, not a recomputed 1.02·r:
    here only the perturbation crosses at the end, and the scan's flip there sends the
    bisection into the last stretch, where a narrow band (0.97, 0.99) flips first."""
    model = _Intervals([[(0.97, 0.99), (1.02 + 5e-13, math.inf)]])
    images, total = _unit_rays(1)
    res = _ray_result(
        model, images, total, 0.02, perturbation=torch.full((1, 1), 1.02 + 1e-12, dtype=F64)
    )
    assert res.fooled.item()
    scale = tight_scales(model, images, res)
    assert scale.item() == pytest.approx(0.971, abs=4 * EPS)


@pytest.mark.parametrize(
    "batch, tolerance, scan_points, sizes",
    [
        # steps = 102 (1.02/0.01 is 102.00000000000001 in floats): 16 scanned points 6 or 7
        # apart, one pass of 16·5 images, then ⌈log2 7⌉ = 3 bisection passes of 5.
        (5, 0.01, 16, [80, 5, 5, 5]),
        # steps = 5 ≤ scan_points: every grid point is scanned, nothing left to bisect.
        (5, 0.25, 16, [25]),
        # steps = 17 exactly (1.02/0.06 is 17.0 in floats), scanned whole by 17 points.
        (5, 0.06, 17, [85]),
        # A batch above 256 images: one copy of the batch per pass.
        (300, 0.01, 16, [300] * 16 + [300] * 3),
        # One image: 256 copies per pass; steps 1020, 300 points 3 or 4 apart: 2 bisections.
        (1, 0.001, 300, [256, 44, 1, 1]),
    ],
)
def test_tight_scales_makes_a_fixed_number_of_forward_passes(batch, tolerance, scan_points, sizes):
    inner = _linear(3, 2, 0, dtype=torch.float32)
    images = torch.randn(batch, 3, generator=torch.Generator().manual_seed(7))
    result = deepfool(inner, images, overshoot=0.02)
    assert result.iterations.dtype == torch.long
    model = _Recording(inner)
    tight_scales(model, images, result, tolerance=tolerance, scan_points=scan_points)
    assert model.sizes == sizes


def test_tight_scales_stays_on_the_images_device_without_a_host_synchronisation():
    """On the meta device (shapes only, no values: any host synchronisation or CPU tensor
    mixed in raises), the scan and the bisection stay on the images' device."""
    meta = torch.device("meta")
    model = _linear(3, 2, 0).to(meta)
    images = torch.empty(4, 3, dtype=F64, device=meta)
    result = DeepFoolResult(
        perturbation=torch.empty(4, 3, dtype=F64, device=meta),
        total=torch.empty(4, 3, dtype=F64, device=meta),
        original=torch.empty(4, dtype=torch.long, device=meta),
        adversarial=torch.empty(4, dtype=torch.long, device=meta),
        fooled=torch.empty(4, dtype=torch.bool, device=meta),
        iterations=torch.empty(4, dtype=torch.long, device=meta),
        overshoot=0.02,
    )
    scales = tight_scales(model, images, result)
    assert (scales.device, scales.dtype, scales.shape) == (meta, F64, (4,))


def test_tight_scales_argument_checks():
    model = _Intervals([[(0.5, math.inf)]])
    images, total = _unit_rays(1)
    res = _ray_result(model, images, total, 0.02)
    for bad in (0.0, 1.0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="tolerance"):
            tight_scales(model, images, res, tolerance=bad)
    assert tight_scales(model, images, res, tolerance=0.999).item() == 0.999  # grid .999 1.02
    with pytest.raises(ValueError, match="tight_scales: scan_points"):
        tight_scales(model, images, res, scan_points=0)
    with pytest.raises(ValueError, match="result"):
        tight_scales(model, torch.zeros(2, 1, dtype=F64), res)


# ------------------------------------------------------------------- valid range, outside
def test_valid_range_of_a_split():
    class Split:
        mean = torch.tensor([0.25, 0.5], dtype=torch.float32)
        std = torch.tensor([0.5, 0.25], dtype=torch.float32)

    low, high = valid_range_of(Split())
    assert low.dtype == F64 and high.dtype == F64
    assert low.tolist() == [-0.5, -2.0] and high.tolist() == [1.5, 2.0]

    class OnlyMean:
        mean = torch.tensor([0.5])
        std = None

    class OnlyStd:
        std = torch.tensor([0.5])

    assert valid_range_of(OnlyMean()) is None and valid_range_of(OnlyStd()) is None
    assert valid_range_of(object()) is None


def _just_outside(bound: float, upper: bool) -> tuple[float, float]:
    """The last value inside and the first outside past ``bound`` with the slack 1e-5·max(1,|b|)
    (float64, computed as the module documents it)."""
    edge = bound + 1e-5 * max(1.0, abs(bound)) if upper else bound - 1e-5 * max(1.0, abs(bound))
    outside = np.nextafter(edge, math.inf if upper else -math.inf)
    return edge, float(outside)


def test_out_of_range_counts_values_past_the_slack_per_channel():
    """Per channel c (3 channels, images 4 × 2): row 0 holds the last values inside the two
    edges, rows 1-2 values well inside, row 3 the first values outside. Bounds of either sign,
    above and below 1 in size (the slack is relative to |bound|, at least 1)."""
    bounds = [(-3.0, -1.5), (1.5, 2.75), (-0.25, 0.5)]
    low = torch.tensor([lo for lo, _ in bounds], dtype=F64)
    high = torch.tensor([hi for _, hi in bounds], dtype=F64)
    points = torch.zeros(2, 3, 4, 2, dtype=F64)
    for c, (lo, hi) in enumerate(bounds):
        points[:, c] = (lo + hi) / 2
        for col, (bound, upper) in enumerate(((lo, False), (hi, True))):
            inside, outside = _just_outside(bound, upper)
            points[0, c, 0, col], points[0, c, 3, col] = inside, outside
    points[1, 0, 1, 1] = -1.4  # image 1: one value past channel 0's high
    got = out_of_range_fractions(points, low, high)
    assert got.dtype == F64 and got.tolist() == [6 / 24, 1 / 24]
    # One bound for every channel: a direct count.
    one = out_of_range_fractions(points, torch.tensor([0.0], dtype=F64), torch.tensor([1.0]))
    expected = ((points < -1e-5) | (points > 1 + 1e-5)).flatten(1).double().mean(1)
    assert one.tolist() == expected.tolist() and 0 < one[0] < 1
    with pytest.raises(ValueError, match="valid_range"):
        out_of_range_fractions(points, torch.zeros(2), torch.ones(2))


def test_out_of_range_of_flat_points_takes_the_second_dimension_as_channels():
    points = torch.tensor([[0.5, 5.0, -5.0], [2.0, 5.0, -5.0]], dtype=torch.float32)
    low, high = torch.tensor([0.0, 4.0, -6.0]), torch.tensor([1.0, 6.0, -4.0])
    assert out_of_range_fractions(points, low, high).tolist() == [0.0, 1 / 3]


def test_out_of_range_reads_float32_bounds_in_float64():
    """Bounds given in float32 are compared in float64: ±2.75 ± the slack rounds inward in
    float32 (by 8e-8), so values exactly on the float64 edges count as outside only if the
    edges are computed in float32."""
    low, high = torch.tensor([-2.75]), torch.tensor([2.75])
    edge = 2.75 + 1e-5 * 2.75
    points = torch.tensor([[[-edge, edge]]], dtype=F64)
    assert torch.tensor(edge, dtype=torch.float32).double() < edge  # the inward rounding
    assert out_of_range_fractions(points, low, high).tolist() == [0.0]
    assert out_of_range_fractions(points * (1 + 1e-15), low, high).tolist() == [1.0]


def test_out_of_range_moves_the_bounds_to_the_points_device():
    points = torch.empty(2, 3, 4, 4, device="meta")
    got = out_of_range_fractions(points, torch.zeros(3), torch.ones(3))
    assert (got.device.type, got.dtype, got.shape) == ("meta", F64, (2,))


def test_out_of_range_refuses_points_without_a_channel_dimension():
    with pytest.raises(
        ValueError, match=r"^out_of_range_fractions: points must be \[B, C, \.\.\.\]"
    ):
        out_of_range_fractions(torch.zeros(4), torch.zeros(1), torch.ones(1))


# ------------------------------------------------------------------------- the sample
def test_sample_indices_are_seeded_in_range_and_distinct(seed):
    n = 40
    for samples in (1, 7, 40):
        got = sample_indices(n, samples, seed)
        assert got.dtype == torch.long and got.numel() == samples
        assert got.unique().numel() == samples and 0 <= int(got.min()) and int(got.max()) < n
        reference = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]
        assert torch.equal(got, reference)
        assert torch.equal(sample_indices(n, samples, seed), got)
    assert not torch.equal(sample_indices(n, 20, seed), sample_indices(n, 20, seed + 1))
    default = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:5]
    assert torch.equal(sample_indices(n, 5), default)
    # More samples than images: every image once.
    assert sorted(sample_indices(6, 50, seed).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="sample_indices: samples"):
        sample_indices(n, 0, seed)


# ------------------------------------------------------------------------- robustness()
class _Split:
    """What robustness() needs from a LabeledImages split: ``labels`` and ``batch``."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def batch(self, index):
        return self.images[index], self.labels[index]


def _summary_reference(images32, labels, model, overshoot, bounds):
    """The summary from deepfool and tight_scales on the same float32 batch, reduced in numpy
    float64 (the mean, median of an odd count, sample stderr σ/√n)."""
    res = deepfool(model, images32, overshoot=overshoot)
    scale = tight_scales(model, images32, res).numpy()
    rel = res.relative_norms(images32).numpy()
    tight = scale / (1 + overshoot) * rel
    correct = (res.original == labels).numpy()
    fooled = res.fooled.numpy()
    n = len(rel)
    outside = out_of_range_fractions(images32 + res.perturbation, *bounds).numpy()
    return {
        "robustness": rel.mean(),
        "robustness_median": np.median(rel),
        "robustness_stderr": rel.std(ddof=1) / math.sqrt(n),
        "robustness_correct": rel[correct].mean(),
        "robustness_tight": tight.mean(),
        "robustness_tight_median": np.median(tight),
        "robustness_tight_stderr": tight.std(ddof=1) / math.sqrt(n),
        "robustness_tight_scale_median": np.median(scale[fooled]),
        "robustness_out_of_range": outside.mean(),
        "robustness_samples": n,
        "robustness_correct_samples": int(correct.sum()),
        "robustness_not_fooled": int((~fooled).sum()),
        "robustness_mean_iterations": res.iterations.double().mean().item(),
        "robustness_overshoot": overshoot,
        "robustness_seed": None,  # filled by the caller
    }


def test_robustness_summary_against_a_float64_recomputation(seed):
    model = _linear(6, 3, seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(20, 6, generator=gen, dtype=F64)
    with torch.no_grad():
        predicted = model(images.float()).argmax(1)
    index = sample_indices(20, 7, seed)
    labels = predicted.clone()
    wrong = index[::3]  # 3 of the 7 sampled images misclassified, whatever the seed
    labels[wrong] = (predicted[wrong] + 1) % 3
    split = _Split(images, labels)
    bounds = (torch.tensor([-1.0], dtype=F64), torch.tensor([1.0], dtype=F64))
    out = robustness(
        model, split, samples=7, seed=seed, overshoot=0.05, batch_size=7,
        device="cpu", valid_range=(-1.0, 1.0), progress=False,
    )  # fmt: skip
    expected = _summary_reference(images[index].float(), labels[index], model, 0.05, bounds)
    expected["robustness_seed"] = seed
    assert set(out) == set(expected)
    for key, value in expected.items():
        # The same per-image float32/float64 values, reduced in another order: 7·eps.
        assert out[key] == pytest.approx(value, rel=1e-13, abs=0), key
        assert type(out[key]) is (int if isinstance(value, int) else float), key
    # Independent of ncfast: the closed form (float32 logits: 1e-5 relative on the distance).
    perturbation, _, _ = _linear_attack(model, images[index], 0.05)
    rel = np.linalg.norm(perturbation, axis=1) / images[index].norm(dim=1).numpy()
    assert out["robustness"] == pytest.approx(rel.mean(), rel=1e-4)
    assert out["robustness_correct_samples"] == 4 and out["robustness_not_fooled"] == 0
    # In batches of 2 (the last one of 1): the same numbers up to float32 sums of other length.
    small = robustness(
        model, split, samples=7, seed=seed, overshoot=0.05, batch_size=2,
        valid_range=(-1.0, 1.0), progress=False,
    )  # fmt: skip
    for key in ("robustness", "robustness_tight", "robustness_out_of_range"):
        assert small[key] == pytest.approx(out[key], rel=1e-5), key
    assert small["robustness_samples"] == 7


def test_robustness_of_an_unreachable_class_and_no_correct_image():
    images = torch.linspace(-1, 1, 5, dtype=F64).reshape(5, 1)
    split = _Split(images, torch.ones(5, dtype=torch.long))  # the model always says 0
    out = robustness(_Unreachable(), split, samples=5, max_iter=3, device="cpu", progress=False)
    assert out["robustness_mean_iterations"] == 3.0
    assert out["robustness_not_fooled"] == 5 and out["robustness_correct_samples"] == 0
    assert math.isnan(out["robustness_correct"])
    assert math.isnan(out["robustness_tight_scale_median"])
    # Never fooled: s* = 1 + overshoot, so the tight bound is the plain one.
    assert out["robustness_tight"] == pytest.approx(out["robustness"], rel=1e-15)
    assert out["robustness_seed"] == 0 and out["robustness_overshoot"] == 0.02
    # No mean/std and no valid_range: not measured.
    assert math.isnan(out["robustness_out_of_range"])


def test_robustness_of_one_and_two_samples():
    model = _linear(3, 2, 0, dtype=torch.float32)
    split = _Split(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.zeros(4))
    one = robustness(model, split, samples=1, batch_size=1, progress=False)
    assert one["robustness_samples"] == 1 and math.isnan(one["robustness_stderr"])
    assert math.isnan(one["robustness_tight_stderr"])
    assert one["robustness_median"] == one["robustness"]
    two = robustness(model, split, samples=2, progress=False)
    assert two["robustness_stderr"] > 0 and two["robustness_tight_stderr"] > 0


def test_robustness_takes_the_range_from_the_splits_statistics():
    """mean 0.5, std 0.25: the range is (−2, 2); 3 of the 4 values of the unfooled flat
    model's images (r = 0) lie inside."""

    class Stats(_Split):
        mean = torch.tensor([0.5])
        std = torch.tensor([0.25])

    images = torch.tensor([[[0.0, 1.9]], [[-2.1, 2.0]]], dtype=F64)
    split = Stats(images, torch.zeros(2, dtype=torch.long))
    out = robustness(_Flat(), split, samples=2, device="cpu", progress=False)
    assert out["robustness_out_of_range"] == 0.25
    # An explicit range wins.
    wide = robustness(
        _Flat(), split, samples=2, device="cpu", valid_range=([-3.0], [3.0]), progress=False
    )
    assert wide["robustness_out_of_range"] == 0.0


def test_a_model_without_parameters_runs_on_the_devices_of_the_data():
    """No ``device`` and a model without parameters: the data's device (was a bare
    StopIteration), with the result of ``device="cpu"``."""
    assert not list(_Flat().parameters())
    images = torch.tensor([[[0.0, 1.9]], [[-2.1, 2.0]]], dtype=F64)
    split = _Split(images, torch.zeros(2, dtype=torch.long))
    kwargs = {"samples": 2, "valid_range": (-2.0, 2.0), "progress": False}
    assert robustness(_Flat(), split, **kwargs) == robustness(
        _Flat(), split, device="cpu", **kwargs
    )


def test_robustness_runs_in_eval_mode_and_restores_the_mode():
    inner = _linear(3, 2, 0, dtype=torch.float32)
    split = _Split(torch.randn(5, 3, generator=torch.Generator().manual_seed(2)), torch.zeros(5))
    for training in (True, False):
        model = _Recording(inner).train(training)
        robustness(model, split, samples=3, progress=False)
        assert model.modes and not any(model.modes)
        assert model.training is training


def test_robustness_sends_the_index_to_the_device_of_the_images():
    """A split whose images live on the meta device receives its index there."""

    class MetaSplit:
        def __init__(self, real):
            self.real, self.images = real, real.to("meta")
            self.labels = torch.zeros(len(real), dtype=torch.long)
            self.devices: list[str] = []

        def batch(self, index):
            self.devices.append(index.device.type)
            order = sample_indices(len(self.real), 3, 0)
            return self.real[order], self.labels[order]

    split = MetaSplit(torch.randn(6, 3, generator=torch.Generator().manual_seed(3)))
    robustness(_linear(3, 2, 0, dtype=torch.float32), split, samples=3, progress=False)
    assert split.devices == ["meta"]


def test_robustness_counts_len_when_there_are_no_labels():
    class Sized:
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def batch(self, index):
            return self.images[index], torch.zeros(len(index), dtype=torch.long)

    split = Sized(torch.randn(4, 3, generator=torch.Generator().manual_seed(4)))
    out = robustness(_linear(3, 2, 0, dtype=torch.float32), split, samples=9, progress=False)
    assert out["robustness_samples"] == 4


def test_robustness_progress_bar(capsys):
    model = _linear(3, 2, 0, dtype=torch.float32)
    split = _Split(torch.randn(4, 3, generator=torch.Generator().manual_seed(5)), torch.zeros(4))
    robustness(model, split, samples=4, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""
    robustness(model, split, samples=4, batch_size=2)  # progress by default
    err = capsys.readouterr().err
    assert err.startswith("\rDeepFool: ") and "batch/s" in err and "0/2" in err  # 2 batches
    assert "\n" not in err  # leave=False: the bar is cleared, no line left behind


def test_robustness_argument_checks():
    model = _linear(3, 2, 0, dtype=torch.float32)
    split = _Split(torch.randn(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="robustness: samples"):
        robustness(model, split, samples=0)
    with pytest.raises(ValueError, match="robustness: overshoot"):
        robustness(model, split, overshoot=-1.0)
    with pytest.raises(ValueError, match="robustness: max_iter"):
        robustness(model, split, max_iter=0)
    with pytest.raises(ValueError, match="robustness: batch_size"):
        robustness(model, split, batch_size=0)
    with pytest.raises(TypeError, match="batch"):
        robustness(model, object())
    with pytest.raises(ValueError, match="no images"):
        robustness(model, _Split(torch.zeros(0, 3), torch.zeros(0)))
    bad_ranges = {
        "a pair": [(0.0, 1.0, 2.0), "ab", torch.tensor([0.0, 1.0])],
        "numbers": [("a", 1.0)],
        "same number": [([], []), ([0.0, 0.0], [1.0])],
        "finite low < high": [(1.0, 1.0), (2.0, 1.0), (0.0, math.inf), (-math.nan, 1.0)],
    }
    for message, ranges in bad_ranges.items():
        for valid_range in ranges:
            with pytest.raises(ValueError, match=message):
                robustness(model, split, valid_range=valid_range, progress=False)
    # The boundary values are accepted: one sample, max_iter 1, batch_size 1, overshoot 0.
    out = robustness(
        model, split, samples=1, max_iter=1, batch_size=1, overshoot=0.0, progress=False
    )
    assert out["robustness_samples"] == 1 and out["robustness_overshoot"] == 0.0


def test_robustness_reads_the_valid_range_in_float64():
    """2**24 and 2**24 + 1 are one float32: read in float64 they are a valid range."""
    images = torch.full((2, 1, 2), 2.0**24, dtype=F64)
    split = _Split(images, torch.zeros(2, dtype=torch.long))
    out = robustness(
        _Flat(), split, samples=2, device="cpu", valid_range=(2.0**24, 2.0**24 + 1), progress=False
    )
    assert out["robustness_out_of_range"] == 0.0


def test_robustness_names_itself_in_a_bad_valid_range():
    split = _Split(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^robustness: valid_range must have finite low < high"):
        robustness(_linear(3, 2, 0), split, valid_range=(1.0, 0.0), progress=False)


def test_robustness_batches_32_images_by_default():
    class Counting(_Split):
        def __init__(self, images, labels):
            super().__init__(images, labels)
            self.sizes: list[int] = []

        def batch(self, index):
            self.sizes.append(len(index))
            return super().batch(index)

    split = Counting(
        torch.randn(70, 3, generator=torch.Generator().manual_seed(6)), torch.zeros(70)
    )
    robustness(_linear(3, 2, 0, dtype=torch.float32), split, samples=70, progress=False)
    assert split.sizes == [32, 32, 6]


def test_robustness_of_one_sample_warns_nothing():
    """One sample (and no fooled image): the standard errors are NaN without a warning."""
    images = torch.linspace(-1, 1, 3, dtype=F64).reshape(3, 1)
    split = _Split(images, torch.ones(3, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = robustness(_Unreachable(), split, samples=1, max_iter=2, progress=False)
    assert math.isnan(out["robustness_stderr"]) and math.isnan(out["robustness_tight_stderr"])


def test_robustness_of_data_without_an_images_tensor_runs_on_the_cpu():
    """Data that only provides ``batch`` and ``labels`` (no ``images`` tensor): its index is a
    CPU tensor, and a model without parameters runs on the CPU."""

    class BatchOnly:
        def __init__(self, images, labels):
            self._images, self.labels = images, labels
            self.devices: list[torch.device] = []

        def batch(self, index):
            self.devices.append(index.device)
            return self._images[index], self.labels[index]

    for images_attribute in (False, True):
        split = BatchOnly(torch.tensor([[[0.0, 1.9]], [[-2.1, 2.0]]], dtype=F64), torch.zeros(2))
        if images_attribute:
            split.images = "not a tensor"
        out = robustness(_Flat(), split, samples=2, valid_range=(-2.0, 2.0), progress=False)
        assert out["robustness_out_of_range"] == 0.25
        assert split.devices == [torch.device("cpu")]
