"""The sweep itself: a grid in a directory, the state of each of its runs, running what is
not done, and selecting each cell's best learning rate."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ncfast.paper.checkpoint import write_text_atomic
from ncfast.paper.config import TrainConfig
from ncfast.paper.data import DatasetError, default_root, download_dataset
from ncfast.paper.rundir import RunDirectory, RunDirectoryError, is_run_directory
from ncfast.paper.sweep.executors import (
    SweepOptions,
    local_slots,
    run_local,
    run_submitit,
)
from ncfast.paper.sweep.grid import Grid, RunSpec
from ncfast.paper.sweep.layout import (
    REPORT_DIR,
    RUNS_DIR,
    SELECTED_FILE,
    STATES,
    SWEEP_FILE,
    SweepError,
)
from ncfast.paper.sweep.run import TrainingRun
from ncfast.paper.sweep.status import (
    final_test_error,
    in_use,
    job_alive,
    read_status,
    sweep_owner,
)
from ncfast.report.runs import CHECKPOINT_FILE, load_run
from ncfast.report.sweep_figures import lr_sweep_figure
from ncfast.report.tables import write_table1


class Sweep:
    """A sweep in ``out`` (see :mod:`ncfast.paper.sweep`). ``grid`` None: the grid of
    ``out/sweep.json`` (SweepError when there is none). ``option``: the command-line option
    that gave ``out`` (named by the errors); ``read_train_args``: the command line's parser of
    ``ncfast train`` words, for a ``sweep.json`` of format 1."""

    def __init__(
        self,
        out: str | os.PathLike,
        grid: Grid | None = None,
        *,
        option: str = "--out",
        read_train_args: Callable | None = None,
    ) -> None:
        self.out = Path(out)
        self.option = option
        if is_run_directory(self.out):
            raise SweepError(
                f"{option}: {self.out} holds a training run (its config.json carries ncfast "
                "train's marker), not a sweep; choose another directory"
            )
        stored = self.stored_grid(read_train_args)
        if grid is None and stored is None:
            raise SweepError(
                f"{option}: {self.out} holds no sweep ({SWEEP_FILE} is missing)"
                + (
                    "; give the grid (--datasets ... or --preset paper)"
                    if option == "--out"
                    else ""
                )
            )
        if grid is not None and stored is not None and grid != stored:
            raise SweepError(
                f"{option}: {self.out / SWEEP_FILE} holds another grid ("
                + "; ".join(grid.difference(stored))
                + "); rerun with that grid (or with none: it is read from there), or choose "
                "another --out"
            )
        self.grid: Grid = grid or stored  # type: ignore[assignment]
        self.specs = self.grid.runs()
        self._config: TrainConfig | None = None
        self._epochs: int | None = None
        # Runs whose sweep_status.json said more than their files show (reported, then rerun).
        self.mismatches: dict[str, str] = {}

    def stored_grid(self, read_train_args: Callable | None = None) -> Grid | None:
        path = self.out / SWEEP_FILE
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SweepError(f"{path}: cannot be read ({exc})") from None
        return Grid.from_json(values, str(path), read_train_args)

    @property
    def config(self) -> TrainConfig:
        """The resolved options common to the runs (checks the whole grid on first use)."""
        if self._config is None:
            self._config = self.grid.check()
        return self._config

    @property
    def epochs(self) -> int:
        """The runs' ``epochs`` (without checking the whole grid)."""
        if self._epochs is None:
            self._epochs = self.grid.epochs()
        return self._epochs

    def prepare(self) -> None:
        """Check the grid and write ``sweep.json`` (before any run starts)."""
        _ = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.out / SWEEP_FILE).is_file():
            write_text_atomic(self.out / SWEEP_FILE, json.dumps(self.grid.to_json(), indent=1))

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / RUNS_DIR / spec.name

    def training_run(self, spec: RunSpec, checkpoint_every=None, env=None) -> TrainingRun:
        """The run function of ``spec`` (every executor's)."""
        options = {"preset": self.grid.train_preset, **self.grid.train_options}
        return TrainingRun(self.out, spec, options, self.epochs, checkpoint_every, env)

    # ---------------------------------------------------------------------------- states
    def state(self, spec: RunSpec) -> str:
        """done, failed, running (its lock is held), queued (submitted to Slurm, job alive) or
        waiting (not started, or stopped and resumable). The status file is checked against
        the run's files: a run it calls done that has not logged its final test error is
        waiting (and noted in :attr:`mismatches`)."""
        run_dir = self.run_dir(spec)
        if not run_dir.is_dir():
            return "waiting"
        if in_use(run_dir):
            return "running"
        status = read_status(run_dir)
        finished = final_test_error(run_dir, self.epochs) is not None
        if status.get("state") == "done" and not finished:
            self.mismatches[spec.name] = (
                f"{spec.name}: sweep_status.json says done, but the run has not logged its "
                f"test error of epoch {self.epochs}; it runs again"
            )
            return "waiting"
        if status.get("state") in ("done", "failed"):
            return status["state"]
        if status.get("state") in ("submitted", "started") and job_alive(status):
            return "queued"
        if finished:
            return "done"  # finished; the sweep that ran it was killed before recording it
        return "waiting"

    def states(self) -> dict[str, list[RunSpec]]:
        out: dict[str, list[RunSpec]] = {s: [] for s in STATES}
        self.mismatches = {}
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
                f"of the waiting: {counts['queued']} queued (submitted jobs), {resumable} "
                "resume from a checkpoint"
            )
        lines += list(self.mismatches.values())
        for spec in states["failed"]:
            reason = read_status(self.run_dir(spec)).get("reason", "?")
            lines.append(f"failed {spec.name}: {reason}")
        owner = sweep_owner(self.out)
        if owner:
            lines.append(f"a sweep is running in it: {owner}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------- run
    def run(
        self, options: SweepOptions | None = None, echo: Callable[[str], None] = print
    ) -> dict[str, int]:
        """Run every run that is not done (see :mod:`ncfast.paper.sweep`); returns the counts
        of :meth:`states` at the end. Every option and the whole grid are checked before
        anything is written."""
        options = options or SweepOptions()
        options.check()
        slots = None
        if options.executor == "local":
            slots = local_slots(options, self.grid.train_options.get("device") == "cpu")
        self.prepare()
        if options.download:
            self._download(echo)
        lock = RunDirectory(self.out, command="sweep")
        try:
            lock.lock()  # one sweep process per DIR at a time
        except RunDirectoryError as exc:
            raise SweepError(str(exc).replace("out: ", "--out: ", 1)) from None
        try:
            states = self.states()
            todo = states["waiting"] + (states["failed"] if options.retry_failed else [])
            counts = {k: len(v) for k, v in states.items()}
            for line in self.mismatches.values():
                echo(f"status mismatch: {line}")
            echo(
                f"sweep: {len(self.specs)} runs ({self.grid.shape()}): {counts['done']} done, "
                f"{counts['failed']} failed, {counts['running'] + counts['queued']} running "
                f"elsewhere, {len(todo)} to run"
            )
            if slots is not None:
                run_local(self, todo, slots, options, echo)
            else:
                run_submitit(self, todo, states["queued"] + states["running"], options, echo)
        finally:
            lock.unlock()
        return {k: len(v) for k, v in self.states().items()}

    def _download(self, echo) -> None:
        """Fetch the grid's missing dataset files once, before any run (not by every run)."""
        root = self.grid.train_options.get("data_root") or default_root()
        for dataset in self.grid.datasets:
            echo(f"download: {dataset} into {root}")
            try:
                download_dataset(dataset, root)
            except DatasetError as exc:
                raise SweepError(f"--download: {exc}") from None

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
        selected = [
            _selected(cell, by_lr, failed.get(cell, set())) for cell, by_lr in results.items()
        ]
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
        from ncfast.report.plots import plot_runs

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


def _selected(cell: tuple, by_lr: dict[float, dict[int, float]], failed: set[float]) -> dict:
    """The selection's entry of one (dataset, network, loss)."""
    dataset, net, loss = cell
    entry: dict = {"dataset": dataset, "net": net, "loss": loss}
    mean = {lr: sum(e.values()) / len(e) for lr, e in by_lr.items()}
    entry["lrs_finished"] = sorted(mean)
    entry["lrs_failed"] = sorted(failed)
    if not mean:
        return {**entry, "lr": None, "test_error": None, "seeds": [], "runs": []}
    best = min(mean, key=lambda lr: (mean[lr], lr))
    seeds = sorted(by_lr[best])
    return {
        **entry,
        "lr": best,
        "test_error": mean[best],
        "seeds": seeds,
        "runs": [RunSpec(dataset, net, loss, best, s).name for s in seeds],
        "test_error_by_lr": {repr(lr): mean[lr] for lr in sorted(mean)},
    }
