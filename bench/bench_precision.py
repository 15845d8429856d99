"""Per-batch cost of ncfast's update in both precision policies against the multi-pass peer's
accumulators (bench/peer_nc.py), side by side in one process.

For each shape (B, P, C) every competitor processes the same float32 batches, in steady state
(every class already seen), interleaved call by call, median of --repeats:

- ncfast exact / fast: one ``update_stats_`` (counts, class sums and the within-class scatter in
  one pass; the scatter product in float64, or in IEEE float32 added into float64:
  docs/precision.md);
- the peer in float32 and in float64: its mean accumulator and its covariance accumulator on the
  same batch (the work its two passes spend per batch; its covariance pass needs the means of
  the first, given here).

Ratios are peer time / ncfast time (> 1: ncfast is faster). Two clocks: the CPU time of the
process (``time.process_time``: the work done, which other processes on a shared machine do
not inflate; the default is one torch thread, so no thread spins on a lock) and the wall clock
(on this project's 2 cores shared by busy helpers, wall time is mostly waiting for the
scheduler: it is printed, and the ratios are computed from the CPU time). The load average is
recorded with the results.

On a GPU (``--device cuda``) each call is timed by a pair of CUDA events around it (the device's
own time for the work, not the host's launch time), still interleaved call by call with the
order alternating; the events are read after the last call, medians and ratios as on the CPU.
The results add ``auto_precision`` (the policy ncfast's ``auto`` picks on the device, and why),
which bench/gpu_check.sh's ``precision`` step reads.

    python bench/bench_precision.py              # the three shapes of issue 22 (~2 min, CPU)
    python bench/bench_precision.py --device cuda --out precision_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_kernels import machine_info, make_batches
from peer_nc import PeerCovariance, PeerMeans

from ncfast.backend import ops
from ncfast.backend.build_info import build_info
from ncfast.backend.precision import auto_precision
from ncfast.backend.reference import new_state

SHAPES = [(1024, 512, 10), (1024, 2048, 1000), (1024, 768, 5000)]
COLUMNS = ("ncfast exact", "ncfast fast", "peer f32", "peer f64")


def competitors(batches, dim, classes, device) -> dict:
    """name -> fn(features, labels), each with its own state already fed the first batch."""
    fns = {}
    for name, fast in (("ncfast exact", False), ("ncfast fast", True)):
        state = new_state(classes, dim, device)
        ops.update_stats_(*batches[0], *state.values(), fast=fast)

        def ncfast(x, y, state=state, fast=fast):
            ops.update_stats_(x, y, *state.values(), fast=fast)

        fns[name] = ncfast
    for name, dtype in (("peer f32", torch.float32), ("peer f64", torch.float64)):
        means = PeerMeans(classes, dim, device, dtype)
        means.update(*batches[0])
        mu, _ = means.compute()
        cov = PeerCovariance(classes, dim, mu, device, dtype)

        def peer(x, y, means=means, cov=cov):
            means.update(x, y)
            cov.update(x, y)

        fns[name] = peer
    return fns


def time_both(fns: dict, inputs: list, repeats: int) -> tuple[dict, dict]:
    """(median CPU ms, median wall ms) of each fn(*inputs[i % len(inputs)]), the fns
    interleaved call by call, their order alternating, after one warm-up call each."""
    for fn in fns.values():
        fn(*inputs[0])
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        order = list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            fn(*inputs[i % len(inputs)])
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
            wall[name].append((time.perf_counter() - start_wall) * 1e3)
    median = statistics.median
    return {k: median(v) for k, v in cpu.items()}, {k: median(v) for k, v in wall.items()}


def time_cuda(fns: dict, inputs: list, repeats: int) -> dict:
    """Median device ms of each fn(*inputs[i % len(inputs)]) from a pair of CUDA events around
    each call, the fns interleaved call by call, their order alternating, after one warm-up
    call each; the events are read once, after the last call (no sync between calls)."""
    for fn in fns.values():
        fn(*inputs[0])
    events: dict[str, list] = {name: [] for name in fns}
    for i in range(repeats):
        order = list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs[i % len(inputs)])
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {
        name: statistics.median(start.elapsed_time(end) for start, end in pairs)
        for name, pairs in events.items()
    }


def bench_shape(batch, dim, classes, device, repeats, seed) -> dict:
    batches = make_batches(4, batch, dim, classes, torch.float32, device, seed)
    fns = competitors(batches, dim, classes, device)
    row: dict = {"batch": batch, "dim": dim, "classes": classes}
    if device.type == "cuda":
        times = row["ms"] = time_cuda(fns, batches[1:], repeats)
    else:
        times, wall = time_both(fns, batches[1:], repeats)
        row.update(ms=times, wall_ms=wall)
    row["peer_f32_over"] = {k: times["peer f32"] / times[k] for k in COLUMNS[:2]}
    row["peer_f64_over"] = {k: times["peer f64"] / times[k] for k in COLUMNS[:2]}
    row["exact_over_fast"] = times["ncfast exact"] / times["ncfast fast"]
    return row


def print_row(row: dict) -> None:
    ms, wall = row["ms"], row.get("wall_ms")
    if wall is None:  # CUDA events only
        cells = " ".join(f"{ms[k]:>16.4f}" for k in COLUMNS)
    else:
        cells = " ".join(f"{ms[k]:>7.1f} ({wall[k]:>6.1f})" for k in COLUMNS)
    f32, f64 = row["peer_f32_over"], row["peer_f64_over"]
    print(
        f"{row['batch']:>5} {row['dim']:>5} {row['classes']:>5} {cells} "
        f"{f32['ncfast fast']:>9.2f}× {f32['ncfast exact']:>9.2f}× "
        f"{f64['ncfast fast']:>9.2f}× {f64['ncfast exact']:>9.2f}× {row['exact_over_fast']:>7.2f}"
    )


def _shape(text: str, parser: argparse.ArgumentParser) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        parser.error(f"--shape: expected three positive integers B,P,C, got {text!r}")
    batch, dim, classes = (int(part) for part in parts)
    return batch, dim, classes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--shape",
        action="append",
        default=None,
        help="B,P,C (repeatable; default: the three shapes of issue 22)",
    )
    args = parser.parse_args(argv)
    shapes = [_shape(text, parser) for text in args.shape] if args.shape else SHAPES
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    out = args.out or Path(__file__).parent / "results" / f"precision_{device.type}.json"
    report = {"machine": machine_info(device), "build": build_info(), "rows": []}
    if device.type == "cuda":
        report["auto_precision"] = list(auto_precision(device))
        print(
            f"per-batch update, float32 batches, median of {args.repeats}: device ms (CUDA "
            f"events) on {torch.cuda.get_device_name(device)}; auto picks "
            f"{report['auto_precision'][0]} here ({report['auto_precision'][1]})"
        )
    else:
        print(
            f"per-batch update, float32 batches, median of {args.repeats}: CPU ms (wall ms), "
            f"{args.threads} torch thread(s); load average "
            f"{report['machine']['load_average_1_5_15min']}; ratios from CPU time"
        )
    head = f"{'B':>5} {'P':>5} {'C':>5} " + " ".join(f"{k:>16}" for k in COLUMNS)
    head += f" {'f32/fast':>10} {'f32/exact':>10} {'f64/fast':>10} {'f64/exact':>10} {'ex/fast':>7}"
    print(head)
    print("-" * len(head))
    for batch, dim, classes in shapes:
        row = bench_shape(batch, dim, classes, device, args.repeats, args.seed)
        report["rows"].append(row)
        print_row(row)
        sys.stdout.flush()
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
