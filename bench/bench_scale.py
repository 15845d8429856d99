"""Scale benchmark: streamed statistics update and final metric computation, time and peak memory.

Cases (C, P) ∈ {(10, 512), (1000, 2048), (1000, 4096), (32000, 4096)}; every backend that
``ncfast.backend.ops`` can load (reference always, native when the extension is built), each
case and
backend in its own subprocess so ``NCFAST_BACKEND`` is set before ncfast is imported and no
allocation of one run survives into the next.

Phases, each measured from the same baseline (after warm-up, with the classifier and the input
batches already allocated, before the statistics exist):

- ``update``: ``ClassStats.update`` over ⌈C / B⌉ batches (at least 4) of ``B`` float32 samples
  whose labels cycle through all classes, so every class is present;
- ``metrics``: ``nc_metrics(stats, W, b, λ)``: every SPEC §2–§4 key but NC4, whose per-sample
  buffer is a separate, configurable cost (``memory_budget_bytes``, see docs/memory.md).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the baseline; on the CPU the
process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the
baseline, with glibc's mmap threshold pinned at 64 KiB and MKL's buffer cache off so freed
arrays leave the resident set at once (``ru_maxrss`` without a reset where /proc is missing).
The accumulators' own size, 8C + 16CP + 8P² + 16 bytes, is checked against the tensors.

    python bench/bench_scale.py --quick          # CPU, the cases that fit a small machine
    python bench/bench_scale.py                  # all cases on CUDA if present, else CPU

Results go to ``bench/results/scale_<device>[_quick].json``; the table printed compares backends
side by side. ``--quick`` exits non-zero unless (C=1000, P=2048) finishes with an update-phase
peak within 2× the accumulators (the metric phase's floor is explained in docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CASES = [(10, 512), (1000, 2048), (1000, 4096), (32000, 4096)]
QUICK_CASES = [(10, 512), (1000, 2048)]  # what a 2-core CPU with a few GB does in seconds
QUICK_CHECK = (1000, 2048)
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
MIN_BATCHES = 4
DISTINCT_BATCHES = 4  # input batches are generated once and cycled, outside the measured region
LAMBDA = 0.25  # λ of HPD22 Eq. 3 for the MSE decomposition: any positive value exercises it


def accumulator_bytes(num_classes: int, dim: int) -> int:
    """counts int64 [C]; shift, sums float64 [C, P]; scatter float64 [P, P]; invalid int64 [2]."""
    return 8 * num_classes + 16 * num_classes * dim + 8 * dim * dim + 16


# --------------------------------------------------------------------------- worker side
class _CpuMemory:
    """Resident-set high-water mark of this process above a baseline."""

    def __init__(self):
        self.method = "VmHWM via /proc/self/clear_refs"
        try:
            self._reset()
            self._read("VmHWM")
        except OSError:
            self.method = "ru_maxrss (no reset available: peaks are process-wide)"

    @staticmethod
    def _read(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{field} not in /proc/self/status")

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def current(self) -> int:
        if self.method.startswith("VmHWM"):
            return self._read("VmRSS")
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self) -> int:
        base = self.current()
        if self.method.startswith("VmHWM"):
            self._reset()
        return base

    def peak(self) -> int:
        if self.method.startswith("VmHWM"):
            return self._read("VmHWM")
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _CudaMemory:
    method = "torch.cuda.max_memory_allocated"

    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def current(self) -> int:
        return self.torch.cuda.memory_allocated(self.device)

    def start(self) -> int:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return self.current()

    def peak(self) -> int:
        self.torch.cuda.synchronize(self.device)
        return self.torch.cuda.max_memory_allocated(self.device)


def run_worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import ncfast
    from ncfast.backend import ops

    device = torch.device(spec["device"])
    c, p, batch = spec["num_classes"], spec["dim"], spec["batch_size"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    memory = _CudaMemory(torch, device) if device.type == "cuda" else _CpuMemory()

    # Warm-up: loads BLAS/LAPACK code and thread pools so they are not charged to the case.
    g = torch.Generator(device="cpu").manual_seed(0)
    warm = ncfast.ClassStats(8, 16, device=device)
    warm.update(torch.randn(64, 16, generator=g).to(device), (torch.arange(64) % 8).to(device))
    ncfast.nc_metrics(warm, torch.randn(8, 16).to(device), torch.randn(8).to(device), LAMBDA)
    del warm

    weight = torch.randn(c, p, generator=g).to(device) / math.sqrt(p)
    bias = torch.randn(c, generator=g).to(device)
    inputs = [torch.randn(batch, p, generator=g).to(device) for _ in range(DISTINCT_BATCHES)]
    num_batches = max(MIN_BATCHES, math.ceil(c / batch))
    labels = [((k * batch + torch.arange(batch)) % c).to(device) for k in range(DISTINCT_BATCHES)]
    # Class structure: each sample gets a bump along the coordinate of its class (mod P).
    for x, y in zip(inputs, labels, strict=True):
        x[torch.arange(batch, device=device), y % p] += 4.0
    sync()

    out = {**spec, "backend_loaded": ops.BACKEND, "memory_method": memory.method}
    base = memory.start()
    stats = ncfast.ClassStats(c, p, device=device)
    out["accumulator_bytes"] = accumulator_bytes(c, p)
    out["accumulator_resident_bytes"] = memory.current() - base
    sync()
    t0 = time.perf_counter()
    for k in range(num_batches):
        # Labels shift by B each batch, so ⌈C / B⌉ batches cover every class.
        y = (labels[k % DISTINCT_BATCHES] + (k // DISTINCT_BATCHES) * DISTINCT_BATCHES * batch) % c
        stats.update(inputs[k % DISTINCT_BATCHES], y)
    sync()
    update_s = time.perf_counter() - t0
    out.update(
        num_batches=num_batches,
        num_samples=num_batches * batch,
        update_s=update_s,
        update_ms_per_batch=1e3 * update_s / num_batches,
        update_samples_per_s=num_batches * batch / update_s,
        update_peak_bytes=memory.peak() - base,
    )
    if "metrics" in spec["phases"]:
        memory.start()  # resets the high-water mark; the baseline stays the one above
        t0 = time.perf_counter()
        result = ncfast.nc_metrics(stats, weight, bias, weight_decay=LAMBDA)
        sync()
        out.update(
            metrics_s=time.perf_counter() - t0,
            metrics_peak_bytes=memory.peak() - base,
            classes_present=result["classes_present"],
            nc1=result["nc1"],
            sigma_b_rank=result["sigma_b_rank"],
            sigma_w_rank=result["sigma_w_rank"],
            loss_mse=result["loss_mse"],
        )
    # The formula against the accumulators themselves, after the peaks were read (the state
    # dict is a copy).
    held = stats.state_dict().values()
    acc_tensors = sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))
    if acc_tensors != out["accumulator_bytes"]:
        raise AssertionError(f"accumulator formula {out['accumulator_bytes']} != {acc_tensors}")
    acc = out["accumulator_bytes"]
    for phase in ("update", "metrics"):
        if f"{phase}_peak_bytes" in out:
            out[f"{phase}_peak_over_accumulators"] = out[f"{phase}_peak_bytes"] / acc
    return out


# --------------------------------------------------------------------------- parent side
def _native_status() -> tuple[bool, str]:
    """Whether the native backend can be loaded here, whatever NCFAST_BACKEND says in this
    process (the workers choose their own), and why not."""
    try:
        import ncfast.backend.native  # noqa: F401
    except ImportError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run_one(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["NCFAST_BACKEND"] = spec["backend"]
    if spec["device"] == "cpu":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        env.setdefault("MKL_DISABLE_FAST_MM", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {**spec, "error": f"exit code {proc.returncode}: " + " | ".join(tail)}


def _mb(x) -> str:
    return f"{x / 2**20:9.1f}" if isinstance(x, (int, float)) else f"{'-':>9}"


def _fmt(x, spec: str, width: int) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else f"{'-':>{width}}"


def print_table(runs: list[dict]) -> None:
    print(
        f"{'C':>6} {'P':>5} {'backend':>9} {'acc MiB':>9} {'upd ms/b':>9} {'upd peak':>9} "
        f"{'×acc':>5} {'metr s':>8} {'metr peak':>9} {'×acc':>5}"
    )
    for r in runs:
        head = f"{r['num_classes']:>6} {r['dim']:>5} {r['backend']:>9}"
        if "error" in r:
            print(f"{head}  FAILED: {r['error']}")
            continue
        print(
            f"{head} {_mb(r['accumulator_bytes'])} {r['update_ms_per_batch']:9.1f} "
            f"{_mb(r['update_peak_bytes'])} {r['update_peak_over_accumulators']:5.2f} "
            f"{_fmt(r.get('metrics_s'), '8.2f', 8)} {_mb(r.get('metrics_peak_bytes'))} "
            f"{_fmt(r.get('metrics_peak_over_accumulators'), '5.2f', 5)}"
        )
    by_case: dict[tuple, dict] = {}
    for r in runs:
        if "error" not in r:
            by_case.setdefault((r["num_classes"], r["dim"]), {})[r["backend"]] = r
    for (c, p), backends in by_case.items():
        if {"native", "reference"} <= set(backends):
            nat, ref = backends["native"], backends["reference"]
            parts = [f"update {ref['update_s'] / nat['update_s']:.2f}× faster"]
            if "metrics_s" in nat and "metrics_s" in ref:
                parts.append(f"metrics {ref['metrics_s'] / nat['metrics_s']:.2f}× faster")
                parts.append(f"|Δnc1|/nc1 = {abs(nat['nc1'] - ref['nc1']) / abs(ref['nc1']):.1e}")
            print(f"native vs reference at C={c}, P={p}: " + ", ".join(parts))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU only, the cases that fit")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--cases", help="e.g. 1000x2048,32000x4096 (default: all, or quick set)")
    parser.add_argument("--backends", default="auto", help="reference,native or auto")
    parser.add_argument("--phases", default="update,metrics")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; 1 with --quick, as shared small CPUs make "
        "multi-threaded LAPACK erratic)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/...)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def _device(parser, args) -> str:
    import torch

    device = "cpu" if args.quick else args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return device


def _cases(parser, args) -> list[tuple[int, ...]]:
    if not args.cases:
        return list(QUICK_CASES if args.quick else CASES)
    try:
        cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    except ValueError:
        parser.error(f"--cases must look like 1000x2048,32000x4096, got {args.cases!r}")
    if any(len(case) != 2 or min(case) < 1 for case in cases):
        parser.error(f"--cases must be positive CxP pairs, got {args.cases!r}")
    return cases


def _backends(parser, args, native_ok: bool, why_not: str) -> list[str]:
    if args.backends == "auto":
        return ["reference"] + (["native"] if native_ok else [])
    backends = [b for b in args.backends.split(",") if b]
    if set(backends) - {"reference", "native"}:
        parser.error(f"--backends must name reference and/or native, got {args.backends!r}")
    if "native" in backends and not native_ok:
        parser.error(f"--backends native: the native extension is not available ({why_not})")
    return backends


def _quick_check(runs: list[dict]) -> bool:
    """--quick: whether the C×P case of QUICK_CHECK finished within 2× the accumulators."""
    check = [
        r
        for r in runs
        if (r["num_classes"], r["dim"]) == QUICK_CHECK and r["backend"] == "reference"
    ]
    if not check or "error" in check[0]:
        print(f"check C={QUICK_CHECK[0]}, P={QUICK_CHECK[1]}: did not finish")
        return False
    ratio = check[0]["update_peak_over_accumulators"]
    metrics_ratio = check[0].get("metrics_peak_over_accumulators", float("nan"))
    ok = ratio <= 2.0
    print(
        f"check C={QUICK_CHECK[0]}, P={QUICK_CHECK[1]}: finished; update peak "
        f"{ratio:.2f}× the accumulators ({'within' if ok else 'OVER'} 2×); metric "
        f"computation peak {metrics_ratio:.2f}× (its floor is set by the P×P "
        "eigendecomposition of Σ_W, docs/memory.md)"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0

    import torch
    from tqdm import tqdm

    if args.batch_size < 1:
        parser.error("--batch-size must be ≥ 1")
    phases = [p for p in args.phases.split(",") if p]
    if not phases or set(phases) - {"update", "metrics"} or "update" not in phases:
        parser.error("--phases must be 'update' or 'update,metrics'")
    device = _device(parser, args)
    if args.threads is None:
        args.threads = 1 if args.quick else 0
    cases = _cases(parser, args)
    native_ok, why_not = _native_status()
    backends = _backends(parser, args, native_ok, why_not)

    specs = [
        {
            "num_classes": c,
            "dim": p,
            "backend": backend,
            "device": device,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "phases": phases,
        }
        for c, p in cases
        for backend in backends
    ]
    runs = [
        _run_one(spec, args.timeout)
        for spec in tqdm(specs, desc="bench_scale", unit="run", file=sys.stderr)
    ]

    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "native_available": native_ok,
        "native_unavailable_reason": why_not,
        "quick": args.quick,
        "lambda": LAMBDA,
    }
    out = args.out or RESULTS / f"scale_{device}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")

    print(f"device {meta['device'] or device}, torch {meta['torch']}, threads {meta['threads']}")
    if not native_ok:
        print(f"native backend not available ({why_not}): reference only")
    print_table(runs)
    print(f"written to {out}")
    failed = any("error" in r for r in runs)
    if args.quick:
        return 0 if _quick_check(runs) and not failed else 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
