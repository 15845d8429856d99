"""HPD22's whole grid of training runs in one resumable command (``ncfast sweep``).

HPD22 (Appendix A.3, as PHD20) trained every (dataset, network) pair of Table A.2 with MSE and
with cross-entropy at 25 learning rates log-spaced in [1e-4, 0.25] and kept, per (dataset,
network, loss), the one with the best final test error. A :class:`Sweep` does that:

- the grid (:class:`Grid`): datasets × networks (a family resolves to Table A.2's depth per
  dataset) × losses × learning rates × seeds, plus options of ``ncfast train`` given to every run.
  It is checked (one resolved :class:`ncfast.paper.train.TrainConfig` per value) and written to
  ``DIR/sweep.json`` before anything starts; another grid in the same DIR is an error naming the
  difference;
- each run lives in ``DIR/runs/<dataset>-<net>-<loss>-lr<lr>-seed<seed>`` and is trained by
  ``ncfast train`` as a subprocess (:class:`TrainingRun`, the one run function of both executors),
  with ``--resume`` when the run has a checkpoint. Its outcome (done, or failed with the reason)
  goes to ``sweep_status.json`` there (written atomically), the child's output to ``sweep.log``;
  a failed run does not stop the sweep;
- executors: ``local`` runs in parallel over this machine's GPUs (one run per GPU, or
  ``runs_per_gpu``) or over ``jobs`` CPU slots; children die with the sweep (Linux:
  ``PR_SET_PDEATHSIG``), so a rerun never races orphans. ``slurm`` submits one array job through
  submitit; a job that reaches its time limit is requeued (the run function is checkpointable)
  and resumes the run from its last checkpoint (``checkpoint_every`` bounds what is lost with
  ``--stop-after`` segments); ``submitit-local`` is the same path with local processes;
- rerunning is idempotent: finished runs are skipped, killed ones resumed, the rest started;
  failed ones stay failed unless ``retry_failed``. A run is *running* while its run directory's
  lock (:class:`ncfast.paper.rundir.RunDirectory`) is held by a live process;
- :meth:`Sweep.select` picks per (dataset, network, loss) the learning rate of lowest final test
  error (mean over the seeds that finished; ties: the smaller learning rate) into
  ``DIR/selected.json``; :meth:`Sweep.report` writes Table 1, the Figs. 2–12 grid over the selected
  runs (MSE beside CE) and the sweep's own figure (final test error against learning rate) to
  ``DIR/report/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import click

from ncfast.errors import NCFastError
from ncfast.paper.checkpoint import load_checkpoint, write_text_atomic
from ncfast.paper.config import MAX_SEED, TrainConfig
from ncfast.paper.data import DATASETS, DatasetError, default_root, download_dataset
from ncfast.paper.losses import LOSSES, parse_mse_scale
from ncfast.paper.models import FAMILIES, NETS, paper_net
from ncfast.paper.rundir import RunDirectory, RunDirectoryError
from ncfast.report.plots import LOSS_COLORS, OTHER_COLORS, new_figure, plot_runs, save_figure
from ncfast.report.runs import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    RunError,
    load_run,
    read_metrics,
)
from ncfast.report.tables import write_table1

SWEEP_FILE = "sweep.json"
SELECTED_FILE = "selected.json"
RUNS_DIR = "runs"
REPORT_DIR = "report"
SLURM_DIR = "slurm"
STATUS_FILE = "sweep_status.json"
LOG_FILE = "sweep.log"
FORMAT = 1
# What sweep_status.json says of the submitit job of a submitted run.
JOB_FIELDS = ("job_id", "cluster", "folder", "submit_host", "submitted")

# HPD22 Appendix A (as PHD20): the five datasets, the three families, both losses and 25
# learning rates log-spaced in [1e-4, 0.25].
PAPER_DATASETS = ("mnist", "fashionmnist", "svhn", "cifar10", "stl10")
PAPER_LRS = "logspace:1e-4,0.25,25"
PAPER_GRID = {
    "datasets": ",".join(PAPER_DATASETS),
    "nets": ",".join(FAMILIES),
    "losses": "mse,ce",
    "lrs": PAPER_LRS,
    "seeds": "0",
}
# Options of `ncfast train` the sweep sets itself (grid coordinates and the run's directory).
GRID_OPTIONS = {
    "dataset": "--datasets",
    "net": "--nets",
    "loss": "--losses",
    "lr": "--lrs",
    "seed": "--seeds",
}
SWEEP_OWNED = {
    "out": "each run's directory is DIR/runs/<run>",
    "resume": "the sweep resumes killed runs itself",
    "overwrite": "the sweep never replaces a run",
    "quiet": "the runs are quiet",
    "stop_after": "use the sweep's --checkpoint-every",
    "tensorboard": "the runs would share one TensorBoard folder",
    "download": "give --download to the sweep (it downloads once, before the runs)",
}
# Significant digits kept of a generated learning rate: the same grid on every platform (libm's
# pow/log10 may differ in the last bit), far finer than any sweep's spacing.
LR_DIGITS = 10
STATES = ("done", "running", "failed", "queued", "waiting")
# Seconds between looks at the runs while waiting for submitit jobs.
POLL_S = {"local": 1.0, "slurm": 30.0}


class SweepError(NCFastError, ValueError):
    """A sweep that cannot be set up or continued as asked; the message names the option."""


# ----------------------------------------------------------------------------------- grid
def _items(text, option: str) -> list[str]:
    """'a,b' (or a sequence) -> ['a', 'b']; an empty list or item is an error naming ``option``."""
    items = list(text) if isinstance(text, list | tuple) else str(text).split(",")
    items = [str(v).strip() for v in items]
    if not items or not all(items):
        raise SweepError(f"{option}: expected a comma-separated list, got {text!r}")
    return items


def _unique(values: list) -> tuple:
    return tuple(dict.fromkeys(values))


def parse_names(text, option: str, choices: Sequence[str]) -> tuple[str, ...]:
    """A comma-separated list of names out of ``choices`` (SweepError naming ``option``)."""
    items = _items(text, option)
    bad = [v for v in items if v not in choices]
    if bad:
        raise SweepError(f"{option}: unknown {bad[0]!r} (choose from {', '.join(choices)})")
    return _unique(items)


def parse_lrs(text) -> tuple[float, ...]:
    """Learning rates: a comma-separated list, or ``logspace:LO,HI,N`` (N values log-spaced from
    LO to HI inclusive, kept to 10 significant digits), e.g. HPD22's ``logspace:1e-4,0.25,25``."""
    if isinstance(text, str) and text.strip().lower().startswith("logspace:"):
        parts = _items(text.split(":", 1)[1], "--lrs logspace")
        if len(parts) != 3:
            raise SweepError(f"--lrs: expected logspace:LO,HI,N (e.g. {PAPER_LRS}), got {text!r}")
        lo, hi = (_positive_lr(p, text) for p in parts[:2])
        if not parts[2].isdigit() or int(parts[2]) < 1:
            raise SweepError(f"--lrs: N must be a whole number ≥ 1, got {parts[2]!r} in {text!r}")
        n = int(parts[2])
        if n > 1 and not lo < hi:
            raise SweepError(f"--lrs: logspace needs LO < HI, got {text!r}")
        if n == 1:
            return (lo,)
        a, b = math.log10(lo), math.log10(hi)
        inner = [
            float(f"{10 ** (a + k * (b - a) / (n - 1)):.{LR_DIGITS}g}") for k in range(1, n - 1)
        ]
        return _unique([lo, *inner, hi])
    return _unique([_positive_lr(v, text) for v in _items(text, "--lrs")])


