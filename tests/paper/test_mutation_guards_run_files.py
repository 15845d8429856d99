"""Guards of ncfast/paper/run_files.py that mutmut found missing (issue 21): the run's marker,
the names ncfast analyze writes, the check that a folder can be written and the swap of a
folder; each test fails on the surviving mutants that bench/results/mutation.md lists with it
(checked by running the mutant)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from ncfast.paper.run_files import (
    RUN_FORMAT,
    RunDirectoryError,
    analysis_entries,
    check_writable_dir,
    foreign_entries,
    os_reason,
    run_marker,
    swap_in_folder,
)
from ncfast.report.plots import FIGURE_NAMES

MARKER_LIMIT = 1 << 20  # run_marker reads at most this many bytes of config.json
HAS_RENAMEAT2 = sys.platform == "linux" and hasattr(ctypes.CDLL(None), "renameat2")
needs_renameat2 = pytest.mark.skipif(not HAS_RENAMEAT2, reason="no renameat2 on this system")


# ----------------------------------------------------------------- the run's marker
def marker_of_size(size: int) -> bytes:
    """A config.json of this release's marker, padded to exactly ``size`` bytes."""
    record = {"format": RUN_FORMAT, "ncfast_version": "0.3.0", "pad": ""}
    bare = len(json.dumps(record).encode())
    record["pad"] = "x" * (size - bare)
    text = json.dumps(record).encode()
    assert len(text) == size
    return text


def test_a_marker_of_up_to_one_mebibyte_is_read_and_a_larger_one_is_not_ncfasts(tmp_path):
    """config.json is read up to 1 MiB: a marker of exactly that size counts, one byte more
    (cut there, so no longer JSON) does not."""
    (tmp_path / "config.json").write_bytes(marker_of_size(MARKER_LIMIT))
    assert run_marker(tmp_path) is not None
    (tmp_path / "config.json").write_bytes(marker_of_size(MARKER_LIMIT + 1))
    assert run_marker(tmp_path) is None


def test_a_config_json_linked_to_a_valid_marker_is_not_a_marker(tmp_path):
    """A symbolic link named config.json is never ncfast's, even to a file with the marker."""
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"format": RUN_FORMAT, "ncfast_version": "0.3.0"}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").symlink_to(elsewhere)
    assert run_marker(run) is None


@pytest.mark.parametrize(
    "record",
    [
        {"ncfast_version": "0.1.0"},
        {"ncfast_version": "0.1.0", "dataset": "mnist", "net": "mlp"},
        {"format": "other", "ncfast_version": "0.1.0", "dataset": "d", "net": "n", "epochs": 1},
        {"format": None, "ncfast_version": "0.1.0", "dataset": "d", "net": "n", "epochs": 1},
    ],
)
def test_a_record_without_ncfasts_format_or_all_legacy_options_is_not_a_marker(tmp_path, record):
    """A release before the format field is recognised by the options dataset, net and epochs
    (all three), and only when the record has no format field at all."""
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert run_marker(tmp_path) is None


def test_a_legacy_record_with_all_three_options_is_a_marker(tmp_path):
    record = {"ncfast_version": "0.1.0", "dataset": "d", "net": "n", "epochs": 1}
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert run_marker(tmp_path) == record


# ----------------------------------------------------------------- what ncfast analyze wrote
def fill_analysis(folder: Path, figure_names: list[str], top: list[str]) -> None:
    (folder / "figures").mkdir(parents=True)
    for name in figure_names:
        (folder / "figures" / name).write_text("figure")
    for name in top:
        (folder / name).write_text("text")


@pytest.mark.parametrize("ext", ["png", "pdf", "svg"])
def test_figures_of_each_format_are_ncfasts(tmp_path, ext):
    """figures/NAME.png, .pdf and .svg of ncfast's figures are analyze's; other formats are
    not."""
    name = FIGURE_NAMES[0]
    fill_analysis(tmp_path, [f"{name}.{ext}", f"{name}.{ext}x"], [])
    figures = tmp_path / "figures"
    assert analysis_entries(tmp_path) == [figures / f"{name}.{ext}", figures]
    assert foreign_entries(tmp_path) == [figures / f"{name}.{ext}x"]


def test_an_analysis_without_a_figures_folder_lists_its_files(tmp_path):
    """Without figures/ (e.g. --format none): report.json and summary.md alone."""
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "summary.md").write_text("# run")
    assert analysis_entries(tmp_path) == [tmp_path / "report.json", tmp_path / "summary.md"]
    assert foreign_entries(tmp_path) == []


def test_a_file_named_figures_is_not_a_figures_folder(tmp_path):
    (tmp_path / "figures").write_text("mine")
    (tmp_path / "report.json").write_text("{}")
    assert analysis_entries(tmp_path) == [tmp_path / "report.json"]
    assert foreign_entries(tmp_path) == [tmp_path / "figures"]


