"""Guards of ncfast/paper/rundir.py that mutmut found missing (issue 21), for the lock file
and the leftovers of killed owners: each test fails on the surviving mutants that
bench/results/mutation.md lists with it (checked by running the mutant)."""

from __future__ import annotations

import errno
import json
import os
import platform
import stat
import time
from pathlib import Path

import pytest

from ncfast.paper import rundir
from ncfast.paper.rundir import LOCK_FILE, RunDirectory, RunDirectoryError

fcntl = pytest.importorskip("fcntl", reason="the lock is an flock")
TOKEN = "0123456789abcdef"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def killed_owner(out: Path, record: bytes, *leftovers: str) -> None:
    """``out`` as a killed owner left it: its lock file holding ``record`` (no flock on it)
    and an empty file of each name in ``leftovers``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_bytes(record)
    for name in leftovers:
        (out / name).write_text("partial")


# ----------------------------------------------------------------- the lock file
def test_the_lock_file_is_created_readable_by_all_and_executable_by_none(tmp_path):
    """The lock file is created with mode 0644 (before the umask): others can read who owns
    the directory; nobody can execute it."""
    previous = os.umask(0o022)
    try:
        run = RunDirectory(tmp_path / "run").lock()
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE(run.lock_path.stat().st_mode) == 0o644
    finally:
        run.unlock()


def test_the_lock_file_records_its_owner(tmp_path):
    """The lock file holds the owner's PID, host, start time (local, "YYYY-MM-DD HH:MM:SS"),
    command and token, and the refusal of another process names them."""
    out = tmp_path / "run"
    run = RunDirectory(out, command="analyze").lock()
    try:
        owner = json.loads(run.lock_path.read_text(encoding="utf-8"))
        with pytest.raises(RunDirectoryError) as error:
            RunDirectory(out).lock()
    finally:
        run.unlock()
    started = owner.pop("started")
    time.strptime(started, "%Y-%m-%d %H:%M:%S")  # ValueError if not of this form
    assert owner == {
        "pid": os.getpid(),
        "host": platform.node(),
        "command": "analyze",
        "token": run.token,
    }
    assert str(error.value) == (
        f"out: {out} is in use by PID {os.getpid()} on {platform.node()} (ncfast analyze) "
        f"since {started}; wait for that analysis to end, or choose another --out"
    )


@pytest.mark.parametrize("gone", [False, True])
def test_a_lock_whose_owner_record_cannot_be_written_leaves_nothing(tmp_path, monkeypatch, gone):
    """A failed write of the owner record (a full disk) is a RunDirectoryError saying why; the
    lock file and the folder lock() created are removed (the file may already be gone)."""
    out = tmp_path / "run"

    def full_disk(fd, data, offset):
        if gone:
            (out / LOCK_FILE).unlink()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "pwrite", full_disk)
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(out).lock()
    assert str(error.value) == f"out: cannot write to {out} (No space left on device)"
    assert not out.exists()


def test_a_file_system_that_cannot_lock_is_refused(tmp_path, monkeypatch):
    """An flock that fails for another reason than a holder (a file system without locks)
    refuses the directory, naming the lock file and the reason."""
    out = tmp_path / "run"

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(out).lock()
    assert str(error.value) == f"out: cannot lock {out / LOCK_FILE} (No locks available)"


def test_a_fifo_named_like_the_lock_is_refused(tmp_path):
    """A lock path that is no regular file (here a FIFO) is refused, with what to do."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("the platform has no FIFOs")
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / LOCK_FILE)
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(out).lock()
    assert str(error.value) == f"out: {out / LOCK_FILE} is not a regular file; delete it"


def test_without_fcntl_the_lock_file_itself_is_the_lock(tmp_path, monkeypatch):
    """Where fcntl is missing (Windows) a lock file that exists refuses the directory, stale or
    not, and the message says to delete it if its owner is gone; once unlocked, the directory
    can be locked again."""
    monkeypatch.setattr(rundir, "fcntl", None)
    out = tmp_path / "run"
    RunDirectory(out).lock().unlock()
    RunDirectory(out).lock().unlock()
    killed_owner(out, b'{"pid": 42, "host": "h", "started": "t", "command": "train"}')
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(out).lock()
    assert str(error.value) == (
        f"out: {out} is in use by PID 42 on h (ncfast train) since t; wait for that run to "
        f"end, or choose another --out; if no such process runs, delete {out / LOCK_FILE}"
    )