def _positive_lr(value, text) -> float:
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise SweepError(f"--lrs: {value!r} is not a number (in {text!r})") from None
    if not (math.isfinite(lr) and lr > 0):
        raise SweepError(f"--lrs: learning rates must be finite and > 0, got {value!r}")
    return lr


def parse_seeds(text) -> tuple[int, ...]:
    """Seeds: a comma-separated list of whole numbers in 0..2**63-1."""
    seeds = []
    for item in _items(text, "--seeds"):
        if not item.isdigit() or int(item) > MAX_SEED:
            raise SweepError(f"--seeds: expected whole numbers in 0..2**63-1, got {item!r}")
        seeds.append(int(item))
    return _unique(seeds)


def lr_label(lr: float) -> str:
    """The learning rate in a run's name: 4 significant digits (a grid whose rates share a
    label is refused)."""
    return format(lr, ".4g")


@dataclass(frozen=True)
class RunSpec:
    """One point of the grid."""

    dataset: str
    net: str  # the network (a family already resolved for the dataset)
    loss: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.net}-{self.loss}-lr{lr_label(self.lr)}-seed{self.seed}"

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.dataset, self.net, self.loss)

    def train_args(self) -> list[str]:
        """The grid coordinates as ``ncfast train`` options (the exact learning rate)."""
        return [
            *("--dataset", self.dataset, "--net", self.net, "--loss", self.loss),
            *("--lr", repr(self.lr), "--seed", str(self.seed)),
        ]


def train_options(args: Sequence[str]) -> tuple[str | None, dict]:
    """``ncfast train`` options (a list of command-line words) as ``(preset, TrainConfig
    fields)``; SweepError naming the option when they do not parse or are the sweep's own."""
    # The runs are `ncfast train` command lines, so their words are read with that command's own
    # parser: one grammar for both (the one import of the CLI outside it, see tests/test_layers).
    from ncfast.cli.train import train_command

    try:
        ctx = train_command.make_context("ncfast train", list(args), resilient_parsing=False)
    except click.ClickException as exc:
        raise SweepError(f"train option: {exc.format_message()}") from None
    params = dict(ctx.params)
    for name, option in GRID_OPTIONS.items():
        if params.get(name) is not None:
            raise SweepError(
                f"train option --{name}: the grid sets it; give the values with {option}"
            )
    for name, why in SWEEP_OWNED.items():
        if params.get(name) not in (None, False):
            raise SweepError(f"train option --{name.replace('_', '-')}: not in a sweep ({why})")
    device = params.get("device")
    if device is not None and device not in ("cpu", "cuda"):
        raise SweepError(
            f"train option --device: cpu or cuda in a sweep (each run sees only its own GPUs), "
            f"got {device!r}"
        )
    if params.get("mse_scale") is not None:
        try:
            params["mse_scale"] = parse_mse_scale(params["mse_scale"])
        except ValueError as exc:
            raise SweepError(f"train option --mse-scale: {exc}") from None
    preset = params.pop("preset")
    for name in ("resume", "overwrite", "quiet"):
        params.pop(name)
    return preset, {k: v for k, v in params.items() if v is not None}


