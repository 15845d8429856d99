"""Adversarial robustness as in the seed's Fig. 9: DeepFool (L2) minimal perturbations.

DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016) linearises the classifier around the
current point, steps to the nearest linearised decision boundary of the class the network
predicted on the clean input, and repeats until the prediction changes; the total step is
scaled by ``1 + overshoot`` (0.02 in the original). The robustness measure is the mean over a
fixed, seeded sample of test images of ``‖r‖₂ / ‖x‖₂``, both in the network's input space
(normalised images), as in the original code, where the perturbation is computed on the tensor
the network sees.

Batched: every image in a batch is attacked at once; the Jacobian of the C logits with respect
to the inputs comes from C backward passes through one forward pass. The network runs in eval
mode (batch norm with running statistics), so the images of a batch do not interact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

DEFAULT_OVERSHOOT = 0.02
DEFAULT_MAX_ITER = 50
DEFAULT_SAMPLES = 100
# The original adds this to each step's distance so the linearised step lands past the boundary.
STEP_MARGIN = 1e-4


@dataclass
class DeepFoolResult:
    """Per-image outcome of :func:`deepfool` (all tensors on the input's device).

    ``perturbation`` is the final ``r`` (already scaled by ``1 + overshoot``); ``original`` the
    class predicted on the clean input; ``adversarial`` the class predicted on ``x + r``;
    ``fooled`` whether they differ; ``iterations`` the DeepFool steps taken.
    """

    perturbation: torch.Tensor
    original: torch.Tensor
    adversarial: torch.Tensor
    fooled: torch.Tensor
    iterations: torch.Tensor

    def relative_norms(self, images: torch.Tensor) -> torch.Tensor:
        """``‖r‖₂ / ‖x‖₂`` per image, float64."""
        r = self.perturbation.flatten(1).double().norm(dim=1)
        x = images.flatten(1).double().norm(dim=1)
        return r / x


def _check_overshoot_and_iter(overshoot: float, max_iter: int, where: str) -> None:
    if not isinstance(overshoot, (int, float)) or not math.isfinite(overshoot) or overshoot < 0:
        raise ValueError(f"{where}: overshoot must be a finite number ≥ 0, got {overshoot!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"{where}: max_iter must be an integer ≥ 1, got {max_iter!r}")


def _logit_jacobian(model: nn.Module, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, C, D]``: the gradient of every logit with respect to its own input.

    One forward and one backward pass over C copies of the batch (copy c carries the gradient
    of logit c): with batch norm in eval mode the copies do not interact, and one large pass is
    much cheaper than C small ones (on a GPU, and on a busy CPU).
    """
    b = x.shape[0]
    copies = x.detach().unsqueeze(0).expand(num_classes, *x.shape)
    copies = copies.reshape(num_classes * b, *x.shape[1:]).clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(copies).reshape(num_classes, b, num_classes)
        own = out[torch.arange(num_classes), :, torch.arange(num_classes)]  # [C, b]: logit c
        (grad,) = torch.autograd.grad(own.sum(), copies)
    # reshape, not view: for a channels-last network autograd returns the input gradient
    # channels-last, which no view can flatten when there are several channels.
    return grad.reshape(num_classes, b, -1).transpose(0, 1)


def deepfool(
    model: nn.Module,
    images: torch.Tensor,
    *,
    overshoot: float = DEFAULT_OVERSHOOT,
    max_iter: int = DEFAULT_MAX_ITER,
) -> DeepFoolResult:
    """DeepFool (L2) on one batch ``images [B, ...]`` for a ``model`` returning logits ``[B, C]``.

    The model is used as it is (put it in eval mode first: batch norm in training mode would mix
    the images of the batch). Images that cannot be moved (all gradient differences zero) or are
    not fooled within ``max_iter`` steps come back with ``fooled = False``.
    """
    _check_overshoot_and_iter(overshoot, max_iter, "deepfool")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(
            f"deepfool: images must be a floating-point torch.Tensor, got "
            f"{getattr(images, 'dtype', type(images).__name__)}"
        )
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(
            f"deepfool: images must have shape [B, ...] with B ≥ 1, got {list(images.shape)}"
        )
    x0 = images.detach()
    batch = x0.shape[0]
    with torch.no_grad():
        logits0 = model(x0)
    if logits0.dim() != 2 or logits0.shape[0] != batch or logits0.shape[1] < 2:
        raise ValueError(
            f"deepfool: model must return logits [B, C] with C ≥ 2, got {list(logits0.shape)}"
        )
    original = logits0.argmax(dim=1)
    r_tot = torch.zeros_like(x0)
    iterations = torch.zeros(batch, dtype=torch.long, device=x0.device)
    active = torch.ones(batch, dtype=torch.bool, device=x0.device)
    scale = 1.0 + overshoot

    for _ in range(max_iter):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        x = x0[idx] + scale * r_tot[idx]
        label = original[idx]
        with torch.no_grad():
            logits = model(x)
        still = logits.argmax(dim=1) == label
        if not bool(still.all()):
            active[idx[~still]] = False
        if not bool(still.any()):
            break
        # Only the images still on their original side are linearised again.
        idx, x, label, logits = idx[still], x[still], label[still], logits[still]
        jac = _logit_jacobian(model, x, logits.shape[1])  # [b, C, D]
        rows = torch.arange(idx.numel(), device=x0.device)
        f = logits - logits[rows, label].unsqueeze(1)  # [b, C]
        w = jac - jac[rows, label].unsqueeze(1)  # [b, C, D]
        w_norm = w.norm(dim=2)
        dist = f.abs() / w_norm
        dist[w_norm == 0] = math.inf
        dist[rows, label] = math.inf
        best_dist, best = dist.min(dim=1)
        movable = torch.isfinite(best_dist)
        step = ((best_dist + STEP_MARGIN) / w_norm[rows, best]).unsqueeze(1) * w[rows, best]
        step[~movable] = 0
        r_tot[idx] += step.reshape(r_tot[idx].shape)
        iterations[idx] += movable.long()
        active[idx[~movable]] = False

    perturbation = scale * r_tot
    with torch.no_grad():
        adversarial = model(x0 + perturbation).argmax(dim=1)
    return DeepFoolResult(
        perturbation=perturbation,
        original=original,
        adversarial=adversarial,
        fooled=adversarial != original,
        iterations=iterations,
    )


def _check_samples(samples, where: str) -> int:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"{where}: samples must be an integer ≥ 1, got {samples!r}")
    return samples


