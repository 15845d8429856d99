"""Mutation guards of what a sweep knows of a run (ncfast/paper/sweep/status.py) and of its
layout (layout.py): fast, in-process tests that pin each answer exactly, so that a small change
of these modules fails here in seconds, before the slow sweeps of test_sweep.py. Run
directories are built in tmp_path in the real on-disk formats (metrics.jsonl records, an ncfast
checkpoint, the run directory's lock); the run function's guards are in
test_mutation_guards_sweep_run.py."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from ncfast.errors import NCFastError
from ncfast.paper.rundir import RunDirectory
from ncfast.paper.sweep import layout
from ncfast.paper.sweep.grid import RunSpec
from ncfast.paper.sweep.status import (
    checkpoint_epoch,
    failure_reason,
    final_test_error,
    in_use,
    job_alive,
    outcome_of,
    read_status,
    sweep_owner,
    sweep_wording,
    tail,
    write_status,
)
from tests.helpers.sweep_runs import finished_rows, write_checkpoint

SPEC = RunSpec("mnist5k", "vgg11", "mse", 0.01, 3)
RUN_NAME = "mnist5k-vgg11-mse-lr0.01-seed3"


# ------------------------------------------------------------------------ on-disk states
def write_metrics(run_dir: Path, rows: list[dict], tail_text: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail_text
    (run_dir / "metrics.jsonl").write_text(text)


# -------------------------------------------------------------------------------- layout
def test_the_layout_names_are_the_documented_ones():
    assert (layout.SWEEP_FILE, layout.SELECTED_FILE) == ("sweep.json", "selected.json")
    assert (layout.RUNS_DIR, layout.REPORT_DIR, layout.SLURM_DIR) == ("runs", "report", "slurm")
    assert (layout.STATUS_FILE, layout.LOG_FILE) == ("sweep_status.json", "sweep.log")
    assert (layout.FORMAT, layout.FORMATS) == (2, (1, 2))
    assert layout.STATES == ("done", "running", "failed", "queued", "waiting")
    assert layout.SHOWN_CHARS == 60
    assert issubclass(layout.SweepError, NCFastError) and issubclass(layout.SweepError, ValueError)


def test_now_is_local_time_to_the_second():
    before = time.strftime("%Y-%m-%d %H:%M:%S")
    stamp = layout.now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stamp), stamp
    assert before <= stamp <= time.strftime("%Y-%m-%d %H:%M:%S")


def test_shown_cuts_a_long_value_and_says_its_length():
    assert layout.shown("a" * 58) == repr("a" * 58)  # 60 characters: whole
    assert layout.shown("a" * 59) == "'" + "a" * 49 + "... (61 characters)"
    assert layout.shown([1]) == "[1]"


# ------------------------------------------------------------------------- read_status
def test_a_status_is_read_as_utf8_whatever_the_locale(tmp_path):
    """A run's reason with non-ASCII text reads back the same under an ASCII locale (C, with
    Python's UTF-8 mode and locale coercion off): the file is UTF-8, not the locale's."""
    (tmp_path / "sweep_status.json").write_text('{"reason": "é"}', encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = (
        "import sys; from ncfast.paper.sweep.status import read_status; "
        "print(ascii(read_status(sys.argv[1]).get('reason')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ascii("é")


def test_a_missing_or_unreadable_status_reads_as_empty(tmp_path):
    assert read_status(tmp_path / "none") == {}
    for raw in (b"{", b"[1, 2]", b'"done"', b"\xff\xfe{}", b"null"):
        (tmp_path / "sweep_status.json").write_bytes(raw)
        assert read_status(tmp_path) == {}, raw


def test_read_status_keeps_every_field_of_the_right_kind_and_drops_the_others(tmp_path):
    status = {
        "state": "done",
        "reason": 5,
        "note": "n",
        "started": "s",
        "finished": None,
        "job_id": 12,
        "cluster": "local",
        "folder": "f",
        "submit_host": "h",
        "submitted": "t",
        "test_error": 1,
        "attempts": [
            {"seconds": 1.5, "from_epoch": True, "pid": "x", "returncode": 2, "host": "h"},
            {"seconds": math.inf, "from_epoch": 3},
            7,
        ],
        "extra": [1],
    }
    write_status(tmp_path, status)
    read = read_status(tmp_path)
    assert read == {
        "extra": [1],
        "state": "done",
        "note": "n",
        "started": "s",
        "job_id": "12",
        "cluster": "local",
        "folder": "f",
        "submit_host": "h",
        "submitted": "t",
        "test_error": 1.0,
        "attempts": [{"seconds": 1.5, "returncode": 2, "host": "h"}, {"from_epoch": 3}],
    }
    assert type(read["test_error"]) is float


@pytest.mark.parametrize(
    ("status", "read"),
    [
        ({"job_id": True, "reason": 3, "state": ["done"]}, {"attempts": []}),
        ({"submitted": 1, "submit_host": None, "folder": 2, "cluster": 3}, {"attempts": []}),
        ({"job_id": "7_1", "finished": "f"}, {"job_id": "7_1", "finished": "f", "attempts": []}),
        ({"test_error": "x"}, {"attempts": []}),
        ({"test_error": True}, {"attempts": []}),
        ({"test_error": math.nan, "attempts": "x"}, {"attempts": []}),
        ({"test_error": 0.5, "attempts": {"seconds": 1}}, {"test_error": 0.5, "attempts": []}),
        ({"attempts": [{"seconds": 2, "pid": 9}]}, {"attempts": [{"seconds": 2, "pid": 9}]}),
        ({"attempts": [{"returncode": False}]}, {"attempts": [{}]}),
    ],
)
def test_read_status_field_by_field(tmp_path, status, read):
    (tmp_path / "sweep_status.json").write_text(json.dumps(status, allow_nan=True))
    assert read_status(tmp_path) == read


def test_write_status_writes_indented_json_in_the_status_file(tmp_path):
    write_status(tmp_path, {"state": "done", "attempts": [{"seconds": 1.0}]})
    text = (tmp_path / "sweep_status.json").read_text()
    assert text == json.dumps({"state": "done", "attempts": [{"seconds": 1.0}]}, indent=1) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep_status.json"]


# ------------------------------------------------------------------ lock, owner, job alive
@pytest.mark.parametrize("name", ["run", "a is in use by b; c"])
def test_in_use_and_the_sweeps_owner_follow_the_lock(tmp_path, name):
    run_dir = tmp_path / name
    assert in_use(run_dir) is False and sweep_owner(run_dir) is None
    lock = RunDirectory(run_dir, command="sweep").lock()
    try:
        assert in_use(run_dir) is True
        owner = sweep_owner(run_dir)
        assert owner.startswith(f"PID {os.getpid()} on {platform.node()} (ncfast sweep) since ")
        assert ";" not in owner and re.search(r"since \d{4}-\d\d-\d\d", owner), owner
    finally:
        lock.unlock()
    # The lock file a finished owner leaves is not a lock.
    assert in_use(run_dir) is False and sweep_owner(run_dir) is None


def stand_in_job(name: str = "submitit-job") -> subprocess.Popen:
    """A live process whose command line names submitit (as its local jobs' do)."""
    job = subprocess.Popen([name, "60"], executable="/bin/sleep")
    cmdline = Path(f"/proc/{job.pid}/cmdline")
    deadline = time.monotonic() + 10
    while name.encode() not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.001)  # until its exec is done
    return job


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_local_job_is_alive_only_as_a_live_submitit_process_of_this_host():
    here = {"cluster": "local", "submit_host": platform.node()}
    job = stand_in_job()
    try:
        assert job_alive({**here, "job_id": str(job.pid)}) is True
        assert job_alive({**here, "job_id": str(job.pid), "submit_host": "elsewhere"}) is False
    finally:
        job.kill()
        job.wait()
    assert job_alive({**here, "job_id": str(job.pid)}) is False  # ended
    other = stand_in_job("another-job")
    try:
        assert job_alive({**here, "job_id": str(other.pid)}) is False  # live, not submitit's
    finally:
        other.kill()
        other.wait()
    assert job_alive({**here, "job_id": str(os.getpid())}) is False
    for job_id in ("x", "", str(2**70)):
        assert job_alive({**here, "job_id": job_id}) is False
    assert job_alive(here) is False
    assert job_alive({}) is False


