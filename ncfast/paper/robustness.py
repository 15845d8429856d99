"""Adversarial robustness as in PHD20 and HPD22 Fig. 9: DeepFool (L2) minimal perturbations.

DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016) linearises the classifier around the
current point, steps to the nearest linearised decision boundary of the class the network
predicted on the clean input, and repeats until the prediction at ``x + (1 + overshoot)·r``
changes; the perturbation is that total step ``r`` scaled by ``1 + overshoot`` (0.02 in the
original). SPEC §7 defines three numbers over a fixed, seeded sample of test images, all in the
network's input space (the normalised tensor it sees, as in the original code):

- ``robustness``: the mean of ``‖(1 + overshoot)·r‖₂ / ‖x‖₂``, what the papers report.
- ``robustness_tight``: the same mean with ``s*·r``, ``s*`` the smallest multiple of ``r`` in
  ``(0, 1 + overshoot]`` that already changes the prediction (to 1e-3). DeepFool's linear steps
  overshoot on smooth networks, so this is the bound a reader can interpret.
- ``robustness_out_of_range``: the fraction of the pixels of ``x + (1 + overshoot)·r`` outside
  the valid image range: DeepFool is unconstrained, and this says how far from a real image it
  went.

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

from ncfast.checks import check_int, check_number

DEFAULT_OVERSHOOT = 0.02
DEFAULT_MAX_ITER = 50
DEFAULT_SAMPLES = 100
# The original adds this to each step's distance so the linearised step lands past the boundary.
STEP_MARGIN = 1e-4
# SPEC §7: robustness_tight bisects s* to this resolution, after a scan at this many points.
DEFAULT_TIGHT_TOLERANCE = 1e-3
TIGHT_SCAN_POINTS = 16
# Out of range means past the bound by more than this (relative, at least 1): float32
# normalisation rounds clean pixels at 0 or 255 a few ulps (1e-7) past the float64 bound, while
# one grey level is 1/(255·std) ≳ 0.004 in normalised units.
RANGE_SLACK = 1e-5


@dataclass
class DeepFoolResult:
    """Per-image outcome of :func:`deepfool` (all tensors on the input's device).

    ``total`` is the sum of DeepFool's steps ``r``; ``perturbation`` the attack
    ``(1 + overshoot)·r``; ``original`` the class predicted on the clean input; ``adversarial``
    the class predicted on ``x + perturbation``; ``fooled`` whether they differ; ``iterations``
    the DeepFool steps taken (int64).
    """

    perturbation: torch.Tensor
    total: torch.Tensor
    original: torch.Tensor
    adversarial: torch.Tensor
    fooled: torch.Tensor
    iterations: torch.Tensor
    overshoot: float

    def relative_norms(self, images: torch.Tensor) -> torch.Tensor:
        """``‖perturbation‖₂ / ‖x‖₂`` per image, float64."""
        r = self.perturbation.flatten(1).double().norm(dim=1)
        x = images.flatten(1).double().norm(dim=1)
        return r / x


def _check_overshoot_and_iter(overshoot: float, max_iter: int, where: str) -> None:
    check_number(overshoot, "overshoot", where, minimum=0.0)
    check_int(max_iter, "max_iter", 1, where)


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
        total=r_tot,
        original=original,
        adversarial=adversarial,
        fooled=adversarial != original,
        iterations=iterations,
        overshoot=float(overshoot),
    )


def tight_scales(
    model: nn.Module,
    images: torch.Tensor,
    result: DeepFoolResult,
    *,
    tolerance: float = DEFAULT_TIGHT_TOLERANCE,
    scan_points: int = TIGHT_SCAN_POINTS,
) -> torch.Tensor:
    """``s*`` per image (float64 ``[B]``): the smallest multiple of DeepFool's ``r`` that changes
    the prediction, on the grid ``s_k = min(k·tolerance, 1 + overshoot)``, ``k ≥ 1``.

    ``result`` is :func:`deepfool`'s on ``images`` (the same ``model``, in eval mode). The
    prediction at ``x + s·r`` is first scanned at ``scan_points`` grid points spread over
    ``(0, 1 + overshoot]`` (all images and points batched), then bisected on the grid between
    the first scanned point that flips and the one before it. So the model flips at ``s*·r``
    and not at ``(s* − tolerance)·r``, and at no scanned point below ``s*``: a flip that a path
    with several crossings makes and undoes between two scanned points (``1.02/16`` apart by
    default) is not seen. Images ``result`` did not fool keep ``s* = 1 + overshoot`` (their full
    ``r``, as in ``robustness``). A fixed number of forward passes, no host synchronisation.
    """
    if not isinstance(tolerance, float) or not 0 < tolerance < 1:
        raise ValueError(f"tight_scales: tolerance must be a float in (0, 1), got {tolerance!r}")
    check_int(scan_points, "scan_points", 1, "tight_scales")
    x0 = images.detach()
    if result.total.shape != x0.shape:
        raise ValueError(
            f"tight_scales: result is for images {list(result.total.shape)}, got {list(x0.shape)}"
        )
    batch = x0.shape[0]
    top = 1.0 + result.overshoot
    # Grid indices 0..steps; s_steps is exactly the attack's (1 + overshoot), where it was fooled.
    steps = max(1, math.ceil(top / tolerance - 1e-9))
    tile = (1,) * (x0.dim() - 1)
    unsqueeze = (-1, *tile)
    # Whole copies of the batch per forward pass, at least 256 images when the batch is smaller.
    per_pass = batch * max(1, 256 // batch)

    def flips(k: torch.Tensor) -> torch.Tensor:
        """Whether x + s_k·r changes the prediction; k: long [n·B], image i at row i mod B."""
        predicted = []
        for part in k.split(per_pass):
            copies = part.numel() // batch
            s = (part.double() * tolerance).clamp(max=top).to(x0.dtype).reshape(unsqueeze)
            step = s * result.total.repeat(copies, *tile)
            # At k = steps exactly the attack's perturbation, as deepfool evaluated it.
            last = (part == steps).reshape(unsqueeze)
            step = torch.where(last, result.perturbation.repeat(copies, *tile), step)
            with torch.no_grad():
                predicted.append(model(x0.repeat(copies, *tile) + step).argmax(dim=1))
        return torch.cat(predicted) != result.original.repeat(k.numel() // batch)

    device = x0.device
    scan = sorted({max(1, round(j * steps / scan_points)) for j in range(1, scan_points + 1)})
    scan_k = torch.tensor(scan, dtype=torch.long, device=device)
    scanned = flips(scan_k.repeat_interleave(batch)).reshape(len(scan), batch)
    first = scanned.int().argmax(dim=0)  # index of the first scanned point that flips
    found = scanned.any(dim=0) & result.fooled
    previous = torch.cat([scan_k.new_zeros(1), scan_k])  # k = 0: the clean image
    hi = torch.where(found, scan_k[first], torch.full_like(first, steps))
    lo = torch.where(found, previous[first], hi)
    # Invariant: no flip at lo (k = 0 is the clean prediction), a flip at hi.
    widest = max(b - a for a, b in zip([0, *scan], scan, strict=False))
    for _ in range(math.ceil(math.log2(widest)) if widest > 1 else 0):
        open_ = hi - lo > 1
        mid = (lo + hi) // 2
        flipped = flips(mid)
        hi = torch.where(open_ & flipped, mid, hi)
        lo = torch.where(open_ & ~flipped, mid, lo)
    return (hi.double() * tolerance).clamp(max=top)


def valid_range_of(data) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The valid image range ``(low, high)`` per channel in the normalised units ``data.batch``
    returns, from the ``mean``/``std`` (in [0, 1]-pixel units) of a LabeledImages split:
    ``[(0 − mean_c)/std_c, (1 − mean_c)/std_c]``; None when ``data`` has no such statistics."""
    mean, std = getattr(data, "mean", None), getattr(data, "std", None)
    if not (isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)):
        return None
    mean, std = mean.detach().double().cpu(), std.detach().double().cpu()
    return (0.0 - mean) / std, (1.0 - mean) / std


