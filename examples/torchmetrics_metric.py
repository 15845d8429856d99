"""Neural Collapse as a torchmetrics Metric: ``update(features, labels)``, ``compute``, ``reset``.

A small MLP learns scikit-learn's bundled 8×8 digits (no download) with SGD on the MSE loss, as
in Han, Papyan & Donoho (2022). After each epoch the held-out digits go through the model once;
their penultimate features feed ``NeuralCollapse``, which is computed, printed and reset for
the next epoch. Seconds on a CPU::

    python examples/torchmetrics_metric.py [--epochs 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncfast import mse_lambda
from ncfast.integrations.torchmetrics import NeuralCollapse

NUM_CLASSES = 10
COLUMNS = ("nc1", "nc2_equinorm_means", "nc2_equiangular_means", "nc4_ncc_mismatch")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels))
    val, train = order[:360], order[360:]
    train_loader = DataLoader(TensorDataset(images[train], labels[train]), 64, shuffle=True)
    val_loader = DataLoader(TensorDataset(images[val], labels[val]), batch_size=120)

    body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    classifier = nn.Linear(64, NUM_CLASSES)
    parameters = [*body.parameters(), *classifier.parameters()]
    optimizer = torch.optim.SGD(
        parameters, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    # The metric reads the classifier's current weights at compute(); λ of HPD22 Eq. 3 from the
    # SGD weight decay.
    nc = NeuralCollapse(
        NUM_CLASSES, 64, classifier, weight_decay=mse_lambda(args.weight_decay, NUM_CLASSES)
    )

    print(f"{'epoch':>5} {'accuracy':>8} " + " ".join(f"{c[:14]:>14}" for c in COLUMNS))
    history = []
    for epoch in range(1, args.epochs + 1):
        body.train(), classifier.train()
        for x, y in train_loader:
            loss = F.mse_loss(classifier(body(x)), F.one_hot(y, NUM_CLASSES).float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        body.eval(), classifier.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                features = body(x)
                nc.update(features, y)
                correct += int((classifier(features).argmax(1) == y).sum())
        result = {k: float(v) for k, v in nc.compute().items() if v.dim() == 0}
        result["accuracy"] = correct / len(val)
        nc.reset()  # the next epoch is a new pass
        history.append({"epoch": epoch, **result})
        print(
            f"{epoch:>5} {result['accuracy']:>8.4f} "
            + " ".join(f"{result[c]:>14.4g}" for c in COLUMNS)
        )
    return history


if __name__ == "__main__":
    main()