# ------------------------------------------------------ a killed owner's leftovers
def test_a_killed_owners_record_with_a_bad_byte_still_names_its_leftovers(tmp_path):
    """The record of a killed owner is read with replacement characters for bytes that are no
    UTF-8: its token is still known, and its partial file is deleted."""
    out = tmp_path / "run"
    record = b'{"pid": 5, "host": "b\xffx", "token": "' + TOKEN.encode() + b'"}\n'
    killed_owner(out, record, f".config.json.ncfast-{TOKEN}-abc.tmp")
    run = RunDirectory(out).lock()
    try:
        assert run.stale_owner == {"pid": 5, "host": "b\ufffdx", "token": TOKEN}
        assert names(out) == [LOCK_FILE]
    finally:
        run.unlock()


@pytest.mark.parametrize("size", [4096, 4097])
def test_only_the_first_4096_bytes_of_the_lock_file_are_the_owner(tmp_path, size):
    """The owner record is read from the first 4096 bytes of the lock file (ncfast's own are
    far shorter): a longer one is unreadable, its owner unknown, and nothing is deleted on its
    behalf."""
    out = tmp_path / "run"
    owner = {"pid": 5, "token": TOKEN, "host": ""}
    owner["host"] = "h" * (size - len(json.dumps(owner)))
    record = json.dumps(owner).encode()
    assert len(record) == size
    leftover = f".config.json.ncfast-{TOKEN}-abc.tmp"
    killed_owner(out, record, leftover)
    run = RunDirectory(out).lock()
    try:
        if size == 4096:
            assert run.stale_owner == owner
            assert names(out) == [LOCK_FILE]
        else:
            assert run.stale_owner is None
            assert names(out) == [leftover, LOCK_FILE]
    finally:
        run.unlock()


@pytest.mark.parametrize("token", ["", "mine", 5, TOKEN.upper()])
def test_a_killed_owner_with_a_malformed_token_has_no_leftovers(tmp_path, token):
    """Only a token of 16 hexadecimal digits names leftovers: a record with another one (not
    ncfast's) gets nothing deleted, also not names that look like ncfast's."""
    out = tmp_path / "run"
    record = json.dumps({"pid": 5, "token": token}).encode()
    killed_owner(out, record, f".config.json.ncfast-{token}-abc.tmp", ".ncfast-trash-mine")
    run = RunDirectory(out).lock()
    try:
        assert run.stale_owner == {"pid": 5, "token": token}
        assert run.leftovers(token) == []
        assert names(out) == sorted(
            [LOCK_FILE, f".config.json.ncfast-{token}-abc.tmp", ".ncfast-trash-mine"]
        )
    finally:
        run.unlock()


def test_leftovers_are_by_default_this_objects_own(tmp_path):
    """leftovers() lists the dot-named files and folders carrying this object's token, and not
    those of another token or without the leading dot."""
    run = RunDirectory(tmp_path / "run")
    mine = [f".config.json.ncfast-{run.token}-a.tmp", f".ncfast-{run.token}-trash"]
    other = [f".config.json.ncfast-{TOKEN}-a.tmp", f"config.json.ncfast-{run.token}-a.tmp"]
    killed_owner(run.path, b"", *mine, *other)
    assert run.leftovers() == sorted(run.path / name for name in mine)
    assert run.leftovers(TOKEN) == [run.path / other[0]]


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_run_path_that_is_no_folder_has_no_leftovers(tmp_path, kind):
    """leftovers() of a path that does not exist, or is a file, is empty (not an error)."""
    path = tmp_path / "run"
    if kind == "file":
        path.write_text("x")
    assert RunDirectory(path).leftovers(TOKEN) == []


