"""``ncfast sweep`` trusts no state file (issue 19: 10, 11, 12, 13, 16, 19; issue 21: 4).

The runs here are trained by a stand-in for the child process (``TrainingRun._train`` replaced:
it logs a final test error and exits 0), so the sweep's own decisions are tested in seconds and
deterministically; one test trains a real run in this process, through the child's entry point
(:mod:`ncfast.paper.run_one`), from the state a run killed before its first checkpoint leaves.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ncfast
from ncfast.cli import main
from ncfast.cli.sweep import read_train_args
from ncfast.paper import run_one
from ncfast.paper.rundir import RUN_FORMAT
from ncfast.paper.sweep import (
    STATUS_FILE,
    SWEEP_FILE,
    Grid,
    Sweep,
    SweepError,
    SweepOptions,
    TrainingRun,
    failure_reason,
    parse_lrs,
    read_status,
)
from ncfast.paper.sweep.layout import SHOWN_CHARS

TINY = ("--epochs", "2", "--width", "0.0625", "--per-class", "3", "--device", "cpu")
QUIET = SweepOptions(progress=False)


def tiny_grid(lrs: str = "0.01,0.05") -> Grid:
    _, options = read_train_args(TINY)
    return Grid.from_options(
        datasets="mnist5k", nets="vgg", losses="mse", lrs=lrs, train_options=options
    )


@pytest.fixture
def stand_in_child(monkeypatch):
    """Each run 'trains' by logging a final test error of 0.25; returns the runs started."""
    started: list[str] = []

    def train(self, run_dir: Path, stop):
        started.append(self.spec.name)
        rows = [
            {"epoch": self.epochs, "split": "train", "error": 0.0},
            {"epoch": self.epochs, "split": "test", "error": 0.25},
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0

    monkeypatch.setattr(TrainingRun, "_train", train)
    return started


def cli(*args: str):
    return CliRunner().invoke(main, ["sweep", *args])


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


# ------------------------------------------------------ 10: status against the run's files
def test_a_status_that_says_done_without_the_run_is_rerun_and_reported(tmp_path, stand_in_child):
    sweep = Sweep(tmp_path, tiny_grid())
    sweep.prepare()
    edited = sweep.specs[0]
    sweep.run_dir(edited).mkdir(parents=True)
    (sweep.run_dir(edited) / STATUS_FILE).write_text('{"state": "done", "attempts": []}')
    assert sweep.state(edited) == "waiting"
    assert "sweep_status.json says done" in sweep.status_text()
    lines: list[str] = []
    counts = sweep.run(QUIET, echo=lines.append)
    assert any(line.startswith(f"status mismatch: {edited.name}") for line in lines), lines
    assert edited.name in stand_in_child  # trained, not skipped
    assert counts["done"] == 2
    assert read_status(sweep.run_dir(edited))["test_error"] == 0.25
    # Its learning rate is in the selection again.
    (entry,) = sweep.select()["selected"]
    assert entry["lrs_finished"] == [0.01, 0.05]


def _status_naming_job(run_dir: Path, pid: int) -> None:
    run_dir.mkdir(parents=True)
    status = {
        "state": "started",
        "attempts": [],
        "job_id": str(pid),
        "cluster": "local",
        "submit_host": platform.node(),
    }
    (run_dir / STATUS_FILE).write_text(json.dumps(status))


def test_a_live_pid_that_is_no_submitit_job_does_not_keep_a_run_queued(tmp_path):
    sweep = Sweep(tmp_path, tiny_grid())
    sweep.prepare()
    first, second = sweep.specs
    # This process: alive, and not a job of submitit's local executor.
    _status_naming_job(sweep.run_dir(first), os.getpid())
    # A live process that is one (its command line names submitit, as its jobs' do).
    job = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "submitit.local._local"]
    )
    try:
        cmdline = Path(f"/proc/{job.pid}/cmdline")
        while b"submitit" not in cmdline.read_bytes():  # until its exec is done
            assert job.poll() is None
        _status_naming_job(sweep.run_dir(second), job.pid)
        assert sweep.state(first) == "waiting"
        assert sweep.state(second) == "queued"
        assert "1 queued (submitted jobs)" in sweep.status_text()
    finally:
        job.kill()
        job.wait()
    assert sweep.state(second) == "waiting"  # its job has ended


# --------------------------------------------------------------- 11: sweep.json read back
def _write_sweep_json(out: Path, **changes) -> None:
    values = {**tiny_grid().to_json(), **changes}
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_FILE).write_text(json.dumps(values))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"datasets": []}, "datasets: expected a non-empty list, got []"),
        ({"nets": [None]}, "nets: expected a list of names, got [None]"),
        ({"datasets": "mnist5k"}, "datasets: expected a non-empty list, got 'mnist5k'"),
        ({"losses": ["mse", "hinge"]}, "losses: unknown 'hinge'"),
        ({"lrs": [0.1, "x"]}, "lrs: 'x' is not a number"),
        ({"lrs": [True]}, "lrs: True is not a number"),
        ({"seeds": [-1]}, "seeds: expected whole numbers"),
        ({"seeds": [1.5]}, "seeds: expected whole numbers"),
        ({"train_options": {"lr": 0.1}}, "train_options --lr: the grid sets it"),
        ({"train_options": {"bogus": 1}}, "train_options: unknown option 'bogus'"),
        ({"train_options": {"epochs": "x"}}, "train option --epochs: a whole number"),
        ({"train_options": [1]}, "train_options: expected an object"),
        ({"train_preset": "nope"}, "train_options --preset: one of"),
        ({"train_preset": []}, "train_options --preset: one of"),
        ({"format": 3}, "not a sweep grid of format 2"),
    ],
)
def test_a_bad_sweep_json_is_one_line_naming_the_field(tmp_path, changes, message):
    _write_sweep_json(tmp_path, **changes)
    with pytest.raises(SweepError, match="^" + str(tmp_path / SWEEP_FILE).replace("/", ".")):
        Sweep(tmp_path).status_text()
    with pytest.raises(SweepError) as caught:
        Sweep(tmp_path).status_text()
    assert message in str(caught.value)
    line = one_line_error(cli("--status", str(tmp_path)))
    assert message in line
    assert "--out" not in line  # (19) the user gave --status


def test_a_sweep_json_of_format_1_is_read_through_the_command_lines_parser(tmp_path):
    values = {**tiny_grid().to_json(), "format": 1, "train_args": list(TINY)}
    del values["train_options"], values["train_preset"]
    (tmp_path / SWEEP_FILE).write_text(json.dumps(values))
    with pytest.raises(SweepError, match="format 1 stores the runs' options as `ncfast train`"):
        Sweep(tmp_path)
    assert Sweep(tmp_path, read_train_args=read_train_args).grid == tiny_grid()
    result = cli("--status", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "done 0, running 0, failed 0, waiting 2" in result.output


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
GRID_KEYS = ("format", "datasets", "nets", "losses", "lrs", "seeds", "train_preset")
STATUS_KEYS = ("state", "attempts", "job_id", "cluster", "submit_host", "reason", "test_error")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grid=st.dictionaries(st.sampled_from(GRID_KEYS), JSON, max_size=3),
    status=st.one_of(
        JSON,
        st.dictionaries(
            st.sampled_from(STATUS_KEYS),
            JSON | st.lists(st.dictionaries(st.sampled_from(["seconds", "pid"]), JSON)),
            max_size=4,
        ),
    ),
    raw=st.sampled_from([None, b"", b"{", b"\xff\xfe", b"[1, 2]"]),
)
def test_fuzzed_sweep_and_status_files_give_one_line_or_are_repaired(grid, status, raw):
    """Any sweep.json is a SweepError of one line or a grid; any sweep_status.json is read
    (its fields of the wrong kind left out: the documented repair); never a traceback."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        _write_sweep_json(out, **grid)
        run_dir = out / "runs" / tiny_grid().runs()[0].name
        run_dir.mkdir(parents=True)
        status_path = run_dir / STATUS_FILE
        if raw is None:
            status_path.write_text(json.dumps(status))
        else:
            status_path.write_bytes(raw)
        try:
            sweep = Sweep(out)
            text = sweep.status_text()
        except SweepError as exc:
            assert "\n" not in str(exc)
            return
        assert "runs (" in text
        read = read_status(run_dir)
        assert isinstance(read.get("attempts", []), list)
        sweep.select()  # the selection reads the same files