def test_a_slurm_job_is_alive_while_sacct_knows_it_unfinished(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text("#!/bin/sh\nexit 0\n")  # knows no job: still pending
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    status = {"job_id": "42_1", "cluster": "slurm", "folder": str(tmp_path)}
    assert job_alive(status) is True
    assert job_alive({"cluster": "slurm", "folder": str(tmp_path)}) is False
    monkeypatch.setitem(sys.modules, "submitit", None)  # no submitit: submit again
    assert job_alive(status) is False


def fake_sacct(bin_dir: Path, rows: str = "") -> None:
    """A ``sacct`` on PATH that answers ``rows`` (JobID|State|NodeList lines) to any query."""
    bin_dir.mkdir(exist_ok=True)
    answer = f"JobID|State|NodeList\n{rows}" if rows else ""
    (bin_dir / "sacct").write_text(f"#!/bin/sh\nprintf '{answer}'\n")
    (bin_dir / "sacct").chmod(0o755)


def test_a_slurm_job_whose_result_is_in_its_folder_is_done(tmp_path, monkeypatch):
    """submitit reads a job's result file in the status's folder (not the working directory),
    named by the status's job id: once it is there, the job is no longer alive."""
    pytest.importorskip("submitit")
    fake_sacct(tmp_path / "bin")  # knows no job: pending
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    folder = tmp_path / "jobs"
    folder.mkdir()
    status = {"job_id": "42_1", "cluster": "slurm", "folder": str(folder)}
    assert job_alive(status) is True
    (folder / "42_1_0_result.pkl").write_bytes(b"")
    assert job_alive(status) is False


def test_a_slurm_status_without_a_folder_looks_in_the_working_directory(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    fake_sacct(tmp_path / "bin")  # knows no job: pending
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    status = {"job_id": "42_1", "cluster": "slurm"}
    assert job_alive(status) is True
    (tmp_path / "42_1_0_result.pkl").write_bytes(b"")
    assert job_alive(status) is False


def test_a_slurm_jobs_state_is_asked_anew_each_time(tmp_path, monkeypatch):
    """submitit caches sacct's answers for minutes; the sweep forces a fresh one, so a job
    that just ended is seen ended."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    status = {"job_id": "4077", "cluster": "slurm", "folder": str(tmp_path)}
    fake_sacct(tmp_path / "bin", "4077|RUNNING|node1\n")
    assert job_alive(status) is True
    fake_sacct(tmp_path / "bin", "4077|COMPLETED|node1\n")
    assert job_alive(status) is False


# -------------------------------------------------------------- logs, checkpoint, outcome
def test_final_test_error_is_the_last_test_record_of_the_last_epoch(tmp_path):
    assert final_test_error(tmp_path, 2) is None  # no log
    rows = [
        {"epoch": 2, "split": "train", "error": 0.5},
        {"epoch": 1, "split": "test", "error": 0.3},
        {"epoch": 2, "split": "test", "error": 0.2},
        {"epoch": 2, "split": "test", "error": 0.125},  # a resumed run logged it again
        {"epoch": 3, "split": "train", "error": 0.75},
    ]
    write_metrics(tmp_path, rows)
    assert final_test_error(tmp_path, 2) == 0.125
    assert final_test_error(tmp_path, 1) == 0.3
    assert final_test_error(tmp_path, 3) is None  # only the train record
    assert final_test_error(tmp_path, 4) is None
    write_metrics(tmp_path, [{"epoch": 2, "split": "test", "error": 0}])
    assert type(final_test_error(tmp_path, 2)) is float
    write_metrics(tmp_path, [{"epoch": 2, "split": "test"}])  # no error measured
    assert final_test_error(tmp_path, 2) is None
    write_metrics(tmp_path, [])
    assert final_test_error(tmp_path, 2) is None  # an empty log


def test_a_half_written_last_line_is_skipped_silently_and_a_corrupt_log_is_no_result(tmp_path):
    write_metrics(tmp_path, finished_rows(2, 0.25), tail_text='{"epoch": 3, "spl')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert final_test_error(tmp_path, 2) == 0.25
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 2\n' + json.dumps(finished_rows(2)[1]))
    assert final_test_error(tmp_path, 2) is None


def test_checkpoint_epoch_reads_the_checkpoint(tmp_path):
    assert checkpoint_epoch(tmp_path) == 0
    write_checkpoint(tmp_path, 3)
    assert checkpoint_epoch(tmp_path) == 3
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(NCFastError, match="is corrupt or not a torch checkpoint"):
        checkpoint_epoch(tmp_path)


def test_outcome_of_a_status():
    status = {
        "state": "done",
        "reason": "r",
        "test_error": 0.5,
        "note": "n",
        "finished": "t",
        "job_id": "1",
        "attempts": [{"seconds": 2.0}, 3, {"from_epoch": 1}],
    }
    out = {"state": "done", "reason": "r", "test_error": 0.5, "note": "n", "attempts": 2}
    assert outcome_of(status) == out
    status["attempts"] = [{"seconds": 1.0}, 3, {"seconds": 4.5}]
    assert outcome_of(status) == {**out, "seconds": 4.5}
    assert outcome_of({"state": "failed"}) == {"state": "failed", "attempts": 0}
    assert outcome_of({}) == {"attempts": 0}


def test_tail_is_the_last_bytes_of_a_file(tmp_path):
    path = tmp_path / "log"
    assert tail(path) == ""
    path.write_bytes(b"x" * 10 + b"\xff" + b"y" * 8192)
    assert tail(path) == "y" * 8192
    assert tail(path, 8193) == "\ufffd" + "y" * 8192
    assert tail(path, 3) == "yyy"
    assert tail(path, 20000) == "x" * 10 + "\ufffd" + "y" * 8192


# ---------------------------------------------------------------------- failure reasons
@pytest.mark.parametrize(
    ("returncode", "log", "reason"),
    [
        (1, "a\nError: first\nb\nError: second\nlast\n", "second"),
        (1, "  spaced out  \n\n   \n", "spaced out"),
        (1, "Error:no space\n", "Error:no space"),
        (2, "", "the run's process exited with code 2"),
        (0, "", "the run's process exited with code 0"),
        (0, "\n \n", "the run's process exited with code 0"),
        (-9, "", "killed by SIGKILL (out of memory?)"),
        (-9, "epoch 1\n", "killed by SIGKILL (out of memory?); last output: epoch 1"),
        (-15, "Error: out: R is busy\n", "killed by SIGTERM; last output: R is busy"),
        (-200, "", "killed by signal 200"),
        (1, "Error: --resume: nothing; start it again with --overwrite\n", "nothing"),
    ],
)
def test_failure_reason(returncode, log, reason):
    assert failure_reason(returncode, log) == reason


@pytest.mark.parametrize(
    ("message", "worded"),
    [
        ("--resume: a; b", "a; b"),
        ("out: a", "a"),
        ("--out: a", "a"),
        ("keep --out in the first clause; b", "keep --out in the first clause; b"),
        ("a; replace it with --overwrite, or choose another --out; c", "a; c"),
        ("a; start with --resume", "a"),
        ("a; choose --out", "a"),
        ("a; set --overwrite", "a"),
        ("a; lower --lr (now 1) and start again with --overwrite; c", "a; lower --lr (now 1); c"),
        ("a; use --out x and y", "a"),
        ("a; b and c", "a; b and c"),
        ("a; lower --lr and --wd and start again with --overwrite", "a; lower --lr and --wd"),
        ("a; lower --lr and start again with --resume and --overwrite; c", "a; lower --lr; c"),
        ("a;b", "a;b"),
        ("", ""),
    ],
)
def test_sweep_wording_drops_the_advice_of_ncfast_train(message, worded):
    assert sweep_wording(message) == worded


def live_local_job(pid: int) -> dict:
    return {"cluster": "local", "submit_host": platform.node(), "job_id": str(pid)}


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_asking_whether_a_local_job_is_alive_sends_it_no_signal(monkeypatch):
    """The liveness probe is signal 0 (no signal sent), never one that would stop the job."""
    sent = []
    real_kill = os.kill

    def spy(pid, signal):
        sent.append(signal)
        return real_kill(pid, 0)

    job = stand_in_job()
    try:
        with monkeypatch.context() as patched:
            patched.setattr(os, "kill", spy)
            assert job_alive(live_local_job(job.pid)) is True
    finally:
        job.kill()
        job.wait()
    assert sent == [0]


def test_without_proc_a_live_pid_is_taken_as_a_live_job(monkeypatch):
    """No /proc (macOS): a live PID is all there is to go by; a dead one is still dead."""
    real_exists = Path.exists
    monkeypatch.setattr(
        Path, "exists", lambda self: not str(self).startswith("/proc/") and real_exists(self)
    )
    assert job_alive(live_local_job(os.getpid())) is True
    ended = subprocess.Popen(["sleep", "0"], executable="/bin/sleep")
    ended.wait()
    assert job_alive(live_local_job(ended.pid)) is False


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_job_whose_command_line_cannot_be_read_is_not_alive(monkeypatch):
    """The process ended between the probe and the read of /proc/PID/cmdline (or it is not
    readable): not taken as a live job, and no error."""
    real_read = Path.read_bytes

    def unreadable(self):
        if str(self).startswith("/proc/") and str(self).endswith("/cmdline"):
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_read(self)

    job = stand_in_job()
    monkeypatch.setattr(Path, "read_bytes", unreadable)
    try:
        assert job_alive(live_local_job(job.pid)) is False
    finally:
        job.kill()
        job.wait()
