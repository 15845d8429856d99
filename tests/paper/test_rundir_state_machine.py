"""The run directory's state machine, explored by hypothesis (issue 19).

Random sequences of: a new run (with or without --overwrite, to the end or stopped early), a
resumption, a kill at the start of an epoch (what a kill leaves: the stale lock of the killed
owner and a partial checkpoint named by its token), an analysis, files the user puts in the
folder (including names that look like ncfast's temporary files) and a symbolic link planted as
the lock. After every step: no byte of a foreign file (or of the link's victim) changed, no
leftover of a finished owner is in the folder, and a run that reached its last epoch, however
often it was killed and resumed, logged and saved exactly what the uninterrupted run did (on
the CPU training reproduces exactly, see ncfast.paper.train).

Everything runs in this process on tests/helpers/tiny_runs.py's synthetic data (a 1/16-width
VGG11, 80 images, 3 epochs); the analysis draws no figures (they are plots.py's concern). The
seed of the exploration is the test's ``seed`` (printed on failure; NCFAST_TEST_SEED replays it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    get_state_machine_test,
    initialize,
    invariant,
    precondition,
    rule,
)

import ncfast.paper.analyze as analyze_module
import ncfast.paper.sgd_epoch as sgd_epoch
import ncfast.paper.train as train_module
from ncfast.errors import NCFastError
from ncfast.paper.checkpoint import load_checkpoint
from ncfast.paper.rundir import LOCK_FILE, RunDirectory, RunDirectoryError
from tests.helpers.tiny_runs import read_rows, synthetic_split, tiny_config

EPOCHS = 3
TIME_KEYS = ("wall_time", "epoch_time", "measure_time")
# Names a user may give files, among them look-alikes of ncfast's temporary names.
FOREIGN_NAMES = (
    "notes.txt",
    ".ncfast-trash-mine",
    ".config.json.mine.tmp",
    ".checkpoint.pt.abc.tmp",
    "analysis/paper.tex",
    ".ncfast-0123456789abcdef-trash",
)


class Killed(BaseException):
    """Stands for SIGKILL: raised at the start of an epoch, caught by the test only."""


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in read_rows(out)]


def _weights(out: Path) -> dict:
    return load_checkpoint(out / "checkpoint.pt")["model"]


class RunDirectoryMachine(RuleBasedStateMachine):
    data = None
    reference: tuple[list[dict], dict] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="ncfast-sm-"))
        self.out = self.root / "run"
        self.out.mkdir()
        self.victim = self.root / "victim.txt"
        self.victim.write_bytes(b"victim")
        self.foreign: dict[Path, bytes] = {}
        self.checkpoint_epoch = 0  # 0: none
        self.has_run = False  # config.json of a run is here
        self.finished = False

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ the runs
    def _train(self, **options) -> None:
        train_module.train(tiny_config(self.out, **self._options(options)), False, self.data)

    @staticmethod
    def _options(options: dict) -> dict:
        return {"epochs": EPOCHS, "measure_epochs": "all", **options}

    def _finished(self) -> None:
        self.has_run, self.checkpoint_epoch, self.finished = True, EPOCHS, True
        rows, weights = self.reference
        assert _rows(self.out) == rows
        got = _weights(self.out)
        assert all(torch.equal(got[k], v) for k, v in weights.items())

    @initialize(foreign=st.sampled_from(FOREIGN_NAMES[:4]), stop_after=st.sampled_from([1, 2]))
    def stopped_run(self, foreign: str, stop_after: int) -> None:
        """Most sequences worth exploring begin with a run to resume (among the user's files)."""
        self.foreign_file(foreign, b"mine")
        self.new_run(False, stop_after)

    @rule(overwrite=st.booleans(), stop_after=st.sampled_from([None, 1, 2]))
    def new_run(self, overwrite: bool, stop_after: int | None) -> None:
        if self.has_run and not overwrite:
            with pytest.raises(RunDirectoryError, match="already holds a run"):
                self._train(overwrite=False, stop_after=stop_after)
            return
        self._train(overwrite=overwrite, stop_after=stop_after)
        if stop_after is None:
            self._finished()
        else:
            self.has_run, self.checkpoint_epoch, self.finished = True, stop_after, False

    @rule()
    def resume(self) -> None:
        if self.finished:  # nothing left to train: the run stays as it is
            self._train(resume=True)
            self._finished()
            return
        if not self.checkpoint_epoch:
            with pytest.raises(NCFastError):
                self._train(resume=True, overwrite=False)
            return
        self._train(resume=True)
        self._finished()

    @rule(later=st.integers(1, EPOCHS - 1), partial=st.booleans())
    def kill(self, later: int, partial: bool) -> None:
        """A run (a resumption where there is a checkpoint to resume) killed at the start of
        the epoch ``later`` epochs after its first; with ``partial``, halfway through writing
        a checkpoint too."""
        resume = bool(self.checkpoint_epoch) and not self.finished
        epoch = min(EPOCHS, (self.checkpoint_epoch if resume else 0) + later)
        permutation = sgd_epoch.epoch_permutation

        def killed_at(num_samples, seed, e, device):
            if e == epoch:
                raise Killed
            return permutation(num_samples, seed, e, device)

        unlock = RunDirectory.unlock
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sgd_epoch, "epoch_permutation", killed_at)
            # The kernel drops a killed owner's flock; its lock file stays.
            patch.setattr(RunDirectory, "unlock", _unlock_as_a_kill)
            try:
                self._train(resume=resume, overwrite=not resume)
            except Killed:
                pass
        RunDirectory.unlock = unlock
        owner = json.loads((self.out / LOCK_FILE).read_text())
        if partial:
            name = f".checkpoint.pt.ncfast-{owner['token']}-killed.tmp"
            (self.out / name).write_bytes(b"PK\x03\x04 half a checkpoint")
        self.has_run, self.finished = True, False
        self.checkpoint_epoch = epoch - 1 if epoch > 1 else (self.checkpoint_epoch if resume else 0)

    @precondition(lambda self: self.checkpoint_epoch > 0)
    @rule()
    def analyze(self) -> None:
        # The analysis replaces analysis/ as a whole: a user's file there makes it refuse.
        foreign_analysis = any(p.parent == self.out / "analysis" for p in self.foreign)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(analyze_module, "plot_runs", lambda *a, **k: [])
            patch.setattr(analyze_module, "load_data", lambda config: self.data)
            if foreign_analysis:
                with pytest.raises(RunDirectoryError, match="did not write"):
                    analyze_module.analyze(
                        self.out / "checkpoint.pt", robustness_samples=0, progress=False
                    )
                return
            report = analyze_module.analyze(
                self.out / "checkpoint.pt", robustness_samples=0, progress=False
            )
        assert report["epoch"] == self.checkpoint_epoch

    # ------------------------------------------------------------- the user's files
    @rule(name=st.sampled_from(FOREIGN_NAMES), content=st.binary(max_size=16))
    def foreign_file(self, name: str, content: bytes) -> None:
        path = self.out / name
        if (
            path in self.foreign
            or path.exists()
            or (name.startswith("analysis/") and not self.has_run)
        ):
            return  # (analysis/ of no run: a folder ncfast refuses, test_rundir_safety.py)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        self.foreign[path] = content

    @rule()
    def linked_lock(self) -> None:
        """A link planted as the lock is refused and never written through; then removed."""
        lock = self.out / LOCK_FILE
        stale = lock.read_bytes() if lock.exists() and not lock.is_symlink() else None
        lock.unlink(missing_ok=True)
        lock.symlink_to(self.victim)
        with pytest.raises(RunDirectoryError, match="symbolic link"):
            self._train(resume=bool(self.checkpoint_epoch), overwrite=True)
        lock.unlink()
        if stale is not None:
            lock.write_bytes(stale)

    # ----------------------------------------------------------------- invariants
    @invariant()
    def nothing_foreign_changed(self) -> None:
        assert self.victim.read_bytes() == b"victim"
        for path, content in self.foreign.items():
            assert path.read_bytes() == content, path

    @invariant()
    def no_leftovers_of_a_finished_owner(self) -> None:
        lock = self.out / LOCK_FILE
        if lock.exists():  # a killed owner's: its leftovers are cleaned by the next one
            return
        ours = [p.name for p in self.out.iterdir() if ".ncfast-" in p.name or "ncfast-" in p.name]
        assert [n for n in ours if self.out / n not in self.foreign] == []


def _unlock_as_a_kill(self) -> None:
    if self._lock_fd is not None:
        os.close(self._lock_fd)
        self._lock_fd = None


@pytest.fixture(scope="module")
def machine_class(tmp_path_factory, one_thread):
    """The machine with the data and the uninterrupted run's rows and weights."""
    data = (synthetic_split("train", 20, 0), synthetic_split("test", 6, 1))
    out = tmp_path_factory.mktemp("reference") / "run"
    train_module.train(tiny_config(out, epochs=EPOCHS, measure_epochs="all"), False, data)
    RunDirectoryMachine.data = data
    RunDirectoryMachine.reference = (_rows(out), _weights(out))
    return RunDirectoryMachine


def test_run_directory_state_machine(machine_class, seed):
    print(f"hypothesis seed {seed}")
    test = get_state_machine_test(
        machine_class,
        settings=settings(
            max_examples=5,
            stateful_step_count=6,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    hypothesis_seed(seed)(test)()