@pytest.mark.parametrize(
    "status",
    [
        {"state": "started", "job_id": [1], "cluster": "local"},
        {"state": "started", "job_id": "x", "cluster": "local"},
        {"state": ["done"]},
        {"state": "done", "test_error": "x"},
        {"attempts": 5},
        {"attempts": [{"seconds": "x", "pid": None}, 3]},
    ],
)
def test_a_status_field_of_the_wrong_kind_is_left_out(tmp_path, status, stand_in_child):
    """The documented repair: a field of the wrong kind reads as missing, and the run goes
    on from what its files say (here: nothing yet, so it runs)."""
    sweep = Sweep(tmp_path, tiny_grid(lrs="0.01"))
    (spec,) = sweep.specs
    sweep.run_dir(spec).mkdir(parents=True)
    status = {**status, "submit_host": platform.node()}
    (sweep.run_dir(spec) / STATUS_FILE).write_text(json.dumps(status))
    read = read_status(sweep.run_dir(spec))
    assert all(k not in read or isinstance(read[k], str) for k in ("state", "job_id"))
    assert sweep.state(spec) == "waiting"
    lines: list[str] = []
    assert sweep.run(QUIET, echo=lines.append)["done"] == 1, lines
    attempts = read_status(sweep.run_dir(spec))["attempts"]
    assert all(isinstance(a.get("seconds", 0.0), float) for a in attempts)