def test_a_linked_figures_folder_is_not_followed(tmp_path):
    """figures/ as a symbolic link to a folder: nothing in it (nor the link) is analyze's."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"{FIGURE_NAMES[0]}.png").write_text("someone's figure")
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "figures").symlink_to(elsewhere, target_is_directory=True)
    assert analysis_entries(analysis) == []
    assert foreign_entries(analysis) == [analysis / "figures"]


def test_foreign_files_beside_a_figures_folder_are_listed(tmp_path):
    """With analyze's figures/ present, foreign entries at the top of the folder are listed
    as well as those inside figures/."""
    name = f"{FIGURE_NAMES[0]}.png"
    fill_analysis(tmp_path, [name, "mine.png"], ["report.json", "notes.txt"])
    assert foreign_entries(tmp_path) == [tmp_path / "figures" / "mine.png", tmp_path / "notes.txt"]


# ----------------------------------------------------------------- a folder that can be written
def test_the_reason_of_an_error_without_a_message_is_its_type():
    assert os_reason(FileNotFoundError(errno.ENOENT, "No such file")) == "No such file"
    assert os_reason(PermissionError()) == "PermissionError"


def test_a_dangling_link_is_refused_and_named(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(RunDirectoryError) as error:
        check_writable_dir(link, "out")
    gone = tmp_path / "gone"
    assert str(error.value) == f"out: {link} is a symbolic link to {gone}, which does not exist"
    assert not gone.exists()


def probes_of(monkeypatch) -> list[tuple[Path, bool]]:
    """Each file removed with os.unlink from now on, and whether it existed (was written)."""
    removed: list[tuple[Path, bool]] = []
    unlink = os.unlink

    def spy(path, *args, **kwargs):
        removed.append((Path(path), Path(path).is_file()))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", spy)
    return removed


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_probe_is_a_hidden_ncfast_file_in_the_nearest_existing_folder(
    tmp_path, monkeypatch, depth
):
    """The check writes one probe, named .ncfast-probe-*, in the folder itself when it exists,
    else in its nearest existing parent (the folder that creating it writes to); nothing is
    left and nothing is created."""
    existing = tmp_path / "outs"
    existing.mkdir()
    path = existing.joinpath(*[f"level{i}" for i in range(depth)])
    removed = probes_of(monkeypatch)
    check_writable_dir(path, "out")
    monkeypatch.undo()
    assert len(removed) == 1
    probe, written = removed[0]
    assert written and probe.parent == existing and probe.name.startswith(".ncfast-probe-")
    assert list(existing.iterdir()) == []


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (OSError(), "OSError"),
    ],
)
@pytest.mark.parametrize("exists", [True, False])
def test_a_folder_that_cannot_be_written_is_refused_with_the_reason(
    tmp_path, monkeypatch, error, reason, exists
):
    """The probe fails: an existing folder "cannot write to", a missing one "cannot create",
    with the system's reason (or the error's type when it gives none)."""
    path = tmp_path / "out" if exists else tmp_path / "missing" / "out"
    if exists:
        path.mkdir()

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(RunDirectoryError) as raised:
        check_writable_dir(path, "--tensorboard")
    action = "write to" if exists else "create"
    assert str(raised.value) == f"--tensorboard: cannot {action} {path} ({reason})"


# ----------------------------------------------------------------- the swap of a folder
def folder_with(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "report.json").write_text(text)
    (path / "figures").mkdir()
    (path / "figures" / "loss.png").write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in path.rglob("*") if p.is_file()}


class NoRenameat2:
    """ctypes.CDLL of a system without renameat2 (macOS, older C libraries)."""

    def __init__(self, *args, **kwargs):
        pass


@needs_renameat2
@pytest.mark.parametrize("relative", [False, True])
def test_the_atomic_exchange_replaces_the_folder_without_the_trash_name(
    tmp_path, monkeypatch, relative
):
    """Where the system exchanges two paths at once, the old folder is never renamed to the
    trash name (a file there stays untouched), for absolute and relative paths alike."""
    folder_with(tmp_path / "analysis", "old")
    folder_with(tmp_path / "staging", "new")
    (tmp_path / "trash").write_text("not a folder")
    base = tmp_path
    if relative:
        monkeypatch.chdir(tmp_path)
        base = Path()
    swap_in_folder(base / "staging", base / "analysis", base / "trash")
    assert contents(tmp_path / "analysis") == {"report.json": "new", "figures/loss.png": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis", "trash"]
    assert (tmp_path / "trash").read_text() == "not a folder"


def test_without_an_atomic_exchange_the_old_folder_goes_through_the_trash(tmp_path, monkeypatch):
    """Without renameat2 the old folder is renamed to the trash name, the new one into place,
    and the trash deleted."""
    monkeypatch.setattr(ctypes, "CDLL", NoRenameat2)
    folder_with(tmp_path / "analysis", "old")
    folder_with(tmp_path / "staging", "new")
    swap_in_folder(tmp_path / "staging", tmp_path / "analysis", tmp_path / "trash")
    assert contents(tmp_path / "analysis") == {"report.json": "new", "figures/loss.png": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["analysis"]


@pytest.mark.parametrize("atomic", [pytest.param(True, marks=needs_renameat2), False])
def test_an_old_folder_that_cannot_be_deleted_does_not_fail_the_swap(tmp_path, monkeypatch, atomic):
    """The new folder is in place once swapped: a failure to delete the old one (where it then
    is: the staging name after an exchange, else the trash name) is left, not raised."""
    if not atomic:
        monkeypatch.setattr(ctypes, "CDLL", NoRenameat2)
    old_place = tmp_path / ("staging" if atomic else "trash")
    rmdir = os.rmdir

    def busy(path, *args, **kwargs):
        if Path(path) == old_place:
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        return rmdir(path, *args, **kwargs)

    folder_with(tmp_path / "analysis", "old")
    folder_with(tmp_path / "staging", "new")
    monkeypatch.setattr(os, "rmdir", busy)
    swap_in_folder(tmp_path / "staging", tmp_path / "analysis", tmp_path / "trash")
    monkeypatch.undo()
    assert contents(tmp_path / "analysis") == {"report.json": "new", "figures/loss.png": "new"}
    assert old_place.is_dir() and list(old_place.iterdir()) == []
    shutil.rmtree(old_place)
