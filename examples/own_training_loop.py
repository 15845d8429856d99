"""Neural Collapse in your own PyTorch training loop, measured with ``ncfast.monitor.NCMonitor``.

A small MLP learns scikit-learn's bundled 8×8 digits (no download) with SGD on the MSE loss, as in
Han, Papyan & Donoho (2022). At a few epochs the monitor measures the training set through a
forward hook on the classifier, in the same eval pass that counts the training error, and the NC
metrics are printed (and, with ``--tensorboard DIR``, logged). A few seconds on a CPU::

    python examples/own_training_loop.py [--epochs 40] [--tensorboard runs/digits]

The shortest form, for a loader of ``(inputs, labels)``, is ``monitor.evaluate(loader)``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncfast import mse_lambda
from ncfast.integrations.tensorboard import TensorBoardWriter
from ncfast.monitor import NCMonitor

COLUMNS = {
    "nc1": "nc1",
    "nc2_equinorm_means": "equinorm",
    "nc2_equiangular_means": "equiang",
    "nc2_maxangle_means": "maxangle",
    "nc3_self_duality": "nc3",
    "nc4_ncc_mismatch": "nc4",
    "snr_condition": "snr_cond",
}


def measurement_epochs(epochs: int, count: int = 8) -> set[int]:
    """About ``count`` epochs, log-spaced from 1 to ``epochs`` (NC changes fastest early)."""
    return {round(epochs ** (i / (count - 1))) for i in range(count)} | {epochs}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensorboard", metavar="DIR", help="also log every metric to DIR")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    num_classes = 10
    train_loader = DataLoader(TensorDataset(images, labels), batch_size=128, shuffle=True)
    eval_loader = DataLoader(TensorDataset(images, labels), batch_size=512)

    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes)
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    # The features are the input of the last layer; λ of the MSE decomposition from the SGD
    # weight decay (ncfast.mse_lambda).
    monitor = NCMonitor(
        model,
        classifier=model[-1],
        weight_decay=mse_lambda(args.weight_decay, num_classes),
    )
    logger = TensorBoardWriter(args.tensorboard) if args.tensorboard else None
    measure_at = measurement_epochs(args.epochs)

    print(f"{'epoch':>5} {'loss':>8} {'error':>7} " + " ".join(f"{c:>9}" for c in COLUMNS.values()))
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        loss_sum = 0.0
        for x, y in train_loader:
            loss = F.mse_loss(model(x), F.one_hot(y, num_classes).float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
        if epoch not in measure_at:
            continue

        # One eval pass: the model runs as usual, the monitor's hook takes the features.
        model.eval()
        wrong = 0
        with torch.no_grad(), monitor.measure() as nc:
            for x, y in eval_loader:
                nc.labels(y)
                wrong += int((model(x).argmax(1) != y).sum())
        metrics = {**nc.metrics, "train_error": wrong / len(labels)}
        metrics["train_loss"] = loss_sum / len(labels)
        history.append({"epoch": epoch, **metrics})
        print(
            f"{epoch:>5} {metrics['train_loss']:>8.5f} {metrics['train_error']:>7.4f} "
            + " ".join(f"{metrics[k]:>9.4g}" for k in COLUMNS)
        )
        if logger is not None:
            logger.log(metrics, step=epoch)
    if logger is not None:
        logger.close()
    return history


if __name__ == "__main__":
    main()
