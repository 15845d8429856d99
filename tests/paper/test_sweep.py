"""``ncfast sweep`` (ncfast.paper.sweep): the grid, the run function, both executors, the selection.

The slow tests train a real 2×2×2 grid on the CPU (mnist5k and a tiny CIFAR-10 in its real
on-disk format; MSE and CE; two learning rates; 2 epochs of 3 images per class at width 1/16):
once with the local executor, killed half-way with SIGKILL and rerun; once through submitit's
local executor. Training on the CPU is deterministic (a resumed run reproduces the
uninterrupted one exactly, ncfast.paper.train's docstring), so both sweeps must log the same
numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ncfast.cli import main
from ncfast.cli.sweep import read_train_args
from ncfast.paper.sweep import (
    LOG_FILE,
    STATUS_FILE,
    Grid,
    RunSpec,
    SlurmOptions,
    Sweep,
    SweepError,
    SweepOptions,
    failure_reason,
    in_use,
    parse_lrs,
    parse_names,
    parse_seeds,
    read_status,
    submitit_parameters,
)
from ncfast.paper.sweep.executors import Progress
from tests.helpers.data_fixtures import write_cifar10

REPO = Path(__file__).resolve().parents[2]
TINY = ("--epochs", "2", "--width", "0.0625", "--per-class", "3", "--device", "cpu")
# HPD22 Table A.2 (the depths Appendix A.2 lists).
TABLE_A2 = {
    "mnist": ("vgg11", "resnet18", "densenet40"),
    "fashionmnist": ("vgg11", "resnet18", "densenet250"),
    "svhn": ("vgg13", "resnet34", "densenet40"),
    "cifar10": ("vgg11", "resnet50", "densenet100"),
    "stl10": ("vgg11", "resnet18", "densenet201"),
}


def grid_of(train_args=(), **grid) -> Grid:
    """A grid with ``ncfast train`` words given to every run (read as the command line does)."""
    preset, options = read_train_args(train_args)
    return Grid.from_options(**grid, train_preset=preset, train_options=options)


# ------------------------------------------------------------------------------ the grid
def test_logspace_is_hpd22s_sweep():
    lrs = parse_lrs("logspace:1e-4,0.25,25")
    assert len(lrs) == 25
    assert lrs[0] == 1e-4 and lrs[-1] == 0.25  # the end points as given, exactly
    ratios = np.diff(np.log10(lrs))
    # Each value is kept to 10 significant digits: log10 steps equal to ~1e-10 relative.
    np.testing.assert_allclose(ratios, np.log10(0.25 / 1e-4) / 24, rtol=1e-8)
    # SPEC §6's reference rates of MNIST-ResNet18 are points 16 and 20 of this sweep.
    assert f"{lrs[16]:.3g}" == "0.0184" and f"{lrs[20]:.3g}" == "0.0679"
    assert parse_lrs("0.1, 0.01,0.1") == (0.1, 0.01)  # duplicates once, order kept
    assert parse_lrs("logspace:0.5,0.5,1") == (0.5,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("logspace:1e-4,0.25", "--lrs: expected logspace:LO,HI,N"),
        ("logspace:0.25,1e-4,5", "--lrs: logspace needs LO < HI"),
        ("logspace:1e-4,0.25,2.5", "--lrs: N must be a whole number"),
        ("0.1,0", "--lrs: learning rates must be finite and > 0"),
        ("0.1,inf", "--lrs: learning rates must be finite and > 0"),
        ("0.1,abc", "--lrs: 'abc' is not a number"),
        ("0.1,,0.2", "--lrs: expected a comma-separated list"),
    ],
)
def test_bad_learning_rates_name_the_option(text, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_lrs(text)


def test_families_resolve_to_table_a2_per_dataset():
    grid = grid_of(datasets=",".join(TABLE_A2), lrs="0.01", losses="mse")
    nets = {}
    for spec in grid.runs():
        nets.setdefault(spec.dataset, []).append(spec.net)
    assert {d: tuple(n) for d, n in nets.items()} == TABLE_A2
    # An explicit depth is the same on every dataset; a family and its depth collapse to one.
    grid = grid_of(datasets="mnist,svhn", nets="vgg,vgg11", lrs="0.01", losses="mse")
    assert [(s.dataset, s.net) for s in grid.runs()] == [
        ("mnist", "vgg11"),
        ("svhn", "vgg13"),
        ("svhn", "vgg11"),
    ]


def test_paper_preset_is_the_750_runs_of_hpd22():
    grid = Grid.paper()
    runs = grid.runs()
    assert len(runs) == 5 * 3 * 2 * 25
    assert len({r.name for r in runs}) == len(runs)
    assert grid.shape() == ("5 datasets × 3 networks × 2 losses × 25 learning rates × 1 seed")
    assert grid.train_preset == "paper"
    assert {(r.dataset, r.net) for r in runs} == {
        (d, n) for d, nets in TABLE_A2.items() for n in nets
    }


@pytest.mark.parametrize(
    ("option", "text", "message"),
    [
        ("--datasets", "mnist,imagenet", "--datasets: unknown 'imagenet'"),
        ("--nets", "vgg12", "--nets: unknown 'vgg12'"),
        ("--losses", "mse,hinge", "--losses: unknown 'hinge'"),
    ],
)
def test_bad_names_name_the_option(option, text, message):
    from ncfast.paper.data import DATASETS
    from ncfast.paper.losses import LOSSES
    from ncfast.paper.models import FAMILIES, NETS

    choices = {"--datasets": DATASETS, "--nets": [*FAMILIES, *NETS], "--losses": LOSSES}
    with pytest.raises(SweepError, match=message):
        parse_names(text, option, list(choices[option]))


@pytest.mark.parametrize("text", ["-1", "x", "1,", str(2**63)])
def test_bad_seeds_name_the_option(text):
    with pytest.raises(SweepError, match="--seeds"):
        parse_seeds(text)


@pytest.mark.parametrize(
    ("train_args", "message"),
    [
        (["--epoch", "2"], "train option: No such option '--epoch'"),
        (["--dataset", "svhn"], "train option --dataset: the grid sets it; give the values with "),
        (["--lr", "0.1"], "train option --lr: the grid sets it; give the values with --lrs"),
        (["--out", "x"], "train option --out: not in a sweep"),
        (["--resume"], "train option --resume: not in a sweep"),
        (["--stop-after", "1"], "train option --stop-after: not in a sweep"),
        (["--device", "cuda:1"], "train option --device: cpu or cuda"),
        (["--epochs", "x"], "train option: Invalid value for '--epochs'"),
        # Found only by resolving the runs' configurations (ncfast.paper.train's checks).
        # 0.01·γ² fits float32 and 0.05·γ² does not: every learning rate is checked.
        (["--lr-gamma", "1e20"], "lr_gamma: the learning rate 0.05 grows past float32"),
        (["--epochs", "4", "--measure-epochs", "1,2"], "--measure-epochs must include the last"),
    ],
)
def test_train_options_are_checked_before_anything_starts(tmp_path, train_args, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(")):
        grid_of(
            datasets="mnist5k", nets="vgg", losses="mse", lrs="0.01,0.05", train_args=train_args
        ).check()
    # The command: a one-line usage error, and nothing written (no sweep.json, no run).
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        main,
        [
            *("sweep", "--out", str(out), "--datasets", "mnist5k", "--nets", "vgg"),
            *("--losses", "mse", "--lrs", "0.01,0.05", "--", *train_args),
        ],
    )
    assert result.exit_code == 2, result.output
    assert message.split(":")[0] in result.output
    assert "Traceback" not in result.output
    assert not (out / "sweep.json").exists()


def test_learning_rates_that_share_a_run_name_are_refused():
    grid = grid_of(datasets="mnist5k", nets="vgg", losses="mse", lrs="0.1,0.10001")
    with pytest.raises(SweepError, match="--lrs: 0.1 and 0.10001 give the same run name"):
        grid.check()


def test_another_grid_in_the_same_directory_is_refused_naming_the_difference(tmp_path):
    first = grid_of(datasets="mnist5k", nets="vgg", lrs="0.01,0.05", train_args=TINY)
    Sweep(tmp_path, first).prepare()
    stored = json.loads((tmp_path / "sweep.json").read_text())
    assert stored["lrs"] == [0.01, 0.05] and stored["train_options"]["epochs"] == 2
    other = grid_of(datasets="mnist5k", nets="vgg", lrs="0.01", train_args=TINY)
    with pytest.raises(SweepError, match=r"lrs: \[0.01, 0.05\] there, \[0.01\] now"):
        Sweep(tmp_path, other)
    more_epochs = grid_of(
        datasets="mnist5k", nets="vgg", lrs="0.01,0.05", train_args=[*TINY, "--epochs", "3"]
    )
    with pytest.raises(SweepError, match="train_options: "):
        Sweep(tmp_path, more_epochs)
    # The same grid, or none (read from sweep.json), continues the sweep.
    assert Sweep(tmp_path, first).grid == first
    assert Sweep(tmp_path).grid == first
    with pytest.raises(SweepError, match="holds no sweep"):
        Sweep(tmp_path / "empty")


# ---------------------------------------------------------------------- pieces of a run
def test_failure_reason_is_ncfast_trains_error_line():
    log = (
        "[2026-01-01] train --out x\n"
        "UserWarning: something harmless\n"
        "Error: training diverged at epoch 2 (loss nan); lower --lr (now 1000)\n"
    )
    assert (
        failure_reason(1, log) == "training diverged at epoch 2 (loss nan); lower --lr (now 1000)"
    )
    assert failure_reason(1, "Traceback ...\nValueError: bad\n") == "ValueError: bad"
    assert failure_reason(3, "") == "the run's process exited with code 3"
    assert failure_reason(-9, "epoch 1\n") == (
        "killed by SIGKILL (out of memory?); last output: epoch 1"
    )


def test_slurm_parameters_reach_the_sbatch_script(tmp_path, monkeypatch):
    """Submission to a Slurm cluster without one: a fake sbatch records the array job's
    script; the runs are marked submitted with their array jobs' ids, and queued."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" {bin_dir}/script\necho "Submitted batch job 4242"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sacct").write_text("#!/bin/sh\nexit 0\n")  # knows no job: still pending
    for name in ("sbatch", "srun", "sacct"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    grid = grid_of(datasets="mnist5k", nets="vgg", losses="mse,ce", lrs="0.01", train_args=TINY)
    sweep = Sweep(tmp_path / "sweep", grid)
    slurm = SlurmOptions(
        partition="gpu",
        time="1-02:00:00",
        cpus_per_run=4,
        options=("account=hpd", "array_parallelism=1", "reservation=r1"),
    )
    options = SweepOptions(executor="slurm", slurm=slurm, wait=False, progress=False)
    counts = sweep.run(options, echo=lambda s: None)
    script = (bin_dir / "script").read_text()
    for line in (
        "--partition=gpu",
        "--time=1560",  # 26 hours, in minutes
        "--gpus-per-node=1",
        "--cpus-per-task=4",
        "--account=hpd",
        "--array=0-1%1",  # one array job of both runs, one at a time
        "--reservation=r1",  # not a submitit parameter: passed to sbatch as is
        "--signal=USR2@",  # submitit's timeout signal: the runs are requeued, not lost
    ):
        assert f"#SBATCH {line}" in script
    ids = sorted(read_status(sweep.run_dir(s))["job_id"] for s in sweep.specs)
    assert ids == ["4242_0", "4242_1"]
    assert counts["queued"] == 2
    with pytest.raises(SweepError, match="--slurm-option: expected KEY=VALUE"):
        submitit_parameters(SlurmOptions(options=("account",)))
    with pytest.raises(SweepError, match="--time: expected minutes"):
        submitit_parameters(SlurmOptions(time="1:2:3:4"))


def _write_finished_run(sweep: Sweep, spec: RunSpec, test_error: float, state="done") -> None:
    run_dir = sweep.run_dir(spec)
    run_dir.mkdir(parents=True)
    rows = [
        {"epoch": 2, "split": "train", "error": 0.0},
        {"epoch": 2, "split": "test", "error": test_error},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / STATUS_FILE).write_text(json.dumps({"state": state, "attempts": []}))


def test_selection_takes_the_lowest_mean_error_and_the_smaller_rate_on_ties(tmp_path, seed):
    rng = np.random.default_rng(seed)
    grid = grid_of(
        datasets="mnist5k",
        nets="vgg",
        losses="mse,ce",
        lrs="0.3,0.1,0.2",
        seeds="0,1",
        train_args=TINY,
    )
    sweep = Sweep(tmp_path, grid)
    sweep.prepare()
    # Errors on a grid of 1/100, so that ties happen; for MSE 0.2 and 0.3 tie at the lowest
    # error (0.2 must win); for CE the rate 0.1 failed (its logged 0 must not count).
    errors = {s: float(rng.integers(1, 4)) / 100 for s in sweep.specs}
    for spec in sweep.specs:
        if spec.loss == "mse" and spec.lr in (0.2, 0.3):
            errors[spec] = 0.0
    for spec in sweep.specs:
        failed = spec.loss == "ce" and spec.lr == 0.1
        _write_finished_run(
            sweep, spec, 0.0 if failed else errors[spec], "failed" if failed else "done"
        )
    selection = sweep.select()
    assert json.loads((tmp_path / "selected.json").read_text()) == json.loads(json.dumps(selection))
    for entry in selection["selected"]:
        usable = [s for s in sweep.specs if s.loss == entry["loss"]]
        usable = [s for s in usable if not (s.loss == "ce" and s.lr == 0.1)]
        mean = {}
        for lr in {s.lr for s in usable}:
            values = [errors[s] for s in usable if s.lr == lr]
            mean[lr] = sum(values) / len(values)
        best = min(mean.values())
        assert entry["lr"] == min(lr for lr, v in mean.items() if v == best)
        assert entry["test_error"] == best
        assert entry["lrs_failed"] == ([0.1] if entry["loss"] == "ce" else [])
        if entry["loss"] == "mse":
            assert entry["lr"] == 0.2
        assert entry["runs"] == [
            RunSpec("mnist5k", "vgg11", entry["loss"], entry["lr"], s).name for s in (0, 1)
        ]


def test_time_left_is_the_mean_run_time_per_round_of_slots():
    progress = Progress(total=10, initial=1, slots=2, enabled=False)
    lines = []
    for k, seconds in enumerate((10.0, 20.0)):
        spec = RunSpec("mnist5k", "vgg11", "mse", 0.01, k)
        progress.finished(spec, {"state": "done", "seconds": seconds}, lines.append)
    # 7 runs left on 2 slots: 4 rounds of the mean 15 s.
    assert progress.estimate() == 60.0
    # Announced after the first: 8 left, 4 rounds of 10 s.
    assert "estimated time left: 40 s (from 1 finished run(s), 2 at a time)" in lines
    assert "done mnist5k-vgg11-mse-lr0.01-seed1: 20 s" in lines
    progress.finished(spec, {"state": "failed", "reason": "x"}, lines.append)
    assert progress.estimate() == 15.0 * 3  # failed runs count as finished, not as time


# ----------------------------------------------------------------------- real sweeps
def _grid_args(data_root: Path) -> list[str]:
    return [
        *("--datasets", "mnist5k,cifar10", "--nets", "vgg", "--losses", "mse,ce"),
        *("--lrs", "0.01,0.05", *TINY, "--data-root", str(data_root)),
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, np.random.default_rng(0))
    return root


def _sweep_command(out: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ncfast",
        "sweep",
        "--out",
        str(out),
        "--jobs",
        "2",
        "--no-progress",
        "--format",
        "png",
        *_grid_args(data_root),
        *extra,
    ]


def _done_runs(out: Path) -> list[Path]:
    runs = out / "runs"
    if not runs.is_dir():
        return []
    return [d for d in runs.iterdir() if read_status(d).get("state") == "done"]


def _training_pids(out: Path) -> list[int]:
    """The processes holding run directories' locks (training now)."""
    pids = []
    for run_dir in (out / "runs").iterdir() if (out / "runs").is_dir() else ():
        if in_use(run_dir):
            with contextlib.suppress(OSError, ValueError):
                pids.append(json.loads((run_dir / ".ncfast.lock").read_text())["pid"])
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return True


def _logged_final_test_error(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["epoch"] for r in rows)
    return next(r["error"] for r in rows if r["split"] == "test" and r["epoch"] == last)


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory, data_root):
    """The 8-run grid with --jobs 2: SIGKILL of the sweep once 2 runs are done, then the same
    command again. Returns (out, what was seen before the rerun)."""
    out = tmp_path_factory.mktemp("local") / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        _sweep_command(out, data_root),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    # Half-way: 2 runs done and another one training (its lock held by a live process).
    while first.poll() is None and time.time() < deadline:
        training = _training_pids(out)
        if len(_done_runs(out)) >= 2 and training:
            break
        time.sleep(0.05)
    assert first.poll() is None, first.stdout.read().decode()
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stdout.close()
    killed_at = time.time()
    # No orphans: the training children die with the sweep (PR_SET_PDEATHSIG), at once, not
    # when their runs end (a run takes seconds here). That includes a child the sweep started
    # between the snapshot above and the kill: wait for every lock holder, not only those.
    holders = set(training)
    while time.time() < killed_at + 2:
        holders.update(_training_pids(out))
        if not any(_alive(pid) for pid in holders):
            break
        time.sleep(0.01)
    orphans = [pid for pid in holders if _alive(pid)]
    done_before = {
        d.name: ((d / "checkpoint.pt").stat().st_mtime_ns, read_status(d)) for d in _done_runs(out)
    }
    busy_after_kill = [d.name for d in (out / "runs").iterdir() if in_use(d)]
    status_after_kill = CliRunner().invoke(main, ["sweep", "--status", str(out)]).output
    started = time.time()
    second = subprocess.run(
        _sweep_command(out, data_root),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seen = {
        "done_before": done_before,
        "busy_after_kill": busy_after_kill,
        "training_at_kill": training,
        "orphans": orphans,
        "status_after_kill": status_after_kill,
        "rerun": second,
        "rerun_seconds": time.time() - started,
    }
    return out, seen


@pytest.mark.slow
def test_killed_sweep_reruns_without_redoing_finished_runs(killed_and_rerun):
    out, seen = killed_and_rerun
    assert seen["training_at_kill"] and seen["orphans"] == []
    assert seen["busy_after_kill"] == []
    assert "running 0" in seen["status_after_kill"]
    assert f"done {len(seen['done_before'])}," in seen["status_after_kill"]
    rerun = seen["rerun"]
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(seen['done_before'])} done" in rerun.stdout
    statuses = {d.name: read_status(d) for d in (out / "runs").iterdir()}
    assert len(statuses) == 8 and all(s["state"] == "done" for s in statuses.values())
    for name, (mtime, status) in seen["done_before"].items():
        # Not trained again: the same checkpoint file, one attempt.
        assert (out / "runs" / name / "checkpoint.pt").stat().st_mtime_ns == mtime
        assert statuses[name]["attempts"] == status["attempts"]
        assert len(statuses[name]["attempts"]) == 1
    for name, status in statuses.items():
        if name in seen["done_before"]:
            continue
        # Killed mid-way (a second attempt, from its checkpoint if it had one) or not started.
        assert 1 <= len(status["attempts"]) <= 2
        if len(status["attempts"]) == 2:
            log = (out / "runs" / name / LOG_FILE).read_text()
            assert ("--resume" in log) == (status["attempts"][1]["from_epoch"] > 0)
    print(
        f"killed after {len(seen['done_before'])} runs; rerun {seen['rerun_seconds']:.0f} s; "
        f"resumed: {[n for n, s in statuses.items() if len(s['attempts']) == 2]}"
    )


