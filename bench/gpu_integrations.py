"""The integrations on the GPU against the CPU, for bench/gpu_check.sh's ``integrations`` step:
the torchmetrics ``NeuralCollapse`` metric fed the same float64 batches on cuda and on the CPU,
and the Lightning ``NeuralCollapseCallback`` over a fit of examples/lightning_callback.py's
model (learning rate 0, so both devices measure the same weights) on each accelerator.

    python bench/gpu_integrations.py
    python bench/gpu_integrations.py --device cpu   # a smoke test of the script itself

Prints ``VERDICT PASS|FAIL|SKIPPED <what>: <why>`` and ``FIGURES {json}`` lines (read by
bench/gpu_check_report.py): every scalar within 1e-8 relative + 1e-10 absolute, float64 rounding
of the two devices' different summation orders amplified by the metrics' conditioning.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-8, 1e-10


def scalars(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def worst(got: dict[str, float], want: dict[str, float]) -> tuple[str, float]:
    """The key with the largest error relative to its bound, and that ratio (> 1: fails)."""
    ratios = {"(missing keys)": 2.0} if set(want) ^ set(got) else {}
    for key, value in want.items():
        other = got.get(key, math.nan)
        if math.isnan(value) and math.isnan(other):
            continue
        ratios[key] = abs(other - value) / (ATOL + RTOL * abs(value))
    if not ratios:
        return "(none)", 0.0
    key = max(ratios, key=lambda k: ratios[k] if not math.isnan(ratios[k]) else math.inf)
    return key, ratios[key]


def torchmetrics_case(device: str) -> dict[str, float]:
    from ncfast.integrations.torchmetrics import NeuralCollapse

    gen = torch.Generator().manual_seed(1)
    classes, dim = 10, 32
    weight = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(classes, generator=gen, dtype=torch.float64)
    batches = []
    for _ in range(6):
        labels = torch.randint(0, classes, (256,), generator=gen)
        batches.append(
            (torch.randn(256, dim, generator=gen, dtype=torch.float64) + labels[:, None], labels)
        )
    results = {}
    for name, where in (("cpu", "cpu"), ("cuda", device)):
        metric = NeuralCollapse(classes, dim, (weight, bias)).to(where)
        for features, labels in batches:
            metric.update(features.to(where), labels.to(where))
        results[name] = scalars(metric.compute())
    return compare("torchmetrics", results)


def lightning_case(device: str) -> dict[str, float]:
    import lightning as L

    from ncfast.integrations.lightning import NeuralCollapseCallback

    spec = importlib.util.spec_from_file_location(
        "example", ROOT / "examples" / "lightning_callback.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    train, val = example.digits(0)
    results = {}
    for accelerator in ("cpu", "gpu" if device == "cuda" else "cpu"):
        L.seed_everything(0, verbose=False)
        model = example.DigitsMLP(0.0, 0.0)  # lr 0: both devices measure the same weights
        callback = NeuralCollapseCallback("classifier")
        L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision="64-true",
            max_epochs=1,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(
            model,
            torch.utils.data.DataLoader(train, batch_size=64),
            torch.utils.data.DataLoader(val, batch_size=64),
        )
        results[accelerator] = scalars(callback.metrics)
    return compare("lightning", {"cpu": results["cpu"], "cuda": results[accelerator]})


def compare(what: str, results: dict[str, dict[str, float]]) -> dict[str, float]:
    key, ratio = worst(results["cuda"], results["cpu"])
    verdict = "PASS" if ratio <= 1.0 else "FAIL"
    print(
        f"VERDICT {verdict} {what}: {len(results['cpu'])} scalars; worst {key} at {ratio:.2g} of "
        f"its bound"
    )
    print("FIGURES " + json.dumps({what: {"worst_key": key, "worst_over_bound": ratio}}))
    return results["cuda"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("VERDICT SKIPPED integrations: no CUDA device")
        return 0
    for case in (torchmetrics_case, lightning_case):
        try:
            case(args.device)
        except ImportError as exc:
            print(f"VERDICT SKIPPED {case.__name__}: {exc}")
        except Exception as exc:  # one case's failure must not hide the other's verdict
            print(f"VERDICT FAIL {case.__name__}: {type(exc).__name__}: {exc}".splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
