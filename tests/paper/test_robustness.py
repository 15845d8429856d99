"""DeepFool against the exact distance of a linear classifier and the original algorithm on a
curved network; robustness_tight's s* and robustness_out_of_range (SPEC §7)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from ncfast.paper import models
from ncfast.paper.data.images import LabeledImages
from ncfast.paper.robustness import (
    DEFAULT_MAX_ITER,
    STEP_MARGIN,
    DeepFoolResult,
    deepfool,
    out_of_range_fractions,
    robustness,
    sample_indices,
    tight_scales,
    valid_range_of,
)


def _linear_model(dim: int, classes: int, seed: int, dtype=torch.float64) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(dim, classes).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, dim, generator=gen, dtype=dtype))
        lin.bias.copy_(torch.randn(classes, generator=gen, dtype=dtype))
    return nn.Sequential(nn.Flatten(), lin).eval()


def _exact_linear(model: nn.Module, images: torch.Tensor):
    """Independent numpy float64: min_c |f_y − f_c| / ‖w_y − w_c‖ and the arg-min class."""
    lin = model[1]
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    x = images.detach().double().reshape(images.shape[0], -1).numpy()
    f = x @ w.T + b
    y = f.argmax(axis=1)
    dist, target = [], []
    for i in range(x.shape[0]):
        d = [
            abs(f[i, y[i]] - f[i, c]) / np.linalg.norm(w[y[i]] - w[c]) if c != y[i] else np.inf
            for c in range(w.shape[0])
        ]
        dist.append(min(d))
        target.append(int(np.argmin(d)))
    return np.array(dist), np.array(target), y


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_linear_classifier_distance_is_exact(classes, seed):
    model = _linear_model(dim=3 * 4 * 4, classes=classes, seed=seed)
    images = torch.randn(
        17, 3, 4, 4, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    dist, target, y = _exact_linear(model, images)

    res = deepfool(model, images, overshoot=0.0)
    norms = res.perturbation.flatten(1).norm(dim=1).numpy()
    # One step onto the boundary plus the original's margin of 1e-4 in distance; float64 with
    # a condition of O(1): agreement to a few hundred eps.
    np.testing.assert_allclose(norms, dist + STEP_MARGIN, rtol=1e-10, atol=1e-12)
    assert res.fooled.all()
    assert (res.iterations == 1).all()
    np.testing.assert_array_equal(res.original.numpy(), y)
    # The step points along w_target − w_y (the normal of the nearest boundary) ...
    w = model[1].weight.detach()
    normal = w[torch.as_tensor(target)] - w[torch.as_tensor(y)]
    cos = torch.nn.functional.cosine_similarity(res.perturbation.flatten(1), normal, dim=1)
    np.testing.assert_allclose(cos.numpy(), 1.0, atol=1e-12)
    # ... and lands where numpy says the classifier predicts (the target class, unless another
    # boundary lies within the 1e-4 margin).
    _, _, landed = _exact_linear(model, images + res.perturbation)
    np.testing.assert_array_equal(res.adversarial.numpy(), landed)

    over = deepfool(model, images, overshoot=0.02)
    np.testing.assert_allclose(
        over.perturbation.flatten(1).norm(dim=1).numpy(), 1.02 * (dist + STEP_MARGIN), rtol=1e-10
    )
    torch.testing.assert_close(over.perturbation, 1.02 * over.total, rtol=0, atol=0)


def test_linear_classifier_float32_and_near_boundary(seed):
    model = _linear_model(dim=20, classes=5, seed=seed)
    images = torch.randn(
        8, 20, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    # Hard case: move image 0 to within 1e-7 of its nearest boundary.
    dist, target, y = _exact_linear(model, images)
    w = model[1].weight.detach()
    normal = w[target[0]] - w[y[0]]
    images[0] += (dist[0] - 1e-7) * normal / normal.norm()
    dist, target, y = _exact_linear(model, images)
    assert dist[0] < 1e-6
    model32 = model.float()
    res = deepfool(model32, images.float(), overshoot=0.0)
    norms = res.perturbation.flatten(1).double().norm(dim=1).numpy()
    np.testing.assert_allclose(norms, dist + STEP_MARGIN, rtol=1e-4, atol=1e-6)
    assert res.fooled.all()


class _SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 16),
            nn.ReLU(),
            nn.Linear(16, 4),
        )

    def forward(self, x):
        return self.body(x)


def test_nonlinear_batched_equals_one_by_one_and_crosses_boundary(seed):
    torch.manual_seed(seed)
    model = _SmallConvNet().double()
    model.train()
    model(torch.randn(32, 1, 6, 6, dtype=torch.float64))  # give batch norm running stats
    model.eval()
    images = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    batched = deepfool(model, images)
    # A ReLU network can leave an image in a flat region (every gradient difference zero, e.g.
    # seed 693230763): DeepFool then stops it unfooled before max_iter. Every other image crosses.
    fooled = batched.fooled
    assert fooled.any()
    assert bool((batched.iterations[~fooled] < DEFAULT_MAX_ITER).all())
    with torch.no_grad():
        adv = model(images + batched.perturbation).argmax(1)
    assert torch.equal(adv != model(images).argmax(1), fooled)
    for i in range(images.shape[0]):
        one = deepfool(model, images[i : i + 1])
        torch.testing.assert_close(one.perturbation[0], batched.perturbation[i])
        assert int(one.iterations[0]) == int(batched.iterations[i])


# ---- several DeepFool steps: a curved network against the original algorithm ---------------


def _curved_mlp(seed: int) -> nn.Module:
    """A float64 tanh MLP with weights 3× the default scale: its decision boundaries bend enough
    that DeepFool takes 2-5 steps on most inputs (1 on a linear model)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)
        ).double()
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.mul_(3.0)
    return model.eval()