def test_a_killed_owners_leftover_folder_that_cannot_be_deleted_stays(tmp_path, monkeypatch):
    """A killed owner's leftover folder that cannot be deleted (here its rmdir fails) stays
    behind without failing the lock; its other leftovers are deleted."""
    out = tmp_path / "run"
    trash = f".ncfast-{TOKEN}-trash"
    killed_owner(out, json.dumps({"pid": 5, "token": TOKEN}).encode(), f".x.ncfast-{TOKEN}.tmp")
    (out / trash).mkdir()
    real_rmdir = os.rmdir

    def rmdir_busy(path, *args, **kwargs):
        if str(path).endswith(trash):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir_busy)
    run = RunDirectory(out).lock()
    monkeypatch.undo()
    try:
        assert names(out) == sorted([LOCK_FILE, trash])
    finally:
        run.unlock()


def test_a_killed_owners_leftover_deleted_meanwhile_does_not_fail_the_lock(tmp_path, monkeypatch):
    """A leftover file that another process deletes just before the new owner does (here: at
    the new owner's unlink) is no error."""
    out = tmp_path / "run"
    leftover = out / f".config.json.ncfast-{TOKEN}-abc.tmp"
    killed_owner(out, json.dumps({"pid": 5, "token": TOKEN}).encode(), leftover.name)
    real_unlink = os.unlink

    def deleted_meanwhile(path, *args, **kwargs):
        if Path(path) == leftover:
            real_unlink(path)  # the other process
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "unlink", deleted_meanwhile)
    run = RunDirectory(out).lock()
    monkeypatch.undo()
    try:
        assert names(out) == [LOCK_FILE]
    finally:
        run.unlock()


# ------------------------------------------------------------ creating the folder
@pytest.mark.parametrize("below", [["run"], ["x", "run"]])
def test_a_run_directory_below_a_file_is_refused_naming_the_file(tmp_path, below):
    """--out below a regular file cannot be created: the refusal names that file."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker.joinpath(*below)
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(out).lock()
    assert str(error.value) == f"out: cannot create {out}: {blocker} is a file"
    assert names(tmp_path) == ["file.txt"]


def test_a_run_directory_below_a_fifo_is_refused(tmp_path):
    """--out below something that is neither a folder nor a regular file (a FIFO) cannot be
    created: the refusal says a part of the path is a file."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("the platform has no FIFOs")
    os.mkfifo(tmp_path / "fifo")
    out = tmp_path / "fifo" / "run"
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(out).lock()
    assert str(error.value) == f"out: cannot create {out}: a part of it is a file"


# ---------------------------------------------------------------------- unlock
def test_lock_creates_the_missing_folders_and_unlock_removes_only_those(tmp_path):
    """lock() creates the folders missing on the way to the run directory; unlock() removes
    those that stayed empty, and no folder that existed before."""
    kept = tmp_path / "kept"
    kept.mkdir()
    run = RunDirectory(kept / "a" / "run").lock()
    assert run.path.is_dir()
    run.unlock()
    assert names(tmp_path) == ["kept"]
    assert names(kept) == []
    RunDirectory(kept).lock().unlock()
    assert names(kept) == []


def test_an_object_locked_again_deletes_its_lock_file_again(tmp_path):
    """A RunDirectory locked, unlocked and locked again deletes its lock file at each unlock."""
    out = tmp_path / "run"
    out.mkdir()
    run = RunDirectory(out)
    for _ in range(2):
        run.lock()
        assert names(out) == [LOCK_FILE]
        run.unlock()
        assert names(out) == []


def test_unlock_when_the_lock_file_was_deleted_by_hand(tmp_path):
    """A lock file deleted by hand while held is no error at unlock, which still releases the
    lock."""
    out = tmp_path / "run"
    out.mkdir()
    run = RunDirectory(out).lock()
    run.lock_path.unlink()
    run.unlock()
    assert not run.locked
    RunDirectory(out).lock().unlock()


def test_stale_owner_is_none_unless_a_lock_took_over_a_killed_owner(tmp_path):
    """stale_owner is None before lock(), and after a lock() that found no killed owner's
    record; it is that record after taking over one."""
    out = tmp_path / "run"
    run = RunDirectory(out)
    assert run.stale_owner is None
    run.lock().unlock()
    assert run.stale_owner is None
    killed_owner(out, b'{"pid": 5}')
    run.lock().unlock()
    assert run.stale_owner == {"pid": 5}
