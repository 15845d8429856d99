"""Native ops (ncfast._C) against the pure-torch reference, side by side in one process.

For each case (B, P, C, input dtype) the script first checks native against reference on fresh
random data (counts, class means, Σ_W; the NC4 count exactly), then times both on the same
batches: the statistics update in steady state (every class already seen) and the NC4 count.
CPU: wall clock, median of --repeats (≥ 20) after warm-up. CUDA: CUDA events, warm-up, median.
On CUDA it also times the float64 GEMM that matches the update (ZᵀZ for Z [B, P]) and prints the
update's rate as a fraction of it.

    python bench/bench_kernels.py --quick            # < 1 min on 2 CPU cores
    python bench/bench_kernels.py --device cuda      # the issue's full grid on a GPU

Columns: native and reference medians (ms), ratio = reference/native (× faster), GB/s (bytes of
the batch and of the state read and written, over the native time), GFLOP/s (2·B·P² for the
update, 4·B·P·C for NC4, over the native time). JSON (machine, versions, every number) goes to
--out (default bench/results/kernels_<device>[_quick].json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ncfast.backend import reference
from ncfast.backend.build_info import build_info
from ncfast.backend.reference import STATE_KEYS, new_state

try:
    from ncfast.backend import native as _native
except ImportError as exc:  # the benchmark is about the native ops
    sys.exit(f"bench_kernels: the native extension is not available ({exc})")

FULL_GRID = {
    "batch": [128, 1024, 8192, 65536],
    "dim": [512, 2048],
    "classes": [10, 100, 1000],
    "dtype": ["float32", "bfloat16"],
}
# The quick subset: the acceptance case first, then a spread of shapes.
QUICK_CASES = [
    (1024, 512, 10, "float32"),
    (128, 512, 10, "float32"),
    (1024, 512, 100, "bfloat16"),
    (8192, 512, 10, "float32"),
    (1024, 2048, 1000, "bfloat16"),
]


def make_batches(n, batch, dim, classes, dtype, device, seed):
    """n batches of features (class means + noise, an offset as post-ReLU features have) and
    labels, drawn on `device`; every class appears in the first."""
    g = torch.Generator(device=device).manual_seed(seed)
    opts = {"generator": g, "device": device}
    means = torch.randn(classes, dim, **opts) + 2.0
    out = []
    for _ in range(n):
        labels = torch.randint(0, classes, (batch,), **opts)
        labels[: min(batch, classes)] = torch.arange(min(batch, classes), device=device)
        features = means[labels] + 0.5 * torch.randn(batch, dim, **opts)
        out.append((features.to(dtype), labels))
    return out


def check_case(batch, dim, classes, dtype, device, seed) -> None:
    """Native vs reference on fresh data: raise AssertionError if they disagree."""
    batches = make_batches(3, batch, dim, classes, dtype, device, seed)
    nat, ref = new_state(classes, dim, device), new_state(classes, dim, device)
    for x, y in batches:
        _native.update_stats_(x, y, *(nat[k] for k in STATE_KEYS))
        reference.update_stats_(x, y, *(ref[k] for k in STATE_KEYS))
    assert torch.equal(nat["counts"], ref["counts"]), "counts differ"
    keys = ("counts", "shift", "sums", "scatter")
    m_nat, s_nat = reference.finalize_stats(*(nat[k] for k in keys))
    m_ref, s_ref = reference.finalize_stats(*(ref[k] for k in keys))
    err_m = float((m_nat - m_ref).abs().max() / m_ref.abs().max())
    err_s = float((s_nat - s_ref).abs().max() / s_ref.abs().max())
    assert err_m < 1e-12 and err_s < 1e-10, f"means rel err {err_m:.2e}, Σ_W rel err {err_s:.2e}"
    x, _ = batches[0]
    w, b, present = nc4_inputs(classes, dim, device, seed)
    valid = torch.ones(batch, dtype=torch.bool, device=device)
    got = _native.ncc_mismatch_count(x, valid, w, b, m_ref, present)
    expected = reference.ncc_mismatch_count(x, valid, w, b, m_ref, present)
    assert int(got) == int(expected), f"NC4 count {int(got)} != reference {int(expected)}"


def nc4_inputs(classes, dim, device, seed):
    g = torch.Generator(device=device).manual_seed(seed + 1)
    opts = {"generator": g, "device": device, "dtype": torch.float64}
    w, b = torch.randn(classes, dim, **opts), torch.randn(classes, **opts)
    return w, b, torch.ones(classes, dtype=torch.bool, device=device)


def time_ms(fns: dict, inputs, repeats: int, device) -> dict[str, float]:
    """Median ms of each fn(*inputs[i % len(inputs)]), the fns interleaved call by call (so a
    change of machine load hits all alike) and inputs rotating (no cache-warm reuse)."""
    for i in range(3):
        for fn in fns.values():
            fn(*inputs[i % len(inputs)])
    samples: dict[str, list[float]] = {name: [] for name in fns}
    if device.type == "cuda":
        torch.cuda.synchronize()
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        order = list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                stop.record()
                stop.synchronize()
                samples[name].append(start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                fn(*args)
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_case(batch, dim, classes, dtype_name, device, repeats, seed) -> list[dict]:
    dtype = getattr(torch, dtype_name)
    check_case(min(batch, 4096), dim, classes, dtype, device, seed)
    batches = make_batches(3, batch, dim, classes, dtype, device, seed + 7)
    rows = []
    esize = torch.empty((), dtype=dtype).element_size()
    state_bytes = 2 * 8 * (dim * dim + 2 * classes * dim)
    upd_bytes = batch * dim * esize + batch * 8 + state_bytes
    upd_flops = 2.0 * batch * dim * dim
    runners = {}
    for name, fn in (("native", _native.update_stats_), ("reference", reference.update_stats_)):
        state = new_state(classes, dim, device)
        fn(*batches[0], *(state[k] for k in STATE_KEYS))  # steady state: all classes seen

        def run(x, y, fn=fn, state=state):
            fn(x, y, *(state[k] for k in STATE_KEYS))

        runners[name] = run
    results = time_ms(runners, batches, repeats, device)
    row = {
        "op": "update",
        "batch": batch,
        "dim": dim,
        "classes": classes,
        "dtype": dtype_name,
        "native_ms": results["native"],
        "reference_ms": results["reference"],
        "ratio": results["reference"] / results["native"],
        "gb_per_s": upd_bytes / results["native"] / 1e6,
        "gflop_per_s": upd_flops / results["native"] / 1e6,
    }
    if device.type == "cuda":
        z = [torch.randn(batch, dim, dtype=torch.float64, device=device) for _ in range(2)]
        out = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        gemm_ms = time_ms(
            {"gemm": lambda a: out.addmm_(a.T, a)}, [(a,) for a in z], repeats, device
        )["gemm"]
        row["gemm_f64_ms"] = gemm_ms
        row["gemm_f64_gflop_per_s"] = upd_flops / gemm_ms / 1e6
        row["update_vs_gemm"] = row["gflop_per_s"] / row["gemm_f64_gflop_per_s"]
    rows.append(row)

    means = torch.randn(classes, dim, dtype=torch.float64, device=device) + 2.0
    w, b, present = nc4_inputs(classes, dim, device, seed)
    valid = torch.ones(batch, dtype=torch.bool, device=device)
    nc4 = time_ms(
        {
            name: (lambda x, y, fn=fn: fn(x, valid, w, b, means, present))
            for name, fn in (
                ("native", _native.ncc_mismatch_count),
                ("reference", reference.ncc_mismatch_count),
            )
        },
        batches,
        repeats,
        device,
    )
    rows.append(
        {
            "op": "nc4",
            "batch": batch,
            "dim": dim,
            "classes": classes,
            "dtype": dtype_name,
            "native_ms": nc4["native"],
            "reference_ms": nc4["reference"],
            "ratio": nc4["reference"] / nc4["native"],
            "gb_per_s": (batch * dim * esize + 2 * 8 * classes * dim) / nc4["native"] / 1e6,
            "gflop_per_s": 4.0 * batch * dim * classes / nc4["native"] / 1e6,
        }
    )
    return rows


def fits(batch, dim, classes, device, max_gb: float) -> bool:
    """Peak memory of the reference update (≈ 4 float64 copies of the batch) within max_gb."""
    return 8 * (4 * batch * dim + dim * dim + 3 * classes * dim) / 1e9 <= max_gb


def machine_info(device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        # Other processes on the machine skew CPU timings; the ratios are interleaved.
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_sms=props.multi_processor_count)
    return info


def print_header(device) -> None:
    head = f"{'op':6} {'B':>6} {'P':>5} {'C':>5} {'dtype':8} {'native ms':>10} {'ref ms':>10}"
    head += f" {'ref/nat':>8} {'GB/s':>7} {'GFLOP/s':>8}"
    if device.type == "cuda":
        head += f" {'f64 GEMM GFLOP/s':>17} {'upd/GEMM':>9}"
    print(head)
    print("-" * len(head))


def print_row(r: dict) -> None:
    line = (
        f"{r['op']:6} {r['batch']:>6} {r['dim']:>5} {r['classes']:>5} {r['dtype']:8} "
        f"{r['native_ms']:>10.3f} {r['reference_ms']:>10.3f} {r['ratio']:>7.2f}x "
        f"{r['gb_per_s']:>7.2f} {r['gflop_per_s']:>8.1f}"
    )
    if "gemm_f64_gflop_per_s" in r:
        line += f" {r['gemm_f64_gflop_per_s']:>17.1f} {r['update_vs_gemm']:>8.0%}"
    print(line, flush=True)


def parse_case(text: str, parser) -> tuple[int, int, int, str]:
    parts = text.split(",")
    if len(parts) != 4 or parts[3] not in ("float16", "bfloat16", "float32", "float64"):
        parser.error(f"--case {text!r}: expected B,P,C,DTYPE with a float dtype name")
    try:
        return int(parts[0]), int(parts[1]), int(parts[2]), parts[3]
    except ValueError:
        parser.error(f"--case {text!r}: B, P and C must be integers")
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--quick", action="store_true", help="a subset: < 1 min on 2 CPU cores")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per op (≥ 20)")
    parser.add_argument("--max-gb", type=float, default=None, help="skip larger cases")
    parser.add_argument(
        "--case",
        action="append",
        default=None,
        metavar="B,P,C,DTYPE",
        help="run only this case (repeatable), e.g. 65536,512,10,float32",
    )
    parser.add_argument("--seed", type=int, default=None, help="data seed (default: fresh)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and _native.WITH_CUDA):
        print("bench_kernels: --device cuda needs a GPU and CUDA kernels", file=sys.stderr)
        return 2
    if args.repeats < 20:
        parser.error("--repeats must be at least 20 (medians of fewer are noise)")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    if args.case:
        cases = [parse_case(text, parser) for text in args.case]
    elif args.quick:
        cases = QUICK_CASES
    else:
        cases = list(itertools.product(*FULL_GRID.values()))
    if args.max_gb is None:
        if device.type == "cuda":
            args.max_gb = 0.5 * torch.cuda.get_device_properties(device).total_memory / 1e9
        else:
            args.max_gb = 4.0
    out = args.out or Path(__file__).parent / "results" / (
        f"kernels_{device.type}{'_quick' if args.quick and not args.case else ''}.json"
    )
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(
        f"# ncfast bench_kernels on {device} ({machine_info(device)['processor']}, "
        f"{torch.get_num_threads()} threads{load}), torch {torch.__version__}, seed {seed}"
    )
    rows, skipped = [], []
    started = time.perf_counter()
    report = {
        "machine": machine_info(device),
        "build": build_info(),
        "seed": seed,
        "repeats": args.repeats,
        "quick": args.quick,
        "gram": os.environ.get("NCFAST_GRAM", "auto"),
        "results": rows,
        "skipped": skipped,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    print_header(device)
    for batch, dim, classes, dtype in cases:
        if not fits(batch, dim, classes, device, args.max_gb):
            skipped.append({"batch": batch, "dim": dim, "classes": classes, "dtype": dtype})
            continue
        for r in bench_case(batch, dim, classes, dtype, device, args.repeats, seed):
            rows.append(r)
            print_row(r)
        report["elapsed_s"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive a kill
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if skipped:
        print(
            f"# skipped {len(skipped)} cases over --max-gb={args.max_gb:g}: "
            + ", ".join(f"{s['batch']}x{s['dim']}x{s['classes']}" for s in skipped)
        )
    report["elapsed_s"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"# {len(rows)} rows in {report['elapsed_s']:.0f} s; every case checked native == reference"
    )
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
