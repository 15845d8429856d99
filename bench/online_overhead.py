"""Cost of measuring Neural Collapse from the training passes (``ncfast train --online-every K``).

Three copies of one network (same seed, same data) train side by side in one process through
``ncfast train``'s own epoch loop (:func:`ncfast.paper.sgd_epoch.train_epoch`): one plain, one with
the online measurement (the forward pre-hook feeding every batch's features into the window's
float64 statistics, NC4 against the previous window's means counted on the device, and at the
window's end the metrics), and one whose windows never end (the per-batch work alone). Each
"epoch" is K steps on K·batch images of the embedded MNIST subset (mnist5k), so every online
epoch holds exactly one window and its end; the copies alternate epoch by epoch (the order
reversed every repetition), and each overhead is the median over repetitions of (seconds /
plain seconds) − 1: machine load that drifts over the run hits all alike. The window ends'
share is the online overhead less the per-batch one; it shrinks as 1/K.

    python bench/online_overhead.py                      # CPU: the demo's net, and wider
    python bench/online_overhead.py --device cuda --nets vgg11:1,resnet18:1

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
from pathlib import Path

import torch
import torch.nn.functional as F

from ncfast.backend import ops
from ncfast.paper.config import TrainConfig
from ncfast.paper.console import Console
from ncfast.paper.data import LabeledImages, load_dataset
from ncfast.paper.distributed import DistributedContext
from ncfast.paper.sgd_epoch import train_epoch
from ncfast.paper.training_state import TrainingState

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


# Windows that never end: the per-batch arm measures the hook's work alone.
NEVER = 2**62


def time_arms(net: str, width: float, data: LabeledImages, args) -> dict:
    """Interleaved epochs of K steps of three copies of the network: plain, online, and online
    whose windows never end (the hook's per-batch work alone: statistics update and NC4 against
    the online arm's previous means); per-repetition seconds and ratios to plain."""
    ctx = DistributedContext(device=torch.device(args.device))
    configs = {
        "plain": config_for(net, width, args, 0),
        "online": config_for(net, width, args, args.every),
        "per_batch": config_for(net, width, args, NEVER),
    }
    states = {k: TrainingState.start(c, ctx, data, None, None) for k, c in configs.items()}
    console = Console(configs["plain"], 0, progress=False)
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for rep in range(args.warmup + args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            sgd = train_epoch(states[name], rep + 1, data, configs[name], ctx, console)
            if rep >= args.warmup:
                seconds[name].append(sgd.seconds)
        if rep == 0:  # the per-batch arm counts NC4 against the online arm's first means
            watched = states["online"].online.watch.state_dict()
            watched.update(every=NEVER, step=0, window_start=0)
            states["per_batch"].online.watch.load_state_dict(watched, window=False)

    def ratios(name: str) -> list[float]:
        return [a / b for a, b in zip(seconds[name], seconds["plain"], strict=True)]

    def quartiles(values: list[float]) -> list[float]:
        return statistics.quantiles(values, n=4) if len(values) > 1 else values

    model = states["plain"].model
    online, per_batch = ratios("online"), ratios("per_batch")
    return {
        "net": net,
        "every": args.every,
        "width": width,
        "feature_dim": model.classifier.in_features,
        "parameters": sum(p.numel() for p in model.parameters()),
        **{
            f"step_ms_{name}": 1e3 * statistics.median(seconds[name]) / args.every for name in names
        },
        "ratio_median": statistics.median(online),
        "ratio_quartiles": quartiles(online),
        "per_batch_ratio_median": statistics.median(per_batch),
        "per_batch_ratio_quartiles": quartiles(per_batch),
        "ratios": online,
        "per_batch_ratios": per_batch,
        "seconds": seconds,
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
        row = time_arms(net, float(width), data, args)
        if args.device.startswith("cuda"):
            row["sync_check"] = sync_check(net, float(width), data, args)
        results.append(row)
        print(summary_line(row), flush=True)
    write(results, args)


def summary_line(row: dict) -> str:
    def percent(ratio: float) -> str:
        return f"{100 * (ratio - 1):+.2f}%"

    low, _, high = (row["ratio_quartiles"] + [math.nan] * 3)[:3]
    per_batch = row["per_batch_ratio_median"]
    return (
        f"{row['net']} width {row['width']:g} (P={row['feature_dim']}): step "
        f"{row['step_ms_plain']:.1f} ms plain, {row['step_ms_online']:.1f} ms online; overhead "
        f"median {percent(row['ratio_median'])} (quartiles {percent(low)}, {percent(high)}) at "
        f"K = {row['every']}: per batch {percent(per_batch)} (statistics update and NC4), "
        f"window ends {percent(row['ratio_median'] - per_batch + 1)} (divided by K/{row['every']} "
        "for windows of K steps)"
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
