"""DeepFool against the exact distance of a linear classifier, and the robustness measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ncfast.robustness import STEP_MARGIN, deepfool, robustness, sample_indices


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
@pytest.mark.parametrize("seed", [0, 1])
def test_linear_classifier_distance_is_exact(classes, seed):
    model = _linear_model(dim=3 * 4 * 4, classes=classes, seed=seed)
    images = torch.randn(
        17, 3, 4, 4, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64
    )
    dist, target, y = _exact_linear(model, images)

    res = deepfool(model, images, overshoot=0.0)
    norms = res.perturbation.flatten(1).norm(dim=1).numpy()
    # One step onto the boundary plus the original's margin of 1e-4 in distance.
    np.testing.assert_allclose(norms, dist + STEP_MARGIN, rtol=1e-10, atol=1e-12)
    assert res.fooled.all()
    assert (res.iterations == 1).all()
    np.testing.assert_array_equal(res.original.numpy(), y)
    np.testing.assert_array_equal(res.adversarial.numpy(), target)
    # The step points along w_target − w_y (the normal of the nearest boundary).
    w = model[1].weight.detach()
    normal = w[torch.as_tensor(target)] - w[torch.as_tensor(y)]
    cos = torch.nn.functional.cosine_similarity(res.perturbation.flatten(1), normal, dim=1)
    np.testing.assert_allclose(cos.numpy(), 1.0, atol=1e-12)

    over = deepfool(model, images, overshoot=0.02)
    np.testing.assert_allclose(
        over.perturbation.flatten(1).norm(dim=1).numpy(), 1.02 * (dist + STEP_MARGIN), rtol=1e-10
    )


def test_linear_classifier_float32_and_near_boundary():
    model = _linear_model(dim=20, classes=5, seed=3)
    images = torch.randn(8, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
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


def test_nonlinear_batched_equals_one_by_one_and_crosses_boundary():
    torch.manual_seed(0)
    model = _SmallConvNet().double()
    model.train()
    model(torch.randn(32, 1, 6, 6, dtype=torch.float64))  # give batch norm running stats
    model.eval()
    images = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    batched = deepfool(model, images)
    assert batched.fooled.all()
    with torch.no_grad():
        adv = model(images + batched.perturbation).argmax(1)
    assert (adv != model(images).argmax(1)).all()
    for i in range(images.shape[0]):
        one = deepfool(model, images[i : i + 1])
        torch.testing.assert_close(one.perturbation[0], batched.perturbation[i])
        assert int(one.iterations[0]) == int(batched.iterations[i])


class _FakeSplit:
    """The two things robustness() needs from a LabeledImages split."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def batch(self, index):
        return self.images[index], self.labels[index]


def test_robustness_mean_relative_norm_on_seeded_sample():
    model = _linear_model(dim=12, classes=4, seed=5).float()
    gen = torch.Generator().manual_seed(6)
    images = torch.randn(50, 12, generator=gen)
    labels = torch.randint(0, 4, (50,), generator=gen)
    split = _FakeSplit(images, labels)
    model.train()
    out = robustness(model, split, samples=20, seed=7, batch_size=6, progress=False)
    assert model.training  # restored
    index = sample_indices(50, 20, seed=7)
    assert index.unique().numel() == 20
    dist, _, pred = _exact_linear(model.double(), images[index].double())
    model.float()
    expected = 1.02 * (dist + STEP_MARGIN) / images[index].double().norm(dim=1).numpy()
    assert out["robustness"] == pytest.approx(expected.mean(), rel=1e-4)
    assert out["robustness_samples"] == 20
    correct = pred == labels[index].numpy()
    assert out["robustness_correct_samples"] == int(correct.sum())
    assert out["robustness_correct"] == pytest.approx(expected[correct].mean(), rel=1e-4)
    assert out["robustness_not_fooled"] == 0
    # Same seed, same sample, same number; another seed, another sample.
    again = robustness(model, split, samples=20, seed=7, batch_size=20, progress=False)
    assert again["robustness"] == pytest.approx(out["robustness"], rel=1e-6)
    assert not torch.equal(sample_indices(50, 20, seed=8), index)


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