def _check_valid_range(valid_range, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` as float64 1-D CPU tensors (one value, or one per channel)."""
    if not isinstance(valid_range, (tuple, list)) or len(valid_range) != 2:
        raise ValueError(
            f"{where}: valid_range must be a pair (low, high), got {type(valid_range).__name__}"
        )
    try:
        low, high = (torch.as_tensor(v, dtype=torch.float64).cpu().flatten() for v in valid_range)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"{where}: valid_range must hold numbers or per-channel sequences, got {valid_range!r}"
        ) from None
    if low.numel() == 0 or low.shape != high.shape:
        raise ValueError(
            f"{where}: valid_range low and high must have the same number (≥ 1) of values, got "
            f"{low.numel()} and {high.numel()}"
        )
    if not (torch.isfinite(low).all() and torch.isfinite(high).all() and (low < high).all()):
        raise ValueError(
            f"{where}: valid_range must have finite low < high, got {low.tolist()}, {high.tolist()}"
        )
    return low, high


def out_of_range_fractions(
    points: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    """Per image (float64 ``[B]``): the fraction of the values of ``points [B, C, ...]`` outside
    ``[low_c, high_c]`` (``low``/``high``: one value, or one per channel ``C``).

    A value counts as outside when it passes the bound by more than ``RANGE_SLACK`` (relative
    to the bound, at least 1): normalising in float32 rounds a clean pixel at 0 or 255 by a few
    ulps (≈ 1e-7) past the bound computed in float64, and that is no excursion.
    """
    if points.dim() < 2:
        raise ValueError(
            f"out_of_range_fractions: points must be [B, C, ...] (a batch of images or of flat "
            f"vectors), got shape {tuple(points.shape)}"
        )
    channels = points.shape[1]
    if low.numel() not in (1, channels):
        raise ValueError(
            f"valid_range: {low.numel()} values for images with {channels} channels "
            f"(give one value or one per channel)"
        )
    shape = (1, -1) + (1,) * (points.dim() - 2)
    low = low.to(points.device, torch.float64).reshape(shape)
    high = high.to(points.device, torch.float64).reshape(shape)
    slack_low = RANGE_SLACK * low.abs().clamp(min=1.0)
    slack_high = RANGE_SLACK * high.abs().clamp(min=1.0)
    values = points.detach().double()
    outside = (values < low - slack_low) | (values > high + slack_high)
    return outside.flatten(1).double().mean(dim=1)


def sample_indices(num_images: int, samples: int, seed: int = 0) -> torch.Tensor:
    """The fixed, seeded sample of image indices (the same for every epoch and run)."""
    check_int(samples, "samples", 1, "sample_indices")
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
    valid_range=None,
    progress: bool = True,
) -> dict:
    """SPEC §7's DeepFool measures over a seeded sample of ``data`` (a LabeledImages split).

    ``data`` needs ``len`` (or ``labels``) and ``batch(index) -> (normalised images, labels)``.
    The model is switched to eval mode for the attack and restored afterwards.

    ``valid_range``: the valid image range in the normalised units of ``data.batch``, a pair
    ``(low, high)`` of numbers or per-channel sequences. None (the default) takes it from the
    data's ``mean``/``std`` in [0, 1]-pixel units (:func:`valid_range_of`: what a LabeledImages
    split has); data without them and no ``valid_range`` gives ``robustness_out_of_range = NaN``
    (not measured).

    Returns ``robustness`` (the mean of ``‖(1 + overshoot)·r‖/‖x‖`` over all sampled images, the
    papers' Fig. 9 measure), its median and standard error, the mean over correctly classified
    images only; ``robustness_tight`` (the mean of ``‖s*·r‖/‖x‖``, :func:`tight_scales`), its
    median and standard error and the median of ``s*`` over fooled images;
    ``robustness_out_of_range`` (the fraction of the pixels of ``x + (1 + overshoot)·r`` outside
    the valid range, :func:`out_of_range_fractions`); and counts.
    """
    check_int(samples, "samples", 1, "robustness")
    _check_overshoot_and_iter(overshoot, max_iter, "robustness")
    check_int(batch_size, "batch_size", 1, "robustness")
    if not hasattr(data, "batch"):
        raise TypeError(
            f"robustness: data must provide batch(index) -> (images, labels), "
            f"got {type(data).__name__}"
        )
    if valid_range is None:
        valid_range = valid_range_of(data)
    bounds = None if valid_range is None else _check_valid_range(valid_range, "robustness")
    num_images = len(data.labels) if hasattr(data, "labels") else len(data)
    if num_images == 0:
        raise ValueError("robustness: data has no images")
    if device is None:  # the model's (a model without parameters: the data's)
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else _data_device(data)
    device = torch.device(device)
    index = sample_indices(num_images, samples, seed)

    was_training = model.training
    model.eval()
    per_image: dict[str, list] = {
        k: [] for k in ("rel", "tight", "scale", "outside", "correct", "fooled", "iters")
    }
    try:
        chunks = index.split(batch_size)
        bar = tqdm(chunks, desc="DeepFool", unit="batch", disable=not progress, leave=False)
        for chunk in bar:
            images, labels = data.batch(chunk.to(_data_device(data)))
            images = images.to(device, torch.float32)
            labels = labels.to(device)
            res = deepfool(model, images, overshoot=overshoot, max_iter=max_iter)
            scale = tight_scales(model, images, res)
            rel = res.relative_norms(images)
            per_image["rel"].append(rel)
            # ‖s*·r‖/‖x‖ as (s*/(1 + overshoot))·‖(1 + overshoot)·r‖/‖x‖: the same number, and
            # with s* ≤ 1 + overshoot never above robustness's term, rounding included (a
            # product with the float32 perturbation's norm could round 1e-8 above it).
            per_image["tight"].append(scale / (1.0 + res.overshoot) * rel)
            per_image["scale"].append(scale)
            if bounds is not None:
                outside = out_of_range_fractions(images + res.perturbation, *bounds)
                per_image["outside"].append(outside)
            per_image["correct"].append(res.original == labels)
            per_image["fooled"].append(res.fooled)
            per_image["iters"].append(res.iterations)
    finally:
        model.train(was_training)

    # One transfer at the end, not one per batch.
    got = {k: torch.cat(v).cpu() for k, v in per_image.items() if v}
    rel, tight, correct, fooled = got["rel"], got["tight"], got["correct"], got["fooled"]
    n = rel.numel()
    fooled_scales = got["scale"][fooled]
    return {
        "robustness": float(rel.mean()),
        "robustness_median": float(rel.median()),
        "robustness_stderr": _stderr(rel),
        "robustness_correct": float(rel[correct].mean()) if correct.any() else math.nan,
        "robustness_tight": float(tight.mean()),
        "robustness_tight_median": float(tight.median()),
        "robustness_tight_stderr": _stderr(tight),
        "robustness_tight_scale_median": (
            float(fooled_scales.median()) if fooled_scales.numel() else math.nan
        ),
        "robustness_out_of_range": float(got["outside"].mean()) if "outside" in got else math.nan,
        "robustness_samples": n,
        "robustness_correct_samples": int(correct.sum()),
        "robustness_not_fooled": int((~fooled).sum()),
        "robustness_mean_iterations": float(got["iters"].double().mean()),
        "robustness_overshoot": float(overshoot),
        "robustness_seed": int(seed),
    }


def _stderr(values: torch.Tensor) -> float:
    n = values.numel()
    return float(values.std() / math.sqrt(n)) if n > 1 else math.nan


def _data_device(data) -> torch.device:
    images = getattr(data, "images", None)
    return images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
