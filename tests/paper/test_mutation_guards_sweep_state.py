"""Mutation guards of the sweep itself (ncfast/paper/sweep/sweep.py): the state of a run for
each state of its directory, the ``--status`` text, the run loop's decisions and printed
summary, and the selection. Run directories are built in tmp_path in the real on-disk
formats; runs 'train' through a stand-in for the child process (in-process, milliseconds)."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest

from ncfast.paper.checkpoint import save_checkpoint
from ncfast.paper.run_files import RUN_FORMAT
from ncfast.paper.rundir import RunDirectory
from ncfast.paper.sweep import Grid, Sweep, SweepOptions, TrainingRun
from ncfast.paper.sweep.status import in_use, read_status, write_status
from tests.helpers.checkpoint_payloads import valid_payload

QUIET = SweepOptions(progress=False)


def rows(epoch: int, error: float) -> str:
    records = [
        {"epoch": epoch, "split": "train", "error": 0.0},
        {"epoch": epoch, "split": "test", "error": error},
    ]
    return "".join(json.dumps(r) + "\n" for r in records)


def make_sweep(tmp_path: Path, lrs: str = "0.01,0.05", seeds: str = "0") -> Sweep:
    grid = Grid.from_options(
        "mnist5k", "vgg", "mse", lrs, seeds, train_options={"epochs": 2, "device": "cpu"}
    )
    return Sweep(tmp_path / "sweep", grid)


def run_dir_of(sweep: Sweep, k: int) -> Path:
    run_dir = sweep.run_dir(sweep.specs[k])
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@pytest.fixture
def stand_in_child(monkeypatch):
    """Each run 'trains' by logging a final test error of 0.25; returns the runs started."""
    started: list[str] = []

    def train(self, run_dir: Path, stop):
        started.append(self.spec.name)
        (run_dir / "metrics.jsonl").write_text(rows(self.epochs, 0.25))
        return 0

    monkeypatch.setattr(TrainingRun, "_train", train)
    return started


def test_the_state_of_each_run_directory(tmp_path):
    sweep = make_sweep(tmp_path, lrs="0.01,0.02,0.03,0.04,0.05,0.06,0.07,0.08")
    specs = sweep.specs
    # 0: no directory. 1: killed before its first checkpoint (config.json, an empty log).
    marker = {"format": RUN_FORMAT, "ncfast_version": "0.3.0"}
    (run_dir_of(sweep, 1) / "config.json").write_text(json.dumps(marker))
    (run_dir_of(sweep, 1) / "metrics.jsonl").write_text("")
    # 2: a checkpoint, a partial log. 3: finished, never recorded. 4: recorded done.
    save_checkpoint(run_dir_of(sweep, 2) / "checkpoint.pt", valid_payload(epoch=1))
    (run_dir_of(sweep, 2) / "metrics.jsonl").write_text(rows(1, 0.5))
    (run_dir_of(sweep, 3) / "metrics.jsonl").write_text(rows(2, 0.5))
    (run_dir_of(sweep, 4) / "metrics.jsonl").write_text(rows(2, 0.5))
    write_status(run_dir_of(sweep, 4), {"state": "done", "attempts": []})
    # 5: recorded failed (even with its final error logged). 6: says done, is not.
    (run_dir_of(sweep, 5) / "metrics.jsonl").write_text(rows(2, 0.5))
    write_status(run_dir_of(sweep, 5), {"state": "failed", "reason": "boom"})
    write_status(run_dir_of(sweep, 6), {"state": "done"})
    # 7: training now (its lock held).
    lock = RunDirectory(run_dir_of(sweep, 7)).lock()
    try:
        states = [sweep.state(s) for s in specs]
        assert states == [
            "waiting",
            "waiting",
            "waiting",
            "done",
            "done",
            "failed",
            "waiting",
            "running",
        ]
        assert sweep.mismatches == {
            specs[6].name: f"{specs[6].name}: sweep_status.json says done, but the run has not "
            "logged its test error of epoch 2; it runs again"
        }
        grouped = sweep.states()
        assert list(grouped) == ["done", "running", "failed", "queued", "waiting"]
        assert {k: [specs.index(s) for s in v] for k, v in grouped.items()} == {
            "done": [3, 4],
            "running": [7],
            "failed": [5],
            "queued": [],
            "waiting": [0, 1, 2, 6],
        }
        text = sweep.status_text()
    finally:
        lock.unlock()
    assert text.splitlines() == [
        f"{sweep.out}: 8 runs (1 dataset × 1 network × 1 loss × 8 learning rates × 1 seed)",
        "done 2, running 1, failed 1, waiting 4",
        "of the waiting: 0 queued (submitted jobs), 1 resume from a checkpoint",
        sweep.mismatches[specs[6].name],
        f"failed {specs[5].name}: boom",
    ]


def test_a_run_of_a_live_submitted_job_is_queued(tmp_path):
    sweep = make_sweep(tmp_path, lrs="0.01")
    (spec,) = sweep.specs
    job = subprocess.Popen(["submitit-job", "60"], executable="/bin/sleep")
    try:
        cmdline = Path(f"/proc/{job.pid}/cmdline")
        while b"submitit" not in cmdline.read_bytes():
            pass
        status = {"job_id": str(job.pid), "cluster": "local", "submit_host": platform.node()}
        for state, expected in (("submitted", "queued"), ("started", "queued"), ("x", "waiting")):
            write_status(run_dir_of(sweep, 0), {**status, "state": state})
            assert sweep.state(spec) == expected, state
        write_status(run_dir_of(sweep, 0), {**status, "state": "started"})
        assert sweep.status_text().splitlines()[1:] == [
            "done 0, running 0, failed 0, waiting 1",
            "of the waiting: 1 queued (submitted jobs), 0 resume from a checkpoint",
        ]
    finally:
        job.kill()
        job.wait()
    assert sweep.state(spec) == "waiting"


def test_the_status_text_of_a_sweep_in_progress_names_its_owner(tmp_path):
    sweep = make_sweep(tmp_path, lrs="0.01")
    sweep.prepare()
    lock = RunDirectory(sweep.out, command="sweep").lock()
    try:
        lines = sweep.status_text().splitlines()
    finally:
        lock.unlock()
    assert lines[1] == "done 0, running 0, failed 0, waiting 1"
    assert lines[2].startswith("a sweep is running in it: PID ") and len(lines) == 3


def test_the_run_loop_runs_what_is_waiting_and_prints_its_summary(tmp_path, stand_in_child):
    sweep = make_sweep(tmp_path, lrs="0.01,0.02,0.03,0.04")
    specs = sweep.specs
    (run_dir_of(sweep, 0) / "metrics.jsonl").write_text(rows(2, 0.5))
    write_status(run_dir_of(sweep, 0), {"state": "done", "attempts": []})
    write_status(run_dir_of(sweep, 1), {"state": "failed", "reason": "boom", "attempts": []})
    write_status(run_dir_of(sweep, 2), {"state": "done"})  # says done, is not
    lines: list[str] = []
    counts = sweep.run(QUIET, echo=lines.append)
    assert counts == {"done": 3, "running": 0, "failed": 1, "queued": 0, "waiting": 0}
    assert stand_in_child == [specs[2].name, specs[3].name]
    assert lines[0] == (
        f"status mismatch: {specs[2].name}: sweep_status.json says done, but the run has not "
        "logged its test error of epoch 2; it runs again"
    )
    assert lines[1] == (
        "sweep: 4 runs (1 dataset × 1 network × 1 loss × 4 learning rates × 1 seed): "
        "1 done, 1 failed, 0 running elsewhere, 2 to run"
    )
    assert json.loads((sweep.out / "sweep.json").read_text()) == sweep.grid.to_json()
    assert not in_use(sweep.out)  # the sweep's lock is released
    # Again, retrying the failed run: only it runs.
    lines.clear()
    counts = sweep.run(SweepOptions(progress=False, retry_failed=True), echo=lines.append)
    assert counts["done"] == 4 and stand_in_child[2:] == [specs[1].name]
    assert lines[0].endswith(": 3 done, 1 failed, 0 running elsewhere, 1 to run")
    assert read_status(sweep.run_dir(specs[1]))["test_error"] == 0.25


def test_the_selection_takes_the_lowest_mean_error_per_cell(tmp_path):
    sweep = make_sweep(tmp_path, lrs="0.01,0.02,0.03", seeds="0,1")
    errors = {(0.01, 0): 0.125, (0.01, 1): 0.375, (0.02, 0): 0.25, (0.03, 0): 0.375}
    for k, spec in enumerate(sweep.specs):
        run_dir = run_dir_of(sweep, k)
        if (spec.lr, spec.seed) in errors:
            (run_dir / "metrics.jsonl").write_text(rows(2, errors[spec.lr, spec.seed]))
        if (spec.lr, spec.seed) == (0.03, 0):
            write_status(run_dir, {"state": "done"})
        elif (spec.lr, spec.seed) == (0.03, 1):
            write_status(run_dir, {"state": "failed", "reason": "boom"})
    selection = sweep.select()
    assert selection == {
        "criterion": "lowest final test error (mean over seeds); ties: the smaller lr",
        "epochs": 2,
        "runs_done": 4,
        "runs_total": 6,
        "selected": [
            {
                "dataset": "mnist5k",
                "net": "vgg11",
                "loss": "mse",
                "lrs_finished": [0.01, 0.02, 0.03],
                "lrs_failed": [0.03],
                "lr": 0.01,  # ties with 0.02: the smaller rate
                "test_error": 0.25,
                "seeds": [0, 1],
                "runs": ["mnist5k-vgg11-mse-lr0.01-seed0", "mnist5k-vgg11-mse-lr0.01-seed1"],
                "test_error_by_lr": {"0.01": 0.25, "0.02": 0.25, "0.03": 0.375},
            }
        ],
    }
    assert json.loads((sweep.out / "selected.json").read_text()) == selection


def test_the_run_loop_counts_queued_and_locked_runs_as_running_elsewhere(tmp_path, stand_in_child):
    sweep = make_sweep(tmp_path, lrs="0.01,0.02,0.03")
    specs = sweep.specs
    job = subprocess.Popen(["submitit-job", "60"], executable="/bin/sleep")
    lock = None
    try:
        cmdline = Path(f"/proc/{job.pid}/cmdline")
        while b"submitit" not in cmdline.read_bytes():
            pass
        status = {"job_id": str(job.pid), "cluster": "local", "submit_host": platform.node()}
        write_status(run_dir_of(sweep, 0), {**status, "state": "submitted"})
        lock = RunDirectory(run_dir_of(sweep, 1), command="train").lock()
        lines: list[str] = []
        counts = sweep.run(QUIET, echo=lines.append)
    finally:
        if lock is not None:
            lock.unlock()
        job.kill()
        job.wait()
    assert lines[0].endswith(": 0 done, 0 failed, 2 running elsewhere, 1 to run")
    assert stand_in_child == [specs[2].name]
    assert counts == {"done": 1, "running": 1, "failed": 0, "queued": 1, "waiting": 0}


def test_the_selection_leaves_out_a_failed_run_that_logged_its_final_error(tmp_path):
    # A run that logged its last epoch's test error and then failed (e.g. killed while writing
    # its checkpoint) is failed: its error, the lowest here, is not selected.
    sweep = make_sweep(tmp_path, lrs="0.01,0.02")
    (run_dir_of(sweep, 0) / "metrics.jsonl").write_text(rows(2, 0.0625))
    write_status(run_dir_of(sweep, 0), {"state": "failed", "reason": "boom"})
    (run_dir_of(sweep, 1) / "metrics.jsonl").write_text(rows(2, 0.5))
    (entry,) = sweep.select()["selected"]
    assert (entry["lrs_finished"], entry["lrs_failed"]) == ([0.02], [0.01])
    assert (entry["lr"], entry["test_error"], entry["seeds"]) == (0.02, 0.5, [0])
