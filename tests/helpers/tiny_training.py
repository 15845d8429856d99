"""The parts of a training run in milliseconds, for guards of ncfast.paper.training_state,
sgd_epoch and train that drive them in-process: a float64 linear network on 4×4 images, tiny
labelled splits, a configuration that fits them, a TrainingState of them on the CPU, a console
that records its calls, and a float64 SGD written out by hand (the reference of an epoch)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ncfast.paper.config import TrainConfig
from ncfast.paper.data import LabeledImages
from ncfast.paper.distributed import DistributedContext
from ncfast.paper.training_state import TrainingState, make_optimizer

CPU = torch.device("cpu")
CLASSES = 3


class TinyNet(nn.Module):
    """A linear classifier (float64 unless ``dtype``) of the flattened image, after an
    optional BatchNorm1d; ``classifier`` is the layer NCMonitor watches."""

    def __init__(self, in_features: int = 16, batchnorm: bool = False, dtype=torch.float64):
        super().__init__()
        self.dtype = dtype
        self.norm = nn.BatchNorm1d(in_features, dtype=dtype) if batchnorm else nn.Identity()
        self.classifier = nn.Linear(in_features, CLASSES, dtype=dtype)
        self.feature_dim = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(x.flatten(1).to(self.dtype)))


def tiny_split(samples: int, seed: int, split: str = "train") -> LabeledImages:
    """``samples`` uint8 1×4×4 images of :data:`CLASSES` classes (labels cycling)."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, size=(samples, 1, 4, 4)).astype(np.uint8))
    labels = torch.arange(samples) % CLASSES
    return LabeledImages(
        images, labels, CLASSES, torch.full((1,), 0.4), torch.full((1,), 0.3), "tiny", split
    )


def small_config(**overrides) -> TrainConfig:
    """A configuration of :class:`TinyNet` runs (not resolved: every value given)."""
    values = {
        "dataset": "tiny",
        "net": "vgg11",
        "width": 0.0625,
        "loss": "mse",
        "epochs": 4,
        "lr": 0.05,
        "batch_size": 8,
        "momentum": 0.9,
        "weight_decay": 5e-3,
        "lr_milestones": (2, 3),
        "lr_gamma": 0.1,
        "channels_last": False,
        "device": "cpu",
        "stats_precision": "exact",
    }
    values.update(overrides)
    return TrainConfig(**values)


def cpu_context() -> DistributedContext:
    return DistributedContext(device=CPU)


def tiny_state(config: TrainConfig, model: nn.Module | None = None, seed: int = 0):
    """A TrainingState of ``model`` (a fresh :class:`TinyNet` from ``seed``) and the optimiser
    and schedule of ``config``."""
    if model is None:
        torch.manual_seed(seed)
        model = TinyNet()
    optimizer, scheduler = make_optimizer(model, config, CPU)
    return TrainingState(model, model, optimizer, scheduler, CPU)


class RecordingConsole:
    """Console.batches without bars: records each epoch's call and yields the batches."""

    def __init__(self) -> None:
        self.calls: list[tuple[list, int]] = []

    def batches(self, batches: list, epoch: int):
        self.calls.append((list(batches), epoch))
        return iter(batches)


def permutation_by_hand(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((1_000_003 * seed + epoch) % 2**64)
    return torch.randperm(num_samples, generator=generator)


def loss_and_gradient(loss: str, z: torch.Tensor, y: torch.Tensor, scale=None):
    """The mean loss of logits ``z`` [B, C] and its gradient, written out (float64)."""
    batch, classes = z.shape
    target = torch.zeros_like(z)
    target[torch.arange(batch), y] = 1.0
    if loss == "ce":
        p = torch.softmax(z, 1)
        return -torch.log(p[torch.arange(batch), y]).mean(), (p - target) / batch
    k, m = scale if loss == "mse-rescaled" else (1.0, 1.0)
    weight = 1.0 + (k - 1.0) * target  # k on the true class
    diff = z - m * target
    value = (weight * diff.square()).sum() / (batch * classes)
    return value, 2.0 * weight * diff / (batch * classes)


def sgd_epoch_by_hand(weight, bias, data, config: TrainConfig, epoch: int, lr: float, buffers):
    """One epoch of SGD (momentum, weight decay) of the linear network ``(weight, bias)``
    (float64, updated in place) over the batches of (seed, epoch), as torch.optim.SGD does it.
    ``buffers``: the momentum buffers (an empty list at the first step). Returns the Σ
    loss·samples, the misclassified samples, the samples and the per-step records."""
    perm = permutation_by_hand(len(data), config.seed, epoch)
    bounds = list(range(0, len(data), config.batch_size))
    batches = [(s, min(s + config.batch_size, len(data))) for s in bounds]
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] < 2:
        batches.pop()
    loss_sum, wrong, steps = 0.0, 0, []
    for first, stop in batches:
        x, y = data.batch(perm[first:stop])
        x = x.flatten(1).double()
        z = x @ weight.T + bias
        value, g = loss_and_gradient(config.loss, z, y, config.mse_scale)
        grads = (g.T @ x, g.sum(0))
        params = (weight, bias)
        for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
            d_p = grad + config.weight_decay * p
            if len(buffers) < 2:
                buffers.append(d_p.clone())
            else:
                buffers[i] = config.momentum * buffers[i] + d_p
            p -= lr * buffers[i]
        batch_wrong = int((z.argmax(1) != y).sum())
        loss_sum += float(value) * (stop - first)
        wrong += batch_wrong
        steps.append((float(value) * (stop - first), batch_wrong, stop - first))
    return loss_sum, wrong, batches[-1][1], steps
