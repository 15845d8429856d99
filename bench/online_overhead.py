"""Cost of measuring Neural Collapse from the training passes (``ncfast train --online-every K``).

Two copies of one network (same seed, same data) train side by side in one process through
``ncfast train``'s own epoch loop (:func:`ncfast.paper.train.train_epoch`): one plain, one with
the online measurement (the forward pre-hook feeding every batch's features into the window's
float64 statistics, NC4 against the previous window's means counted on the device, and at the
window's end the metrics). Each "epoch" is K steps on K·batch images of the embedded MNIST
subset (mnist5k), so every online epoch holds exactly one window and its end; the two copies
alternate epoch by epoch (the order swapped every repetition), and the overhead is the median
over repetitions of (online seconds / plain seconds) − 1: machine load that drifts over the run
hits both alike. The same overhead is also estimated from its parts, timed alone on K real
batches: the hook's work per batch plus the window's end divided by K, over the plain step
(stabler where the machine is shared and noisy).

    PYTHONPATH=. python bench/online_overhead.py                      # CPU: the demo's net, wider
    PYTHONPATH=. python bench/online_overhead.py --device cuda --nets vgg11:1,resnet18:1

Writes ``bench/results/online_overhead_<device>.{json,txt}``. On CUDA it also checks that the
steps inside a window never synchronise with the host (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ncfast.backend import ops
from ncfast.paper.config import TrainConfig
from ncfast.paper.data import LabeledImages, load_dataset
from ncfast.paper.distributed import DistributedContext
from ncfast.paper.train import Console, TrainingState, train_epoch

RESULTS = Path(__file__).resolve().parent / "results"


def subset(data: LabeledImages, count: int) -> LabeledImages:
    """The first ``count`` images (mnist5k is stored class-balanced and shuffled)."""
    return LabeledImages(
        data.images[:count],
        data.labels[:count],
        data.num_classes,
        data.mean,
        data.std,
        data.name,
        data.split,
    )


def config_for(net: str, width: float, args, online_every: int) -> TrainConfig:
    """The demo's training settings (SPEC §6's SGD, the demo's lr and weight decay)."""
    return TrainConfig(
        dataset="mnist5k",
        net=net,
        width=width,
        loss="mse",
        lr=0.05,
        weight_decay=5e-3,
        batch_size=args.batch_size,
        epochs=10**6,
        lr_milestones=(),
        measure_epochs="none",
        online_every=online_every,
        device=args.device,
        precision=args.precision,
        out=os.devnull,
    ).resolved()


def time_pair(net: str, width: float, data: LabeledImages, args) -> dict:
    """Interleaved epochs of K steps, plain and online; per-repetition seconds and ratios."""
    ctx = DistributedContext(device=torch.device(args.device))
    configs = {
        "plain": config_for(net, width, args, 0),
        "online": config_for(net, width, args, args.every),
    }
    states = {k: TrainingState.start(c, ctx, data, None, None) for k, c in configs.items()}
    console = Console(configs["plain"], 0, progress=False)
    seconds: dict[str, list[float]] = {"plain": [], "online": []}
    for rep in range(args.warmup + args.reps):
        order = ("plain", "online") if rep % 2 == 0 else ("online", "plain")
        for name in order:
            sgd = train_epoch(states[name], rep + 1, data, configs[name], ctx, console)
            if rep >= args.warmup:
                seconds[name].append(sgd.seconds)
    ratios = [o / p for o, p in zip(seconds["online"], seconds["plain"], strict=True)]
    model = states["plain"].model
    return {
        "net": net,
        "every": args.every,
        "width": width,
        "feature_dim": model.classifier.in_features,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_ms_plain": 1e3 * statistics.median(seconds["plain"]) / args.every,
        "step_ms_online": 1e3 * statistics.median(seconds["online"]) / args.every,
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
        "ratios": ratios,
        "seconds": seconds,
    }


