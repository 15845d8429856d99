"""What makes a folder a run directory of ncfast and which of its files ncfast wrote: the
marker (:func:`run_marker`, :func:`is_run_directory`), the names ncfast writes (:data:`RUN_FILES`,
:func:`analysis_entries`) and the rest (:func:`foreign_entries`), the check that an output folder
can be written, and the atomic swap of a folder (:func:`swap_in_folder`). The lock and every
change to a run directory: :mod:`ncfast.paper.rundir`."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path

from ncfast.errors import NCFastError
from ncfast.report.runs import ANALYSIS_DIR, CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE

# config.json's marker of a run directory (older releases wrote none: see is_run_directory).
RUN_FORMAT = "ncfast-run-v1"
# The file that makes a folder a sweep's (ncfast.paper.sweep.SWEEP_FILE), never a run's.
SWEEP_FILE = "sweep.json"
# The files of a run, in the order an overwrite removes them: the checkpoint first (a run is
# never resumed from a half-cleared directory), config.json (the marker) last.
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, ANALYSIS_DIR, CONFIG_FILE)
# What ncfast analyze writes in an analysis folder (figures/NAME.FORMAT of ncfast.report.plots).
ANALYSIS_FILES = ("report.json", "summary.md")
FIGURES_DIR = "figures"


class RunDirectoryError(NCFastError, ValueError):
    """The run directory cannot be used as asked (in use, holds another run, not writable, or
    the resumed run had other options); the message says what to do."""


def os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def run_marker(path: str | os.PathLike) -> dict | None:
    """The ``config.json`` of the run directory ``path`` when ncfast wrote it (a JSON object
    with ncfast's ``format`` and ``ncfast_version``; releases before the format field: the
    version and the options ``dataset``, ``net`` and ``epochs``), else None."""
    config = Path(path) / CONFIG_FILE
    if config.is_symlink() or not config.is_file():
        return None
    try:
        with config.open("rb") as f:
            record = json.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("ncfast_version"), str):
        return None
    if record.get("format") == RUN_FORMAT:
        return record
    legacy = "format" not in record and all(k in record for k in ("dataset", "net", "epochs"))
    return record if legacy else None


def is_run_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory written by ``ncfast train``: its ``config.json``
    carries ncfast's marker (:func:`run_marker`). A sweep folder (``sweep.json``) never is."""
    return not (Path(path) / SWEEP_FILE).exists() and run_marker(path) is not None


def analysis_entries(folder: str | os.PathLike) -> list[Path]:
    """The files (and the figures folder) ``ncfast analyze`` writes that are in ``folder``:
    report.json, summary.md and figures/NAME.FORMAT of ncfast's figures; deepest first."""
    from ncfast.report.plots import FIGURE_NAMES, ONLINE_FIGURE

    folder = Path(folder)
    figures = folder / FIGURES_DIR
    found = []
    if figures.is_dir() and not figures.is_symlink():
        figure_names = (*FIGURE_NAMES, ONLINE_FIGURE)
        names = {f"{n}.{ext}" for n in figure_names for ext in ("png", "pdf", "svg")}
        found = sorted(p for p in figures.iterdir() if p.name in names and not p.is_dir())
        found.append(figures)
    found += [folder / n for n in ANALYSIS_FILES if (folder / n).exists()]
    return found


def foreign_entries(folder: str | os.PathLike) -> list[Path]:
    """What in the analysis ``folder`` ncfast analyze did not write."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = set(analysis_entries(folder))
    inside = [*folder.iterdir()]
    if folder / FIGURES_DIR in ours:
        inside += [*(folder / FIGURES_DIR).iterdir()]
    return sorted(p for p in inside if p not in ours)


def swap_in_folder(staging: Path, target: Path, trash: Path) -> None:
    """Replace the folder ``target`` (if any) by ``staging`` at once: an atomic exchange where
    the system has one (Linux ``renameat2``), else ``target`` renamed to ``trash`` and
    ``staging`` to ``target`` (a kill between leaves both, named by the lock's token). The old
    folder is deleted."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return
    os.rename(target, trash)
    os.rename(staging, target)
    shutil.rmtree(trash, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange the paths ``a`` and ``b`` (False where it cannot be done)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


def dangling_link(path: Path) -> str | None:
    if path.is_symlink() and not path.exists():
        return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
    return None


def check_writable_dir(path: str | os.PathLike, option: str) -> None:
    """RunDirectoryError naming ``option`` unless ``path`` is a directory that can be written,
    or can be created. Nothing is left behind: a probe file is written (and removed) in
    ``path`` or in its nearest existing parent, which creating it needs to write to."""
    path = Path(path)
    dangling = dangling_link(path)
    if dangling:
        raise RunDirectoryError(f"{option}: {dangling}")
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"{option}: {path} exists and is not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirectoryError(f"{option}: cannot create {path}: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ncfast-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        action = "write to" if existing == path else "create"
        raise RunDirectoryError(f"{option}: cannot {action} {path} ({os_reason(exc)})") from None
