"""Guards of the paper's analyses that a mutant used to survive (issue 21, items 8-9): the tight
robustness bound of an image DeepFool did not fool although its prediction flips and flips back
along the ray, and the central-path fit whose best non-negative law has a single positive
constant. Each test fails when its check is removed (see bench/results/mutation.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ncfast import theory
from ncfast.paper.robustness import DeepFoolResult, tight_scales
from tests.helpers.synthetic_features import F64
from tests.helpers.tolerances import EPS


# ------------------------------------------------------------- 8. the tight robustness bound
class Bump(nn.Module):
    """Two classes on one input x: class 1 exactly where 0.3 < x < 0.7 (a bump of width 0.4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bump = 0.04 - (x[:, 0] - 0.5).square()
        return torch.stack([torch.zeros_like(bump), bump], dim=1)


def test_an_unfooled_image_whose_prediction_flips_and_flips_back_keeps_its_scale():
    """Image 0: r = 1 (overshoot 0.02): the ray crosses the bump (class 1 for s in (0.3, 0.7))
    and ends at x = 1.02, class 0 again: DeepFool did not fool it, and it keeps
    s* = 1 + overshoot although scanned points flip. Image 1: r = 0.5: fooled from s = 0.6 on
    (x = 0.3): s* is the first grid point past 0.6."""
    overshoot, tolerance = 0.02, 1e-3
    images = torch.zeros(2, 1, dtype=F64)
    total = torch.tensor([[1.0], [0.5]], dtype=F64)
    perturbation = (1 + overshoot) * total
    model = Bump()
    with torch.no_grad():
        original = model(images).argmax(1)
        adversarial = model(images + perturbation).argmax(1)
    result = DeepFoolResult(
        perturbation=perturbation,
        total=total,
        original=original,
        adversarial=adversarial,
        fooled=adversarial != original,
        iterations=torch.ones(2, dtype=torch.long),
        overshoot=overshoot,
    )
    assert result.fooled.tolist() == [False, True]
    scale = tight_scales(model, images, result, tolerance=tolerance)
    assert float(scale[0]) == 1 + overshoot
    # Image 1 flips at s > 0.6 and not at s* − tolerance (grid points k·tolerance).
    assert 0.6 < float(scale[1]) <= 0.6 + tolerance + 4 * EPS


# --------------------------------------------------------------- 9. the central-path fit
def test_a_fit_with_a_single_positive_constant():
    """t = log ω − 0.05 ω²: the unconstrained law has c2 < 0, and the best law with c ≥ 0 is
    c1 log ω = a + t alone (c2 = c3 = 0), which the fit must return with its own residual, R²
    and predicted ω = exp((a + t)/c1), not a NaN or a division by c3 = 0."""
    omega = torch.linspace(0.5, 2.5, 25, dtype=F64)[:, None]
    times = (omega.log() - 0.05 * omega.square())[:, 0]
    fit = theory.fit_central_path(times, omega)
    # The brute force: least squares of t on [log ω, −1].
    design = np.stack([np.log(omega[:, 0].numpy()), -np.ones(25)], axis=1)
    (c1, a), *_ = np.linalg.lstsq(design, times.numpy(), rcond=None)
    residual = float(np.square(design @ np.array([c1, a]) - times.numpy()).sum())
    # cond(design) ~ 10: the two least-squares solutions agree to ~1e3·eps.
    assert fit["c1"] == pytest.approx(c1, rel=1e-12) and c1 > 0
    assert fit["c2"] == 0.0 and fit["c3"] == 0.0
    assert float(fit["a"][0]) == pytest.approx(a, rel=1e-12)
    assert math.isnan(fit["c1_over_c3"]) and math.isnan(fit["c2_over_c3"])
    total = float(np.square(times.numpy() - times.numpy().mean()).sum())
    assert fit["r2_time"] == pytest.approx(1 - residual / total, rel=1e-12)
    assert 0.95 < fit["r2_time"] < 1.0  # a real misfit: the ω² term is missing
    predicted = torch.exp((fit["a"][0] + times) / fit["c1"])[:, None]
    torch.testing.assert_close(fit["predicted_omega"], predicted, rtol=1e-12, atol=0)
    r2_omega = 1 - float((predicted - omega).square().sum() / (omega - omega.mean()).square().sum())
    assert fit["r2_omega"] == pytest.approx(r2_omega, rel=1e-10)
    # The other side: with t = log ω + 0.05 ω² both constants are positive.
    both = theory.fit_central_path((omega.log() + 0.05 * omega.square())[:, 0], omega)
    assert both["c1"] == pytest.approx(1.0, rel=1e-9)
    assert both["c2"] == pytest.approx(0.05, rel=1e-9) and both["c3"] < 1e-9