# ---------------------------------------------------- 12: a corrupt checkpoint, one failure
def test_a_corrupt_checkpoint_fails_its_run_and_the_others_run(tmp_path, stand_in_child):
    sweep = Sweep(tmp_path, tiny_grid())
    broken, fine = sweep.specs
    sweep.run_dir(broken).mkdir(parents=True)
    (sweep.run_dir(broken) / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    lines: list[str] = []
    counts = sweep.run(QUIET, echo=lines.append)
    assert counts["done"] == 1 and counts["failed"] == 1
    assert stand_in_child == [fine.name]
    reason = read_status(sweep.run_dir(broken))["reason"]
    assert reason.startswith(f"checkpoint {sweep.run_dir(broken) / 'checkpoint.pt'} is corrupt")
    assert reason.endswith("(then rerun the sweep with --retry-failed)")
    assert any(line.startswith(f"failed {broken.name}: checkpoint") for line in lines), lines


# -------------------------------------------------------------- 13: counts bounded, short
def test_a_logspace_too_long_to_run_is_refused_at_once_in_one_short_line():
    with pytest.raises(SweepError, match=r"N must be a whole number in 1\.\.1000") as caught:
        parse_lrs("logspace:1e-4,0.25,100000000")
    huge = "9" * 100_000
    with pytest.raises(SweepError) as caught:
        parse_lrs(f"logspace:1e-4,0.25,{huge}")
    assert len(str(caught.value)) < 2 * SHOWN_CHARS + 60
    with pytest.raises(SweepError) as caught:
        parse_lrs(f"0.1,{'x' * 100_000}")
    assert len(str(caught.value)) < 3 * SHOWN_CHARS + 60
    assert len(parse_lrs("logspace:1e-4,0.25,1000")) == 1000
    with pytest.raises(SweepError, match=r"N must be a whole number in 1\.\.1000, got '1001'"):
        parse_lrs("logspace:1e-4,0.25,1001")


def test_a_grid_of_more_runs_than_can_run_is_refused():
    seeds = ",".join(str(k) for k in range(200))
    with pytest.raises(SweepError, match="the grid has 200000 runs, more than a sweep can run"):
        Grid.from_options(
            datasets="mnist5k",
            nets="vgg11",
            losses="mse",
            lrs="logspace:0.01,0.1,1000",
            seeds=seeds,
        )


# --------------------------------------------------------- 16: every option before writing
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--jobs", "0"), "--jobs: must be ≥ 1, got 0"),
        (("--runs-per-gpu", "0"), "--runs-per-gpu: must be ≥ 1"),
        (("--checkpoint-every", "0"), "--checkpoint-every: must be ≥ 1"),
        (("--gpus", "0,,1"), "--gpus: expected a comma-separated list"),
        (("--executor", "slurm", "--time", "1:2:3:4"), "--time: expected minutes"),
        (("--executor", "slurm", "--slurm-option", "account"), "--slurm-option: expected KEY"),
        (("--executor", "slurm", "--cpus-per-run", "0"), "--cpus-per-run: must be ≥ 1"),
        (("--executor", "slurm", "--mem-gb", "nan"), "--mem-gb: must be finite"),
    ],
)
def test_a_refused_option_writes_nothing(tmp_path, options, message, stand_in_child):
    out = tmp_path / "sweep"
    grid = ("--datasets", "mnist5k", "--nets", "vgg", "--losses", "mse", "--lrs", "0.01")
    line = one_line_error(cli("--out", str(out), *grid, *options, *TINY))
    assert message in line
    assert not out.exists()
    assert stand_in_child == []
    # The corrected command is not refused as "another grid": it runs.
    result = cli("--out", str(out), *grid, "--no-progress", "--no-report", *TINY)
    assert result.exit_code == 0, result.output
    assert stand_in_child == ["mnist5k-vgg11-mse-lr0.01-seed0"]


