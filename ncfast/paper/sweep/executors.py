"""Where a sweep's runs train: ``local`` (this machine's GPUs or CPU slots, a thread per slot,
each run a child process) or through submitit (``slurm``: one array job; ``submitit-local``:
the same path with local processes). :class:`SweepOptions` is the configuration of
:meth:`ncfast.paper.sweep.Sweep.run`, checked as a whole before anything is written."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import queue
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ncfast.paper.sweep.grid import RunSpec
from ncfast.paper.sweep.layout import SLURM_DIR, SweepError, now, shown
from ncfast.paper.sweep.run import TrainingRun
from ncfast.paper.sweep.status import in_use, job_alive, outcome_of, read_status, write_status

if TYPE_CHECKING:
    from ncfast.paper.sweep.sweep import Sweep

EXECUTORS = ("local", "slurm", "submitit-local")
# Seconds between looks at the runs while waiting for submitit jobs.
POLL_S = {"local": 1.0, "slurm": 30.0}


@dataclass(frozen=True)
class SlurmOptions:
    """What a Slurm array job asks for. ``time``: minutes, or [D-]HH:MM[:SS]; ``options``:
    KEY=VALUE pairs, a submitit Slurm parameter (e.g. ``array_parallelism``, ``account``,
    ``qos``, ``constraint``) or else an ``sbatch`` option passed as ``--KEY=VALUE``;
    ``cluster``: submitit's cluster (None: Slurm; "local": local processes, for tests)."""

    partition: str | None = None
    time: str = "24:00:00"
    gpus_per_run: int | None = None  # None: 1 on Slurm, 0 with local processes
    cpus_per_run: int | None = None
    mem_gb: float | None = None
    options: tuple[str, ...] = ()
    cluster: str | None = None
    max_requeues: int = 100

    def check(self) -> None:
        """SweepError naming the option for a value that cannot be submitted."""
        parse_time_minutes(self.time)
        if self.gpus_per_run is not None and self.gpus_per_run < 0:
            raise SweepError(f"--gpus-per-run: must be ≥ 0, got {self.gpus_per_run}")
        if self.cpus_per_run is not None and self.cpus_per_run < 1:
            raise SweepError(f"--cpus-per-run: must be ≥ 1, got {self.cpus_per_run}")
        if self.mem_gb is not None and not (math.isfinite(self.mem_gb) and self.mem_gb > 0):
            raise SweepError(f"--mem-gb: must be finite and > 0, got {self.mem_gb}")
        for item in self.options:
            _slurm_option(item)