def sample_indices(num_images: int, samples: int, seed: int = 0) -> torch.Tensor:
    """The fixed, seeded sample of image indices (the same for every epoch and run)."""
    _check_samples(samples, "sample_indices")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_images, generator=gen)[: min(samples, num_images)]


def robustness(
    model: nn.Module,
    data,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    overshoot: float = DEFAULT_OVERSHOOT,
    max_iter: int = DEFAULT_MAX_ITER,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict:
    """Mean DeepFool ``‖r‖/‖x‖`` over a seeded sample of ``data`` (a LabeledImages split).

    ``data`` needs ``len`` (or ``labels``) and ``batch(index) -> (normalised images, labels)``.
    The model is switched to eval mode for the attack and restored afterwards. Returns
    ``robustness`` (mean over all sampled images, the seed's Fig. 9 measure), its median and
    standard error, the mean over correctly classified images only, and counts.
    """
    _check_samples(samples, "robustness")
    _check_overshoot_and_iter(overshoot, max_iter, "robustness")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"robustness: batch_size must be an integer ≥ 1, got {batch_size!r}")
    if not hasattr(data, "batch"):
        raise TypeError(
            f"robustness: data must provide batch(index) -> (images, labels), "
            f"got {type(data).__name__}"
        )
    num_images = len(data.labels) if hasattr(data, "labels") else len(data)
    if num_images == 0:
        raise ValueError("robustness: data has no images")
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    index = sample_indices(num_images, samples, seed)

    was_training = model.training
    model.eval()
    rel, correct, fooled, iters = [], [], [], []
    try:
        chunks = index.split(batch_size)
        bar = tqdm(chunks, desc="DeepFool", unit="batch", disable=not progress, leave=False)
        for chunk in bar:
            images, labels = data.batch(chunk.to(_data_device(data)))
            images = images.to(device, torch.float32)
            labels = labels.to(device)
            res = deepfool(model, images, overshoot=overshoot, max_iter=max_iter)
            rel.append(res.relative_norms(images).cpu())
            correct.append((res.original == labels).cpu())
            fooled.append(res.fooled.cpu())
            iters.append(res.iterations.cpu())
    finally:
        model.train(was_training)

    rel_t, correct_t = torch.cat(rel), torch.cat(correct)
    fooled_t, iters_t = torch.cat(fooled), torch.cat(iters)
    n = rel_t.numel()
    stderr = float(rel_t.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "robustness": float(rel_t.mean()),
        "robustness_median": float(rel_t.median()),
        "robustness_stderr": stderr,
        "robustness_correct": float(rel_t[correct_t].mean()) if correct_t.any() else float("nan"),
        "robustness_samples": n,
        "robustness_correct_samples": int(correct_t.sum()),
        "robustness_not_fooled": int((~fooled_t).sum()),
        "robustness_mean_iterations": float(iters_t.double().mean()),
        "robustness_overshoot": float(overshoot),
        "robustness_seed": int(seed),
    }


def _data_device(data) -> torch.device:
    images = getattr(data, "images", None)
    return images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
