"""Guards of ncfast/paper/rundir.py that mutmut found missing (issue 21): each test fails on the
surviving mutants that bench/results/mutation.md lists with it (checked by running the mutant)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ncfast.paper import rundir
from ncfast.paper.run_files import RUN_FILES
from ncfast.paper.rundir import RunDirectory, RunDirectoryError
from tests.helpers.tiny_runs import tiny_payload

fcntl = pytest.importorskip("fcntl", reason="the lock is an flock")
# A Python that fails where a file is opened in text mode without an encoding.
STRICT_ENCODING_PYTHON = [
    sys.executable,
    "-X",
    "warn_default_encoding",
    "-W",
    "error::EncodingWarning",
]


def refusal_while_held(out: Path, owner: bytes) -> list[str]:
    """The messages a second process gets (before locking, and locking) while the lock is held
    and the lock file holds ``owner``."""
    holder = RunDirectory(out).lock()
    try:
        holder.lock_path.write_bytes(owner)  # the same file (inode): the flock stays
        messages = []
        for attempt in (RunDirectory(out).check_not_in_use, RunDirectory(out).lock):
            with pytest.raises(RunDirectoryError) as error:
                attempt()
            messages.append(str(error.value))
        return messages
    finally:
        holder.unlock()


@pytest.mark.parametrize(
    ("owner", "says"),
    [
        (
            {"pid": 123, "host": "box", "started": "2026-12-07 06:00:00", "command": "analyze"},
            "is in use by PID 123 on box (ncfast analyze) since 2026-12-07 06:00:00; wait for "
            "that analysis to end, or choose another --out",
        ),
        (
            {"pid": 7, "host": "h", "started": "t", "command": "train"},
            "is in use by PID 7 on h (ncfast train) since t; wait for that run to end, or "
            "choose another --out",
        ),
        (
            {"pid": 7},
            "is in use by PID 7 on ? (ncfast train); wait for that run to end, or choose "
            "another --out",
        ),
        (
            {"pid": 8, "started": "", "command": "sweep"},
            "is in use by PID 8 on ? (ncfast sweep); wait for that run to end, or choose "
            "another --out",
        ),
    ],
)
def test_the_refusal_names_the_owner_of_the_lock(tmp_path, owner, says):
    """Each part of the owner's record, and the defaults of the missing parts, in the message."""
    out = tmp_path / "run"
    assert refusal_while_held(out, json.dumps(owner).encode()) == [f"out: {out} {says}"] * 2


@pytest.mark.parametrize(
    "owner",
    [b"", b"not json", b"[1, 2]", b'"pid"', b"{}", b'{"host": "h", "started": "t"}', b"\xff\xfe"],
)
def test_a_lock_without_an_owner_record_is_a_starting_process(tmp_path, owner):
    """An empty, unreadable or pid-less record: the holder is still writing it."""
    out = tmp_path / "run"
    says = f"out: {out} is in use by another process (it is starting)"
    assert refusal_while_held(out, owner) == [says] * 2


def test_an_owner_record_with_a_bad_byte_is_still_read(tmp_path):
    """A record whose text has a byte that is no UTF-8 is read with a replacement character,
    not refused as unreadable."""
    out = tmp_path / "run"
    record = b'{"pid": 5, "host": "b\xffx"}'
    says = f"out: {out} is in use by PID 5 on b\ufffdx (ncfast train); wait for that run"
    assert all(m.startswith(says) for m in refusal_while_held(out, record))


def test_the_owner_record_is_read_as_utf8_whatever_the_locale(tmp_path):
    """The record is read as UTF-8, not in the locale's encoding: in a Python that warns where
    a file is opened without an encoding (and fails on that warning), the refusal still names
    the owner."""
    script = (
        "import sys\n"
        "from ncfast.paper.rundir import RunDirectory, RunDirectoryError\n"
        "out = sys.argv[1]\n"
        "holder = RunDirectory(out).lock()\n"
        'holder.lock_path.write_bytes(b\'{"pid": 5, "host": "h\\\\u00e9"}\')\n'
        "try:\n"
        "    RunDirectory(out).check_not_in_use()\n"
        "except RunDirectoryError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [*STRICT_ENCODING_PYTHON, "-c", script, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "is in use by PID 5 on h\u00e9 (ncfast train)" in result.stdout


def test_the_lock_holder_is_not_in_its_own_way(tmp_path):
    """check_not_in_use of the directory that holds the lock itself passes."""
    holder = RunDirectory(tmp_path / "run").lock()
    try:
        holder.check_not_in_use()
    finally:
        holder.unlock()


def test_a_lock_path_that_is_a_link_is_not_followed_by_the_check(tmp_path):
    """A symbolic link named like the lock is not opened through (lock() refuses it later):
    a lock held on the file it points to does not make the directory in use."""
    out = tmp_path / "run"
    elsewhere = RunDirectory(tmp_path / "elsewhere").lock()
    try:
        out.mkdir()
        (out / elsewhere.lock_path.name).symlink_to(elsewhere.lock_path)
        RunDirectory(out).check_not_in_use()
        with pytest.raises(RunDirectoryError):
            RunDirectory(out).lock()
    finally:
        elsewhere.unlock()


# ------------------------------------------------------------------------- writes
def written_run(out: Path) -> RunDirectory:
    """A locked run directory holding a run's config, log and checkpoint."""
    run = RunDirectory(out).lock()
    run.start({"ncfast_version": "x"}, [{"epoch": 1, "split": "train", "error": 0.5}], False)
    run.save_checkpoint(tiny_payload(1))
    return run


def test_overwrite_leaves_no_trash_folder(tmp_path):
    """clear() moves the old run into a trash folder and deletes that folder."""
    run = written_run(tmp_path / "run")
    (run.path / "notes.txt").write_text("mine")
    run.clear()
    assert sorted(p.name for p in run.path.iterdir()) == [run.lock_path.name, "notes.txt"]
    run.unlock()


def test_a_trash_folder_that_cannot_be_deleted_does_not_fail_the_overwrite(tmp_path, monkeypatch):
    """The old run's files are out of the way once renamed into the trash; a trash folder that
    cannot be deleted (here: its rmdir fails) stays behind without failing the new run."""
    run = written_run(tmp_path / "run")
    real_rmdir = os.rmdir

    def rmdir_busy(path, *args, **kwargs):
        if str(path).endswith("-trash"):
            raise OSError(errno.EBUSY, "busy", str(path))
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir_busy)
    run.clear()
    assert not any((run.path / name).exists() for name in RUN_FILES)
    monkeypatch.undo()
    run.unlock()


