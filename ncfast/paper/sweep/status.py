"""What a sweep knows of each run: its ``sweep_status.json`` (read back defensively), its
lock, its log and checkpoint, and why it failed."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import warnings
from pathlib import Path

from ncfast.paper.checkpoint import load_checkpoint, write_text_atomic
from ncfast.paper.rundir import RunDirectory, RunDirectoryError
from ncfast.paper.sweep.layout import STATUS_FILE
from ncfast.report.runs import CHECKPOINT_FILE, METRICS_FILE, RunError, read_metrics

# What sweep_status.json says of the submitit job of a submitted run.
JOB_FIELDS = ("job_id", "cluster", "folder", "submit_host", "submitted")
# The text fields of a status and of an attempt, and the numeric ones of an attempt.
TEXT_FIELDS = ("state", "reason", "note", "started", "finished", *JOB_FIELDS)
ATTEMPT_NUMBERS = ("seconds", "from_epoch", "pid", "returncode")


def read_status(run_dir: str | os.PathLike) -> dict:
    """The run's ``sweep_status.json`` ({} when there is none or it cannot be read). Every
    field is checked as it is read: one of the wrong kind (a hand edit, a torn write of an
    older release) is left out, as if it were missing, so a bad status never stops a sweep;
    the run's files decide what it is (:meth:`ncfast.paper.sweep.Sweep.state`)."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(status, dict):
        return {}
    clean = {k: v for k, v in status.items() if k not in (*TEXT_FIELDS, "attempts", "test_error")}
    for key in TEXT_FIELDS:
        value = status.get(key)
        if isinstance(value, str) or (key == "job_id" and _is_int(value)):
            clean[key] = str(value)
    if _is_number(status.get("test_error")):
        clean["test_error"] = float(status["test_error"])
    attempts = status.get("attempts")
    clean["attempts"] = (
        [_attempt(a) for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else []
    )
    return clean


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _attempt(attempt: dict) -> dict:
    """An attempt of a status, its numbers checked (a wrong one is left out)."""
    return {k: v for k, v in attempt.items() if k not in ATTEMPT_NUMBERS or _is_number(v)}


def write_status(run_dir: str | os.PathLike, status: dict) -> None:
    write_text_atomic(Path(run_dir) / STATUS_FILE, json.dumps(status, indent=1) + "\n")


def in_use(run_dir: str | os.PathLike) -> bool:
    """True while a live process holds the run directory's lock (the run is training)."""
    try:
        RunDirectory(run_dir).check_not_in_use()
    except RunDirectoryError:
        return True
    return False


def final_test_error(run_dir: str | os.PathLike, epochs: int) -> float | None:
    """The test error logged at epoch ``epochs`` (None when the run has not logged it)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a half-written last line of a killed run
            records = read_metrics(path)
    except RunError:
        return None
    errors = [
        r.get("error")
        for r in records
        if isinstance(r, dict) and r.get("split") == "test" and r.get("epoch") == epochs
    ]
    return float(errors[-1]) if errors and _is_number(errors[-1]) else None


def checkpoint_epoch(run_dir: str | os.PathLike) -> int:
    """The epoch of the run's checkpoint (0 when there is none); the checkpoint's
    :class:`ncfast.errors.NCFastError` when it cannot be used."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    return int(load_checkpoint(path)["epoch"])


def failure_reason(returncode: int, log_tail: str) -> str:
    """Why the run's process failed: its error line ('Error: ...'), else the last line it
    printed, and the signal that killed it."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    text = errors[-1][len("Error: ") :] if errors else (lines[-1] if lines else "")
    text = sweep_wording(text)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}" + (f"; last output: {text}" if text else "")
    return text or f"the run's process exited with code {returncode}"


# Advice of `ncfast train`'s messages that a sweep's user cannot act on (the sweep gives a
# run's --out, --resume and --overwrite itself).
TRAIN_ADVICE = ("--overwrite", "--resume", "--out")


def sweep_wording(message: str) -> str:
    """A training error as a sweep reports it: the clauses that advise options of ``ncfast
    train`` (to replace the run with --overwrite, to choose another --out) are left out, and so
    is the option a message starts with (--resume, out)."""
    first, *rest = message.split("; ")
    for prefix in ("--resume: ", "out: ", "--out: "):
        first = first.removeprefix(prefix)
    kept = [part for part in map(_without_advice, rest) if part]
    return "; ".join([first, *kept])


def _without_advice(clause: str) -> str:
    """``clause`` without its ``ncfast train`` advice: all of it, or what comes before an
    ' and ' that starts the advice ('lower --lr (now 1) and start again with --overwrite')."""
    parts = clause.split(" and ")
    for i, part in enumerate(parts):
        if any(word in part for word in TRAIN_ADVICE):
            return " and ".join(parts[:i])
    return clause


def outcome_of(status: dict) -> dict:
    """A run's outcome from its status: ``state``, ``reason`` (failed), ``test_error`` (done),
    ``attempts`` (how many times it was started) and ``seconds`` (of the last attempt)."""
    attempts = [a for a in status.get("attempts", []) if isinstance(a, dict)]
    out = {k: status[k] for k in ("state", "reason", "test_error", "note") if k in status}
    out["attempts"] = len(attempts)
    if attempts and "seconds" in attempts[-1]:
        out["seconds"] = attempts[-1]["seconds"]
    return out


def tail(path: Path, size: int = 8192) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def sweep_owner(out: Path) -> str | None:
    """'PID ... on HOST since ...' while a sweep process holds DIR's lock."""
    try:
        RunDirectory(out).check_not_in_use()
    except RunDirectoryError as exc:
        # The last " is in use by ": the folder's own name may hold the phrase.
        return str(exc).rsplit(" is in use by ", 1)[-1].split(";")[0]
    return None


def job_alive(status: dict) -> bool:
    """Whether the submitit job of a submitted run may still run it (pending or running)."""
    job_id, cluster = status.get("job_id"), status.get("cluster")
    if not job_id:
        return False
    if cluster == "local":
        return status.get("submit_host") == platform.node() and _local_job_alive(job_id)
    try:
        import submitit

        job = submitit.SlurmJob(folder=status.get("folder", "."), job_id=str(job_id))
        return not job.done(force_check=True)
    except Exception:  # no sacct here, or a job Slurm has forgotten: submit again
        return False


def _local_job_alive(job_id: str) -> bool:
    """Whether ``job_id`` is a live process of submitit's local executor (not merely a live
    PID: PIDs are reused, and a status may name any process)."""
    try:
        pid = int(job_id)
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:
        pass
    command = Path(f"/proc/{pid}/cmdline")
    if not Path("/proc/self/cmdline").exists():
        return True  # no /proc (macOS): the live PID is all there is to go by
    with contextlib.suppress(OSError):
        return b"submitit" in command.read_bytes()
    return False


__all__ = [
    "checkpoint_epoch",
    "failure_reason",
    "final_test_error",
    "in_use",
    "job_alive",
    "outcome_of",
    "read_status",
    "sweep_owner",
    "sweep_wording",
    "write_status",
]
