"""Synthetic run directories in the on-disk format of ``ncfast train`` (metrics.jsonl,
config.json), with every SPEC key measured by :class:`ncfast.Measurement` on features that
collapse over the epochs, so plots and tables see realistic, mutually consistent numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ncfast.measure import Measurement
from ncfast.metrics import mse_lambda
from ncfast.report.runs import to_json_value

MEASURE_EPOCHS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 22, 27, 33, 40)


def synthetic_records(
    *,
    loss: str = "mse",
    classes: int = 4,
    dim: int = 8,
    per_class: int = 12,
    epochs=MEASURE_EPOCHS,
    zero_error_at: int | None = 8,
    seed: int = 0,
    sgd_weight_decay: float = 5e-4,
) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    noise = {
        s: torch.randn(classes * per_class, dim, generator=gen, dtype=torch.float64)
        for s in ("train", "test")
    }
    w_noise = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    lam = mse_lambda(sgd_weight_decay, classes)
    records = []
    speed = 1.0 if loss == "mse" else 0.6
    for epoch in epochs:
        spread = 1.5 / (1 + epoch) ** speed
        for split in ("train", "test"):
            scale = spread * (1.0 if split == "train" else 2.5)
            feats = means[labels] + scale * noise[split]
            weight = 0.3 * means + 0.5 * w_noise / epoch
            bias = torch.zeros(classes, dtype=torch.float64)
            meas = Measurement(classes, dim, weight=weight, bias=bias, weight_decay=lam)
            meas.update(feats, labels)
            m = meas.compute()
            if split == "train":
                err = 0.0 if zero_error_at is not None and epoch >= zero_error_at else 0.5 / epoch
            else:
                err = 0.08 + 0.2 / epoch
            rec = {
                "epoch": epoch,
                "split": split,
                "error": err,
                "loss": m["loss_mse"],
                "lr": 0.01,
                "wall_time": float(epoch),
                "epoch_time": 1.0,
                "measure_time": 0.1,
            }
            rec.update(to_json_value(m))
            records.append(rec)
    return records


def write_run_dir(
    path: Path,
    *,
    dataset: str = "mnist5k",
    net: str = "resnet18",
    loss: str = "mse",
    records: list[dict] | None = None,
    **kwargs,
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    records = records if records is not None else synthetic_records(loss=loss, **kwargs)
    epochs = max(r["epoch"] for r in records)
    config = {
        "dataset": dataset,
        "net": net,
        "loss": loss,
        "width": 0.25,
        "epochs": epochs,
        "lr": 0.01,
        "batch_size": 128,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "lr_milestones": [epochs // 3, 2 * epochs // 3],
        "measure_epochs": sorted({r["epoch"] for r in records}),
        "per_class": 12,
        "seed": 0,
        "precision": "fp32",
        "device": "cpu",
        "data_root": None,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    with open(path / "metrics.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path
