"""The plan, the verdicts and the JSON of bench/gpu_check.sh (docs/gpu_check.md documents the file).

bash/gpu_check.sh stays thin: it asks this module for the plan (steps, caps, thresholds), runs
each step's command under its cap, and hands the exit status and the step's raw outputs back
here, where a judge compares the step's figures with its threshold and appends the verdict to
``gpu_check.json`` (rewritten whole after every step, so a killed run still leaves a complete
file). No torch import here except in ``init`` (the versions): the judges read files only.

    python bench/gpu_check_report.py plan [--table]     # GPU_CHECK_STAGE=extra: the extra call
    python bench/gpu_check_report.py init --json J --budget S
    python bench/gpu_check_report.py machine --json J --details D
    python bench/gpu_check_report.py judge STEP --json J --details D --rc RC --seconds S --cap C
    python bench/gpu_check_report.py skip STEP --json J --reason R [--cap C]
    python bench/gpu_check_report.py finish --json J --elapsed S

``GPU_CHECK_PLAN`` names a JSON list of ``{"name", "cap", "threshold", "command"}`` that replaces
the plan (tests/backend/test_gpu_check_script.py runs fake steps so); such a step needs no GPU
and passes when its command exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench_scale import accumulator_bytes  # bench/ (the script's folder); imports no torch

SCHEMA = 1
BUDGET_S = 300  # one device call: the caps below add up to at most this


@dataclass(frozen=True)
class Step:
    name: str
    cap: int  # seconds
    threshold: str  # what PASS means, printed by --dry-run and stored per step
    what: str  # the command, in words
    command: str = ""  # only for GPU_CHECK_PLAN's steps: a shell command, PASS on exit 0


# The lmpeer step's agreement (docs/language_models.md's mapping): the peer accumulates in
# float32, so its sums of ~2.6e5 tokens carry ~log2(N)·u32 ≈ 1e-6 relative error per entry,
# amplified by NC1's pseudo-inverse; 1e-4 leaves a factor ~100 (the CPU run: 1.9e-7 at 4,046
# tokens). NC4: a near-tie decided differently by the peer's float32 argmax moves one token;
# 1e-4 of the tokens is ~26 such ties out of 2.6e5.
LMPEER_RTOL = 1e-4
LMPEER_NC4_ATOL = 1e-4

# Ordered by value: without a build nothing runs; correctness before speed.
PLAN = (
    Step("env", 8, "a CUDA device is visible to torch", "nvidia-smi, nvcc, python, torch"),
    Step(
        "build",
        80,
        "the extension builds for the device's own arch (+PTX) and reports CUDA kernels",
        "TORCH_CUDA_ARCH_LIST=<device cc>+PTX MAX_JOBS=<cores> setup.py build_ext --inplace; "
        "then variants <lower cc> and <lower cc>+PTX build in the background for ptxjit/fallback",
    ),
    Step(
        "tests",
        30,
        "0 failed, 0 errors, and >= 1 CUDA test passed with none skipped",
        "pytest -m cuda tests/backend/test_native.py tests/backend/test_native_cuda.py "
        "tests/backend/test_native_arch.py tests/backend/test_precision.py (fast: never TF32)",
    ),
    Step(
        "memcheck",
        25,
        "0 errors (a tool the machine refuses: SKIPPED)",
        "compute-sanitizer --tool memcheck --kernel-name kns=ncfast bench/sanitize_ops.py",
    ),
    Step(
        "racecheck",
        15,
        "0 hazards (a tool the machine refuses: SKIPPED)",
        "compute-sanitizer --tool racecheck --kernel-name kns=ncfast bench/sanitize_ops.py",
    ),
    Step(
        "initcheck",
        15,
        "0 errors (a tool the machine refuses: SKIPPED)",
        "compute-sanitizer --tool initcheck --kernel-name kns=ncfast bench/sanitize_ops.py",
    ),
    Step(
        "synccheck",
        10,
        "0 errors (a tool the machine refuses: SKIPPED)",
        "compute-sanitizer --tool synccheck --kernel-name kns=ncfast bench/sanitize_ops.py",
    ),
    Step(
        "kernels",
        26,
        "reference/native >= 3x for every op at B <= 1024; update at B=65536,P=512 >= 50% of "
        "a bare cuBLAS float64 GEMM (Z^T Z, same shape, CUDA events)",
        "bench/bench_kernels.py --device cuda, 3 cases",
    ),
    Step(
        "train",
        28,
        "measurement beyond its forward passes < 3% of a training epoch (median of epochs 2..)",
        "bench/train_overhead.py --epochs 3 --per-class 600 (SVHN-shaped VGG13, synthetic)",
    ),
    Step(
        "online",
        20,
        "no host sync inside a window (set_sync_debug_mode('error')) and < 2% per step",
        "bench/online_overhead.py --device cuda --nets vgg11:1 --reps 5",
    ),
    Step(
        "scale",
        15,
        "all metrics at C=32000, P=4096 in < 10 s (native)",
        "bench/bench_scale.py --device cuda --cases 32000x4096 --backends native",
    ),
    Step(
        "integrations",
        13,
        "torchmetrics Metric and Lightning callback on cuda equal the CPU result "
        "(every scalar within 1e-8 relative + 1e-10 absolute)",
        "bench/gpu_integrations.py",
    ),
    Step(
        "ptxjit",
        10,
        "PTX-JIT runs (CUDA_FORCE_PTX_JIT=1 on the +PTX build; the <lower cc>+PTX build) equal "
        "the SASS run (1e-9 relative)",
        "bench/gpu_variant_check.py under CUDA_FORCE_PTX_JIT=1 and with the PTX-only variant",
    ),
    Step(
        "fallback",
        5,
        "an extension without the device's arch warns once and equals the SASS run (1e-9 relative)",
        "bench/gpu_variant_check.py with the <lower cc> variant",
    ),
)


# The extra call (``gpu_check.sh --extra``, a second call of <= 300 s when the device budget
# allows): the GPU cases of issues 22 and 23, which do not fit the main call. It reuses the main
# call's build on the same warm machine (a fresh machine builds again, without the variants).
EXTRA_PLAN = (
    PLAN[0],
    Step(
        "build",
        80,
        "the extension reports CUDA kernels for the device's arch (the main call's build, "
        "reused when it has them, else built as there)",
        "ncfast info; else TORCH_CUDA_ARCH_LIST=<device cc>+PTX setup.py build_ext --inplace",
    ),
    Step(
        "precision",
        40,
        "per batch, fast >= 1x the peer's float32 two passes at every shape; on a GPU with "
        "fast float64 (ncfast's auto picks exact) also exact <= 2x fast",
        "bench/bench_precision.py --device cuda: (B,P,C) = (1024,512,10), (1024,2048,1000), "
        "(1024,768,5000), CUDA events, interleaved, medians",
    ),
    Step(
        "vocab",
        90,
        "completes; state bytes = 8C + 16CP + 8P^2 + 16; update and NC4 per 10^6 tokens, metrics "
        "time and nc1 finite; NC4 counted on the 65536-token sample",
        "bench/bench_vocab.py --device cuda --tokens 1048576 --nc4-tokens 65536 "
        "(C = 50257, P = 768)",
    ),
    Step(
        "lmpeer",
        80,
        f"after the documented mapping, NC1 and NC2 within {LMPEER_RTOL:.0e} relative and NC4 "
        f"within {LMPEER_NC4_ATOL:.0e} absolute of the peer's (float32)",
        "bench/bench_lm_peer.py --device cuda --tokens 262144 --batch-tokens 8192",
    ),
)
STAGES = {"main": PLAN, "extra": EXTRA_PLAN}


def stage() -> str:
    """The call being run: ``GPU_CHECK_STAGE`` (gpu_check.sh sets it), ``main`` by default."""
    name = os.environ.get("GPU_CHECK_STAGE", "main")
    if name not in STAGES:
        raise SystemExit(f"gpu_check_report: GPU_CHECK_STAGE must be main or extra, not {name!r}")
    return name


def plan() -> tuple[Step, ...]:
    path = os.environ.get("GPU_CHECK_PLAN")
    if not path:
        return STAGES[stage()]
    rows = json.loads(Path(path).read_text())
    return tuple(
        Step(r["name"], int(r["cap"]), r.get("threshold", "exit 0"), r["command"], r["command"])
        for r in rows
    )


def step_of(name: str) -> Step:
    for step in plan():
        if step.name == name:
            return step
    raise SystemExit(f"gpu_check_report: unknown step {name!r}")


# ------------------------------------------------------------------ the JSON file
def load(path: Path) -> dict:
    return json.loads(path.read_text())


def save(path: Path, report: dict) -> None:
    counts = {v: 0 for v in ("PASS", "FAIL", "SKIPPED")}
    for row in report["steps"]:
        counts[row["verdict"]] += 1
    overall = "FAIL" if counts["FAIL"] else ("PASS" if not counts["SKIPPED"] else "INCOMPLETE")
    report["summary"] = {**counts, "verdict": overall}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)  # never half a file


def record(path: Path, step: Step, verdict: str, reason: str, **extra) -> None:
    report = load(path)
    row = {
        "name": step.name,
        "verdict": verdict,
        "reason": reason,
        "cap_s": step.cap,
        "threshold": step.threshold,
        "seconds": extra.pop("seconds", 0.0),
        "figures": extra.pop("figures", {}),
    }
    row.update(extra)
    report["steps"] = [r for r in report["steps"] if r["name"] != step.name] + [row]
    save(path, report)
    print(f"[gpu_check] {step.name}: {verdict} ({reason})", flush=True)


def _run(cmd: list[str], timeout: float = 20) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc})"
    return (done.stdout + done.stderr).strip()


def machine() -> dict:
    info: dict = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    smi = _run(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,compute_cap",
            "--format=csv,noheader",
        ]
    )
    info["nvidia_smi"] = smi
    nvcc = _run(["nvcc", "--version"])
    info["nvcc"] = next((ln for ln in nvcc.splitlines() if "release" in ln), nvcc[-200:])
    probe = (
        "import json, torch; c = torch.cuda.is_available(); p = c and "
        "torch.cuda.get_device_properties(0); print(json.dumps({'torch': torch.__version__, "
        "'torch_cuda': torch.version.cuda, 'gpu': c and p.name, 'capability': c and "
        "'%d.%d' % (p.major, p.minor), 'sms': c and p.multi_processor_count, "
        "'memory_gib': c and round(p.total_memory / 2**30, 1)}))"
    )
    out = _run([sys.executable, "-c", probe], timeout=60)
    try:
        info.update(json.loads(out.splitlines()[-1]))
    except (ValueError, IndexError):
        info["torch_probe"] = out[-500:]
    for name in ("transformers", "lightning", "torchmetrics", "numpy"):
        try:  # the installed version, without the seconds an import takes
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


# ------------------------------------------------------------------ judges
# Each judge reads a step's outputs under the details folder and returns
# (verdict, reason, figures); rc and the timeout are handled before it is called.
Judged = tuple[str, str, dict]


def _tail(path: Path, lines: int = 3) -> str:
    if not path.is_file():
        return f"{path.name} missing"
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[-400:]


def judge_env(details: Path, rc: int) -> Judged:
    env = details / "env.json"
    info = json.loads(env.read_text()) if env.is_file() else {}
    figures = {k: info.get(k) for k in ("gpu", "capability", "torch", "nvidia_smi")}
    if rc == 0 and info.get("gpu"):
        return "PASS", f"{info['gpu']} (cc {info.get('capability')})", figures
    return "FAIL", "torch sees no CUDA device", figures


def judge_build(details: Path, rc: int) -> Judged:
    log = details / "build.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    figures: dict = {}
    if match := re.search(r"build time: (\d+) s", text):
        figures["build_s"] = int(match.group(1))
    if match := re.search(r"TORCH_CUDA_ARCH_LIST=(\S+) \(([^)]*)\)", text):
        figures["arch_list"], figures["targets"] = match.group(1), match.group(2)
    if rc != 0:
        return "FAIL", f"build exit {rc}: {_tail(log)}", figures
    if "CUDA kernels" not in text:
        return "FAIL", "ncfast info reports no CUDA kernels", figures
    if "reused the main call's build" in text:
        return "PASS", "reused the main call's build (CUDA kernels for the device)", figures
    return "PASS", f"built in {figures.get('build_s', '?')} s for {figures.get('targets')}", figures


def judge_tests(details: Path, rc: int) -> Judged:
    log = details / "tests.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    figures = {
        key: int(m.group(1)) if (m := re.search(rf"(\d+) {key}", last)) else 0
        for key in ("passed", "failed", "error", "skipped")
    }
    ok = figures["failed"] == figures["error"] == figures["skipped"] == 0 and figures["passed"] > 0
    verdict = "PASS" if ok and rc == 0 else "FAIL"
    return verdict, last or f"pytest exit {rc}, no summary", figures


REFUSED = re.compile(r"device not supported|not supported on this|unsupported device", re.I)


def judge_sanitizer(tool: str) -> Callable[[Path, int], Judged]:
    def judge(details: Path, rc: int) -> Judged:
        log = details / f"{tool}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        summary = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: ([^\n]*)", text)
        errors = int(m.group(1)) if summary and (m := re.match(r"(\d+)", summary[-1])) else None
        figures = {"errors": errors, "summary": summary[-1] if summary else None}
        if refused := REFUSED.search(text):
            line = next(ln for ln in text.splitlines() if refused.group(0) in ln)
            return "SKIPPED", f"the machine refuses {tool}: {line.strip()[:300]}", figures
        if rc == 0 and errors == 0 and "match the reference" in text:
            return "PASS", f"0 errors ({summary[-1]})", figures
        return "FAIL", f"exit {rc}; {summary[-1] if summary else _tail(log)}", figures

    return judge


def judge_kernels(details: Path, rc: int) -> Judged:
    path = details / "kernels.json"
    if not path.is_file():
        return "FAIL", f"no kernels.json (exit {rc})", {}
    rows = json.loads(path.read_text())["results"]
    big = [r for r in rows if r["op"] == "update" and (r["batch"], r["dim"]) == (65536, 512)]
    vs_gemm = big[0].get("update_vs_gemm") if big else None
    figures = {
        "ratios": {
            f"{r['op']} B={r['batch']} P={r['dim']} C={r['classes']}": r["ratio"] for r in rows
        },
        "update_vs_gemm_65536x512": vs_gemm,
    }
    small = [r for r in rows if r["batch"] <= 1024]
    problems = [
        f"{r['op']} B={r['batch']} P={r['dim']}: {r['ratio']:.2f}x"
        for r in small
        if r["ratio"] < 3.0
    ]
    if not small:
        problems.append("no case at B <= 1024")
    if vs_gemm is None or vs_gemm < 0.5:
        problems.append(f"update at B=65536,P=512: {vs_gemm} of the GEMM's rate")
    if rc != 0 or problems:
        return "FAIL", "; ".join(problems) or f"exit {rc}", figures
    low = min(r["ratio"] for r in small)
    return "PASS", f"min ratio {low:.1f}x at B <= 1024; update/GEMM {vs_gemm:.0%}", figures


def judge_train(details: Path, rc: int) -> Judged:
    found = sorted(details.glob("train_overhead_*.json"))
    if not found:
        return "FAIL", f"no train_overhead JSON (exit {rc})", {}
    result = json.loads(found[0].read_text())
    pct = result["beyond_forward_pct_median"]
    figures = {
        "beyond_forward_pct_median": pct,
        "epoch_times_plain": result["plain"]["epoch_times"],
        "sync_check": result.get("sync_check"),
        "backend": result.get("ncfast_backend"),
    }
    verdict = "PASS" if pct < 3.0 and rc == 0 else "FAIL"
    return verdict, f"{pct:.2f}% of a training epoch beyond forward passes", figures


def judge_online(details: Path, rc: int) -> Judged:
    path = details / "online_overhead_cuda.json"
    if not path.is_file():
        return "FAIL", f"no online_overhead_cuda.json (exit {rc})", {}
    rows = json.loads(path.read_text())["results"]
    figures = {
        r["net"]: {
            "overhead_pct": 100 * (r["ratio_median"] - 1),
            "per_batch_pct": 100 * (r["per_batch_ratio_median"] - 1),
            "host_sync": (r.get("sync_check") or {}).get("host_sync", "not checked"),
        }
        for r in rows
    }
    problems = [
        f"{n}: {f['overhead_pct']:+.2f}% per step"
        for n, f in figures.items()
        if f["overhead_pct"] >= 2.0
    ]
    problems += [f"{n}: host sync {f['host_sync']}" for n, f in figures.items() if f["host_sync"]]
    if rc != 0 or problems or not rows:
        return "FAIL", "; ".join(problems) or f"exit {rc}", figures
    worst = max(f["overhead_pct"] for f in figures.values())
    return "PASS", f"{worst:+.2f}% per step, no host sync in a window", figures


def judge_scale(details: Path, rc: int) -> Judged:
    path = details / "scale.json"
    if not path.is_file():
        return "FAIL", f"no scale.json (exit {rc})", {}
    runs = [r for r in json.loads(path.read_text())["runs"] if r.get("backend") == "native"]
    seconds = runs[0].get("metrics_s") if runs else None
    figures = {"metrics_s": seconds, "update_s": runs[0].get("update_s") if runs else None}
    if seconds is None or not math.isfinite(seconds):
        return (
            "FAIL",
            f"no native metrics time ({runs[0].get('error') if runs else 'no run'})",
            figures,
        )
    verdict = "PASS" if seconds < 10.0 and rc == 0 else "FAIL"
    return verdict, f"all metrics in {seconds:.2f} s", figures


PRECISION_FAST_OVER_PEER = 1.0  # issue 22's goal: fast no slower than the peer's float32
PRECISION_EXACT_OVER_FAST = 2.0  # float64 at >= 1/2 the float32 rate: its product <= 2x


def judge_precision(details: Path, rc: int) -> Judged:
    path = details / "precision_cuda.json"
    if not path.is_file():
        return "FAIL", f"no precision_cuda.json (exit {rc})", {}
    result = json.loads(path.read_text())
    strong = result["auto_precision"][0] == "exact"  # ncfast's own rule: fast float64
    figures: dict = {"auto_precision": result["auto_precision"], "shapes": {}}
    problems = []
    for row in result["rows"]:
        shape = f"B={row['batch']} P={row['dim']} C={row['classes']}"
        fast_over = row["peer_f32_over"]["ncfast fast"]
        figures["shapes"][shape] = {
            "peer_f32_over_fast": fast_over,
            "peer_f32_over_exact": row["peer_f32_over"]["ncfast exact"],
            "peer_f64_over_exact": row["peer_f64_over"]["ncfast exact"],
            "exact_over_fast": row["exact_over_fast"],
        }
        if not fast_over >= PRECISION_FAST_OVER_PEER:
            problems.append(f"{shape}: peer f32/fast {fast_over:.2f}x")
        if strong and not row["exact_over_fast"] <= PRECISION_EXACT_OVER_FAST:
            problems.append(f"{shape}: exact/fast {row['exact_over_fast']:.2f}x")
    if not result["rows"]:
        problems.append("no shape measured")
    if rc != 0 or problems:
        return "FAIL", "; ".join(problems) or f"exit {rc}", figures
    low = min(f["peer_f32_over_fast"] for f in figures["shapes"].values())
    worst = max(f["exact_over_fast"] for f in figures["shapes"].values())
    held = "held" if strong else "not held: weak float64"
    return "PASS", f"peer f32/fast >= {low:.2f}x; exact/fast <= {worst:.2f}x ({held})", figures


def judge_vocab(details: Path, rc: int) -> Judged:
    path = details / "vocab_cuda.json"
    if not path.is_file():
        return "FAIL", f"no vocab_cuda.json (exit {rc})", {}
    r = json.loads(path.read_text())
    keys = ("update_s_per_million", "nc4_s_per_million", "metrics_s", "metrics_peak_bytes", "nc1")
    figures = {k: r[k] for k in ("state_bytes", "classes_present", "tokens_measured", *keys)}
    expected = accumulator_bytes(r["vocab"], r["dim"])
    problems = [f"{k} = {r[k]}" for k in keys if not math.isfinite(r[k])]
    if r["state_bytes"] != expected:
        problems.append(f"state {r['state_bytes']} bytes, not 8C + 16CP + 8P^2 + 16 = {expected}")
    if not r["nc4_tokens"] > 0:
        problems.append("NC4 counted no token")
    if rc != 0 or problems:
        return "FAIL", "; ".join(problems) or f"exit {rc}", figures
    return (
        "PASS",
        f"state {r['state_bytes'] / 2**20:.0f} MiB; update {r['update_s_per_million']:.2f} s "
        f"and NC4 {r['nc4_s_per_million']:.2f} s per 10^6 tokens; metrics {r['metrics_s']:.2f} s",
        figures,
    )


def judge_lmpeer(details: Path, rc: int) -> Judged:
    path = details / "lm_peer_cuda.json"
    if not path.is_file():
        return "FAIL", f"no lm_peer_cuda.json (exit {rc})", {}
    rows = {row[0].split(" ")[0]: row for row in json.loads(path.read_text())["rows"]}
    figures: dict = {}
    problems = []
    for key, tolerance, relative in (
        ("NC1", LMPEER_RTOL, True),
        ("NC2", LMPEER_RTOL, True),
        ("NC4", LMPEER_NC4_ATOL, False),
    ):
        ours, theirs = rows[key][1], rows[key][2]
        diff = abs(ours - theirs) / (max(abs(ours), 1e-300) if relative else 1.0)
        figures[key] = {"ncfast": ours, "peer_mapped": theirs, "difference": diff}
        if not diff <= tolerance:  # NaN fails
            problems.append(f"{key}: {diff:.2e} > {tolerance:g}")
    figures["time_s"] = {"ncfast": rows["time"][1], "peer": rows["time"][2]}
    if rc != 0 or problems:
        return "FAIL", "; ".join(problems) or f"exit {rc}", figures
    worst = ", ".join(f"{k} {figures[k]['difference']:.1e}" for k in ("NC1", "NC2", "NC4"))
    return "PASS", f"agree after the mapping: {worst}", figures


def judge_lines(name: str) -> Callable[[Path, int], Judged]:
    """Steps whose script prints ``VERDICT <PASS|FAIL|SKIPPED> <reason>`` and a ``FIGURES {json}``
    line (bench/gpu_integrations.py, bench/gpu_variant_check.py, via the step's shell)."""

    def judge(details: Path, rc: int) -> Judged:
        log = details / f"{name}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        figures = {}
        for m in re.finditer(r"^FIGURES (.*)$", text, re.M):
            figures.update(json.loads(m.group(1)))
        verdicts = re.findall(r"^VERDICT (PASS|FAIL|SKIPPED) (.*)$", text, re.M)
        if not verdicts:
            return "FAIL", f"exit {rc}: {_tail(log)}", figures
        if any(v == "FAIL" for v, _ in verdicts) or rc != 0:
            verdict = "FAIL"
        elif all(v == "SKIPPED" for v, _ in verdicts):
            verdict = "SKIPPED"
        else:
            verdict = "PASS"
        return verdict, "; ".join(f"{v} {r}" for v, r in verdicts), figures

    return judge


LINE_STEPS = ("integrations", "ptxjit", "fallback")
JUDGES: dict[str, Callable[[Path, int], Judged]] = {
    "env": judge_env,
    "build": judge_build,
    "tests": judge_tests,
    **{tool: judge_sanitizer(tool) for tool in ("memcheck", "racecheck", "initcheck", "synccheck")},
    "kernels": judge_kernels,
    "train": judge_train,
    "online": judge_online,
    "scale": judge_scale,
    "precision": judge_precision,
    "vocab": judge_vocab,
    "lmpeer": judge_lmpeer,
    **{name: judge_lines(name) for name in LINE_STEPS},
}


def judge(name: str, details: Path, rc: int, seconds: float, cap: int) -> Judged:
    step = step_of(name)
    if rc in (124, 137):
        killed = f"over its cap: killed after {cap} s"
        if name in LINE_STEPS:  # what the script decided before it was killed
            _, reason, figures = JUDGES[name](details, 0)
            return "FAIL", f"{killed}; before that: {reason}", figures
        return "FAIL", killed, {}
    if step.command or name not in JUDGES:
        return ("PASS" if rc == 0 else "FAIL"), f"exit {rc}", {}
    try:
        return JUDGES[name](details, rc)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return "FAIL", f"results unreadable: {type(exc).__name__}: {exc}", {}


# ------------------------------------------------------------------ commands
def cmd_plan(args) -> None:
    steps = plan()
    if not args.table:
        for s in steps:
            print(f"{s.name}\t{s.cap}\t{s.command}")
        return
    width = max(len(s.name) for s in steps)
    print(f"{'step':<{width}} {'cap s':>5}  threshold (what runs)")
    for s in steps:
        print(f"{s.name:<{width}} {s.cap:>5}  {s.threshold} ({s.what})")
    total = sum(s.cap for s in steps)
    print(f"{'total':<{width}} {total:>5}  (budget {args.budget} s; output: at most 3 files)")


def cmd_init(args) -> None:
    report = {
        "schema": SCHEMA,
        "stage": stage(),
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "budget_s": args.budget,
        "plan": [{"name": s.name, "cap_s": s.cap, "threshold": s.threshold} for s in plan()],
        "machine": {},
        "steps": [],
    }
    save(args.json, report)


def cmd_machine(args) -> None:
    report = load(args.json)
    report["machine"] = machine()
    save(args.json, report)
    (args.details / "env.json").write_text(json.dumps(report["machine"], indent=1) + "\n")


def cmd_judge(args) -> None:
    verdict, reason, figures = judge(args.step, args.details, args.rc, args.seconds, args.cap)
    step = step_of(args.step)
    record(
        args.json, step, verdict, reason, seconds=args.seconds, figures=figures, cap_used_s=args.cap
    )


def cmd_skip(args) -> None:
    record(args.json, step_of(args.step), "SKIPPED", args.reason)


def cmd_finish(args) -> None:
    report = load(args.json)
    report["elapsed_s"] = args.elapsed
    report["finished_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    done = {r["name"] for r in report["steps"]}
    for s in plan():  # a step the run never reached (killed between steps) still has a row
        if s.name not in done:
            report["steps"].append(
                {
                    "name": s.name,
                    "verdict": "SKIPPED",
                    "reason": "not reached",
                    "cap_s": s.cap,
                    "threshold": s.threshold,
                    "seconds": 0.0,
                    "figures": {},
                }
            )
    save(args.json, report)
    s = report["summary"]
    print(
        f"[gpu_check] {s['verdict']}: {s['PASS']} passed, {s['FAIL']} failed, "
        f"{s['SKIPPED']} skipped in {args.elapsed:.0f} s"
    )
    for row in report["steps"]:
        print(f"  {row['name']:<12} {row['verdict']:<7} {row['seconds']:>6.1f} s  {row['reason']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--table", action="store_true")
    p.add_argument("--budget", type=int, default=BUDGET_S)
    p = sub.add_parser("init")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--budget", type=int, default=BUDGET_S)
    p = sub.add_parser("machine")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--details", type=Path, required=True)
    p = sub.add_parser("judge")
    p.add_argument("step")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--details", type=Path, required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--cap", type=int, required=True)
    p = sub.add_parser("skip")
    p.add_argument("step")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--reason", required=True)
    p = sub.add_parser("finish")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--elapsed", type=float, required=True)
    args = parser.parse_args(argv)
    commands = {"plan": cmd_plan, "init": cmd_init, "machine": cmd_machine, "judge": cmd_judge}
    commands.update(skip=cmd_skip, finish=cmd_finish)
    commands[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
