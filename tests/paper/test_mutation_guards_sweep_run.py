"""Mutation guards of a sweep's run function (ncfast/paper/sweep/run.py): what
:class:`TrainingRun` decides for each state of a run directory (skip, record as found, start,
restart over a run killed before its first checkpoint, resume, train in segments, record the
failure or the result), its child's command line, log and environment, and how it stops the
child. The child is replaced by a stand-in that writes what a run would (or, for the process
handling itself, by ``/bin/sh`` scripts of a few milliseconds): fast and in-process."""

from __future__ import annotations

import json
import os
import pickle
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ncfast.paper.rundir import RunDirectory
from ncfast.paper.sweep.grid import RunSpec
from ncfast.paper.sweep.run import TrainingRun, _exited, child_command
from ncfast.paper.sweep.status import read_status, write_status
from tests.helpers.sweep_runs import finished_rows, write_checkpoint, write_config

SPEC = RunSpec("mnist5k", "vgg11", "mse", 0.01, 3)
RUN_NAME = "mnist5k-vgg11-mse-lr0.01-seed3"


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


class StandInRun(TrainingRun):
    """A TrainingRun whose child process is a stand-in: each call records its stop epoch and
    the status then on disk, writes a checkpoint at the stop epoch (the run's end when None)
    and, at the end, the final test error; returns ``returncodes`` in turn (then 0)."""

    def __init__(self, *args, returncodes=(), log_final=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int | None, dict]] = []
        self.returncodes = list(returncodes)
        self.log_final = log_final

    def _train(self, run_dir: Path, stop):
        self.calls.append((stop, read_status(run_dir)))
        code = self.returncodes.pop(0) if self.returncodes else 0
        if code == 0:
            write_checkpoint(run_dir, self.epochs if stop is None else stop)
            if stop is None and self.log_final:
                write_metrics(run_dir, finished_rows(self.epochs, 0.375))
        return code


def stand_in(tmp_path: Path, epochs: int = 4, every=None, **kwargs) -> StandInRun:
    options = {"preset": None, "epochs": epochs, "width": 0.0625}
    return StandInRun(tmp_path, SPEC, options, epochs, every, {"X": "1"}, **kwargs)


def test_the_run_directory_and_the_arguments_of_a_training_run(tmp_path):
    run = TrainingRun(tmp_path, SPEC, {"epochs": 2}, 2)
    assert run.run_dir == tmp_path / "runs" / RUN_NAME
    assert (run.sweep_dir, run.epochs, run.checkpoint_every, run.env) == (
        str(tmp_path),
        2,
        None,
        {},
    )
    assert run._arguments() == {
        "sweep_dir": str(tmp_path),
        "spec": SPEC,
        "train_options": {"epochs": 2},
        "epochs": 2,
        "checkpoint_every": None,
        "env": {},
    }
    run = TrainingRun(tmp_path, SPEC, {"epochs": 2}, 2, 1, {"A": "b"})
    assert run._arguments()["checkpoint_every"] == 1 and run._arguments()["env"] == {"A": "b"}
    run._stopping = True
    run._process = subprocess.Popen(["true"])
    run._process.wait()
    copy = pickle.loads(pickle.dumps(run))
    assert copy._process is None and copy._stopping is False
    assert copy._arguments() == run._arguments()


def test_a_run_is_trained_to_its_end_and_recorded_done(tmp_path):
    run = stand_in(tmp_path)
    (run.run_dir).mkdir(parents=True)
    job = {"job_id": "7", "cluster": "slurm", "folder": "f", "submit_host": "h", "submitted": "t"}
    write_status(run.run_dir, {**job, "state": "submitted", "note": "n", "reason": "r"})
    outcome = run()
    seconds = read_status(run.run_dir)["attempts"][0]["seconds"]
    assert outcome == {"state": "done", "test_error": 0.375, "attempts": 1, "seconds": seconds}
    assert [stop for stop, _ in run.calls] == [None]
    # While it trains: the job's fields kept, state started, the attempt recorded.
    during = run.calls[0][1]
    assert during["state"] == "started"
    assert {k: during.pop(k) for k in job} == job  # the job's fields, and nothing else
    assert sorted(during) == ["attempts", "state"]
    (attempt,) = during["attempts"]
    assert attempt["host"] == platform.node() and attempt["pid"] == os.getpid()
    assert attempt["from_epoch"] == 0 and re.fullmatch(
        r"\d{4}-.* \d\d:\d\d:\d\d", attempt["started"]
    )
    status = read_status(run.run_dir)
    assert status["state"] == "done" and status["test_error"] == 0.375
    assert "job_id" not in status and "reason" not in status and "note" not in status
    assert status["attempts"][0]["returncode"] == 0
    assert 0 <= status["attempts"][0]["seconds"] < 60
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", status["finished"])


