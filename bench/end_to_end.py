"""End to end: the time to measure NC1–NC4 of a network on its training set, ncfast against the
multi-pass peer (bench/peer_nc.py), side by side in one process.

- ncfast: one forward pass feeding ``ncfast.Measurement`` (class statistics and NC4 from the
  same batches), then ``compute()`` (every SPEC key: NC1–NC4 and more), in both precision
  policies (docs/precision.md).
- the peer's method, float32 as its default: a forward pass for the class means, one for the
  covariance about them, one for the NCC/linear decisions, then its NC1 (pinv), NC2 and NC3
  (distance from the simplex ETF) and NC4 (agreement).

Every competitor streams the same batches of the same network in eval mode
(``ncfast.paper.evaluate.split_features``); rounds interleaved (order alternating), median;
CPU time of the process and wall time, one torch thread by default, ratios from CPU time (see
bench/bench_precision.py: on a shared machine the wall clock measures the scheduler).

Cases: the demo's network and data (``--preset demo``: VGG11 at width 0.25 on the embedded MNIST
subset), randomly initialised (seeded; the time does not depend on the weights); and an
SVHN-shaped VGG13 (3×32×32 inputs, 10 classes, full width) on synthetic class-dependent images,
a subset of --svhn-samples images.

    python bench/end_to_end.py                  # ~2 minutes on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from bench_kernels import machine_info
from bench_precision import time_both
from peer_nc import (
    PeerCovariance,
    PeerDecisions,
    PeerMeans,
    nc1_pinv,
    nc2_etf_error,
    nc3_duality_error,
    nc4_agreement,
)

from ncfast import Measurement
from ncfast.backend.build_info import build_info
from ncfast.paper.config import PRESETS
from ncfast.paper.data.images import LabeledImages
from ncfast.paper.data.loading import load_dataset
from ncfast.paper.evaluate import split_features
from ncfast.paper.models import build

COMPETITORS = ("ncfast exact", "ncfast fast", "peer f32")


def ncfast_measure(model, data, batch_size, precision) -> dict:
    """One forward pass into a Measurement, then every metric."""
    classifier = model.classifier
    measurement = Measurement(
        data.num_classes,
        classifier.in_features,
        weight=classifier.weight.detach(),
        bias=classifier.bias.detach(),
        precision=precision,
    )
    for h, y in split_features(model, data, batch_size):
        measurement.update(h, y)
    return measurement.compute(second_pass=lambda: split_features(model, data, batch_size))


def peer_measure(model, data, batch_size) -> dict:
    """The peer's three passes (means, covariance, decisions) and its NC1–NC4."""
    c, p = data.num_classes, model.classifier.in_features
    weight = model.classifier.weight.detach()
    means = PeerMeans(c, p)
    for h, y in split_features(model, data, batch_size):
        means.update(h, y)
    mu, mu_global = means.compute()
    cov = PeerCovariance(c, p, mu)
    for h, y in split_features(model, data, batch_size):
        cov.update(h, y)
    sigma_w = cov.compute()
    decisions = PeerDecisions(c, p, mu, weight)
    for h, y in split_features(model, data, batch_size):
        decisions.update(h, y)
    return {
        "nc1": nc1_pinv(mu, sigma_w, mu_global),
        "nc2": nc2_etf_error(mu, mu_global),
        "nc3": nc3_duality_error(mu, weight, mu_global),
        "nc4_agreement": nc4_agreement(decisions),
    }


def time_rounds(model, data, batch_size, rounds) -> tuple[dict, dict]:
    """(median CPU seconds, median wall seconds) of each competitor over ``rounds``
    interleaved rounds, after a warm-up round."""
    fns = {
        "ncfast exact": lambda: ncfast_measure(model, data, batch_size, "exact"),
        "ncfast fast": lambda: ncfast_measure(model, data, batch_size, "fast"),
        "peer f32": lambda: peer_measure(model, data, batch_size),
    }
    cpu_ms, wall_ms = time_both(fns, [()], rounds)
    return (
        {k: v / 1e3 for k, v in cpu_ms.items()},
        {k: v / 1e3 for k, v in wall_ms.items()},
    )


def demo_case(samples: int | None):
    preset = PRESETS["demo"]
    train, _ = load_dataset(preset["dataset"], seed=0)
    if samples is not None and samples < len(train):
        train = subset(train, samples)
    torch.manual_seed(0)
    model = build(
        preset["net"], train.num_classes, train.channels, train.image_size, preset["width"]
    )
    return model.eval(), train


def subset(data: LabeledImages, count: int) -> LabeledImages:
    """``count`` samples drawn at random (seeded; the split is ordered by class)."""
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    return LabeledImages(
        data.images[keep],
        data.labels[keep],
        data.num_classes,
        data.mean,
        data.std,
        data.name,
        data.split,
    )


def svhn_case(samples: int):
    """SVHN-shaped synthetic images: a random mean image per class plus noise (uint8)."""
    g = torch.Generator().manual_seed(0)
    classes = 10
    labels = torch.arange(samples) % classes
    centres = torch.rand(classes, 3, 32, 32, generator=g) * 255
    noise = torch.randn(samples, 3, 32, 32, generator=g) * 40
    images = (centres[labels] + noise).clamp(0, 255).to(torch.uint8)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    data = LabeledImages(images, labels, classes, mean, std, "svhn-synthetic", "train")
    torch.manual_seed(0)
    return build("vgg13", classes, 3, 32, 1.0).eval(), data


def run_case(name, model, data, batch_size, rounds) -> dict:
    times, wall = time_rounds(model, data, batch_size, rounds)
    row = {
        "case": name,
        "samples": len(data),
        "feature_dim": model.classifier.in_features,
        "classes": data.num_classes,
        "seconds": times,
        "wall_seconds": wall,
        "peer_over": {k: times["peer f32"] / times[k] for k in COMPETITORS[:2]},
    }
    cells = " ".join(f"{times[k]:>7.2f} ({wall[k]:>6.2f})" for k in COMPETITORS)
    print(
        f"{name:14} {len(data):>6} {row['feature_dim']:>5} {cells} "
        f"{row['peer_over']['ncfast exact']:>10.2f}× {row['peer_over']['ncfast fast']:>10.2f}×"
    )
    sys.stdout.flush()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--demo-samples", type=int, default=None, help="default: all")
    parser.add_argument("--svhn-samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path(__file__).parent / "results" / "end_to_end_cpu.json"
    report = {"machine": machine_info(torch.device("cpu")), "build": build_info(), "rows": []}
    print(
        f"seconds to measure NC1–NC4 on the training set, median of {args.rounds} interleaved "
        f"rounds: CPU s (wall s), {torch.get_num_threads()} torch thread(s); load average "
        f"{report['machine']['load_average_1_5_15min']}"
    )
    head = f"{'case':14} {'N':>6} {'P':>5} " + " ".join(f"{k:>16}" for k in COMPETITORS)
    head += f" {'peer/exact':>11} {'peer/fast':>11}"
    print(head)
    print("-" * len(head))
    model, data = demo_case(args.demo_samples)
    report["rows"].append(run_case("demo (VGG11/4)", model, data, args.batch_size, args.rounds))
    model, data = svhn_case(args.svhn_samples)
    report["rows"].append(run_case("SVHN VGG13", model, data, args.batch_size, args.rounds))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
