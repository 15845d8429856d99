"""bench/gpu_check.sh, the script a GPU machine runs first, checked without a GPU: its dry run
(every step with its cap and threshold, the caps within one 300 s call), its argument errors,
a run of fake steps where one overruns its cap (killed, FAIL) and the budget runs out (the rest
SKIPPED) and still a complete gpu_check.json and at most 3 files; a run on this GPU-less
machine (env FAIL, every other step SKIPPED with the reason); the same for the extra call
(``--extra``: issues 22 and 23's GPU cases, its own <= 300 s and 3 files); each judge's
threshold on made-up results (bench/gpu_check_report.py); and that what the steps call exists
and accepts the options passed. The sanitizer workload and bench/bench_precision.py run here on
the CPU."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check_report as report  # noqa: E402

ONE_CALL = 300  # seconds: the budget of the one device call the script is written for
MAX_FILES = 3

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


def _bash(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=full,
        timeout=120,
    )


def _complete(out: Path, names: list[str], stem: str = "gpu_check") -> dict:
    """<stem>.json is whole: every planned step has one row with every field."""
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and f"{stem}.json" in files and f"{stem}.log" in files
    assert all(p.is_file() for p in out.iterdir())  # flat: nothing deeper comes back
    data = json.loads((out / f"{stem}.json").read_text())
    assert [row["name"] for row in data["steps"]] == names
    for row in data["steps"]:
        assert set(row) >= {"verdict", "reason", "seconds", "cap_s", "threshold", "figures"}
        assert row["verdict"] in ("PASS", "FAIL", "SKIPPED") and row["reason"]
    counts = {v: sum(r["verdict"] == v for r in data["steps"]) for v in ("PASS", "FAIL")}
    assert data["summary"]["PASS"] == counts["PASS"] and data["summary"]["FAIL"] == counts["FAIL"]
    assert data["elapsed_s"] >= 0 and data["finished_utc"]
    return data


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _dry_run_names(*args: str, plan: tuple) -> list[str]:
    """The dry run of one call: every step of ``plan`` with its cap and threshold, then the
    total, within one 300 s call; what the steps run is in the repository (no network)."""
    result = _bash(*args, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [re.match(r"(\S+)\s+(\d+)\s+(.*)", line) for line in lines[1:]]
    assert all(rows), result.stdout
    names = [m.group(1) for m in rows]
    assert names[:-1] == [s.name for s in plan] and names[-1] == "total"
    caps = [int(m.group(2)) for m in rows]
    assert all(cap > 0 for cap in caps[:-1]) and caps[-1] == sum(caps[:-1]) <= ONE_CALL
    for m, step in zip(rows, plan, strict=False):
        assert step.threshold in m.group(3)  # the threshold each figure is held to
    text = SCRIPT.read_text() + result.stdout
    for path in set(re.findall(r"(?:bench|tests)/[\w/]+\.py", text)):
        assert (ROOT / path).is_file(), path
    return names


def test_dry_run_lists_every_step_with_its_cap_and_threshold_within_one_call():
    names = _dry_run_names(plan=report.PLAN)
    # Ordered by value: build first, the sanitizers before the timings.
    assert names.index("build") < names.index("tests") < names.index("memcheck")
    assert names.index("synccheck") < names.index("kernels") < names.index("fallback")


def test_extra_dry_run_lists_issue_22_and_23s_gpu_cases_within_a_second_call():
    names = _dry_run_names("--extra", plan=report.EXTRA_PLAN)
    assert names[:2] == ["env", "build"]  # nothing runs without a device and a build
    assert {"precision", "vocab", "lmpeer"} <= set(names)
    # docs/gpu_check.md's table of the extra call gives each step with its cap and the total.
    docs = (ROOT / "docs" / "gpu_check.md").read_text().split("## The extra call")[1]
    for step in report.EXTRA_PLAN:
        assert f"| `{step.name}` | {step.cap} |" in docs, step.name
    assert f"add up to {sum(s.cap for s in report.EXTRA_PLAN)} s" in docs


def test_bad_arguments_fail_in_one_line():
    for args, message in (
        (("--budget", "soon"), "--budget needs seconds"),
        (("--fast",), "unknown argument '--fast'"),
    ):
        result = _bash(*args)
        assert result.returncode == 2 and message in result.stderr.splitlines()[0], result.stderr


def test_a_step_over_its_cap_is_killed_the_rest_skipped_and_the_results_complete(tmp_path):
    plan = [
        {"name": "quick", "cap": 5, "command": "echo quick ran"},
        {"name": "sleepy", "cap": 4, "command": "sleep 60"},
        {"name": "late", "cap": 5, "command": "echo never"},
    ]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    env = {"OUT": str(out), "GPU_CHECK_PLAN": str(tmp_path / "plan.json")}
    # After sleepy (cap 4, or what is left of 10 s less the 3 s reserve) under 4 s remain.
    result = _bash("--budget", "10", env=env)
    assert result.returncode == 1  # not every step passed
    data = _complete(out, ["quick", "sleepy", "late"])
    quick, sleepy, late = data["steps"]
    assert quick["verdict"] == "PASS"
    assert sleepy["verdict"] == "FAIL" and "over its cap" in sleepy["reason"]
    assert sleepy["seconds"] <= sleepy["cap_used_s"] + 3  # killed at its cap, not after 60 s
    assert late["verdict"] == "SKIPPED" and "budget of 10 s spent" in late["reason"]
    assert data["summary"]["verdict"] == "FAIL"
    log = (out / "gpu_check.log").read_text()
    assert "quick ran" in log and "never" not in log and "late" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the GPU-less run")
def test_without_a_gpu_env_fails_and_every_other_step_is_skipped_with_the_reason(tmp_path):
    out = tmp_path / "out"
    result = _bash(env={"OUT": str(out)})
    assert result.returncode == 1, result.stdout[-2000:]
    data = _complete(out, [s.name for s in report.PLAN])
    env, *rest = data["steps"]
    # "no CUDA device", or over its cap where a loaded machine imports torch slowly
    assert env["verdict"] == "FAIL", env
    assert all(r["verdict"] == "SKIPPED" and "env failed" in r["reason"] for r in rest)


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the GPU-less run")
def test_the_extra_call_without_a_gpu_writes_its_own_complete_results(tmp_path):
    out = tmp_path / "out"
    result = _bash("--extra", env={"OUT": str(out)})
    assert result.returncode == 1, result.stdout[-2000:]
    data = _complete(out, [s.name for s in report.EXTRA_PLAN], stem="gpu_check_extra")
    assert data["stage"] == "extra" and data["summary"]["verdict"] == "FAIL"
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check_extra.json",
        "gpu_check_extra.log",
        "gpu_check_extra_details.tar.gz",
    ]
    env, *rest = data["steps"]
    assert env["verdict"] == "FAIL", env
    assert all(r["verdict"] == "SKIPPED" and "env failed" in r["reason"] for r in rest)


# ----------------------------------------------------------------- the judges' thresholds
def _kernel_row(op, batch, dim, ratio, vs_gemm=None):
    row = {"op": op, "batch": batch, "dim": dim, "classes": 10, "ratio": ratio}
    if vs_gemm is not None:
        row["update_vs_gemm"] = vs_gemm
    return row


@pytest.mark.parametrize(
    "small_ratio, vs_gemm, verdict",
    [(3.5, 0.6, "PASS"), (2.9, 0.6, "FAIL"), (3.5, 0.49, "FAIL"), (3.0, 0.5, "PASS")],
)
def test_kernels_judge_holds_the_ratio_and_the_gemm_fraction(
    tmp_path, small_ratio, vs_gemm, verdict
):
    rows = [
        _kernel_row("update", 1024, 512, small_ratio),
        _kernel_row("nc4", 1024, 512, 10.0),
        _kernel_row("update", 65536, 512, 1.5, vs_gemm),  # B > 1024: ratio not held
    ]
    (tmp_path / "kernels.json").write_text(json.dumps({"results": rows}))
    got, reason, figures = report.judge_kernels(tmp_path, 0)
    assert got == verdict, reason
    assert figures["update_vs_gemm_65536x512"] == vs_gemm


def test_sanitizer_judge_refused_is_skipped_errors_fail_clean_passes(tmp_path):
    judge = report.judge_sanitizer("memcheck")
    log = tmp_path / "memcheck.log"
    log.write_text("========= Error: Device not supported\nerror 999\n")
    verdict, reason, _ = judge(tmp_path, 1)
    assert verdict == "SKIPPED" and "Device not supported" in reason
    log.write_text("ops match the reference\n========= ERROR SUMMARY: 2 errors\n")
    assert judge(tmp_path, 99)[0] == "FAIL"
    log.write_text("ops match the reference\n========= ERROR SUMMARY: 0 errors\n")
    assert judge(tmp_path, 0)[:1] == ("PASS",)
    log.write_text("========= ERROR SUMMARY: 0 errors\n")  # the workload did not finish
    assert judge(tmp_path, 1)[0] == "FAIL"


@pytest.mark.parametrize(
    "summary, verdict",
    [
        ("45 passed in 9.1s", "PASS"),
        ("44 passed, 1 failed in 9.1s", "FAIL"),
        ("40 passed, 5 skipped in 9.1s", "FAIL"),  # CUDA cases must run
        ("118 deselected in 1.0s", "FAIL"),
    ],
)
def test_tests_judge_needs_cuda_cases_run_and_none_failed(tmp_path, summary, verdict):
    (tmp_path / "tests.log").write_text(f"....\n{summary}\n")
    assert report.judge_tests(tmp_path, 0 if verdict == "PASS" else 1)[0] == verdict


@pytest.mark.parametrize("pct, verdict", [(2.9, "PASS"), (3.0, "FAIL")])
def test_train_judge_holds_three_percent(tmp_path, pct, verdict):
    result = {"beyond_forward_pct_median": pct, "plain": {"epoch_times": [1.0]}}
    (tmp_path / "train_overhead_gpu_fp32.json").write_text(json.dumps(result))
    assert report.judge_train(tmp_path, 0)[0] == verdict


@pytest.mark.parametrize(
    "ratio, host_sync, verdict",
    [(1.019, None, "PASS"), (1.021, None, "FAIL"), (1.001, "cudaStreamSynchronize", "FAIL")],
)
def test_online_judge_holds_two_percent_and_no_host_sync(tmp_path, ratio, host_sync, verdict):
    row = {
        "net": "vgg11",
        "ratio_median": ratio,
        "per_batch_ratio_median": 1.0,
        "sync_check": {"steps": 9, "host_sync": host_sync},
    }
    (tmp_path / "online_overhead_cuda.json").write_text(json.dumps({"results": [row]}))
    assert report.judge_online(tmp_path, 0)[0] == verdict


@pytest.mark.parametrize("seconds, verdict", [(9.9, "PASS"), (10.0, "FAIL"), (None, "FAIL")])
def test_scale_judge_holds_ten_seconds(tmp_path, seconds, verdict):
    run = {"backend": "native", "update_s": 1.0}
    if seconds is not None:
        run["metrics_s"] = seconds
    (tmp_path / "scale.json").write_text(json.dumps({"runs": [run]}))
    assert report.judge_scale(tmp_path, 0)[0] == verdict


def _precision_row(fast_over_peer, exact_over_fast, shape=(1024, 512, 10)):
    batch, dim, classes = shape
    return {
        "batch": batch,
        "dim": dim,
        "classes": classes,
        "ms": {},
        "peer_f32_over": {"ncfast fast": fast_over_peer, "ncfast exact": 1.0},
        "peer_f64_over": {"ncfast fast": 2.0, "ncfast exact": 1.5},
        "exact_over_fast": exact_over_fast,
    }


@pytest.mark.parametrize(
    "policy, fast_over_peer, exact_over_fast, verdict",
    [
        ("exact", 1.0, 2.0, "PASS"),  # at both thresholds
        ("exact", 0.99, 1.0, "FAIL"),  # fast slower than the peer's float32
        ("exact", 1.5, 2.01, "FAIL"),  # fast float64, yet exact > 2x fast
        ("fast", 1.5, 9.0, "PASS"),  # weak float64: exact/fast reported, not held
        ("fast", 0.99, 1.0, "FAIL"),
    ],
)
def test_precision_judge_holds_fast_against_the_peer_and_exact_where_float64_is_fast(
    tmp_path, policy, fast_over_peer, exact_over_fast, verdict
):
    rows = [
        _precision_row(3.0, 1.0, (1024, 2048, 1000)),
        _precision_row(fast_over_peer, exact_over_fast),  # every shape is held
    ]
    result = {"auto_precision": [policy, "why"], "rows": rows}
    (tmp_path / "precision_cuda.json").write_text(json.dumps(result))
    got, reason, figures = report.judge_precision(tmp_path, 0)
    assert got == verdict, reason
    assert figures["shapes"]["B=1024 P=512 C=10"]["peer_f32_over_fast"] == fast_over_peer
    (tmp_path / "precision_cuda.json").write_text(json.dumps({**result, "rows": []}))
    assert report.judge_precision(tmp_path, 0)[0] == "FAIL"


def test_bench_precision_runs_on_the_cpu_and_its_results_are_what_the_judge_reads(tmp_path):
    """bench/bench_precision.py end to end on tiny shapes (its --device cuda differs only in
    the clock, CUDA events): the CPU file keeps its keys, and with the device's policy added
    (what --device cuda writes) the precision judge reads it."""
    pytest.importorskip("ncfast._C")
    import bench_precision

    out = tmp_path / "precision.json"
    assert bench_precision.main(["--shape", "64,16,4", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"machine", "build", "rows"}
    assert list(result["rows"][0]) == [
        *("batch", "dim", "classes", "ms", "wall_ms"),
        *("peer_f32_over", "peer_f64_over", "exact_over_fast"),
    ]
    result["auto_precision"] = ["fast", "made up"]
    (tmp_path / "precision_cuda.json").write_text(json.dumps(result))
    verdict, reason, figures = report.judge_precision(tmp_path, 0)
    assert verdict in ("PASS", "FAIL") and "unreadable" not in reason
    assert list(figures["shapes"]) == ["B=64 P=16 C=4"]
    with pytest.raises(SystemExit):
        bench_precision.main(["--shape", "64,16"])


def _vocab_result(**changes):
    vocab, dim = 50257, 768
    result = {
        "vocab": vocab,
        "dim": dim,
        "state_bytes": 8 * vocab + 16 * vocab * dim + 8 * dim * dim + 16,
        "classes_present": 30000,
        "tokens_measured": 1038000,
        "update_s_per_million": 1.2,
        "nc4_s_per_million": 0.8,
        "nc4_tokens": 64880,
        "metrics_s": 3.0,
        "metrics_peak_bytes": 2**30,
        "nc1": 0.36,
    }
    return {**result, **changes}


@pytest.mark.parametrize(
    "changes, verdict",
    [
        ({}, "PASS"),
        ({"nc1": float("nan")}, "FAIL"),
        ({"update_s_per_million": float("inf")}, "FAIL"),
        ({"state_bytes": 8 * 50257 + 16 * 50257 * 768 + 8 * 768 * 768}, "FAIL"),
        ({"nc4_tokens": 0}, "FAIL"),
    ],
)
def test_vocab_judge_needs_the_state_as_computed_and_finite_figures(tmp_path, changes, verdict):
    (tmp_path / "vocab_cuda.json").write_text(json.dumps(_vocab_result(**changes)))
    got, reason, figures = report.judge_vocab(tmp_path, 0)
    assert got == verdict, reason
    assert figures["state_bytes"] == _vocab_result(**changes)["state_bytes"]
    assert report.judge_vocab(tmp_path, 1)[0] == "FAIL"  # the script failed


@pytest.mark.parametrize(
    "nc1_rel, nc2_rel, nc4_abs, verdict",
    [
        (report.LMPEER_RTOL, report.LMPEER_RTOL, report.LMPEER_NC4_ATOL, "PASS"),  # at them
        (0.0, 0.0, 0.0, "PASS"),
        (1.1 * report.LMPEER_RTOL, 0.0, 0.0, "FAIL"),
        (0.0, 1.1 * report.LMPEER_RTOL, 0.0, "FAIL"),
        (0.0, 0.0, 1.1 * report.LMPEER_NC4_ATOL, "FAIL"),
        (float("nan"), 0.0, 0.0, "FAIL"),
    ],
)
def test_lmpeer_judge_holds_the_mapping_tolerances(tmp_path, nc1_rel, nc2_rel, nc4_abs, verdict):
    """Rows as bench/bench_lm_peer.py writes them: [name, ncfast, peer mapped, note]. The
    figures are powers of two so that the made-up differences are what the judge computes."""
    nc1, nc2, nc4 = 0.5, 0.25, 0.125
    rows = [
        ["NC1 (SPEC)", nc1, nc1 * (1 + nc1_rel), "peer × C/P"],
        ["NC2 (peer's ETF error)", nc2, nc2 * (1 - nc2_rel), "ncfast's means"],
        ["NC4 (mismatch)", nc4, nc4 + nc4_abs, "1 − agreement"],
        ["time (s)", 2.0, 3.0, ""],
        ["  of which final metrics", 1.0, float("nan"), ""],
    ]
    (tmp_path / "lm_peer_cuda.json").write_text(json.dumps({"args": {}, "rows": rows}))
    got, reason, figures = report.judge_lmpeer(tmp_path, 0)
    assert got == verdict, reason
    assert figures["time_s"] == {"ncfast": 2.0, "peer": 3.0}


def test_vocab_and_lmpeer_judges_read_what_the_scripts_write_on_the_cpu(tmp_path):
    """bench/bench_vocab.py and bench/bench_lm_peer.py at a tiny vocabulary on the CPU (the
    GPU call differs only in --device): their files, renamed as on cuda, pass the judges."""
    pytest.importorskip("ncfast._C")
    import bench_lm_peer
    import bench_vocab

    tiny = ["--vocab", "60", "--dim", "8", "--tokens", "512", "--batch-tokens", "256"]
    tiny += ["--seq-len", "32", "--out", str(tmp_path)]
    assert bench_vocab.main([*tiny, "--nc4-tokens", "128"]) == 0
    assert bench_lm_peer.main(tiny) == 0
    for stem in ("vocab", "lm_peer"):
        (tmp_path / f"{stem}_cpu.json").rename(tmp_path / f"{stem}_cuda.json")
    for judge in (report.judge_vocab, report.judge_lmpeer):
        verdict, reason, _ = judge(tmp_path, 0)
        assert verdict == "PASS", reason


def test_line_judge_reads_the_scripts_verdicts(tmp_path):
    judge = report.judge_lines("ptxjit")
    log = tmp_path / "ptxjit.log"
    log.write_text('FIGURES {"a": 1}\nVERDICT SKIPPED x: torch refuses\nVERDICT PASS y: agree\n')
    assert judge(tmp_path, 0)[:1] == ("PASS",) and judge(tmp_path, 0)[2] == {"a": 1}
    log.write_text("VERDICT SKIPPED x: torch refuses\n")
    assert judge(tmp_path, 0)[0] == "SKIPPED"
    log.write_text("VERDICT PASS x: ok\nVERDICT FAIL y: 3 keys differ\n")
    assert judge(tmp_path, 0)[0] == "FAIL"
    log.write_text("Traceback ...\n")
    assert judge(tmp_path, 1)[0] == "FAIL"
    # Killed at its cap: FAIL, and what the script had decided before is kept.
    log.write_text("VERDICT PASS torchmetrics: 20 scalars\n")
    verdict, reason, _ = report.judge("ptxjit", tmp_path, 124, 9.0, 10)
    assert verdict == "FAIL" and "over its cap" in reason and "PASS torchmetrics" in reason


@pytest.mark.parametrize(
    "script, options",
    [
        ("bench_kernels.py", ["--device", "--case", "--out", "--repeats"]),
        ("bench_scale.py", ["--device", "--cases", "--timeout", "--out", "--backends"]),
        ("train_overhead.py", ["--epochs", "--device", "--results", "--per-class", "--test-size"]),
        ("online_overhead.py", ["--device", "--nets", "--reps", "--results"]),
        ("sanitize_ops.py", ["--device"]),
        ("gpu_variant_check.py", ["--label", "--save", "--compare", "--expect"]),
        ("bench_precision.py", ["--device", "--repeats", "--out"]),
        ("bench_vocab.py", ["--device", "--tokens", "--nc4-tokens", "--out"]),
        ("bench_lm_peer.py", ["--device", "--tokens", "--batch-tokens", "--out"]),
    ],
)
def test_called_scripts_accept_the_options_passed(script, options):
    """Each option the script passes is one the called script defines (read from its source:
    running --help would import torch six times)."""
    calls = [line for line in SCRIPT.read_text().splitlines() if f"bench/{script}" in line]
    assert calls, script
    source = (ROOT / "bench" / script).read_text()
    defined = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
    assert set(options) <= defined, (script, set(options) - defined)


def test_variant_check_saves_and_compares_the_numbers_on_the_cpu(tmp_path, capsys):
    """bench/gpu_variant_check.py's own logic (the GPU runs compare builds): equal numbers
    PASS, a number moved beyond 1e-9 relative FAILs, naming the key."""
    pytest.importorskip("ncfast._C")
    import gpu_variant_check

    saved = tmp_path / "sass.json"
    gpu_variant_check.main(["--device", "cpu", "--label", "a", "--save", str(saved)])
    numbers = json.loads(saved.read_text())
    numbers["nc1"] *= 1 + 1e-6
    saved.write_text(json.dumps(numbers))
    gpu_variant_check.main(["--device", "cpu", "--label", "b", "--compare", str(saved)])
    out = capsys.readouterr().out
    assert re.search(r"VERDICT PASS a: \d+ keys agree", out) and "VERDICT FAIL b: nc1:" in out
    verdict, _, figures = report.judge_lines("ptxjit")(_log(tmp_path, "ptxjit", out), 0)
    assert verdict == "FAIL" and set(figures) == {"a", "b"}


def _log(folder: Path, name: str, text: str) -> Path:
    (folder / f"{name}.log").write_text(text)
    return folder


def test_sanitizer_workload_matches_the_reference_on_the_cpu(seed):
    pytest.importorskip("ncfast._C")
    script = str(ROOT / "bench" / "sanitize_ops.py")
    result = subprocess.run(
        [sys.executable, script, "--device", "cpu", "--seed", str(seed)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "match the reference" in result.stdout