@dataclass(frozen=True)
class Grid:
    """A sweep's grid. ``nets`` as given (families resolve per dataset, see :meth:`runs`);
    ``train_args``: ``ncfast train`` options given to every run, as command-line words."""

    datasets: tuple[str, ...]
    nets: tuple[str, ...] = FAMILIES
    losses: tuple[str, ...] = ("mse", "ce")
    lrs: tuple[float, ...] = field(default_factory=lambda: parse_lrs(PAPER_LRS))
    seeds: tuple[int, ...] = (0,)
    train_args: tuple[str, ...] = ()

    @classmethod
    def from_options(
        cls,
        datasets,
        nets=",".join(FAMILIES),
        losses="mse,ce",
        lrs=PAPER_LRS,
        seeds="0",
        train_args: Sequence[str] = (),
    ) -> Grid:
        """A grid from the command line's texts (or sequences), checked item by item."""
        return cls(
            datasets=parse_names(datasets, "--datasets", sorted(DATASETS)),
            nets=parse_names(nets, "--nets", [*FAMILIES, *NETS]),
            losses=parse_names(losses, "--losses", LOSSES),
            lrs=parse_lrs(lrs),
            seeds=parse_seeds(seeds),
            train_args=tuple(str(a) for a in train_args),
        )

    @classmethod
    def paper(cls, train_args: Sequence[str] = ()) -> Grid:
        """HPD22's grid: 5 datasets × 3 families × {mse, ce} × 25 learning rates, every run
        with ``ncfast train --preset paper`` (SPEC §6)."""
        return cls.from_options(**PAPER_GRID, train_args=["--preset", "paper", *train_args])

    def runs(self) -> list[RunSpec]:
        """Every run, datasets outermost, then networks, losses, learning rates, seeds."""
        specs = []
        for dataset in self.datasets:
            nets = _unique([paper_net(dataset, n) if n in FAMILIES else n for n in self.nets])
            for net in nets:
                for loss in self.losses:
                    for lr in self.lrs:
                        specs += [RunSpec(dataset, net, loss, lr, s) for s in self.seeds]
        return specs

    def shape(self) -> str:
        """'5 datasets × 3 networks × 2 losses × 25 learning rates × 1 seed'."""
        per_dataset = len({(s.dataset, s.net) for s in self.runs()}) // len(self.datasets)
        parts = [
            (len(self.datasets), "dataset", "datasets"),
            (per_dataset, "network", "networks"),
            (len(self.losses), "loss", "losses"),
            (len(self.lrs), "learning rate", "learning rates"),
            (len(self.seeds), "seed", "seeds"),
        ]
        return " × ".join(f"{n} {one if n == 1 else many}" for n, one, many in parts)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "datasets": list(self.datasets),
            "nets": list(self.nets),
            "losses": list(self.losses),
            "lrs": list(self.lrs),
            "seeds": list(self.seeds),
            "train_args": list(self.train_args),
        }

    @classmethod
    def from_json(cls, values: dict, where: str = SWEEP_FILE) -> Grid:
        try:
            return cls(
                datasets=tuple(values["datasets"]),
                nets=tuple(values["nets"]),
                losses=tuple(values["losses"]),
                lrs=tuple(float(v) for v in values["lrs"]),
                seeds=tuple(int(v) for v in values["seeds"]),
                train_args=tuple(values.get("train_args", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SweepError(f"{where}: not a sweep grid ({exc!r})") from None

    def check(self) -> TrainConfig:
        """Check every run's options before anything starts and return the resolved config of
        the first run (the options common to all: epochs, measurement epochs).

        Each distinct (dataset, network, loss) and each distinct (loss, learning rate, seed) is
        resolved through :meth:`ncfast.paper.train.TrainConfig.resolved` (with the device set to the
        CPU when CUDA is asked for but missing here, e.g. on a login node); together they cover
        every option of every run, without building each of 750 networks' shapes again.
        SweepError naming the option otherwise."""
        specs = self.runs()
        if not specs:
            raise SweepError("the grid is empty")
        names = {}
        for spec in specs:
            other = names.setdefault(spec.name, spec)
            if other != spec:
                raise SweepError(
                    f"--lrs: {other.lr!r} and {spec.lr!r} give the same run name {spec.name}; "
                    "use learning rates that differ in their first 4 significant digits"
                )
        preset, options = train_options(self.train_args)
        if options.get("device") == "cuda":
            import torch

            if not torch.cuda.is_available():
                options["device"] = "cpu"
        options.setdefault("device", "cpu")
        first = specs[0]
        seen = set()
        for spec in specs:
            for key, coords in (
                ("cell", (spec.dataset, spec.net, spec.loss, first.lr, first.seed)),
                ("value", (first.dataset, first.net, spec.loss, spec.lr, spec.seed)),
            ):
                if (key, coords) in seen:
                    continue
                seen.add((key, coords))
                dataset, net, loss, lr, seed = coords
                try:
                    config = TrainConfig.from_preset(
                        preset,
                        **{**options, "dataset": dataset, "net": net, "loss": loss},
                        lr=lr,
                        seed=seed,
                    ).resolved()
                except (TypeError, ValueError) as exc:
                    raise SweepError(f"run {spec.name}: {exc}") from None
                if key == "cell" and spec == first:
                    resolved = config
        if not resolved.measure_epochs or resolved.measure_epochs[-1] != resolved.epochs:
            raise SweepError(
                f"train option --measure-epochs must include the last epoch ({resolved.epochs}): "
                "the sweep selects on the final test error"
            )
        return resolved

    def difference(self, other: Grid) -> list[str]:
        """What differs from the stored grid ``other``: one 'key: X there, Y now' per key."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{k}: {theirs[k]} there, {mine[k]} now" for k in mine if mine[k] != theirs[k]]


# --------------------------------------------------------------------------- run function
def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_status(run_dir: str | os.PathLike) -> dict:
    """The run's ``sweep_status.json`` ({} when there is none or it cannot be read)."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


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
    errors = [r["error"] for r in records if r["split"] == "test" and r["epoch"] == epochs]
    return float(errors[-1]) if errors else None


def checkpoint_epoch(run_dir: str | os.PathLike) -> int:
    """The epoch of the run's checkpoint (0 when there is none)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    return int(load_checkpoint(path)["epoch"])


def failure_reason(returncode: int, log_tail: str) -> str:
    """Why ``ncfast train`` failed: its error line (click's 'Error: ...'), else the last line it
    printed, and the signal that killed it."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    text = errors[-1][len("Error: ") :] if errors else (lines[-1] if lines else "")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}" + (f"; last output: {text}" if text else "")
    return text or f"ncfast train exited with code {returncode}"


def outcome_of(status: dict) -> dict:
    """A run's outcome from its status: ``state``, ``reason`` (failed), ``test_error`` (done),
    ``attempts`` (how many times it was started) and ``seconds`` (of the last attempt)."""
    attempts = [a for a in status.get("attempts", []) if isinstance(a, dict)]
    out = {k: status[k] for k in ("state", "reason", "test_error", "note") if k in status}
    out["attempts"] = len(attempts)
    if attempts and "seconds" in attempts[-1]:
        out["seconds"] = attempts[-1]["seconds"]
    return out


def _tail(path: Path, size: int = 8192) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


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
    """The run function of every executor: one grid point trained by ``ncfast train`` as a
    subprocess, its outcome recorded in the run directory.

    ``train_args``: the grid's options of ``ncfast train``; ``epochs``: the runs' resolved
    ``--epochs``; ``checkpoint_every``: train in ``--stop-after`` segments of this many epochs
    (each ends with a checkpoint), so a job killed at its time limit loses at most that much;
    ``env``: extra environment of the child (e.g. ``CUDA_VISIBLE_DEVICES``).

    Submitit calls :meth:`checkpoint` when the job's time limit (or a preemption) nears: the
    child is stopped and the same call is requeued; it resumes from the run's last checkpoint.
    """

    def __init__(
        self,
        sweep_dir: str | os.PathLike,
        spec: RunSpec,
        train_args: Sequence[str],
        epochs: int,
        checkpoint_every: int | None = None,
        env: dict | None = None,
    ) -> None:
        self.sweep_dir = str(sweep_dir)
        self.spec = spec
        self.train_args = list(train_args)
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
        recorded), or interrupted (the sweep stopped it: nothing recorded, it resumes later)."""
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        status = read_status(run_dir)
        if in_use(run_dir):
            return {"state": "skipped", "reason": "another process is training it"}
        error = final_test_error(run_dir, self.epochs)
        if error is not None:
            return self._record(status, "done", test_error=error, note="found finished")
        attempts = [a for a in status.get("attempts", []) if isinstance(a, dict)]
        start = time.time()
        attempt = {
            "started": _now(),
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
            reason = failure_reason(returncode, _tail(run_dir / LOG_FILE))
            return self._record({"attempts": attempts}, "failed", reason=reason)
        error = final_test_error(run_dir, self.epochs)
        if error is None:
            reason = f"ncfast train ended without a test measurement at epoch {self.epochs}"
            return self._record({"attempts": attempts}, "failed", reason=reason)
        return self._record({"attempts": attempts}, "done", test_error=error)

    def _record(self, status: dict, state: str, **values) -> dict:
        status = {**status, "state": state, "finished": _now(), **values}
        status.setdefault("attempts", [])
        if state != "failed":
            status.pop("reason", None)
        write_status(self.run_dir, status)
        return outcome_of(status)

    def _train(self, run_dir: Path, stop: int | None) -> int | None:
        """One ``ncfast train`` process; its exit code (None if the sweep stopped it first)."""
        argv = [
            sys.executable,
            "-m",
            "ncfast",
            "train",
            *self.train_args,
            *self.spec.train_args(),
            *("--out", str(run_dir), "--quiet"),
        ]
        if (run_dir / CHECKPOINT_FILE).is_file():
            argv.append("--resume")
        elif RunDirectory(run_dir).holds_run():
            # Killed before its first checkpoint: nothing to resume and nothing to lose (ncfast
            # train refuses to start over such a run without --overwrite).
            argv.append("--overwrite")
        if stop is not None:
            argv += ["--stop-after", str(stop)]
        env = {**os.environ, **self.env}
        with (run_dir / LOG_FILE).open("ab") as log:
            log.write(f"\n[{_now()}] {' '.join(argv[2:])}\n".encode())
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
            "train_args": self.train_args,
            "epochs": self.epochs,
            "checkpoint_every": self.checkpoint_every,
            "env": self.env,
        }


# --------------------------------------------------------------------------------- sweep
@dataclass
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
            f"--time: expected minutes or [D-]HH:MM:SS (as sbatch --time), got {text!r}"
        ) from None
    total = days_n * 1440 + hours * 60 + minutes + math.ceil(seconds / 60)
    if total < 1:
        raise SweepError(f"--time: must be at least one minute, got {text!r}")
    return total


def submitit_parameters(slurm: SlurmOptions) -> dict:
    """The ``AutoExecutor.update_parameters`` keywords of ``slurm`` (SweepError naming the
    option for a bad one)."""
    cluster = slurm.cluster or "slurm"
    params: dict = {"name": "ncfast-sweep", "timeout_min": parse_time_minutes(slurm.time)}
    gpus = slurm.gpus_per_run if slurm.gpus_per_run is not None else int(cluster == "slurm")
    if gpus < 0:
        raise SweepError(f"--gpus-per-run: must be ≥ 0, got {gpus}")
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
        key, sep, value = str(item).partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise SweepError(f"--slurm-option: expected KEY=VALUE, got {item!r}")
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


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class Sweep:
    """A sweep in ``out`` (see the module docstring). ``grid`` None: the grid of
    ``out/sweep.json`` (SweepError when there is none)."""

    def __init__(self, out: str | os.PathLike, grid: Grid | None = None) -> None:
        self.out = Path(out)
        stored = self.stored_grid()
        if grid is None and stored is None:
            raise SweepError(
                f"--out: {self.out} holds no sweep ({SWEEP_FILE} is missing); give the grid "
                "(--datasets ... or --preset paper)"
            )
        if grid is not None and stored is not None and grid != stored:
            raise SweepError(
                f"--out: {self.out / SWEEP_FILE} holds another grid ("
                + "; ".join(grid.difference(stored))
                + "); rerun with that grid (or with none: it is read from there), or choose "
                "another --out"
            )
        self.grid = grid or stored
        self.specs = self.grid.runs()
        self._config: TrainConfig | None = None
        self._epochs: int | None = None

    def stored_grid(self) -> Grid | None:
        path = self.out / SWEEP_FILE
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SweepError(f"{path}: cannot be read ({exc})") from None
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise SweepError(f"{path}: not a sweep grid of format {FORMAT}")
        return Grid.from_json(values, str(path))

    @property
    def config(self) -> TrainConfig:
        """The resolved options common to the runs (checks the whole grid on first use)."""
        if self._config is None:
            self._config = self.grid.check()
        return self._config

    @property
    def epochs(self) -> int:
        """The runs' ``--epochs`` (without checking the whole grid)."""
        if self._epochs is None:
            preset, options = train_options(self.grid.train_args)
            self._epochs = TrainConfig.from_preset(preset, **options).epochs
        return self._epochs

    def prepare(self) -> None:
        """Check the grid and write ``sweep.json`` (before any run starts)."""
        _ = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.out / SWEEP_FILE).is_file():
            write_text_atomic(self.out / SWEEP_FILE, json.dumps(self.grid.to_json(), indent=1))

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / RUNS_DIR / spec.name

    # ---------------------------------------------------------------------------- states
    def state(self, spec: RunSpec) -> str:
        """done, failed, running (its lock is held), queued (submitted to Slurm, job alive) or
        waiting (not started, or stopped and resumable)."""
        run_dir = self.run_dir(spec)
        if not run_dir.is_dir():
            return "waiting"
        if in_use(run_dir):
            return "running"
        status = read_status(run_dir)
        if status.get("state") in ("done", "failed"):
            return status["state"]
        if status.get("state") in ("submitted", "started") and _job_alive(status):
            return "queued"
        if final_test_error(run_dir, self.epochs) is not None:
            return "done"  # finished; the sweep that ran it was killed before recording it
        return "waiting"

    def states(self) -> dict[str, list[RunSpec]]:
        out: dict[str, list[RunSpec]] = {s: [] for s in STATES}
        for spec in self.specs:
            out[self.state(spec)].append(spec)
        return out

    def status_text(self) -> str:
        """One line per state count, for ``ncfast sweep --status``."""
        states = self.states()
        counts = {k: len(v) for k, v in states.items()}
        resumable = sum((self.run_dir(s) / CHECKPOINT_FILE).is_file() for s in states["waiting"])
        lines = [
            f"{self.out}: {len(self.specs)} runs ({self.grid.shape()})",
            f"done {counts['done']}, running {counts['running']}, failed {counts['failed']}, "
            f"waiting {counts['waiting'] + counts['queued']}",
        ]
        if counts["queued"] or resumable:
            lines.append(
                f"of the waiting: {counts['queued']} queued on Slurm, {resumable} resume from a "
                "checkpoint"
            )
        for spec in states["failed"]:
            reason = read_status(self.run_dir(spec)).get("reason", "?")
            lines.append(f"failed {spec.name}: {reason}")
        owner = _sweep_owner(self.out)
        if owner:
            lines.append(f"a sweep is running in it: {owner}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------- run
    def run(
        self,
        executor: str = "local",
        *,
        jobs: int | None = None,
        runs_per_gpu: int = 1,
        gpus: Sequence[str] | None = None,
        slurm: SlurmOptions | None = None,
        wait: bool = True,
        checkpoint_every: int | None = None,
        retry_failed: bool = False,
        download: bool = False,
        progress: bool = True,
        echo: Callable[[str], None] = print,
    ) -> dict[str, int]:
        """Run every run that is not done (see the module docstring); returns the counts of
        :meth:`states` at the end. ``executor``: local, slurm or submitit-local."""
        if executor not in ("local", "slurm", "submitit-local"):
            raise SweepError(f"--executor: local, slurm or submitit-local, got {executor!r}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise SweepError(f"--checkpoint-every: must be ≥ 1, got {checkpoint_every}")
        self.prepare()
        if download:
            self._download(echo)
        lock = RunDirectory(self.out)
        try:
            lock.lock()  # one sweep process per DIR at a time
        except RunDirectoryError as exc:
            raise SweepError(str(exc).replace("out: ", "--out: ", 1)) from None
        try:
            states = self.states()
            todo = states["waiting"] + (states["failed"] if retry_failed else [])
            counts = {k: len(v) for k, v in states.items()}
            echo(
                f"sweep: {len(self.specs)} runs ({self.grid.shape()}): {counts['done']} done, "
                f"{counts['failed']} failed, {counts['running'] + counts['queued']} running "
                f"elsewhere, {len(todo)} to run"
            )
            if executor == "local":
                self._run_local(todo, jobs, runs_per_gpu, gpus, checkpoint_every, progress, echo)
            else:
                slurm = slurm or SlurmOptions()
                if executor == "submitit-local":
                    slurm = SlurmOptions(**{**slurm.__dict__, "cluster": "local"})
                waiting_for = states["queued"] + states["running"]
                self._run_submitit(todo, waiting_for, slurm, wait, checkpoint_every, progress, echo)
        finally:
            lock.unlock()
        return {k: len(v) for k, v in self.states().items()}

    def _download(self, echo) -> None:
        """Fetch the grid's missing dataset files once, before any run (not by every run)."""
        _, options = train_options(self.grid.train_args)
        root = options.get("data_root") or default_root()
        for dataset in self.grid.datasets:
            echo(f"download: {dataset} into {root}")
            try:
                download_dataset(dataset, root)
            except DatasetError as exc:
                raise SweepError(f"--download: {exc}") from None

    def _training_run(self, spec: RunSpec, checkpoint_every, env=None) -> TrainingRun:
        return TrainingRun(self.out, spec, self.grid.train_args, self.epochs, checkpoint_every, env)

    def _slots(self, jobs, runs_per_gpu, gpus) -> list[dict]:
        """The environment of each parallel slot of the local executor."""
        _, options = train_options(self.grid.train_args)
        on_cpu = options.get("device") == "cpu"
        gpus = [] if on_cpu else (visible_gpus() if gpus is None else [str(g) for g in gpus])
        if runs_per_gpu < 1:
            raise SweepError(f"--runs-per-gpu: must be ≥ 1, got {runs_per_gpu}")
        if gpus:
            if jobs is not None:
                raise SweepError(
                    "--jobs: the runs go to the GPUs (--runs-per-gpu K at once on each); give "
                    "the train option --device cpu for CPU slots"
                )
            slots = [{"CUDA_VISIBLE_DEVICES": g} for g in gpus for _ in range(runs_per_gpu)]
        else:
            jobs = 1 if jobs is None else jobs
            if jobs < 1:
                raise SweepError(f"--jobs: must be ≥ 1, got {jobs}")
            slots = [{"CUDA_VISIBLE_DEVICES": ""} for _ in range(jobs)]
        if "OMP_NUM_THREADS" not in os.environ:
            # Each run its share of the cores, not all of them (oversubscription is slower).
            threads = str(max(1, (os.cpu_count() or 1) // len(slots)))
            for slot in slots:
                slot["OMP_NUM_THREADS"] = threads
        return slots

    def _run_local(self, todo, jobs, runs_per_gpu, gpus, checkpoint_every, progress, echo):
        slots = self._slots(jobs, runs_per_gpu, gpus)
        where = (
            f"{len(slots)} CPU slot(s)"
            if not slots[0]["CUDA_VISIBLE_DEVICES"]
            else f"{len({s['CUDA_VISIBLE_DEVICES'] for s in slots})} GPU(s), {runs_per_gpu} per GPU"
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
            run = self._training_run(spec, checkpoint_every, slot)
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

        tracker = _Progress(len(self.specs), len(self.specs) - len(todo), len(slots), progress)
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

    def _run_submitit(self, todo, waiting_for, slurm, wait_for, checkpoint_every, progress, echo):
        try:
            import submitit
        except ImportError:
            raise SweepError(
                "--executor slurm needs submitit, which is not installed: "
                "pip install 'ncfast[slurm]' (or pip install submitit)"
            ) from None
        cluster = slurm.cluster or "slurm"
        params = submitit_parameters(slurm)
        folder = self.out / SLURM_DIR
        try:
            executor = submitit.AutoExecutor(
                folder=folder, cluster=cluster, slurm_max_num_timeout=slurm.max_requeues
            )
            executor.update_parameters(**params)
        except (ValueError, NameError, AssertionError, RuntimeError) as exc:
            raise SweepError(f"--executor {cluster}: {str(exc).splitlines()[0]}") from None
        jobs: dict[str, object] = {}
        if todo:
            runs = [self._training_run(spec, checkpoint_every) for spec in todo]
            for spec in todo:
                self.run_dir(spec).mkdir(parents=True, exist_ok=True)
            with executor.batch():
                submitted = [executor.submit(run) for run in runs]
            for spec, job in zip(todo, submitted, strict=True):
                jobs[spec.name] = job
                status = read_status(self.run_dir(spec))
                write_status(
                    self.run_dir(spec),
                    {
                        "attempts": status.get("attempts", []),
                        "state": "submitted",
                        "job_id": str(job.job_id),
                        "cluster": cluster,
                        "folder": str(folder),
                        "submit_host": platform.node(),
                        "submitted": _now(),
                    },
                )
            echo(
                f"submitted {len(todo)} runs to {cluster} (job {submitted[0].job_id.split('_')[0]}"
                f"{'' if len(todo) == 1 else ', ...'}); logs in {folder}"
            )
        if not wait_for:
            echo(f"not waiting: follow them with `ncfast sweep --status {self.out}`")
            return
        watched = list(todo) + list(waiting_for)
        tracker = _Progress(len(self.specs), len(self.specs) - len(watched), None, progress)
        open_runs = {spec.name: spec for spec in watched}
        previous = _term_as_interrupt()
        try:
            while open_runs:
                for name, spec in list(open_runs.items()):
                    outcome = self._job_outcome(spec, jobs.get(name))
                    if outcome is not None:
                        del open_runs[name]
                        tracker.finished(spec, outcome, echo)
                if open_runs:
                    time.sleep(POLL_S["local" if cluster == "local" else "slurm"])
        except KeyboardInterrupt:
            tracker.close()
            echo(
                f"stopped waiting; the jobs keep running (`ncfast sweep --status {self.out}`; "
                "the same command waits for them again)"
            )
            raise
        finally:
            _restore_term(previous)
            tracker.close()

    def _job_outcome(self, spec: RunSpec, job) -> dict | None:
        """The outcome of a submitted run once its job has ended, else None."""
        run_dir = self.run_dir(spec)
        status = read_status(run_dir)
        if status.get("state") in ("done", "failed"):
            return outcome_of(status)
        alive = (not job.done()) if job is not None else _job_alive(status)
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
        write_status(run_dir, {**status, "state": "failed", "reason": reason, "finished": _now()})
        return {"state": "failed", "reason": reason}

    # ---------------------------------------------------------------- selection, report
    def select(self) -> dict:
        """Per (dataset, network, loss): the learning rate of lowest final test error (mean
        over the seeds that finished; ties: the smaller rate). Written to ``selected.json`` and
        returned."""
        results: dict[tuple, dict[float, dict[int, float]]] = {}
        failed: dict[tuple, set[float]] = {}
        for spec in self.specs:
            cell = results.setdefault(spec.cell, {})
            state = self.state(spec)
            error = final_test_error(self.run_dir(spec), self.epochs)
            if state == "done" and error is not None:
                cell.setdefault(spec.lr, {})[spec.seed] = error
            elif state == "failed":
                failed.setdefault(spec.cell, set()).add(spec.lr)
        selected = []
        for (dataset, net, loss), by_lr in results.items():
            entry = {"dataset": dataset, "net": net, "loss": loss}
            mean = {lr: sum(e.values()) / len(e) for lr, e in by_lr.items()}
            entry["lrs_finished"] = sorted(mean)
            entry["lrs_failed"] = sorted(failed.get((dataset, net, loss), ()))
            if mean:
                best = min(mean, key=lambda lr: (mean[lr], lr))
                seeds = sorted(by_lr[best])
                entry.update(
                    lr=best,
                    test_error=mean[best],
                    seeds=seeds,
                    runs=[RunSpec(dataset, net, loss, best, s).name for s in seeds],
                    test_error_by_lr={repr(lr): mean[lr] for lr in sorted(mean)},
                )
            else:
                entry.update(lr=None, test_error=None, seeds=[], runs=[])
            selected.append(entry)
        done = sum(self.state(s) == "done" for s in self.specs)
        out = {
            "criterion": "lowest final test error (mean over seeds); ties: the smaller lr",
            "epochs": self.epochs,
            "runs_done": done,
            "runs_total": len(self.specs),
            "selected": selected,
        }
        write_text_atomic(self.out / SELECTED_FILE, json.dumps(out, indent=1) + "\n")
        return out

    def report(self, formats: Sequence[str] = ("png", "pdf"), selection: dict | None = None):
        """Table 1 and the Figs. 2–12 grid over the selected runs (the smallest seed of each for
        the figures), and the sweep figure, in ``report/``; returns the paths written."""
        selection = selection or self.select()
        report = self.out / REPORT_DIR
        chosen = [e for e in selection["selected"] if e["runs"]]
        if not chosen:
            raise SweepError(f"{self.out}: no run has finished yet, nothing to report")
        runs = [load_run(self.out / RUNS_DIR / name) for e in chosen for name in e["runs"]]
        _, paths = write_table1(runs, report)
        first_seed = [load_run(self.out / RUNS_DIR / e["runs"][0]) for e in chosen]
        paths += plot_runs(first_seed, report, formats)
        paths += lr_sweep_figure(selection, report, formats)
        return paths


def _sweep_owner(out: Path) -> str | None:
    """'PID ... on HOST since ...' while a sweep process holds DIR's lock."""
    try:
        RunDirectory(out).check_not_in_use()
    except RunDirectoryError as exc:
        return str(exc).split(" is in use by ", 1)[-1].split(";")[0]
    return None


def _job_alive(status: dict) -> bool:
    """Whether the submitit job of a submitted run may still run it (pending or running)."""
    job_id, cluster = status.get("job_id"), status.get("cluster")
    if not job_id:
        return False
    if cluster == "local":
        if status.get("submit_host") != platform.node():
            return False
        try:
            os.kill(int(job_id), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
        return True
    try:
        import submitit

        job = submitit.SlurmJob(folder=status.get("folder", "."), job_id=str(job_id))
        return not job.done(force_check=True)
    except Exception:  # no sacct here, or a job Slurm has forgotten: submit again
        return False


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


class _Progress:
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
            shown = [f"test error {error:.4f}"] if isinstance(error, float) else []
            seconds = outcome.get("seconds")
            if seconds and outcome.get("note") != "found finished":
                self.seconds.append(seconds)
                shown.append(_duration(seconds))
            self._write(f"done {spec.name}: {', '.join(shown) or 'finished'}", echo)
        self.bar.update(1)
        estimate = self.estimate()
        if estimate is not None:
            if not self.announced:
                basis = (
                    f"{len(self.seconds)} finished run(s), {self.slots} at a time"
                    if self.slots
                    else f"{self.count} run(s) finished so far"
                )
                self._write(f"estimated time left: {_duration(estimate)} (from {basis})", echo)
                self.announced = True
            self.bar.set_postfix_str(f"failed {self.failed}, ~{_duration(estimate)} left")

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


def lr_sweep_figure(selection: dict, out_dir: str | os.PathLike, formats=("png", "pdf")):
    """Final test error against learning rate (log x): a panel per (dataset, network), a line
    per loss (mean over seeds), the selected rate circled, failed rates marked × at the top.
    Written as ``lr_sweep.<format>``; returns the paths."""
    from matplotlib.lines import Line2D

    entries = selection["selected"]
    datasets = list(dict.fromkeys(e["dataset"] for e in entries))
    rows: dict[str, list[str]] = {}
    for e in entries:
        rows.setdefault(e["dataset"], [])
        if e["net"] not in rows[e["dataset"]]:
            rows[e["dataset"]].append(e["net"])
    nrows = max(len(v) for v in rows.values())
    fig, axes = new_figure(nrows, len(datasets), (3.4 * len(datasets), 2.6 * nrows))
    losses = list(dict.fromkeys(e["loss"] for e in entries))
    colors = {
        loss: LOSS_COLORS.get(loss, OTHER_COLORS[k % len(OTHER_COLORS)])
        for k, loss in enumerate(losses)
    }
    for col, dataset in enumerate(datasets):
        for row in range(nrows):
            ax = axes[row][col]
            if row >= len(rows[dataset]):
                ax.set_visible(False)
                continue
            net = rows[dataset][row]
            cell = [e for e in entries if (e["dataset"], e["net"]) == (dataset, net)]
            _lr_panel(ax, f"{dataset} · {net}", cell, colors)
    handles = [Line2D([], [], color=colors[loss], marker="o", ms=3, label=loss) for loss in losses]
    handles.append(
        Line2D([], [], color="gray", marker="o", ms=9, mfc="none", ls="", label="selected")
    )
    handles.append(Line2D([], [], color="gray", marker="x", ls="", label="failed"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    return save_figure(fig, out_dir, "lr_sweep", formats)


def _lr_panel(ax, title: str, entries: list[dict], colors: dict) -> None:
    """One (dataset, network) panel of :func:`lr_sweep_figure`: a line per loss."""
    for e in entries:
        color = colors[e["loss"]]
        by_lr = {float(k): v for k, v in (e.get("test_error_by_lr") or {}).items()}
        if by_lr:
            lrs = sorted(by_lr)
            ax.plot(lrs, [by_lr[x] for x in lrs], "o-", color=color, ms=3, label=e["loss"])
            ax.plot([e["lr"]], [e["test_error"]], "o", ms=10, mfc="none", mec=color, mew=1.5)
        if e["lrs_failed"]:
            ax.plot(e["lrs_failed"], [1.0] * len(e["lrs_failed"]), "x", color=color)
    ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("learning rate", fontsize=8)
    ax.set_ylabel("final test error", fontsize=8)
    ax.tick_params(which="both", labelsize=7)
    ax.grid(True, which="major", alpha=0.3)


__all__ = [
    "PAPER_GRID",
    "Grid",
    "RunSpec",
    "SlurmOptions",
    "Sweep",
    "SweepError",
    "TrainingRun",
    "lr_sweep_figure",
    "parse_lrs",
    "parse_names",
    "parse_seeds",
]