@pytest.mark.parametrize(
    ("epochs", "every", "first", "stops"),
    [
        (5, 2, 0, [2, 4, None]),
        (4, 2, 0, [2, None]),
        (4, None, 0, [None]),
        (4, 3, 0, [3, None]),
        (4, 1, 2, [3, None]),
        (4, 5, 0, [None]),
    ],
)
def test_checkpoint_every_trains_in_segments(tmp_path, epochs, every, first, stops):
    run = stand_in(tmp_path, epochs, every)
    if first:
        write_checkpoint(run.run_dir, first)
    assert run()["state"] == "done"
    assert [stop for stop, _ in run.calls] == stops
    assert read_status(run.run_dir)["attempts"][0]["from_epoch"] == first


def test_a_finished_run_is_recorded_without_training(tmp_path):
    run = stand_in(tmp_path)
    write_metrics(run.run_dir, finished_rows(4, 0.5))
    write_status(run.run_dir, {"state": "failed", "reason": "old", "attempts": [{"seconds": 1}]})
    assert run() == {
        "state": "done",
        "test_error": 0.5,
        "note": "found finished",
        "attempts": 1,
        "seconds": 1,
    }
    assert run.calls == []
    status = read_status(run.run_dir)
    assert "reason" not in status and status["note"] == "found finished"


def test_a_run_another_process_trains_is_skipped_untouched(tmp_path):
    run = stand_in(tmp_path)
    lock = RunDirectory(run.run_dir).lock()
    try:
        assert run() == {"state": "skipped", "reason": "another process is training it"}
    finally:
        lock.unlock()
    assert run.calls == [] and read_status(run.run_dir) == {}


def test_a_failed_process_is_recorded_failed_with_the_reason_of_its_log(tmp_path):
    run = stand_in(tmp_path, returncodes=[3])
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "sweep.log").write_text("epoch 1\nError: out of patience\n")
    write_status(run.run_dir, {"attempts": [{"seconds": 9.0}], "job_id": "5", "note": "x"})
    outcome = run()
    assert outcome["state"] == "failed" and outcome["reason"] == "out of patience"
    assert outcome["attempts"] == 2 and outcome["seconds"] >= 0
    status = read_status(run.run_dir)
    assert status["reason"] == "out of patience" and status["attempts"][1]["returncode"] == 3
    assert "job_id" not in status and "note" not in status and "test_error" not in status
    assert len(run.calls) == 1


def test_a_failed_segment_stops_the_run(tmp_path):
    run = stand_in(tmp_path, 6, 2, returncodes=[0, -9])
    assert run() == {
        "state": "failed",
        "reason": "killed by SIGKILL (out of memory?)",
        "attempts": 1,
        "seconds": read_status(run.run_dir)["attempts"][0]["seconds"],
    }
    assert [stop for stop, _ in run.calls] == [2, 4]
    assert read_status(run.run_dir)["attempts"][0]["returncode"] == -9


def test_a_failed_process_whose_run_was_taken_over_is_skipped(tmp_path):
    run = stand_in(tmp_path, returncodes=[1])
    holder: list[RunDirectory] = []

    def train(run_dir, stop):
        holder.append(RunDirectory(run_dir).lock())  # another process took the run over
        return 1

    run._train = train
    try:
        assert run() == {"state": "skipped", "reason": "another process is training it"}
        assert read_status(run.run_dir)["state"] == "started"
    finally:
        holder[0].unlock()