@pytest.mark.slow
def test_selection_and_report_follow_the_logs(killed_and_rerun):
    out, _ = killed_and_rerun
    selection = json.loads((out / "selected.json").read_text())
    assert len(selection["selected"]) == 4  # 2 datasets × 1 network × 2 losses
    for entry in selection["selected"]:
        logged = {}
        for run_dir in (out / "runs").iterdir():
            config = json.loads((run_dir / "config.json").read_text())
            if (config["dataset"], config["net"], config["loss"]) == (
                entry["dataset"],
                entry["net"],
                entry["loss"],
            ):
                logged[config["lr"]] = _logged_final_test_error(run_dir)
        assert sorted(logged) == [0.01, 0.05]
        best = min(logged.values())
        assert entry["lr"] == min(lr for lr, e in logged.items() if e == best)
        assert entry["test_error"] == best
    report = out / "report"
    for name in ("table1.md", "table1.csv", "lr_sweep.png", "nc1.png", "error.png"):
        assert (report / name).is_file(), name
    table = (report / "table1.md").read_text()
    for entry in selection["selected"]:
        assert entry["runs"][0] in table


@pytest.mark.slow
def test_the_same_grid_through_submitits_local_executor(
    tmp_path, data_root, killed_and_rerun, monkeypatch
):
    pytest.importorskip("submitit")
    local_out, _ = killed_and_rerun
    # One thread per run, as the local executor's 2 slots on 2 cores: the same arithmetic.
    monkeypatch.setenv("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    args = _grid_args(data_root)
    grid = grid_of(datasets=args[1], nets=args[3], losses=args[5], lrs=args[7], train_args=args[8:])
    sweep = Sweep(tmp_path / "sweep", grid)
    lines = []
    options = SweepOptions(executor="submitit-local", slurm=SlurmOptions(time="10"), progress=False)
    counts = sweep.run(options, echo=lines.append)
    assert counts["done"] == 8, "\n".join(lines)
    selection = sweep.select()
    local = json.loads((local_out / "selected.json").read_text())
    assert [(e["lr"], e["test_error"]) for e in selection["selected"]] == [
        (e["lr"], e["test_error"]) for e in local["selected"]
    ]
    for spec in sweep.specs:  # every run logged what the local sweep's run logged
        assert _logged_final_test_error(sweep.run_dir(spec)) == _logged_final_test_error(
            local_out / "runs" / spec.name
        )
    assert any(line.startswith("submitted 8 runs to local") for line in lines)
    # A rerun submits nothing and waits for nothing.
    lines.clear()
    sweep.run(SweepOptions(executor="submitit-local", progress=False), echo=lines.append)
    assert "8 done, 0 failed, 0 running elsewhere, 0 to run" in lines[0]
    assert not any(line.startswith("submitted") for line in lines)


@pytest.mark.slow
def test_a_failed_run_is_recorded_with_its_reason_and_the_rest_finish(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        main,
        [
            *("sweep", "--out", str(out), "--datasets", "mnist5k", "--nets", "vgg"),
            *("--losses", "mse", "--lrs", "1e3,0.01", "--jobs", "2", "--no-progress"),
            *("--format", "png", *TINY),
        ],
    )
    assert result.exit_code == 0, result.output
    failed = read_status(out / "runs" / "mnist5k-vgg11-mse-lr1000-seed0")
    assert failed["state"] == "failed"
    assert failed["reason"].startswith("training diverged at epoch")
    assert "lower --lr (now 1000)" in failed["reason"]
    assert failed["attempts"][0]["returncode"] == 1
    assert read_status(out / "runs" / "mnist5k-vgg11-mse-lr0.01-seed0")["state"] == "done"
    assert "failed mnist5k-vgg11-mse-lr1000-seed0: training diverged" in result.output
    # The budget: the grid's size first, then the time left from the first finished run.
    assert result.output.startswith(
        "sweep: 2 runs (1 dataset × 1 network × 1 loss × 2 learning rates × 1 seed)"
    )
    # (0 s if the failed run ended first, else a round of the done run's time)
    estimate = r"estimated time left: \d+ s \(from 1 finished run\(s\), 2 at a time\)"
    assert re.search(estimate, result.output)
    selection = json.loads((out / "selected.json").read_text())
    (entry,) = selection["selected"]
    assert entry["lr"] == 0.01 and entry["lrs_failed"] == [1000.0]
    assert (out / "report" / "lr_sweep.png").is_file()
    status = CliRunner().invoke(main, ["sweep", "--status", str(out)]).output
    assert "done 1, running 0, failed 1, waiting 0" in status
    assert "failed mnist5k-vgg11-mse-lr1000-seed0: training diverged" in status
    # A rerun leaves the failed run alone (no second attempt) unless asked.
    again = CliRunner().invoke(main, ["sweep", "--out", str(out), "--no-progress", "--no-report"])
    assert again.exit_code == 0, again.output
    assert "1 done, 1 failed, 0 running elsewhere, 0 to run" in again.output
    assert len(read_status(out / "runs" / "mnist5k-vgg11-mse-lr1000-seed0")["attempts"]) == 1
    # The report alone, from what is on disk.
    (out / "selected.json").unlink()
    report = CliRunner().invoke(main, ["sweep", "--report", str(out), "--format", "png"])
    assert report.exit_code == 0, report.output
    assert "mnist5k vgg11 mse: lr 0.01 (test error" in report.output
    assert json.loads((out / "selected.json").read_text())["selected"][0]["lr"] == 0.01
    assert math.isclose(
        entry["test_error"],
        _logged_final_test_error(out / "runs" / "mnist5k-vgg11-mse-lr0.01-seed0"),
        rel_tol=0,
        abs_tol=0,
    )


@pytest.mark.slow
def test_a_job_stopped_at_its_time_limit_is_requeued_and_resumes(tmp_path):
    """Submitit's timeout signal (SIGUSR2, as Slurm sends before the time limit) to a job in
    the middle of its run: the run function stops ncfast train and requeues itself; the new
    attempt resumes from the checkpoint and finishes. With --checkpoint-every 2 the run trains
    in --stop-after segments (the first: epochs 1-2; the signal comes after epoch 1)."""
    pytest.importorskip("submitit")
    train_args = ["--epochs", "3", "--width", "0.0625", "--per-class", "3", "--device", "cpu"]
    grid = grid_of(datasets="mnist5k", nets="vgg", losses="mse", lrs="0.01", train_args=train_args)
    sweep = Sweep(tmp_path / "sweep", grid)
    options = SweepOptions(
        executor="submitit-local", wait=False, checkpoint_every=2, progress=False
    )
    sweep.run(options, echo=lambda s: None)
    (spec,) = sweep.specs
    run_dir = sweep.run_dir(spec)
    controller = int(read_status(run_dir)["job_id"])  # submitit's local job: a process
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoint.pt").is_file() and time.time() < deadline:
            time.sleep(0.05)
        first = read_status(run_dir)
        assert first["state"] == "started", first
        os.kill(first["attempts"][-1]["pid"], signal.SIGUSR2)
        while read_status(run_dir).get("state") not in ("done", "failed"):
            assert time.time() < deadline, read_status(run_dir)
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(controller, signal.SIGKILL)  # a job left running by a failure
    status = read_status(run_dir)
    log = (run_dir / LOG_FILE).read_text()
    assert status["state"] == "done", (status, log)
    assert len(status["attempts"]) == 2, status
    assert status["attempts"][0]["pid"] != status["attempts"][1]["pid"]
    assert status["attempts"][1]["from_epoch"] >= 1
    assert "--resume" in log and "--stop-after 2" in log
    assert _logged_final_test_error(run_dir) == status["test_error"]