def _original_deepfool(model, image, overshoot=0.02, max_iter=50):
    """One image, as in the reference code of Moosavi-Dezfooli, Fawzi & Frossard (2016,
    deepfool.py): classes in decreasing order of the clean logits, one backward pass per
    logit, the first strictly smallest linearised distance, a 1e-4 margin on each step, and the
    stopping test at x0 + (1 + overshoot)·r_tot inside the loop. Returns (perturbation,
    iterations, clean label, final label)."""
    x0 = image.unsqueeze(0)
    with torch.no_grad():
        order = model(x0)[0].argsort(descending=True)
    label = int(order[0])
    r_tot = torch.zeros_like(x0)
    x = x0.clone().requires_grad_(True)
    fs = model(x)
    k_i, loop_i = label, 0
    while k_i == label and loop_i < max_iter:
        pert, w = math.inf, None
        (grad_orig,) = torch.autograd.grad(fs[0, order[0]], x, retain_graph=True)
        for k in range(1, len(order)):
            (cur_grad,) = torch.autograd.grad(fs[0, order[k]], x, retain_graph=True)
            w_k = cur_grad - grad_orig
            f_k = float((fs[0, order[k]] - fs[0, order[0]]).detach())
            pert_k = abs(f_k) / float(w_k.norm())
            if pert_k < pert:
                pert, w = pert_k, w_k
        r_tot = r_tot + (pert + 1e-4) * w / w.norm()
        x = (x0 + (1 + overshoot) * r_tot).detach().requires_grad_(True)
        fs = model(x)
        k_i = int(fs[0].argmax())
        loop_i += 1
    return (1 + overshoot) * r_tot[0].detach(), loop_i, label, k_i