def test_a_run_that_ends_without_its_final_test_error_fails(tmp_path):
    run = stand_in(tmp_path, log_final=False)
    outcome = run()
    reason = "the run ended without a test measurement at epoch 4"
    assert (outcome["state"], outcome["reason"]) == ("failed", reason)
    assert read_status(run.run_dir)["reason"] == reason


@pytest.mark.parametrize("returncode", [None, 0, 1])
def test_a_run_the_sweep_stopped_is_interrupted_and_not_recorded(tmp_path, returncode):
    run = stand_in(tmp_path)

    def train(run_dir, stop):
        if returncode is not None:
            run._stopping = True
        return returncode

    run._train = train
    assert run() == {"state": "interrupted"}
    assert read_status(run.run_dir)["state"] == "started"


def test_an_unusable_checkpoint_fails_the_run_with_advice(tmp_path):
    run = stand_in(tmp_path)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    write_status(run.run_dir, {"attempts": [{"seconds": 1.0}], "job_id": "3"})
    outcome = run()
    path = run.run_dir / "checkpoint.pt"
    assert outcome["state"] == "failed" and outcome["attempts"] == 1
    assert outcome["reason"].startswith(f"checkpoint {path} is corrupt or not a torch checkpoint")
    assert outcome["reason"].endswith(
        "; delete the run's checkpoint.pt to train it from the start (then rerun the sweep "
        "with --retry-failed)"
    )
    status = read_status(run.run_dir)
    assert status["state"] == "failed" and status["reason"] == outcome["reason"]
    assert "job_id" not in status and run.calls == []


def test_the_childs_command_resumes_restarts_or_starts(tmp_path):
    run = TrainingRun(tmp_path, SPEC, {"preset": None, "epochs": 4}, 4)
    run_dir = run.run_dir
    run_dir.mkdir(parents=True)
    options = {
        "preset": None,
        "epochs": 4,
        "dataset": "mnist5k",
        "net": "vgg11",
        "loss": "mse",
        "lr": 0.01,
        "seed": 3,
    }
    head = [sys.executable, "-m", "ncfast.paper.run_one", "--out", str(run_dir)]
    assert run.command(run_dir, None) == [*head, json.dumps(options)]
    assert run.command(run_dir, 2) == [*head, "--stop-after", "2", json.dumps(options)]
    # Issue 21 (4): killed before its first checkpoint (config.json, an empty log): started over.
    write_config(run_dir)
    (run_dir / "metrics.jsonl").write_text("")
    assert run.command(run_dir, None) == [*head, "--overwrite", json.dumps(options)]
    write_checkpoint(run_dir, 1)
    assert run.command(run_dir, 3) == [*head, "--resume", "--stop-after", "3", json.dumps(options)]
    # The grid's coordinates win over the options.
    run = TrainingRun(tmp_path, SPEC, {"lr": 9.0, "seed": 0}, 4)
    assert json.loads(run.command(run_dir, None)[-1])["lr"] == 0.01


def test_a_run_killed_before_its_first_checkpoint_is_restarted_not_failed(tmp_path):
    """Issue 21 (4): config.json, an empty log, no checkpoint: the run is trained again from
    the start (--overwrite), and recorded done."""
    run = stand_in(tmp_path)
    write_config(run.run_dir)
    (run.run_dir / "metrics.jsonl").write_text("")
    commands = []
    train = run._train

    def recorded(run_dir, stop):
        commands.append(run.command(run_dir, stop))
        return train(run_dir, stop)

    run._train = recorded
    assert run()["state"] == "done"
    assert "--overwrite" in commands[0] and "--resume" not in commands[0]
    assert read_status(run.run_dir)["attempts"][0]["from_epoch"] == 0


def test_the_child_dies_with_the_sweep_on_linux():
    if sys.platform.startswith("linux"):
        command = child_command(["a", "b"])
        assert command[:2] == [sys.executable, "-c"] and command[3:] == [str(os.getpid()), "a", "b"]
        assert "prctl(1, signal.SIGKILL)" in command[2]
    else:
        assert child_command(["a", "b"]) == ["a", "b"]


