"""bench/gpu_check.sh, the script a GPU machine runs first, checked without a GPU: its syntax,
its dry run (every step listed with a cap, the caps within 12 minutes), its argument errors,
and that what it calls exists and accepts the options it passes. The sanitizer workload runs
here on the CPU kernels."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = [
    "env",
    "build",
    "tests",
    "memcheck",
    "racecheck",
    "synccheck",
    "kernels",
    "scale",
    "train",
    "online",
]
TWELVE_MINUTES = 720

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


def _bash(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, check=False, cwd=ROOT
    )


def _dry_run_rows(*args: str) -> tuple[dict[str, int], int, str]:
    result = _bash("--dry-run", *args)
    assert result.returncode == 0, result.stderr
    rows = {}
    total = None
    for line in result.stdout.splitlines()[1:]:
        name, cap = line.split()[:2]
        if name == "total":
            total = int(cap)
        else:
            rows[name] = int(cap)
    assert total is not None, result.stdout
    return rows, total, result.stdout


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dry_run_lists_every_step_with_its_cap_within_twelve_minutes():
    rows, total, text = _dry_run_rows()
    assert list(rows) == STEPS
    assert all(cap > 0 for cap in rows.values())
    assert total == sum(rows.values()) <= TWELVE_MINUTES
    # What the steps run is in the repository (the GPU machine has no network).
    for path in set(re.findall(r"(?:bench|tests)/[\w/]+\.py", text)):
        assert (ROOT / path).is_file(), path
    assert "TORCH_CUDA_ARCH_LIST=9.0" in text and "compute-sanitizer" in text


def test_steps_subset_keeps_the_script_order_and_bad_arguments_fail_in_one_line():
    rows, total, _ = _dry_run_rows("--steps", "train,build,tests")
    assert list(rows) == ["build", "tests", "train"] and total == sum(rows.values())
    for args, message in (
        (("--steps", "build,warp"), "unknown step 'warp'"),
        (("--budget", "soon"), "--budget needs seconds"),
        (("--fast",), "unknown argument '--fast'"),
    ):
        result = _bash(*args)
        assert result.returncode == 2 and message in result.stderr.splitlines()[0], result.stderr


@pytest.mark.parametrize(
    "script, options",
    [
        ("bench_kernels.py", ["--device", "--case", "--out"]),
        ("bench_scale.py", ["--device", "--cases", "--timeout", "--out"]),
        ("train_overhead.py", ["--epochs", "--device", "--results"]),
        ("online_overhead.py", ["--device", "--nets", "--reps", "--results"]),
        ("sanitize_ops.py", ["--device"]),
    ],
)
def test_called_scripts_accept_the_options_passed(script, options):
    text = SCRIPT.read_text()
    calls = [line for line in text.splitlines() if f"bench/{script}" in line and "WHAT" not in line]
    assert calls, script
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for option in options:
        assert option in result.stdout, (script, option)


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
