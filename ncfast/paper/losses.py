"""Training losses: ``mse`` (the paper's), ``ce``, and Hui & Belkin's ``mse-rescaled``.

Every loss maps logits ``[B, C]`` and integer labels ``[B]`` to the mean loss of the batch; with
``reduction="sum"`` to the sum over the batch of the per-sample losses, so streamed passes add
batch sums and divide once by N.

- ``mse``: PyTorch's ``MSELoss()`` against one-hot targets, i.e. the mean over the B×C entries of
  ``(f(x) − e_y)²`` (SPEC §3: with SGD weight decay ``wd`` this is HPD22 Eq. 3 with λ = C·wd/2).
- ``ce``: cross-entropy.
- ``mse-rescaled``: Hui & Belkin (2021), "Evaluation of neural architectures trained with square
  loss vs cross-entropy": the true class's entry is weighted by ``k`` and its target is ``M``,
  ``(1/C)[k (f_y − M)² + Σ_{j≠y} f_j²]`` per sample; ``k = M = 1`` is ``mse``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("mse", "ce", "mse-rescaled")


def one_hot(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """``[B, C]`` one-hot rows; a scatter, so it never synchronises with the device."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0)


def parse_mse_scale(text: str | tuple | list | None) -> tuple[float, float] | None:
    """``"k,M"`` (or a pair) -> ``(k, M)``, both finite and > 0."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        k, m = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"mse_scale must be two numbers 'k,M' (e.g. '1,15'), got {text!r}"
        ) from None
    if not (math.isfinite(k) and math.isfinite(m) and k > 0 and m > 0):
        raise ValueError(f"mse_scale: k and M must be finite and > 0, got k={k}, M={m}")
    return k, m


def check_loss(loss: str, mse_scale) -> tuple[float, float] | None:
    """Check a loss name with its scale; returns the parsed ``(k, M)`` (``mse-rescaled`` only)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    scale = parse_mse_scale(mse_scale)
    if loss == "mse-rescaled" and scale is None:
        raise ValueError("loss 'mse-rescaled' needs mse_scale 'k,M' (Hui & Belkin, e.g. '1,15')")
    if loss != "mse-rescaled" and scale is not None:
        raise ValueError(f"mse_scale applies only to loss 'mse-rescaled', not {loss!r}")
    return scale


def compute_loss(
    loss: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    mse_scale: tuple[float, float] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss ``loss`` of ``logits [B, C]`` (computed in float32 or better) for ``labels``.

    ``reduction="mean"``: the training objective (mean over the batch); ``"sum"``: the sum over
    the batch of the per-sample losses (for streamed evaluation).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    num_classes = logits.shape[1]
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction=reduction)
    target = one_hot(labels, num_classes, logits.dtype)
    if loss == "mse":
        per_entry = (logits - target).square()
    elif loss == "mse-rescaled":
        if mse_scale is None:
            raise ValueError("loss 'mse-rescaled' needs mse_scale=(k, M)")
        k, m = mse_scale
        per_entry = (logits - m * target).square() * (1.0 + (k - 1.0) * target)
    else:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    per_sample = per_entry.sum(1) / num_classes
    return per_sample.mean() if reduction == "mean" else per_sample.sum()
