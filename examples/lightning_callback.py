"""Neural Collapse of a PyTorch Lightning model, measured and logged by ncfast's callback.

A small MLP learns scikit-learn's bundled 8×8 digits (no download) with SGD on the MSE loss, as
in Han, Papyan & Donoho (2022). ``NeuralCollapseCallback`` hooks the input of the model's
``classifier`` during validation and logs every NC metric (``nc/nc1``, ...) with the module's
logger; the table below is printed from the callback's history. Seconds on a CPU::

    python examples/lightning_callback.py [--epochs 8] [--log-dir logs] [--devices 2]

``--devices 2`` trains with DDP on two CPU processes (gloo); each rank measures its half of the
validation set and gets the metrics of all of it.
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncfast import mse_lambda
from ncfast.integrations.lightning import NeuralCollapseCallback
from ncfast.measure import scalars

NUM_CLASSES = 10
VALIDATION = 360  # held-out digits; even, so two DDP ranks split it without padding
COLUMNS = ("nc1", "nc2_equinorm_means", "nc2_equiangular_means", "nc3_self_duality")


class DigitsMLP(L.LightningModule):
    def __init__(self, lr: float, weight_decay: float):
        super().__init__()
        self.lr, self.weight_decay = lr, weight_decay
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.classifier = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), F.one_hot(y, NUM_CLASSES).to(x.dtype))
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        error = (self(x).argmax(1) != y).to(x.dtype).mean()
        self.log("val_error", error, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay
        )


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float64) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val, train = order[:VALIDATION], order[VALIDATION:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when > 1)")
    parser.add_argument("--log-dir", help="write Lightning's CSV log (every metric) here")
    parser.add_argument("--history", help="write each rank's measurements to HISTORY.rankN.json")
    parser.add_argument("--save-model", help="write the trained weights here (rank 0)")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train, val = digits(args.seed)
    model = DigitsMLP(args.lr, args.weight_decay)
    # λ of HPD22 Eq. 3 for MSELoss with SGD weight decay on every parameter.
    callback = NeuralCollapseCallback(
        classifier="classifier", weight_decay=mse_lambda(args.weight_decay, NUM_CLASSES)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        precision="64-true",  # float64 features: the measurement is exact on them
        max_epochs=args.epochs,
        callbacks=[callback],
        logger=L.pytorch.loggers.CSVLogger(args.log_dir) if args.log_dir else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    per_rank_batch = 64 // args.devices
    trainer.fit(
        model,
        DataLoader(train, batch_size=per_rank_batch, shuffle=True),
        DataLoader(val, batch_size=per_rank_batch),
    )
    if args.history:
        rows = [{"epoch": row["epoch"], **scalars(row)} for row in callback.history]
        with open(f"{args.history}.rank{trainer.global_rank}.json", "w") as f:
            json.dump(rows, f)
    if trainer.is_global_zero:
        if args.save_model:
            torch.save(model.state_dict(), args.save_model)
        print(f"{'epoch':>5} {'samples':>7} " + " ".join(f"{c[:14]:>14}" for c in COLUMNS))
        for row in callback.history:
            print(
                f"{row['epoch']:>5} {row['num_samples']:>7} "
                + " ".join(f"{row[c]:>14.4g}" for c in COLUMNS)
            )
    return callback.history


if __name__ == "__main__":
    main()