@dataclass(frozen=True)
class SweepOptions:
    """How :meth:`ncfast.paper.sweep.Sweep.run` runs the grid: ``executor`` local, slurm or
    submitit-local; ``jobs`` CPU slots (default 1) or ``runs_per_gpu`` on each of ``gpus``
    (default: all visible); ``slurm`` the array job's resources; ``wait`` for submitted jobs;
    ``checkpoint_every`` epochs per training segment; ``retry_failed`` runs; ``download``
    the datasets once first; ``progress`` bar (else a line per finished run)."""

    executor: str = "local"
    jobs: int | None = None
    runs_per_gpu: int = 1
    gpus: tuple[str, ...] | None = None
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    wait: bool = True
    checkpoint_every: int | None = None
    retry_failed: bool = False
    download: bool = False
    progress: bool = True

    def check(self) -> None:
        """Every option checked (SweepError naming it) before the sweep writes anything."""
        if self.executor not in EXECUTORS:
            raise SweepError(f"--executor: {', '.join(EXECUTORS)}, got {shown(self.executor)}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise SweepError(f"--checkpoint-every: must be ≥ 1, got {self.checkpoint_every}")
        if self.jobs is not None and self.jobs < 1:
            raise SweepError(f"--jobs: must be ≥ 1, got {self.jobs}")
        if self.runs_per_gpu < 1:
            raise SweepError(f"--runs-per-gpu: must be ≥ 1, got {self.runs_per_gpu}")
        if self.gpus is not None and (not self.gpus or not all(str(g).strip() for g in self.gpus)):
            raise SweepError(f"--gpus: expected a comma-separated list, got {shown(self.gpus)}")
        if self.executor != "local":
            self.slurm.check()

    def submitit_slurm(self) -> SlurmOptions:
        """The Slurm options, with local processes for ``submitit-local``."""
        if self.executor == "submitit-local":
            return replace(self.slurm, cluster="local")
        return self.slurm


def parse_time_minutes(text) -> int:
    """Slurm's time formats: MINUTES, HH:MM:SS, MM:SS, D-HH[:MM[:SS]] -> whole minutes (≥ 1)."""
    value = str(text).strip()
    try:
        days, _, rest = value.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        days_n = int(days) if days else 0
        if days:  # D-HH[:MM[:SS]]
            parts += [0] * (3 - len(parts))
            hours, minutes, seconds = parts
        elif len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, (minutes, seconds) = 0, parts
        else:
            hours, minutes, seconds = parts
        if min(days_n, hours, minutes, seconds) < 0 or len(parts) > 3:
            raise ValueError
    except ValueError:
        raise SweepError(
            f"--time: expected minutes or [D-]HH:MM:SS (as sbatch --time), got {shown(text)}"
        ) from None
    total = days_n * 1440 + hours * 60 + minutes + math.ceil(seconds / 60)
    if total < 1:
        raise SweepError(f"--time: must be at least one minute, got {shown(text)}")
    return total


def _slurm_option(item) -> tuple[str, str]:
    key, sep, value = str(item).partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise SweepError(f"--slurm-option: expected KEY=VALUE, got {shown(item)}")
    return key, value


def submitit_parameters(slurm: SlurmOptions) -> dict:
    """The ``AutoExecutor.update_parameters`` keywords of ``slurm`` (SweepError naming the
    option for a bad one)."""
    slurm.check()
    cluster = slurm.cluster or "slurm"
    params: dict = {"name": "ncfast-sweep", "timeout_min": parse_time_minutes(slurm.time)}
    gpus = slurm.gpus_per_run if slurm.gpus_per_run is not None else int(cluster == "slurm")
    if gpus:
        params["gpus_per_node"] = int(gpus)
    if slurm.cpus_per_run is not None:
        params["cpus_per_task"] = int(slurm.cpus_per_run)
    if slurm.mem_gb is not None:
        params["mem_gb"] = float(slurm.mem_gb)
    if cluster != "slurm":
        return params
    import submitit

    if slurm.partition:
        params["slurm_partition"] = slurm.partition
    known = submitit.SlurmExecutor._valid_parameters()
    extra: dict[str, str] = {}
    for item in slurm.options:
        key, value = _slurm_option(item)
        name = key.replace("-", "_")
        if name in known and name != "additional_parameters":
            params[f"slurm_{name}"] = int(value) if value.isdigit() else value
        else:
            extra[key] = value
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [v.strip() for v in listed.split(",") if v.strip()]
        return ids[:count]
    return [str(k) for k in range(count)]


def local_slots(options: SweepOptions, on_cpu: bool) -> list[dict]:
    """The environment of each parallel slot of the local executor."""
    gpus = [] if on_cpu else (visible_gpus() if options.gpus is None else list(options.gpus))
    if gpus:
        if options.jobs is not None:
            raise SweepError(
                "--jobs: the runs go to the GPUs (--runs-per-gpu K at once on each); give "
                "the train option --device cpu for CPU slots"
            )
        slots = [
            {"CUDA_VISIBLE_DEVICES": str(g).strip()}
            for g in gpus
            for _ in range(options.runs_per_gpu)
        ]
    else:
        slots = [{"CUDA_VISIBLE_DEVICES": ""} for _ in range(options.jobs or 1)]
    if "OMP_NUM_THREADS" not in os.environ:
        # Each run its share of the cores, not all of them (oversubscription is slower).
        threads = str(max(1, (os.cpu_count() or 1) // len(slots)))
        for slot in slots:
            slot["OMP_NUM_THREADS"] = threads
    return slots


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _term_as_interrupt():
    """SIGTERM as KeyboardInterrupt (the runs are stopped, not orphaned); the previous handler
    (None off the main thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_term(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def run_local(sweep: Sweep, todo: list[RunSpec], slots: list[dict], options: SweepOptions, echo):
    """Train ``todo`` in parallel over ``slots`` (:func:`local_slots`); each finished run is
    reported to ``echo``. Ctrl-C or SIGTERM stops the runs (resumable) and is raised."""
    where = (
        f"{len(slots)} CPU slot(s)"
        if not slots[0]["CUDA_VISIBLE_DEVICES"]
        else f"{len({s['CUDA_VISIBLE_DEVICES'] for s in slots})} GPU(s), "
        f"{options.runs_per_gpu} per GPU"
    )
    if not todo:
        return
    echo(f"running {len(todo)} runs on {where}")
    free: queue.SimpleQueue = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)
    live: set[TrainingRun] = set()
    guard = threading.Lock()
    stopping = threading.Event()

    def work(spec: RunSpec) -> dict:
        if stopping.is_set():
            return {"state": "interrupted"}
        slot = free.get()
        run = sweep.training_run(spec, options.checkpoint_every, slot)
        with guard:
            if stopping.is_set():
                free.put(slot)
                return {"state": "interrupted"}
            live.add(run)
        try:
            return run()
        finally:
            with guard:
                live.discard(run)
            free.put(slot)

    total = len(sweep.specs)
    tracker = Progress(total, total - len(todo), len(slots), options.progress)
    pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="ncfast-sweep")
    previous = _term_as_interrupt()
    try:
        futures = {pool.submit(work, spec): spec for spec in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in finished:
                tracker.finished(futures[future], future.result(), echo)
    except BaseException:
        # Ctrl-C, SIGTERM or an error here: stop the runs (they stay resumable) rather
        # than leave them to finish unwatched.
        stopping.set()
        with guard:
            runs = list(live)
        for run in runs:
            run._stopping = True
        for run in runs:
            run.stop()
        raise
    finally:
        _restore_term(previous)
        pool.shutdown(wait=True, cancel_futures=True)
        tracker.close()


def run_submitit(sweep: Sweep, todo, waiting_for, options: SweepOptions, echo) -> None:
    """Submit ``todo`` as one array job, then (``options.wait``) wait for it and for the
    runs ``waiting_for`` (submitted earlier), reporting each finished run to ``echo``."""
    try:
        import submitit
    except ImportError:
        raise SweepError(
            "--executor slurm needs submitit, which is not installed: "
            "pip install 'ncfast[slurm]' (or pip install submitit)"
        ) from None
    slurm = options.submitit_slurm()
    cluster = slurm.cluster or "slurm"
    params = submitit_parameters(slurm)
    folder = sweep.out / SLURM_DIR
    try:
        executor = submitit.AutoExecutor(
            folder=folder, cluster=cluster, slurm_max_num_timeout=slurm.max_requeues
        )
        executor.update_parameters(**params)
    except (ValueError, NameError, AssertionError, RuntimeError) as exc:
        raise SweepError(f"--executor {cluster}: {str(exc).splitlines()[0]}") from None
    jobs = _submit(sweep, todo, executor, cluster, folder, options, echo) if todo else {}
    if not options.wait:
        echo(f"not waiting: follow them with `ncfast sweep --status {sweep.out}`")
        return
    watched = list(todo) + list(waiting_for)
    tracker = Progress(len(sweep.specs), len(sweep.specs) - len(watched), None, options.progress)
    open_runs = {spec.name: spec for spec in watched}
    previous = _term_as_interrupt()
    try:
        while open_runs:
            for name, spec in list(open_runs.items()):
                outcome = job_outcome(sweep, spec, jobs.get(name))
                if outcome is not None:
                    del open_runs[name]
                    tracker.finished(spec, outcome, echo)
            if open_runs:
                time.sleep(POLL_S["local" if cluster == "local" else "slurm"])
    except KeyboardInterrupt:
        tracker.close()
        echo(
            f"stopped waiting; the jobs keep running (`ncfast sweep --status {sweep.out}`; "
            "the same command waits for them again)"
        )
        raise
    finally:
        _restore_term(previous)
        tracker.close()


def _submit(sweep: Sweep, todo, executor, cluster, folder, options: SweepOptions, echo) -> dict:
    runs = [sweep.training_run(spec, options.checkpoint_every) for spec in todo]
    for spec in todo:
        sweep.run_dir(spec).mkdir(parents=True, exist_ok=True)
    with executor.batch():
        submitted = [executor.submit(run) for run in runs]
    jobs = {}
    for spec, job in zip(todo, submitted, strict=True):
        jobs[spec.name] = job
        status = read_status(sweep.run_dir(spec))
        write_status(
            sweep.run_dir(spec),
            {
                "attempts": status.get("attempts", []),
                "state": "submitted",
                "job_id": str(job.job_id),
                "cluster": cluster,
                "folder": str(folder),
                "submit_host": platform.node(),
                "submitted": now(),
            },
        )
    echo(
        f"submitted {len(todo)} runs to {cluster} (job {submitted[0].job_id.split('_')[0]}"
        f"{'' if len(todo) == 1 else ', ...'}); logs in {folder}"
    )
    return jobs


def job_outcome(sweep: Sweep, spec: RunSpec, job) -> dict | None:
    """The outcome of a submitted run once its job has ended, else None."""
    run_dir = sweep.run_dir(spec)
    status = read_status(run_dir)
    if status.get("state") in ("done", "failed"):
        return outcome_of(status)
    alive = (not job.done()) if job is not None else job_alive(status)
    if alive or in_use(run_dir):
        return None
    status = read_status(run_dir)  # it may have finished between the two looks
    if status.get("state") in ("done", "failed"):
        return outcome_of(status)
    reason = f"the job ended without finishing the run (job {status.get('job_id', '?')})"
    if job is not None:
        with contextlib.suppress(Exception):
            exc = job.exception()
            if exc is not None:
                reason += f": {str(exc).strip().splitlines()[-1]}"
    write_status(run_dir, {**status, "state": "failed", "reason": reason, "finished": now()})
    return {"state": "failed", "reason": reason}


class Progress:
    """A tqdm bar over the grid and a line per finished run, with the remaining time estimated
    from the runs finished so far."""

    def __init__(self, total: int, initial: int, slots: int | None, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.slots = slots
        self.start = time.time()
        self.count = 0  # runs finished (done or failed) while this tracker watched
        self.seconds: list[float] = []
        self.remaining = total - initial
        self.failed = 0
        self.bar = tqdm(
            total=total, initial=initial, unit="run", disable=not enabled, dynamic_ncols=True
        )
        self.announced = False

    def finished(self, spec: RunSpec, outcome: dict, echo) -> None:
        state = outcome.get("state")
        if state in ("interrupted", "skipped"):
            return
        self.remaining -= 1
        self.count += 1
        if state == "failed":
            self.failed += 1
            self._write(f"failed {spec.name}: {outcome.get('reason')}", echo)
        else:
            error = outcome.get("test_error")
            shown_values = [f"test error {error:.4f}"] if isinstance(error, float) else []
            seconds = outcome.get("seconds")
            if seconds and outcome.get("note") != "found finished":
                self.seconds.append(seconds)
                shown_values.append(duration(seconds))
            self._write(f"done {spec.name}: {', '.join(shown_values) or 'finished'}", echo)
        self.bar.update(1)
        estimate = self.estimate()
        if estimate is not None:
            if not self.announced:
                basis = (
                    f"{len(self.seconds)} finished run(s), {self.slots} at a time"
                    if self.slots
                    else f"{self.count} run(s) finished so far"
                )
                self._write(f"estimated time left: {duration(estimate)} (from {basis})", echo)
                self.announced = True
            self.bar.set_postfix_str(f"failed {self.failed}, ~{duration(estimate)} left")

    def estimate(self) -> float | None:
        """Seconds left: with known slots, the mean run time of the runs that finished here
        times the rounds left; else (a cluster's queue) the elapsed time per finished run."""
        if self.slots:
            if not self.seconds:
                return None
            mean = sum(self.seconds) / len(self.seconds)
            return mean * math.ceil(self.remaining / self.slots)
        if not self.count:
            return None
        return (time.time() - self.start) / self.count * self.remaining

    def _write(self, text: str, echo) -> None:
        if self.bar.disable:
            echo(text)
        else:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
