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


def test_close_tensorboard_stops_the_logging(tmp_path):
    """After close_tensorboard(), log_scalars() and save() log nothing and do not fail."""
    pytest.importorskip("tensorboard", reason="needs tensorboard")
    run = RunDirectory(tmp_path / "run").lock()
    run.start({"ncfast_version": "x"}, [], False)
    run.open_tensorboard(tmp_path / "tb", first_step=1)
    run.log_scalars({"error": 1.0}, 1, "train")
    run.close_tensorboard()
    assert run.tensorboard is None
    run.log_scalars({"error": 2.0}, 2, "train")
    run.save(tiny_payload(2), [{"epoch": 2, "split": "train", "error": 2.0}], 2)
    run.unlock()
    assert scalar_events(tmp_path / "tb") == {"train/error": [(1, 1.0)]}


# ----------------------------------------------------------------- config and log
def test_config_json_is_written_indented_for_people_to_read(tmp_path):
    """config.json holds the record one key per line, indented by two spaces, with a final
    newline; write_config returns its path."""
    run = RunDirectory(tmp_path / "run").lock()
    record = {"format": "ncfast-run-v1", "ncfast_version": "x", "milestones": [1, 2]}
    assert run.write_config(record) == run.config_path
    run.unlock()
    assert run.config_path.read_text(encoding="utf-8") == (
        '{\n  "format": "ncfast-run-v1",\n  "ncfast_version": "x",\n'
        '  "milestones": [\n    1,\n    2\n  ]\n}\n'
    )


def test_write_metrics_replaces_the_log_with_the_rows(tmp_path):
    """write_metrics() rewrites the log from the given rows (a resumption drops the lines a
    killed run wrote after its checkpoint) and returns its path."""
    run = RunDirectory(tmp_path / "run").lock()
    rows = [{"epoch": e, "split": "train", "error": 1.0 / e} for e in (1, 2, 3)]
    run.start({"ncfast_version": "x"}, rows, False)
    assert run.write_metrics(rows[:1]) == run.metrics_path
    run.unlock()
    assert run.metrics_path.read_text(encoding="utf-8") == json.dumps(rows[0]) + "\n"


@pytest.mark.parametrize("which", ["config", "metrics"])
def test_a_failed_record_write_names_the_file(tmp_path, monkeypatch, which):
    """A write of config.json or of the log that fails (a full disk) is a RunDirectoryError
    naming that file and the reason; the file keeps its old content."""
    run = RunDirectory(tmp_path / "run").lock()
    run.start({"ncfast_version": "x"}, [{"epoch": 1, "split": "train", "error": 0.5}], False)
    path = run.config_path if which == "config" else run.metrics_path
    before = path.read_bytes()

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "write_text_atomic", full_disk)
    write = run.write_config if which == "config" else run.write_metrics
    with pytest.raises(RunDirectoryError) as error:
        write({"ncfast_version": "y"} if which == "config" else [])
    assert str(error.value) == f"cannot write {path} (No space left on device)"
    assert path.read_bytes() == before
    run.unlock()