def test_several_steps_match_the_original_algorithm(seed):
    model = _curved_mlp(seed)
    images = torch.randn(48, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = deepfool(model, images)
    # The test is about iterations: most inputs must need more than one step.
    assert (res.iterations >= 2).sum() >= 8  # 15 to 30 of 48 over 200 seeds
    for i in range(images.shape[0]):
        perturbation, iterations, label, final = _original_deepfool(model, images[i])
        # The same discrete path (one input within ~1e-12 of a boundary would be needed to
        # change it), so iterations and labels agree exactly.
        assert int(res.iterations[i]) == iterations, i
        assert int(res.original[i]) == label and int(res.adversarial[i]) == final, i
        # Batched vs one logit at a time: float64 sums in another order (O(width·eps) per
        # gradient), amplified over ≤ 5 steps by the step map's sensitivity near the boundary;
        # measured ≤ 4e-13 relative over 20 seeds, tolerance 1e-9.
        torch.testing.assert_close(res.perturbation[i], perturbation, rtol=1e-9, atol=1e-12)
    assert res.fooled.all()


# ---- robustness_tight: s*, the smallest multiple of r that flips ----------------------------


def _grid_first_flip(model, images, res, tolerance=1e-3):
    """Brute force on flat inputs [B, D]: every grid multiple k·tolerance of r, k = 1..1020;
    the first that flips."""
    top = 1.0 + res.overshoot
    k = torch.arange(1, round(top / tolerance) + 1, dtype=torch.float64)
    s = (k * tolerance).clamp(max=top)
    points = images.unsqueeze(1) + s.reshape(
        1, -1, *(1,) * (images.dim() - 1)
    ) * res.total.unsqueeze(1)
    with torch.no_grad():
        predicted = model(points.flatten(0, 1)).argmax(1).reshape(images.shape[0], -1)
    flipped = predicted != res.original.unsqueeze(1)
    assert flipped.any(dim=1).all()
    return s[flipped.int().argmax(dim=1)]


def _predicts(model, points):
    with torch.no_grad():
        return model(points).argmax(1)


def test_tight_scale_is_the_smallest_flipping_multiple(seed):
    model = _curved_mlp(seed)
    images = torch.randn(48, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = deepfool(model, images)
    scale = tight_scales(model, images, res)
    assert scale.dtype == torch.float64 and scale.shape == (48,)
    assert ((scale > 0) & (scale <= 1.02)).all()
    unsqueeze = scale.reshape(-1, 1)
    # The model flips at s*·r and not at (s* − 1e-3)·r ...
    assert (_predicts(model, images + unsqueeze * res.total) != res.original).all()
    assert (_predicts(model, images + (unsqueeze - 1e-3) * res.total) == res.original).all()
    # ... and at no grid multiple below s* (brute force over all 1020 of them).
    torch.testing.assert_close(scale, _grid_first_flip(model, images, res), rtol=0, atol=1e-12)


class _CubicAlongTheRay(nn.Module):
    """Inputs [B, 4]: coordinate 0 is the position t on the ray, coordinates 1-3 the roots
    a < b < c of the logit gap (t − a)(t − b)(t − c) of class 1 over class 0. The prediction
    is 0 at t = 0, flips on (a, b), flips back on (b, c) and flips again after c."""

    def forward(self, x):
        t, roots = x[:, :1], x[:, 1:]
        gap = (t - roots).prod(dim=1, keepdim=True)
        return torch.cat([torch.zeros_like(gap), gap], dim=1)


def test_tight_scale_finds_the_first_of_several_crossings(seed):
    """A bisection over (0, 1.02] alone lands on whichever crossing it meets; the scan first
    finds the flipped stretch (a, b) (wider than the scan's spacing 1.02/16), so s* is the
    first grid point past a: ⌈a / 1e-3⌉·1e-3."""
    gen = torch.Generator().manual_seed(seed)
    n = 32
    a = 0.05 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    b = a + 0.07 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64)
    c = b + 0.05 + (0.97 - b) * torch.rand(n, generator=gen, dtype=torch.float64)
    images = torch.stack([torch.zeros(n, dtype=torch.float64), a, b, c], dim=1)
    direction = torch.zeros_like(images)
    direction[:, 0] = 1.0  # r moves t only: t = s
    res = DeepFoolResult(
        perturbation=1.02 * direction,
        total=direction,
        original=torch.zeros(n, dtype=torch.long),
        adversarial=torch.ones(n, dtype=torch.long),
        fooled=torch.ones(n, dtype=torch.bool),
        iterations=torch.ones(n, dtype=torch.long),
        overshoot=0.02,
    )
    model = _CubicAlongTheRay()
    scale = tight_scales(model, images, res)
    expected = torch.ceil(a / 1e-3) * 1e-3  # a is never within rounding of a grid point
    torch.testing.assert_close(scale, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(scale, _grid_first_flip(model, images, res), rtol=0, atol=1e-12)


def test_tight_scale_is_exact_on_a_linear_classifier(seed):
    """Along x + s·d a linear classifier's logit gaps are affine in s, so the first flip is
    s_flip = min over classes c with a_c > 0 of g_c / a_c (g_c = f_y − f_c at x,
    a_c = (w_c − w_y)·d), and s* is the first grid point past it: ⌈s_flip / 1e-3⌉·1e-3."""
    model = _linear_model(dim=12, classes=6, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    res = deepfool(model, images)
    # DeepFool's own r flips at d/(d + 1e-4) ≈ 1: stretch it by a random factor in [1, 4] and
    # turn it a little, so the first flip falls anywhere in (0, 1.02].
    stretch = 1 + 3 * torch.rand(40, 1, generator=gen, dtype=torch.float64)
    turned = res.total + 0.2 * res.total.norm(dim=1, keepdim=True) * torch.randn(
        40, 12, generator=gen, dtype=torch.float64
    ) / math.sqrt(12)
    direction = stretch * turned
    fooled = _predicts(model, images + 1.02 * direction) != res.original
    stretched = dataclasses.replace(
        res, total=direction, perturbation=1.02 * direction, fooled=fooled
    )
    scale = tight_scales(model, images, stretched).numpy()

    w = model[1].weight.detach().numpy()
    b = model[1].bias.detach().numpy()
    x, d = images.numpy(), direction.numpy()
    y = res.original.numpy()
    f = x @ w.T + b
    expected = np.full(40, 1.02)
    for i in range(40):
        gaps = f[i, y[i]] - f[i]
        slopes = d[i] @ (w - w[y[i]]).T
        crossing = [gaps[c] / slopes[c] for c in range(6) if c != y[i] and slopes[c] > 0]
        s_flip = min(crossing, default=math.inf)
        if fooled[i] and s_flip <= 1.02:
            # s_flip is never within float64 rounding of a grid point for random data.
            expected[i] = min(math.ceil(s_flip / 1e-3) * 1e-3, 1.02)
    assert fooled.sum() >= 30  # most images are fooled, at s* spread over (0, 1.02]
    assert expected[fooled.numpy()].min() < 0.6
    np.testing.assert_allclose(scale, expected, rtol=0, atol=1e-12)


# ---- robustness_out_of_range ----------------------------------------------------------------


def _labeled_images(seed: int, n: int, channels: int, size: int, classes: int):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    pixels[:, :, 0, :] = 0  # saturated rows: their normalised values sit on the bounds
    pixels[:, :, -1, :] = 255
    labels = torch.randint(0, classes, (n,), generator=gen)
    mean = pixels.double().mean(dim=(0, 2, 3)) / 255
    std = (pixels.double() / 255).std(dim=(0, 2, 3))
    return LabeledImages(pixels, labels, classes, mean.float(), std.float(), "toy", "test")


def test_out_of_range_fraction_against_a_direct_count(seed):
    data = _labeled_images(seed, n=10, channels=3, size=4, classes=3)
    low, high = valid_range_of(data)
    mean, std = data.mean.double(), data.std.double()
    torch.testing.assert_close(low, -mean / std, rtol=0, atol=0)
    torch.testing.assert_close(high, (1 - mean) / std, rtol=0, atol=0)
    images, _ = data.batch(torch.arange(10))
    # Clean images, normalised in float32, lie in the range (pixels 0 and 255 included).
    assert (out_of_range_fractions(images, low, high) == 0).all()
    gen = torch.Generator().manual_seed(seed + 1)
    points = images + torch.randn(images.shape, generator=gen)
    got = out_of_range_fractions(points, low, high)
    values = points.double().numpy()
    lo, hi = low.numpy(), high.numpy()
    for i in range(10):
        outside = 0
        for c in range(3):
            for v in values[i, c].ravel():
                outside += v < lo[c] - 1e-5 * max(1.0, abs(lo[c])) or v > hi[c] + 1e-5 * max(
                    1.0, abs(hi[c])
                )
        assert got[i].item() == outside / values[i].size  # the same count, divided alike
    assert 0 < got.mean() < 1
    # One value or one per channel; anything else is named.
    with pytest.raises(ValueError, match="valid_range"):
        out_of_range_fractions(points, low[:2], high[:2])


def test_robustness_reports_tight_and_out_of_range(seed):
    """robustness() on a LabeledImages split: the range comes from its mean/std, and the three
    numbers are the means of the per-image quantities of deepfool and tight_scales."""
    data = _labeled_images(seed, n=30, channels=2, size=4, classes=4)
    model = _linear_model(dim=2 * 4 * 4, classes=4, seed=seed).float()
    out = robustness(model, data, samples=12, seed=seed, batch_size=5, progress=False)
    images, _ = data.batch(sample_indices(30, 12, seed))
    res = deepfool(model, images)
    scale = tight_scales(model, images, res)
    x_norm = images.flatten(1).double().norm(dim=1)
    low, high = valid_range_of(data)
    # Batches of 5 vs 12: float32 sums in another order, relative 1e-6 on r.
    assert out["robustness"] == pytest.approx(float(res.relative_norms(images).mean()), rel=1e-5)
    tight = scale * res.total.flatten(1).double().norm(dim=1) / x_norm
    assert out["robustness_tight"] == pytest.approx(float(tight.mean()), rel=1e-5)
    assert out["robustness_tight"] <= out["robustness"]
    assert out["robustness_tight_scale_median"] == pytest.approx(float(scale.median()), abs=1e-9)
    outside = out_of_range_fractions(images + res.perturbation, low, high)
    assert out["robustness_out_of_range"] == pytest.approx(float(outside.mean()), abs=1e-9)
    # An explicit range wins; data without mean/std and no range: NaN (not measured).
    wide = robustness(model, data, samples=12, seed=seed, valid_range=(-1e3, 1e3), progress=False)
    assert wide["robustness_out_of_range"] == 0
    split = _FakeSplit(images, torch.zeros(12, dtype=torch.long))
    assert math.isnan(
        robustness(model, split, samples=4, progress=False)["robustness_out_of_range"]
    )
    with pytest.raises(ValueError, match="valid_range"):
        robustness(model, data, samples=2, valid_range=(1.0, -1.0), progress=False)
    with pytest.raises(ValueError, match="valid_range"):
        robustness(model, data, samples=2, valid_range=([0, 0, 0], [1, 1, 1]), progress=False)


# ---- channels-last networks ----------------------------------------------------------------


def test_channels_last_network_gives_the_same_perturbations(seed):
    """A 3-channel conv net in channels-last memory format returns its input gradient
    channels-last; DeepFool must flatten it by reshape, not view (which raised)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        twin = models.build("vgg11", 10, 3, 32, 0.125).double().eval()
    channels_last = copy.deepcopy(twin).to(memory_format=torch.channels_last)
    images = torch.randn(
        3, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    plain = deepfool(twin, images, max_iter=5)
    last = deepfool(channels_last, images, max_iter=5)
    assert torch.equal(plain.iterations, last.iterations)
    assert torch.equal(plain.adversarial, last.adversarial)
    # The two layouts convolve in another order: float64 rounding, amplified over ≤ 5 steps
    # (measured ≤ 2e-14 relative).
    torch.testing.assert_close(last.perturbation, plain.perturbation, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(
        tight_scales(channels_last, images, last), tight_scales(twin, images, plain)
    )


# ---- the measure over a sample, and bad input ------------------------------------------------


class _FakeSplit:
    """The two things robustness() needs from a LabeledImages split."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def batch(self, index):
        return self.images[index], self.labels[index]


def test_robustness_mean_relative_norm_on_seeded_sample(seed):
    model = _linear_model(dim=12, classes=4, seed=seed).float()
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(50, 12, generator=gen)
    labels = torch.randint(0, 4, (50,), generator=gen)
    split = _FakeSplit(images, labels)
    model.train()
    out = robustness(model, split, samples=20, seed=seed, batch_size=6, progress=False)
    assert model.training  # restored
    index = sample_indices(50, 20, seed=seed)
    assert index.unique().numel() == 20
    dist, _, pred = _exact_linear(model.double(), images[index].double())
    model.float()
    expected = 1.02 * (dist + STEP_MARGIN) / images[index].double().norm(dim=1).numpy()
    # float32 logits: the distances carry a relative error of ~1e-6.
    assert out["robustness"] == pytest.approx(expected.mean(), rel=1e-4)
    assert out["robustness_samples"] == 20
    correct = pred == labels[index].numpy()
    assert out["robustness_correct_samples"] == int(correct.sum())
    if correct.any():
        assert out["robustness_correct"] == pytest.approx(expected[correct].mean(), rel=1e-4)
    assert out["robustness_not_fooled"] == 0
    # Same seed, same sample, same number; another seed, another sample.
    again = robustness(model, split, samples=20, seed=seed, batch_size=20, progress=False)
    assert again["robustness"] == pytest.approx(out["robustness"], rel=1e-6)
    assert not torch.equal(sample_indices(50, 20, seed=seed + 1), index)


def test_bad_inputs_are_named():
    model = _linear_model(dim=4, classes=3, seed=0)
    with pytest.raises(ValueError, match="overshoot"):
        deepfool(model, torch.randn(2, 4, dtype=torch.float64), overshoot=-1)
    with pytest.raises(ValueError, match="max_iter"):
        deepfool(model, torch.randn(2, 4, dtype=torch.float64), max_iter=0)
    with pytest.raises(TypeError, match="images"):
        deepfool(model, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="samples"):
        robustness(model, _FakeSplit(torch.randn(3, 4), torch.zeros(3)), samples=0)
    with pytest.raises(TypeError, match="batch"):
        robustness(model, object(), samples=1)
    with pytest.raises(ValueError, match="logits"):
        deepfool(nn.Flatten(0), torch.randn(2, 4, dtype=torch.float64))
    images = torch.randn(2, 4, dtype=torch.float64)
    res = deepfool(model, images)
    with pytest.raises(ValueError, match="tolerance"):
        tight_scales(model, images, res, tolerance=0.0)
    with pytest.raises(ValueError, match="scan_points"):
        tight_scales(model, images, res, scan_points=0)
    with pytest.raises(ValueError, match="result"):
        tight_scales(model, images[:1], res)