def parts(net: str, width: float, data: LabeledImages, args) -> dict:
    """Where the online cost goes, on K real batches' features with the hook of a training
    run (``on_invalid="skip"``): per batch, the hook's whole work (labels, statistics update,
    NC4 count) and :meth:`TrainingWatch.step`, less the classifier's own forward pass; and the
    window's end (its metrics). Medians over repetitions of whole windows, so the online
    overhead per step is about ``batch_ms + window_end_ms / K``."""
    from ncfast.monitor import NCMonitor

    config = config_for(net, width, args, args.every)
    ctx = DistributedContext(device=torch.device(args.device))
    state = TrainingState.start(config, ctx, data, None, None)
    model = state.model.eval()
    batches = []
    for k in range(args.every):
        index = torch.arange(k * args.batch_size, (k + 1) * args.batch_size, device=data.device)
        x, y = data.batch(index, memory_format=torch.channels_last)
        with torch.no_grad():
            batches.append((model.features(x).float(), y))
    monitor = NCMonitor(model, model.classifier, weight_decay=0.025, on_invalid="skip")
    watch = monitor.watch_training(args.every)

    def synchronize() -> None:
        if batches[0][0].device.type == "cuda":
            torch.cuda.synchronize(batches[0][0].device)

    def step(h: torch.Tensor, y: torch.Tensor) -> None:
        watch.labels(y)
        model.classifier(h)
        watch.step()

    per_batch, window_end, forward = [], [], []
    with torch.no_grad():
        for rep in range(1 + max(3, args.reps // 4)):  # the first window: previous means
            synchronize()
            start = time.perf_counter()
            for h, y in batches[:-1]:
                step(h, y)
            synchronize()
            middle = time.perf_counter()
            step(*batches[-1])
            synchronize()
            done = time.perf_counter()
            for h, _ in batches[:-1]:
                model.classifier(h)
            synchronize()
            bare = (time.perf_counter() - done) / (len(batches) - 1)
            if rep:
                forward.append(bare)
                per_batch.append((middle - start) / (len(batches) - 1) - bare)
                window_end.append(done - middle)
    watch.close()
    batch_s = statistics.median(per_batch)
    return {
        "batch_ms": 1e3 * batch_s,
        "window_end_ms": 1e3 * (statistics.median(window_end) - batch_s - min(forward)),
    }


def sync_check(net: str, width: float, data: LabeledImages, args) -> dict:
    """CUDA: K−1 training steps inside a window with the hook on, under
    ``set_sync_debug_mode("error")``: any host synchronisation raises."""
    from ncfast.monitor import NCMonitor

    config = config_for(net, width, args, args.every)
    ctx = DistributedContext(device=torch.device(args.device))
    state = TrainingState.start(config, ctx, data, None, None)
    model, optimizer = state.model, state.optimizer
    watch = NCMonitor(model, model.classifier, weight_decay=0.025).watch_training(10**9)
    index = torch.arange(args.batch_size, device=data.device)
    x, y = data.batch(index, memory_format=torch.channels_last)
    target = torch.zeros(len(y), data.num_classes, device=y.device).scatter_(1, y[:, None], 1.0)

    def step() -> None:
        watch.labels(y)
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        watch.step()

    step()  # first step: kernel selection, lazy allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(args.every - 1):
            step()
        synced = None
    except RuntimeError as exc:
        synced = str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        watch.close()
    return {"steps": args.every - 1, "host_sync": synced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--nets",
        default="vgg11:0.25,vgg11:0.5",
        help="net:width pairs; vgg11:0.25 is the demo's network",
    )
    parser.add_argument("--every", type=int, default=10, help="K: steps per window")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=41)  # the CPU is noisy: a median of many
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()

    train_data, _ = load_dataset("mnist5k", device=args.device)
    data = subset(train_data, args.every * args.batch_size)
    results = []
    for item in args.nets.split(","):
        net, width = item.split(":")
        row = time_pair(net, float(width), data, args)
        row.update(parts(net, float(width), data, args))
        # The same overhead from its parts (stabler than the ratio on a noisy machine).
        per_step_ms = row["batch_ms"] + row["window_end_ms"] / args.every
        row["overhead_from_parts"] = per_step_ms / row["step_ms_plain"]
        if args.device.startswith("cuda"):
            row["sync_check"] = sync_check(net, float(width), data, args)
        results.append(row)
        print(summary_line(row), flush=True)
    write(results, args)


def summary_line(row: dict) -> str:
    low, _, high = (row["ratio_quartiles"] + [math.nan] * 3)[:3]
    return (
        f"{row['net']} width {row['width']:g} (P={row['feature_dim']}): step "
        f"{row['step_ms_plain']:.1f} ms plain, {row['step_ms_online']:.1f} ms online; overhead "
        f"median {100 * (row['ratio_median'] - 1):+.2f}% (quartiles {100 * (low - 1):+.2f}%, "
        f"{100 * (high - 1):+.2f}%), from its parts {100 * row['overhead_from_parts']:+.2f}%: "
        f"the hook per batch {row['batch_ms']:.2f} ms, window end "
        f"{row['window_end_ms']:.1f} ms (once per {row['every']} steps)"
    )


def write(results: list[dict], args) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    header = (
        f"# ncfast online_overhead on {device} ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}), torch "
        f"{torch.__version__}, statistics backend {ops.BACKEND}, batch {args.batch_size}, "
        f"K = {args.every} steps per window, {args.reps} interleaved repetitions, "
        f"{args.precision}"
    )
    slug = "cpu" if device == "cpu" else "cuda"
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "online_overhead",
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backend": ops.BACKEND,
        "settings": {k: v for k, v in vars(args).items() if k != "results"},
        "results": results,
    }
    (out / f"online_overhead_{slug}.json").write_text(json.dumps(payload, indent=1) + "\n")
    text = "\n".join([header, *(summary_line(r) for r in results)])
    checks = [r.get("sync_check") for r in results if r.get("sync_check")]
    for check in checks:
        text += f"\nhost synchronisations in {check['steps']} steps inside a window: "
        text += "none" if check["host_sync"] is None else check["host_sync"]
    (out / f"online_overhead_{slug}.txt").write_text(text + "\n")
    print(f"wrote {out / f'online_overhead_{slug}.json'}")


if __name__ == "__main__":
    main()