def test_a_failed_append_cuts_the_log_back_to_its_old_length(tmp_path, monkeypatch):
    """A write that fails halfway (a full disk) leaves the log as it was, not with half a line."""
    run = written_run(tmp_path / "run")
    before = run.metrics_path.read_bytes()
    real_open = Path.open

    class HalfWrite:
        """The log's file object, whose write stores half the bytes, then fails."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_half(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return HalfWrite(f) if path == run.metrics_path and "a" in mode else f

    monkeypatch.setattr(Path, "open", open_half)
    with pytest.raises(RunDirectoryError, match="cannot write .*metrics.jsonl .*No space left"):
        run.append_metrics([{"epoch": 2, "split": "train", "error": 0.25}])
    monkeypatch.undo()
    assert run.metrics_path.read_bytes() == before
    run.unlock()


@pytest.mark.parametrize("had_one", [True, False])
def test_a_failed_checkpoint_write_says_what_is_kept(tmp_path, monkeypatch, had_one):
    """The error names the checkpoint file and says whether a previous one is intact."""
    run = RunDirectory(tmp_path / "run").lock()
    run.start({"ncfast_version": "x"}, [], False)
    if had_one:
        run.save_checkpoint(tiny_payload(1))

    def full_disk(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "save_checkpoint", full_disk)
    kept = "the previous checkpoint is intact" if had_one else "no checkpoint yet"
    with pytest.raises(RunDirectoryError) as error:
        run.save_checkpoint(tiny_payload(2))
    why = "No space left on device"
    assert str(error.value) == f"cannot write {run.checkpoint_path} ({why}); {kept}"
    run.unlock()


# ---------------------------------------------------------------------- TensorBoard
def scalar_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows in ``folder``: tag -> [(step, value)]."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="needs tensorboard"
    )
    events = accumulator.EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_save_logs_each_row_to_tensorboard_under_its_split(tmp_path):
    """save() writes the log lines and, per row, its numbers as ``{split}/{key}`` (a list as
    ``{split}/{key}/{j}``) at the epoch's step; the epoch and split are no scalars."""
    pytest.importorskip("tensorboard", reason="needs tensorboard")
    run = RunDirectory(tmp_path / "run").lock()
    run.start({"ncfast_version": "x"}, [], False)
    run.open_tensorboard(tmp_path / "tb", first_step=1)
    rows = [
        {"epoch": 3, "split": "train", "error": 0.5, "snr_singular_values": [2.0, 1.0]},
        {"epoch": 3, "split": "test", "error": 0.25, "nc_undefined": "text"},
    ]
    run.save(tiny_payload(3), rows, 3)
    run.save(tiny_payload(3), [], 4)  # no rows: nothing logged
    run.close_tensorboard()
    run.unlock()
    assert [json.loads(line) for line in run.metrics_path.read_text().splitlines()] == rows
    assert scalar_events(tmp_path / "tb") == {
        "train/error": [(3, 0.5)],
        "train/snr_singular_values/1": [(3, 2.0)],
        "train/snr_singular_values/2": [(3, 1.0)],
        "test/error": [(3, 0.25)],
    }


def test_a_resumed_run_hides_the_events_logged_after_its_checkpoint(tmp_path):
    """Events a killed run logged at steps from ``first_step`` on are purged when logging
    starts again there."""
    pytest.importorskip("tensorboard", reason="needs tensorboard")
    folder = tmp_path / "tb"
    killed = RunDirectory(tmp_path / "run").lock()
    killed.open_tensorboard(folder, first_step=1)
    for step in (1, 2, 3):
        killed.log_scalars({"error": float(step)}, step, "train")
    killed.close_tensorboard()
    killed.unlock()
    resumed = RunDirectory(tmp_path / "run").lock()
    resumed.open_tensorboard(folder, first_step=2)
    resumed.log_scalars({"error": 20.0}, 2, "train")
    resumed.close_tensorboard()
    resumed.unlock()
    assert scalar_events(folder) == {"train/error": [(1, 1.0), (2, 20.0)]}
