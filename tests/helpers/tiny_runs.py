"""Tiny training runs of ``ncfast.paper.train`` in seconds: synthetic image splits, the
configuration of a 1/16-width VGG11 on the CPU, the command line of such a run on the embedded
MNIST subset, the rows a run logs, and a valid checkpoint payload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ncfast.paper.checkpoint import FORMAT
from ncfast.paper.config import TrainConfig
from ncfast.paper.data import LabeledImages

NUM_CLASSES = 4  # of synthetic_split

# ``ncfast train`` options of a run of seconds on the embedded MNIST subset: a 1/16-width VGG11,
# two epochs, on the CPU (each test adds the number of images, the batch size, ...).
TINY_TRAIN_ARGS = (
    "--dataset",
    "mnist5k",
    "--net",
    "vgg11",
    "--width",
    "0.0625",
    "--epochs",
    "2",
    "--device",
    "cpu",
)


def synthetic_split(split: str, per_class: int, seed: int, channels: int = 1) -> LabeledImages:
    """Class-dependent blobs plus noise, uint8 32×32, so a tiny network learns something."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    yy, xx = np.mgrid[0:32, 0:32]
    images = rng.integers(0, 60, size=(labels.size, channels, 32, 32)).astype(np.float64)
    for i, c in enumerate(labels):
        cy, cx = 8 + 16 * (c // 2), 8 + 16 * (c % 2)
        images[i] += 180 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
    images = torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8))
    return LabeledImages(
        images,
        torch.from_numpy(labels).long(),
        NUM_CLASSES,
        torch.full((channels,), 0.3),
        torch.full((channels,), 0.3),
        "synthetic",
        split,
    )


def tiny_config(out: Path, **overrides) -> TrainConfig:
    """A two-epoch run of a 1/16-width VGG11 on the CPU, writing to ``out``, for data given to
    ``train(..., data=...)`` (such as two :func:`synthetic_split` splits)."""
    values = {
        "dataset": "synthetic",
        "net": "vgg11",
        "width": 0.0625,
        "epochs": 2,
        "lr": 0.05,
        "batch_size": 16,
        "measure_batch_size": 32,
        "device": "cpu",
        "out": str(out),
    }
    values.update(overrides)
    return TrainConfig(**values)


def read_rows(out: Path) -> list[dict]:
    """The rows a run logged to ``out/metrics.jsonl``, one dict per (epoch, split)."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_payload(epoch: int = 3) -> dict:
    """A valid checkpoint payload of a one-layer model after ``epoch`` epochs."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2], gamma=0.1)
    model(torch.ones(1, 3)).sum().backward()
    for _ in range(epoch):
        optimizer.step()
        scheduler.step()
    return {
        "format": FORMAT,
        "ncfast_version": "x",
        "epoch": epoch,
        "config": {"a": [1, 2]},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "history": [
            {"epoch": 1, "split": "train", "error": 0.5, "snr_singular_values": [2.0, 1.0]}
        ],
    }
