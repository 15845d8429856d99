"""One measurement of a network on one split: NC statistics, loss and error from the same passes.

:func:`measure_split` is what training calls at its measurement epochs and what
``ncfast analyze`` calls on a saved checkpoint, so both give the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ncfast.checks import check_int
from ncfast.measure import Measurement
from ncfast.metrics import mse_lambda
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET
from ncfast.paper.losses import check_loss, compute_loss

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


def network_autocast(device: torch.device, precision: str):
    """bf16 autocast for the network's forward pass, or nothing for fp32."""
    check_precision(precision)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prefers_channels_last(model: nn.Module) -> bool:
    """True when the model's convolution weights are stored channels-last: its inputs should be
    too (same kernels as in training, so the same numbers)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            w = module.weight
            if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
                return True
    return False


def split_batches(num_samples: int, batch_size: int, first: int = 0) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches of samples ``first..num_samples-1`` in the
    split's fixed order."""
    check_int(batch_size, "batch_size", 1, "split_batches")
    for start in range(first, num_samples, batch_size):
        yield start, min(start + batch_size, num_samples)


def split_features(
    model: nn.Module,
    data,
    batch_size: int,
    precision: str = "fp32",
    channels_last: bool = False,
    bounds: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(features float32 [B, P], labels [B])`` over ``data`` (or its samples
    ``bounds = (start, stop)``) in fixed order (no grad; the caller sets eval mode)."""
    device = data.images.device
    first, last = (0, len(data)) if bounds is None else bounds
    with torch.no_grad():
        for start, stop in split_batches(last, batch_size, first):
            x, y = data.batch(torch.arange(start, stop, device=device))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with network_autocast(device, precision):
                h = model.features(x)
            yield h.float(), y


def measure_split(
    model: nn.Module,
    data,
    *,
    loss: str,
    sgd_weight_decay: float,
    batch_size: int,
    precision: str = "fp32",
    mse_scale: tuple[float, float] | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    channels_last: bool | None = None,
    distributed: bool = False,
    group=None,
    stats_precision: str = "auto",
) -> dict:
    """Measure ``model`` on ``data`` (a :class:`ncfast.paper.data.LabeledImages`) in eval mode.

    One streamed pass in the split's order: features from ``model.features`` (upcast to float32,
    statistics in float64), logits from ``model.classifier`` applied to those features, loss and
    error from the same logits, NC statistics and NC4 through :class:`ncfast.Measurement` with
    the classifier's weight and bias and λ = :func:`ncfast.mse_lambda` (``sgd_weight_decay``, C).

    Returns a flat dict: ``error`` (fraction misclassified), ``loss`` (mean per-sample loss, for
    ``mse`` the mean over the N×C entries as PyTorch's ``MSELoss``), and every key of
    :meth:`ncfast.Measurement.compute` (``snr_singular_values`` a float64 tensor). Degenerate
    features (class means that do not separate, SPEC §2) give every metric NaN and the reason
    in ``nc_undefined`` (:func:`ncfast.metrics.undefined_metrics`). The model's
    train/eval mode is restored afterwards. ``channels_last`` (default: as the model's weights
    are stored, see :func:`prefers_channels_last`) sets the memory format of the inputs.

    ``distributed=True`` (torch.distributed initialised; collective: every rank of ``group``
    calls it with the same model and data): each rank streams its contiguous share of the split
    (:func:`ncfast.paper.distributed.shard_bounds`), the statistics are combined by
    ``Measurement.compute(distributed=True)`` and the loss and error sums are all-reduced, so
    every rank returns the metrics of the whole split. ``batch_size`` is then per rank.
    """
    scale = check_loss(loss, mse_scale)
    check_precision(precision)
    classifier = _checked_classifier(model, data)
    num_classes = data.num_classes
    device = data.images.device
    if channels_last is None:
        channels_last = prefers_channels_last(model)
    bounds = _shard(len(data), group) if distributed else None
    was_training = model.training
    model.eval()
    try:
        weight = classifier.weight.detach().float()
        bias = (
            classifier.bias.detach().float()
            if classifier.bias is not None
            else weight.new_zeros(num_classes)
        )
        measurement = Measurement(
            num_classes,
            classifier.in_features,
            weight=weight,
            bias=bias,
            weight_decay=mse_lambda(sgd_weight_decay, num_classes),
            device=device,
            memory_budget_bytes=memory_budget_bytes,
            precision=stats_precision,
        )
        # The labels come from the dataset: an invalid sample is a diverged network.
        measurement.stats.invalid_advice = _DIVERGED_ADVICE
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        for h, y in split_features(model, data, batch_size, precision, channels_last, bounds):
            with torch.no_grad():
                logits = F.linear(h, weight, bias)  # = model.classifier(h)
                loss_sum += compute_loss(loss, logits, y, scale, reduction="sum").double()
                wrong += (logits.argmax(1) != y).sum()
            measurement.update(h, y)

        def second_pass():
            return split_features(model, data, batch_size, precision, channels_last, bounds)

        # Collapsed to a point (or dead) features: a logged row of NaN metrics with the reason,
        # never a crash of the training run nor a number that reads as collapse. Every rank
        # sees the same reduced statistics, so every rank gets the same row.
        result = measurement.compute(
            second_pass=second_pass, distributed=distributed, group=group, on_degenerate="nan"
        )
        totals = torch.stack([loss_sum, wrong.double()])
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(totals, group=group)
        loss_total, wrong_total = totals.tolist()
    finally:
        model.train(was_training)
    n = len(data)
    return {"error": wrong_total / n, "loss": loss_total / n, **result}


_DIVERGED_ADVICE = (
    "The network gives NaN/inf features on these samples: its weights diverged (or its "
    "activations overflow in eval mode), so nothing can be measured; measure an earlier "
    "checkpoint, or train again with a smaller learning rate."
)


def _checked_classifier(model: nn.Module, data) -> nn.Linear:
    """``model.classifier``, checked: the model has the interface measurement needs, its
    classifier is an ``nn.Linear`` with one output per class of ``data``, which is not empty."""
    for attr in ("features", "classifier"):
        if not hasattr(model, attr):
            raise TypeError(
                f"measure_split: model must have .features(x) and .classifier (an nn.Linear); "
                f"{type(model).__name__} lacks .{attr}"
            )
    classifier = model.classifier
    if not isinstance(classifier, nn.Linear):
        raise TypeError(
            f"measure_split: model.classifier must be an nn.Linear, got {type(classifier).__name__}"
        )
    if classifier.out_features != data.num_classes:
        raise ValueError(
            f"measure_split: the classifier has {classifier.out_features} outputs but the "
            f"{data.name} data has {data.num_classes} classes"
        )
    if len(data) == 0:
        raise ValueError(f"measure_split: the {data.name} {data.split} split is empty")
    return classifier


def _shard(num_samples: int, group) -> tuple[int, int]:
    """This rank's contiguous share of a split (torch.distributed must be initialised)."""
    import torch.distributed as dist

    from ncfast.paper.distributed import shard_bounds

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "measure_split(distributed=True) needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group)"
        )
    return shard_bounds(num_samples, dist.get_rank(group), dist.get_world_size(group))
