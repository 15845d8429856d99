"""The run function of every executor: one grid point trained in a child process
(:mod:`ncfast.paper.run_one`), its outcome recorded in the run directory."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ncfast.errors import NCFastError
from ncfast.paper.rundir import RunDirectory
from ncfast.paper.sweep.grid import RunSpec
from ncfast.paper.sweep.layout import LOG_FILE, RUNS_DIR, now
from ncfast.paper.sweep.status import (
    JOB_FIELDS,
    checkpoint_epoch,
    failure_reason,
    final_test_error,
    in_use,
    outcome_of,
    read_status,
    sweep_wording,
    tail,
    write_status,
)
from ncfast.report.runs import CHECKPOINT_FILE

# Sets PR_SET_PDEATHSIG (the child is killed when the thread that started it dies: a killed
# sweep leaves no orphans), checks the parent did not die before that, then execs the command.
_LINUX_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(137)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _exited(pid: int) -> bool:
    """Whether the child ``pid`` has exited, without reaping it (``Popen`` still does)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def child_command(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so that the child dies with this process (on Linux)."""
    if sys.platform.startswith("linux"):
        return [sys.executable, "-c", _LINUX_LAUNCHER, str(os.getpid()), *argv]
    return list(argv)


class TrainingRun:
    """The run function of every executor: one grid point trained in a child process, its
    outcome recorded in the run directory.

    ``train_options``: the grid's :class:`~ncfast.paper.config.TrainConfig` fields (``preset``
    among them); ``epochs``: the runs' resolved ``epochs``; ``checkpoint_every``: train in
    ``stop_after`` segments of this many epochs (each ends with a checkpoint), so a job killed
    at its time limit loses at most that much; ``env``: extra environment of the child (e.g.
    ``CUDA_VISIBLE_DEVICES``).

    Submitit calls :meth:`checkpoint` when the job's time limit (or a preemption) nears: the
    child is stopped and the same call is requeued; it resumes from the run's last checkpoint.
    """

    def __init__(
        self,
        sweep_dir: str | os.PathLike,
        spec: RunSpec,
        train_options: Mapping,
        epochs: int,
        checkpoint_every: int | None = None,
        env: dict | None = None,
    ) -> None:
        self.sweep_dir = str(sweep_dir)
        self.spec = spec
        self.train_options = dict(train_options)
        self.epochs = epochs
        self.checkpoint_every = checkpoint_every
        self.env = dict(env or {})
        self._process: subprocess.Popen | None = None
        self._stopping = False

    @property
    def run_dir(self) -> Path:
        return Path(self.sweep_dir) / RUNS_DIR / self.spec.name

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": None, "_stopping": False}

    def __call__(self) -> dict:
        """Train the run to its end (or resume it); returns and records the outcome: ``state``
        done or failed (with ``reason``), or skipped (another process trains it now, nothing
        recorded), or interrupted (the sweep stopped it: nothing recorded, it resumes later).
        A run whose files cannot be used (e.g. a corrupt checkpoint) is failed with the
        reason; it never stops the sweep."""
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        status = read_status(run_dir)
        if in_use(run_dir):
            return {"state": "skipped", "reason": "another process is training it"}
        error = final_test_error(run_dir, self.epochs)
        if error is not None:
            return self._record(status, "done", test_error=error, note="found finished")
        attempts = list(status.get("attempts", []))
        try:
            return self._attempt(run_dir, status, attempts)
        except NCFastError as exc:  # its checkpoint cannot be used: this run fails, not all
            reason = (
                f"{sweep_wording(str(exc))}; delete the run's {CHECKPOINT_FILE} to train it "
                "from the start (then rerun the sweep with --retry-failed)"
            )
            return self._record({"attempts": attempts}, "failed", reason=reason)

    def _attempt(self, run_dir: Path, status: dict, attempts: list) -> dict:
        start = time.time()
        attempt = {
            "started": now(),
            "host": platform.node(),
            "pid": os.getpid(),
            "from_epoch": checkpoint_epoch(run_dir),
        }
        attempts.append(attempt)
        job = {k: status[k] for k in JOB_FIELDS if k in status}
        write_status(run_dir, {**job, "state": "started", "attempts": attempts})
        while True:
            done = checkpoint_epoch(run_dir)
            stop = None
            if self.checkpoint_every and done + self.checkpoint_every < self.epochs:
                stop = done + self.checkpoint_every
            returncode = self._train(run_dir, stop)
            if self._stopping or returncode is None:
                return {"state": "interrupted"}
            if returncode != 0 or stop is None:
                break
        attempt["seconds"] = round(time.time() - start, 3)
        attempt["returncode"] = returncode
        if returncode != 0:
            if in_use(run_dir):  # a process that took the run over meanwhile owns its status
                return {"state": "skipped", "reason": "another process is training it"}
            reason = failure_reason(returncode, tail(run_dir / LOG_FILE))
            return self._record({"attempts": attempts}, "failed", reason=reason)
        error = final_test_error(run_dir, self.epochs)
        if error is None:
            reason = f"the run ended without a test measurement at epoch {self.epochs}"
            return self._record({"attempts": attempts}, "failed", reason=reason)
        return self._record({"attempts": attempts}, "done", test_error=error)

    def _record(self, status: dict, state: str, **values) -> dict:
        status = {**status, "state": state, "finished": now(), **values}
        status.setdefault("attempts", [])
        if state != "failed":
            status.pop("reason", None)
        write_status(self.run_dir, status)
        return outcome_of(status)

    def command(self, run_dir: Path, stop: int | None) -> list[str]:
        """The child's command line: the run resumed from its checkpoint, or started (over a
        run killed before its first checkpoint: nothing to resume and nothing to lose)."""
        options = {**self.train_options, **self.spec.train_options()}
        argv = [sys.executable, "-m", "ncfast.paper.run_one", "--out", str(run_dir)]
        if (run_dir / CHECKPOINT_FILE).is_file():
            argv.append("--resume")
        elif RunDirectory(run_dir).holds_run():
            argv.append("--overwrite")
        if stop is not None:
            argv += ["--stop-after", str(stop)]
        return [*argv, json.dumps(options)]

    def _train(self, run_dir: Path, stop: int | None) -> int | None:
        """One training process; its exit code (None if the sweep stopped it first)."""
        argv = self.command(run_dir, stop)
        env = {**os.environ, **self.env}
        with (run_dir / LOG_FILE).open("ab") as log:
            log.write(f"\n[{now()}] {' '.join(argv[2:])}\n".encode())
            log.flush()
            if self._stopping:
                return None
            self._process = subprocess.Popen(
                child_command(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: a Ctrl-C in the terminal reaches the sweep, which stops the
                # runs itself (and does not mistake them for failures).
                start_new_session=True,
            )
            try:
                return self._process.wait()
            finally:
                if self._process.poll() is None:  # interrupted while waiting
                    self.stop()

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the child (SIGTERM, then SIGKILL after ``grace_s``) and return once it has
        exited; the run stays resumable. Safe in a signal handler that interrupted the wait
        for the child in the same thread (submitit's :meth:`checkpoint`): it never waits
        through ``Popen``, whose wait lock that frame holds."""
        self._stopping = True
        process = self._process
        if process is None or process.returncode is not None:
            return
        for send, patience in ((process.terminate, grace_s), (process.kill, None)):
            with contextlib.suppress(ProcessLookupError):
                send()
            deadline = None if patience is None else time.monotonic() + patience
            while not _exited(process.pid):
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return

    def checkpoint(self):
        """Submitit's hook before a timeout or preemption: stop the child (its checkpoint is
        on disk) and requeue the same call, which resumes the run."""
        from submitit.helpers import DelayedSubmission

        self.stop()
        return DelayedSubmission(TrainingRun(**self._arguments()))

    def _arguments(self) -> dict:
        return {
            "sweep_dir": self.sweep_dir,
            "spec": self.spec,
            "train_options": self.train_options,
            "epochs": self.epochs,
            "checkpoint_every": self.checkpoint_every,
            "env": self.env,
        }