# ------------------------------------------------------------------ 19: the sweep's words
def test_a_run_folder_is_not_a_sweep_folder(tmp_path, stand_in_child):
    run = tmp_path / "run"
    run.mkdir()
    # What ncfast train writes first: config.json with ncfast's marker (rundir.run_marker).
    marker = {"format": RUN_FORMAT, "ncfast_version": ncfast.__version__}
    (run / "config.json").write_text(json.dumps(marker))
    (run / "metrics.jsonl").write_text("")
    before = sorted(p.name for p in run.iterdir())
    grid = ("--datasets", "mnist5k", "--nets", "vgg", "--losses", "mse", "--lrs", "0.01")
    line = one_line_error(cli("--out", str(run), *grid, *TINY))
    assert f"--out: {run} holds a training run" in line
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written
    assert stand_in_child == []
    line = one_line_error(cli("--status", str(run)))
    assert f"--status: {run} holds a training run" in line


def test_status_errors_name_the_status_option(tmp_path):
    line = one_line_error(cli("--status", str(tmp_path / "none")))
    assert "--status:" in line and "--out" not in line and "give the grid" not in line
    line = one_line_error(cli("--report", str(tmp_path / "none")))
    assert "--report:" in line and "--out" not in line


@pytest.mark.parametrize(
    "error",
    [
        "out: R already holds a run that stopped before its first checkpoint (nothing to "
        "resume); replace it with --overwrite, or choose another --out",
        "--resume: the run in R stopped before its first checkpoint, so there is nothing to "
        "resume; start it again with --overwrite",
        "out: R is in use by PID 7 on h since t; wait for that run to end, or choose another --out",
        "training diverged in R at epoch 2 (loss nan); lower --lr (now 1000) and start again "
        "with --overwrite; the checkpoint of epoch 1 is kept",
    ],
)
def test_a_failed_runs_reason_gives_no_advice_of_ncfast_train(error):
    # (and keeps the advice a sweep's user can act on, see test_sweep's failed run)
    reason = failure_reason(1, f"[t] ncfast.paper.run_one --out R {{}}\nError: {error}\n")
    for word in ("--overwrite", "--resume", "--out"):
        assert word not in reason
    assert " R " in f" {reason}" and reason == reason.strip("; ")
    if "diverged" in error:
        assert reason.endswith("; lower --lr (now 1000); the checkpoint of epoch 1 is kept")


# ------------------------------------- 21.4: killed before the first checkpoint: restarted
def test_a_run_killed_before_its_first_checkpoint_is_started_again(tmp_path, monkeypatch):
    """The state such a kill leaves (config.json and an empty log, no checkpoint) is made by
    ncfast itself, deterministically: training is interrupted at the first epoch. The sweep
    then starts the run over (``--overwrite``) and it finishes; it is not recorded as failed."""
    import ncfast.paper.train as train_module

    sweep = Sweep(tmp_path / "sweep", tiny_grid(lrs="0.01"))
    (spec,) = sweep.specs
    run = sweep.training_run(spec)
    run_dir = sweep.run_dir(spec)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            run_one.main(run.command(run_dir, None)[3:])
    assert (run_dir / "config.json").is_file()
    assert (run_dir / "metrics.jsonl").read_text() == ""
    assert not (run_dir / "checkpoint.pt").exists()
    command = run.command(run_dir, None)
    assert "--overwrite" in command and "--resume" not in command
    # The child, in this process: the real entry point, the real training.
    monkeypatch.setattr(
        TrainingRun, "_train", lambda self, d, stop: run_one.main(self.command(d, stop)[3:])
    )
    outcome = sweep.training_run(spec)()
    assert outcome["state"] == "done", read_status(run_dir)
    assert (run_dir / "checkpoint.pt").is_file()