def test_the_partial_file_of_a_killed_write_is_cleaned_by_the_next_owner(tmp_path):
    """A writer killed during a write of config.json leaves its temporary file, named with its
    lock token: the next process to lock the directory deletes it."""
    out = tmp_path / "run"
    script = (
        "import os, sys\n"
        "from ncfast.paper.rundir import RunDirectory\n"
        "run = RunDirectory(sys.argv[1]).lock()\n"
        "os.fsync = lambda fd: os._exit(9)  # killed before the file is renamed into place\n"
        "run.write_config({'ncfast_version': 'x'})\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(out)], timeout=120)
    assert killed.returncode == 9
    left = sorted(p.name for p in out.iterdir())
    assert left[1:] == [rundir.LOCK_FILE] and left[0].startswith(".config.json.")
    RunDirectory(out).lock().unlock()
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------- --resume checks
def put(out: Path, *names: str) -> None:
    """Create ``out`` holding a file of each of ``names`` that is not ncfast's."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).write_text("not ncfast's")


FOREIGN = "but is not a run directory of ncfast (its config.json is missing or not one ncfast "
FOREIGN += (
    "wrote); ncfast replaces none of those files, also with --overwrite: choose another --out"
)
SWEEP = "is a sweep folder (sweep.json), not a run directory; ncfast sweep manages its runs: "
SWEEP += "choose another --out for this run"


@pytest.mark.parametrize(
    ("names", "says"),
    [
        (None, "does not exist; start the run without --resume"),
        ((), "holds no run (checkpoint.pt is missing); start the run without --resume"),
        (("notes.txt",), "holds no run (checkpoint.pt is missing); start the run without --resume"),
        (("metrics.jsonl",), f"holds metrics.jsonl {FOREIGN}"),
        (("sweep.json",), SWEEP),
        (("checkpoint.pt", "metrics.jsonl"), f"holds checkpoint.pt, metrics.jsonl {FOREIGN}"),
        (("checkpoint.pt", "config.json"), f"holds checkpoint.pt, config.json {FOREIGN}"),
        (("checkpoint.pt", "sweep.json"), SWEEP),
    ],
)
def test_resume_refuses_a_directory_without_a_run_to_continue(tmp_path, names, says):
    """--resume of a missing directory, one without a checkpoint, one whose files of ncfast's
    names are not a run's, or a sweep folder: each refusal says what is there."""
    out = tmp_path / "run"
    if names is not None:
        put(out, *names)
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(out).check_resumable()
    assert str(error.value) == f"--resume: {out} {says}"


def test_resume_refuses_a_file(tmp_path):
    """--resume of a path that is a file, not a directory."""
    out = tmp_path / "run"
    out.write_text("x")
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(out).check_resumable()
    assert str(error.value) == f"--resume: {out} is not a directory"


def test_resume_refuses_a_run_stopped_before_its_first_checkpoint(tmp_path):
    """A run directory with config.json and the log but no checkpoint has nothing to resume."""
    run = RunDirectory(tmp_path / "run").lock()
    run.start({"ncfast_version": "x"}, [], False)
    run.unlock()
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(run.path).check_resumable()
    assert str(error.value) == (
        f"--resume: the run in {run.path} stopped before its first checkpoint, so there is "
        "nothing to resume; start it again with --overwrite"
    )


def test_resume_accepts_a_checkpoint_alone_or_a_whole_run(tmp_path):
    """A checkpoint without other files of ncfast's names (its own format marks it), or the
    checkpoint of a run directory of ncfast, can be resumed."""
    put(tmp_path / "alone", "checkpoint.pt", "notes.txt")
    RunDirectory(tmp_path / "alone").check_resumable()
    written_run(tmp_path / "run").unlock()
    RunDirectory(tmp_path / "run").check_resumable()


@pytest.mark.parametrize(
    ("names", "says"),
    [
        (("checkpoint.pt", "metrics.jsonl"), f"holds checkpoint.pt, metrics.jsonl {FOREIGN}"),
        (("sweep.json",), SWEEP),
    ],
)
def test_a_new_run_refuses_files_it_did_not_write(tmp_path, names, says):
    """A new run (also with --overwrite) refuses a folder holding files of ncfast's names that
    are not a run's, naming them, and a sweep folder."""
    out = tmp_path / "run"
    put(out, *names)
    with pytest.raises(RunDirectoryError) as error:
        RunDirectory(out).check_new_run(overwrite=True)
    assert str(error.value) == f"out: {out} {says}"


# ------------------------------------------------------------- the reader's lock
def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` look not writable to ncfast (the tests may run as root, who can write
    any folder)."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == folder and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "access", access)


def test_a_reader_of_a_writable_directory_takes_the_exclusive_lock(tmp_path):
    """lock_for_reading() where the directory can be written is lock(): the lock file names
    the reader, and another process is told to wait for the analysis."""
    out = tmp_path / "run"
    out.mkdir()
    reader = RunDirectory(out, command="analyze").lock_for_reading()
    try:
        assert reader.locked
        with pytest.raises(RunDirectoryError) as error:
            RunDirectory(out).check_not_in_use()
        assert f"is in use by PID {os.getpid()} on " in str(error.value)
        assert str(error.value).endswith("wait for that analysis to end, or choose another --out")
    finally:
        reader.unlock()


def test_readers_of_a_read_only_run_share_its_lock_file(tmp_path, monkeypatch):
    """In a directory that cannot be written, readers take a shared flock on the lock file a
    (killed) writer left: several readers at once, no writer meanwhile, and the file is neither
    changed nor deleted."""
    out = tmp_path / "run"
    out.mkdir()
    record = b'{"pid": 1, "host": "gone", "command": "train"}\n'
    (out / rundir.LOCK_FILE).write_bytes(record)
    read_only(monkeypatch, out)
    readers = [RunDirectory(out, command="analyze").lock_for_reading() for _ in range(2)]
    assert all(reader.locked for reader in readers)
    monkeypatch.undo()
    with pytest.raises(RunDirectoryError, match="is in use by"):
        RunDirectory(out).lock()
    for reader in readers:
        reader.unlock()
    assert (out / rundir.LOCK_FILE).read_bytes() == record


def test_a_reader_of_a_read_only_directory_without_a_lock_file_takes_none(tmp_path, monkeypatch):
    """No lock file in a directory that cannot be written: no writer can be there, and the
    reader goes on without a lock, creating nothing."""
    out = tmp_path / "run"
    put(out, "notes.txt")
    read_only(monkeypatch, out)
    reader = RunDirectory(out, command="analyze").lock_for_reading()
    assert not reader.locked
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_reader_of_a_read_only_run_is_refused_while_a_writer_holds_it(tmp_path, monkeypatch):
    """The shared flock fails while a writer holds the lock: the refusal names the writer."""
    out = tmp_path / "run"
    writer = RunDirectory(out).lock()
    try:
        read_only(monkeypatch, out)
        with pytest.raises(RunDirectoryError) as error:
            RunDirectory(out, command="analyze").lock_for_reading()
        assert str(error.value).startswith(f"out: {out} is in use by PID {os.getpid()} on ")
        assert str(error.value).endswith("wait for that run to end, or choose another --out")
    finally:
        writer.unlock()


def test_a_reader_never_opens_the_lock_through_a_link(tmp_path, monkeypatch):
    """A symbolic link that replaces the lock file right after the reader's link check (a race)
    is not followed: the lock held on the file it points to neither refuses nor locks the
    reader."""
    out = tmp_path / "run"
    put(out, rundir.LOCK_FILE)
    elsewhere = RunDirectory(tmp_path / "elsewhere").lock()
    real_check = RunDirectory.check_no_links

    def check_then_swap(self):
        real_check(self)
        self.lock_path.unlink()
        self.lock_path.symlink_to(elsewhere.lock_path)

    try:
        read_only(monkeypatch, out)
        monkeypatch.setattr(RunDirectory, "check_no_links", check_then_swap)
        reader = RunDirectory(out, command="analyze").lock_for_reading()
        assert not reader.locked
    finally:
        elsewhere.unlock()


def test_a_later_readers_unlock_removes_no_folder_of_an_earlier_lock(tmp_path, monkeypatch):
    """The folders lock() created are forgotten at its unlock (they stay when not empty): the
    same object, locked again for reading, removes none of them at its own unlock, even
    emptied meanwhile."""
    out = tmp_path / "parent" / "run"
    run = RunDirectory(out).lock()  # creates parent/ and run/
    put(out, "notes.txt")
    run.unlock()
    (out / "notes.txt").unlink()
    (out / rundir.LOCK_FILE).write_bytes(b'{"pid": 1, "host": "gone"}\n')  # a killed writer's
    read_only(monkeypatch, out)
    assert run.lock_for_reading().locked
    (out / rundir.LOCK_FILE).unlink()  # deleted by hand meanwhile
    run.unlock()
    assert out.is_dir()
    assert list(out.iterdir()) == []