# ------------------------------------------------------------- the child process itself
def shell_run(tmp_path: Path, script: str, env=None) -> TrainingRun:
    """A TrainingRun whose child is ``/bin/sh -c script``."""
    run = TrainingRun(tmp_path, SPEC, {}, 4, env=env)
    run.command = lambda run_dir, stop: ["/bin/sh", "-c", script]  # type: ignore[method-assign]
    run.run_dir.mkdir(parents=True)
    return run


def test_the_child_logs_to_the_sweep_log_with_its_environment(tmp_path):
    run = shell_run(tmp_path, 'echo "var=$GUARD_VAR"; echo oops >&2; exit 3', {"GUARD_VAR": "v"})
    (run.run_dir / "sweep.log").write_text("before\n")
    assert run._train(run.run_dir, None) == 3
    log = (run.run_dir / "sweep.log").read_text()
    header, rest = log.split("] ", 1)
    assert header.startswith("before\n\n[") and re.fullmatch(r"before\n\n\[\d{4}.*\d\d", header)
    assert rest == 'echo "var=$GUARD_VAR"; echo oops >&2; exit 3\nvar=v\noops\n'
    assert run._process is not None and run._process.returncode == 3


def test_a_stopping_run_starts_no_child(tmp_path):
    run = shell_run(tmp_path, "touch started")
    run.stop()
    assert run._stopping is True
    assert run._train(run.run_dir, None) is None
    assert run._process is None and not (run.run_dir / "started").exists()


def test_stop_terminates_then_kills_the_child(tmp_path):
    run = shell_run(tmp_path, "exec sleep 60")
    run._process = subprocess.Popen(["sleep", "60"])
    started = time.monotonic()
    run.stop(grace_s=30)
    assert time.monotonic() - started < 10
    assert run._process.wait() == -signal.SIGTERM
    # A child that ignores SIGTERM is killed after the grace period.
    run._process = subprocess.Popen(["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.01; done"])
    time.sleep(0.2)  # its trap is set
    started = time.monotonic()
    run.stop(grace_s=0.3)
    assert 0.3 <= time.monotonic() - started < 10
    assert run._process.wait() == -signal.SIGKILL
    run.stop()  # an exited child: nothing to do
    assert run._stopping is True


def test_stop_of_a_child_reaped_elsewhere_returns_at_once(tmp_path):
    """A child reaped behind Popen's back (its returncode still None) and gone before the
    signal: stop neither raises (ProcessLookupError) nor waits (the wait asks the system,
    which says there is no such child any more)."""
    run = shell_run(tmp_path, "true")
    child = subprocess.Popen(["true"])
    os.waitpid(child.pid, 0)
    assert _exited(child.pid) is True

    def gone() -> None:
        raise ProcessLookupError(child.pid)

    child.terminate = child.kill = gone  # what signalling a reaped pid raises
    run._process = child
    outcome: list[object] = []

    def stop() -> None:
        try:
            run.stop(grace_s=30)
            outcome.append("returned")
        except BaseException as exc:  # reported by the assertion below
            outcome.append(exc)

    worker = threading.Thread(target=stop, daemon=True)  # a hang must fail, not block pytest
    worker.start()
    worker.join(timeout=10)
    child.returncode = 0  # Popen would otherwise warn that it is still running
    assert outcome == ["returned"]


def test_the_checkpoint_hook_stops_the_child_and_requeues_the_same_run(tmp_path):
    pytest.importorskip("submitit")
    run = TrainingRun(tmp_path, SPEC, {"epochs": 2}, 2, 1, {"A": "b"})
    run._process = subprocess.Popen(["sleep", "60"])
    delayed = run.checkpoint()
    assert run._process.wait() == -signal.SIGTERM and run._stopping is True
    again = delayed.function
    assert isinstance(again, TrainingRun) and again is not run
    assert again._arguments() == run._arguments() and again._stopping is False
