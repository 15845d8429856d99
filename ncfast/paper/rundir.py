"""A training run's directory: its file names, its lock, and every change to it.

``ncfast train --out R`` owns ``R`` for the life of the run through :class:`RunDirectory`:

- the files: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (and ``analysis/``, written by
  ``ncfast analyze``); every write goes through here, and a write that fails (disk full, no
  permission) is a :class:`RunDirectoryError` naming the file, with the previous checkpoint
  intact (it is replaced atomically, :func:`ncfast.paper.checkpoint.atomic_write`);
- the lock: :meth:`RunDirectory.lock` creates ``R`` if needed (the check that ``--out`` is
  usable, before any data is loaded) and takes ``R/.ncfast.lock``, which holds the PID and host
  of the owner. The lock is an ``flock`` on that file, so the kernel releases it when its owner
  dies: the file a killed run leaves behind is stale and is simply taken over. A second process
  is refused with "R is in use by PID ... on HOST". Where ``fcntl`` is missing (Windows) the
  file itself is the lock (created with ``O_CREAT | O_EXCL``) and a stale one must be deleted by
  hand (the message says so). Under torchrun only rank 0 takes it;
- the marker: a folder is a run directory only when its ``config.json`` is ncfast's
  (:func:`is_run_directory`: ``format`` ``ncfast-run-v1`` and ``ncfast_version``; runs of
  releases before the format field by their version and options). A folder holding files of
  ncfast's names without it, or a sweep's ``sweep.json``, is refused, ``--overwrite`` included;
- links: the lock is opened with ``O_NOFOLLOW`` and a run file that is a symbolic link is
  refused (:meth:`RunDirectory.check_no_links`): nothing is written through one;
- the overwrite: :meth:`RunDirectory.clear` moves the old run's files, only those ncfast writes
  (:data:`RUN_FILES`; in ``analysis/`` :func:`analysis_entries`), into a trash folder inside ``R``
  (the checkpoint first, ``config.json``, the marker, last) and then deletes the folder;
  nothing new is written before it has run;
- leftovers: every temporary name this object creates (partial ``.checkpoint.pt.*.tmp`` files,
  the trash, an analysis being written) carries ``ncfast-TOKEN``, a random token recorded in the
  lock. Taking over a killed owner's lock deletes that owner's leftovers by its token, and
  nothing else (names that merely look like ncfast's are the user's);
- the records: :meth:`RunDirectory.start` writes ``config.json`` and the log a run begins (or
  resumes) with, :meth:`RunDirectory.save` each checkpoint and the log lines of its epoch, and
  with :meth:`RunDirectory.open_tensorboard` every logged number also goes to TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import time
from pathlib import Path

from ncfast.measure import scalars
from ncfast.paper.checkpoint import save_checkpoint, tagged, write_text_atomic
from ncfast.paper.run_files import (
    FIGURES_DIR,
    RUN_FILES,
    RUN_FORMAT,
    SWEEP_FILE,
    RunDirectoryError,
    analysis_entries,
    check_writable_dir,
    dangling_link,
    foreign_entries,
    is_run_directory,
    os_reason,
    run_marker,
    swap_in_folder,
)
from ncfast.report.runs import (
    ANALYSIS_DIR,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    metrics_lines,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".ncfast.lock"
_TOKEN = re.compile(r"[0-9a-f]{16}")


class RunDirectory:
    """The run directory ``path`` of one training run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, command: str = "train") -> None:
        self.path = Path(path)
        self.command = command  # recorded in the lock, for the "in use" message
        # Names every temporary file and folder this object creates, and is recorded in the
        # lock: a later owner deletes a killed owner's leftovers by it, and nothing else.
        self.token = secrets.token_hex(8)
        self._lock_fd: int | None = None
        self._shared = False  # lock_shared() took it: a reader's, never unlinked by it
        self._created: list[Path] = []  # folders lock() created, deepest first
        self.stale_owner: dict | None = None  # the owner of a stale lock lock() took over
        self.tensorboard = None  # a SummaryWriter once open_tensorboard() ran

    # ------------------------------------------------------------------------------ names
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def leftovers(self, token: str | None = None) -> list[Path]:
        """The temporary files and folders (partial writes, the trash of an overwrite, an
        analysis being written) of the owner whose lock token is ``token`` (default: this
        one's): names carrying ``ncfast-TOKEN``, which no one else writes."""
        token = self.token if token is None else token
        if not isinstance(token, str) or not _TOKEN.fullmatch(token) or not self.path.is_dir():
            return []
        mark = f"ncfast-{token}"
        return sorted(p for p in self.path.iterdir() if p.name.startswith(".") and mark in p.name)

    def holds_run(self) -> bool:
        """True when a file or folder of ncfast's names is here (a run's, or a foreign one)."""
        return any(
            (self.path / name).exists() or (self.path / name).is_symlink() for name in RUN_FILES
        )

    def check_no_links(self) -> None:
        """RunDirectoryError when a run file is a symbolic link: ncfast writes, replaces and
        deletes them, and never through a link to a file elsewhere."""
        for name in (*RUN_FILES, LOCK_FILE):
            if (self.path / name).is_symlink():
                raise RunDirectoryError(
                    f"out: {self.path / name} is a symbolic link; ncfast never writes through "
                    "one (it could change a file elsewhere): replace it by the file itself, or "
                    "choose another --out"
                )

    # ------------------------------------------------------------------------------- lock
    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def lock(self) -> RunDirectory:
        """Create the directory if needed and take its lock (RunDirectoryError if it cannot be
        created or written, or another process holds it); then remove what killed writers left
        behind (partial files, the trash of an interrupted overwrite)."""
        if self.locked:
            return self
        self._make_dirs()
        try:
            fd = self._take_lock()
        except BaseException:
            self._remove_created_dirs()
            raise
        self._lock_fd = fd
        try:
            self.check_no_links()
        except RunDirectoryError:
            self.unlock()
            raise
        stale_token = (self.stale_owner or {}).get("token")
        for path in self.leftovers(stale_token):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return self

    def unlock(self) -> None:
        """Release the lock (and remove the folders :meth:`lock` created if they stayed empty)."""
        if self._lock_fd is None:
            return
        # Unlinked while still held: a process that opened the file before this can tell that
        # it no longer is the lock (see _take_lock).
        if not self._shared:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
        self._shared = False
        os.close(self._lock_fd)
        self._lock_fd = None
        self._remove_created_dirs()

    def lock_for_reading(self) -> RunDirectory:
        """The lock of a reader that writes nothing in the directory's run files (``ncfast
        analyze``): the exclusive :meth:`lock` where the directory can be written, else (a
        read-only run) a shared ``flock`` on the lock file if there is one, so that no writer
        can start meanwhile; RunDirectoryError naming the owner when a writer holds it."""
        if self.locked:
            return self
        if os.access(self.path, os.W_OK) or fcntl is None:
            return self.lock()
        self.check_no_links()
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return self  # no lock file, and none can be created: no writer here either
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirectoryError(self._in_use_message()) from None
        self._lock_fd, self._shared = fd, True
        return self

    def __enter__(self) -> RunDirectory:
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.unlock()

    def check_not_in_use(self) -> None:
        """RunDirectoryError naming the owner when another process holds the lock now (for
        checks made before :meth:`lock`, such as reading the checkpoint to resume)."""
        if self.locked or fcntl is None or not self.lock_path.is_file():
            return
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryError(self._in_use_message()) from None
        except OSError:
            pass
        finally:
            os.close(fd)  # also releases the shared lock

    def _make_dirs(self) -> None:
        dangling = dangling_link(self.path)
        if dangling:
            raise RunDirectoryError(f"out: {dangling}")
        missing, parent = [], self.path
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirectoryError(f"out: {self.path} exists and is not a directory") from None
        except NotADirectoryError:
            blocker = next((p for p in reversed(missing) if p.parent.is_file()), None)
            what = f"{blocker.parent} is a file" if blocker else "a part of it is a file"
            raise RunDirectoryError(f"out: cannot create {self.path}: {what}") from None
        except OSError as exc:
            raise RunDirectoryError(f"out: cannot create {self.path} ({os_reason(exc)})") from None
        self._created = missing

    def _remove_created_dirs(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
        self._created = []

    def _take_lock(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | (0 if fcntl is not None else os.O_EXCL)
        # Never through a link (it would overwrite the file it points to); O_NONBLOCK: a FIFO
        # named like the lock does not hang the open (it is refused as no regular file).
        flags |= _NOFOLLOW | os.O_NONBLOCK
        while True:
            try:
                fd = os.open(self.lock_path, flags, 0o644)
                _check_regular(fd, self.lock_path)
            except FileExistsError:
                raise RunDirectoryError(
                    self._in_use_message() + f"; if no such process runs, delete {self.lock_path}"
                ) from None
            except OSError as exc:
                if self.lock_path.is_symlink():
                    self.check_no_links()
                raise RunDirectoryError(
                    f"out: cannot write to {self.path} ({os_reason(exc)})"
                ) from None
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirectoryError(self._in_use_message()) from None
            except OSError as exc:
                os.close(fd)
                raise RunDirectoryError(
                    f"out: cannot lock {self.lock_path} ({os_reason(exc)})"
                ) from None
            # The previous owner may have removed the file between our open and our flock.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.lock_path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = self._read_owner(fd)
        # A file with an owner but no flock: that owner was killed (the kernel released it).
        self.stale_owner = previous or None
        owner = {
            "pid": os.getpid(),
            "host": platform.node(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": self.command,
            "token": self.token,
        }
        try:
            os.ftruncate(fd, 0)
            # At offset 0: reading the stale owner moved the offset (a plain write there would
            # leave NUL bytes before the JSON, and the owner unreadable).
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            raise RunDirectoryError(
                f"out: cannot write to {self.path} ({os_reason(exc)})"
            ) from None
        return fd

    @staticmethod
    def _read_owner(fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            owner = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _in_use_message(self) -> str:
        try:
            owner = json.loads(self.lock_path.read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError):
            owner = {}
        if not isinstance(owner, dict) or "pid" not in owner:
            return f"out: {self.path} is in use by another process (it is starting)"
        since = f" since {owner['started']}" if owner.get("started") else ""
        command = owner.get("command", "train")
        what = "that analysis" if command == "analyze" else "that run"
        return (
            f"out: {self.path} is in use by PID {owner.get('pid')} on {owner.get('host', '?')}"
            f" (ncfast {command}){since}; wait for {what} to end, or choose another --out"
        )

    # ------------------------------------------------------------------ state of the run
    def check_ncfast_files(self, option: str = "out") -> None:
        """RunDirectoryError unless the directory is no sweep's and the files of ncfast's names
        here are a run's (:func:`is_run_directory`): nothing else is ever replaced or removed."""
        if (self.path / SWEEP_FILE).exists():
            raise RunDirectoryError(
                f"{option}: {self.path} is a sweep folder ({SWEEP_FILE}), not a run directory; "
                "ncfast sweep manages its runs: choose another --out for this run"
            )
        if self.holds_run() and run_marker(self.path) is None:
            names = ", ".join(n for n in RUN_FILES if (self.path / n).exists())
            raise RunDirectoryError(
                f"{option}: {self.path} holds {names} but is not a run directory of ncfast "
                f"(its {CONFIG_FILE} is missing or not one ncfast wrote); ncfast replaces none "
                "of those files, also with --overwrite: choose another --out"
            )

    def check_new_run(self, overwrite: bool) -> None:
        """A new run may start here: the directory holds no run, or ``overwrite`` is set (and
        what is here is a run's: :meth:`check_ncfast_files`)."""
        self.check_ncfast_files()
        if overwrite or not self.holds_run():
            return
        if self.checkpoint_path.exists():
            raise RunDirectoryError(
                f"out: {self.path} already holds a run; continue it with --resume, replace it "
                "with --overwrite, or choose another --out"
            )
        raise RunDirectoryError(
            f"out: {self.path} already holds a run that stopped before its first checkpoint "
            "(nothing to resume); replace it with --overwrite, or choose another --out"
        )

    def check_resumable(self) -> None:
        """``--resume`` can continue the run here: its checkpoint exists, with no other file of
        ncfast's names unless it is a run directory of ncfast, and no run file a link."""
        if self.checkpoint_path.is_file() and self.path.is_dir():
            self.check_no_links()
            # A checkpoint alone is marked by its own format (load_checkpoint checks it), and
            # resuming it replaces nothing; beside other files of ncfast's names, the marker.
            others = [n for n in RUN_FILES[1:] if (self.path / n).exists()]
            if others or (self.path / SWEEP_FILE).exists():
                self.check_ncfast_files("--resume")
            return
        if not self.path.exists():
            raise RunDirectoryError(
                f"--resume: {self.path} does not exist; start the run without --resume"
            )
        if not self.path.is_dir():
            raise RunDirectoryError(f"--resume: {self.path} is not a directory")
        self.check_ncfast_files("--resume")
        if self.holds_run():
            raise RunDirectoryError(
                f"--resume: the run in {self.path} stopped before its first checkpoint, so "
                "there is nothing to resume; start it again with --overwrite"
            )
        raise RunDirectoryError(
            f"--resume: {self.path} holds no run ({CHECKPOINT_FILE} is missing); start the "
            "run without --resume"
        )

    # --------------------------------------------------------------------------- writes
    def _require_lock(self) -> None:
        if not self.locked:
            raise RuntimeError(f"RunDirectory({self.path}): lock() it before changing it")

    def clear(self) -> None:
        """Remove the old run's files (``--overwrite``), only those ncfast writes: renamed into
        a trash folder (named by this lock's token), the checkpoint first and config.json last,
        then the folder is deleted. Files of other names stay, also in ``analysis/``."""
        self._require_lock()
        self.check_ncfast_files()
        trash = self.path / f".ncfast-{self.token}-trash"
        try:
            trash.mkdir()
            for name in RUN_FILES:
                if name == ANALYSIS_DIR:
                    self._clear_analysis(trash)
                elif (self.path / name).exists():
                    os.rename(self.path / name, trash / name)
        except OSError as exc:
            raise RunDirectoryError(
                f"--overwrite: cannot remove the old run in {self.path} ({os_reason(exc)})"
            ) from None
        shutil.rmtree(trash, ignore_errors=True)

    def _clear_analysis(self, trash: Path) -> None:
        """Move what ncfast analyze wrote in ``analysis/`` to ``trash``; the folders go only
        when nothing else is left in them."""
        folder = self.path / ANALYSIS_DIR
        if not folder.is_dir():
            return
        (trash / ANALYSIS_DIR / FIGURES_DIR).mkdir(parents=True)
        for entry in analysis_entries(folder):
            if entry.is_dir():
                with contextlib.suppress(OSError):
                    entry.rmdir()  # only if empty
            else:
                os.rename(entry, trash / entry.relative_to(self.path))
        with contextlib.suppress(OSError):
            folder.rmdir()

    def _written(self, path: Path, write) -> Path:
        self._require_lock()
        try:
            with tagged(self.token):  # its temporary file carries this lock's token
                return write()
        except OSError as exc:
            raise RunDirectoryError(f"cannot write {path} ({os_reason(exc)})") from None

    def write_config(self, record: dict) -> Path:
        """Replace ``config.json`` (atomically) with ``record``."""
        text = json.dumps(record, indent=2) + "\n"
        return self._written(self.config_path, lambda: write_text_atomic(self.config_path, text))

    def write_metrics(self, rows: list[dict]) -> Path:
        """Replace the log (atomically) with ``rows``."""
        text = metrics_lines(rows)
        return self._written(self.metrics_path, lambda: write_text_atomic(self.metrics_path, text))

    def append_metrics(self, rows: list[dict]) -> None:
        """Append ``rows`` to the log; on failure the log is cut back to its old length."""
        self._require_lock()
        path = self.metrics_path
        try:
            with path.open("ab") as f:
                size = f.tell()
                try:
                    f.write(metrics_lines(rows).encode("utf-8"))
                    f.flush()
                except OSError:
                    f.truncate(size)
                    raise
        except OSError as exc:
            raise RunDirectoryError(f"cannot write {path} ({os_reason(exc)})") from None

    def save_checkpoint(self, payload: dict) -> Path:
        """Replace the checkpoint atomically; on failure the previous one is intact."""
        path = self.checkpoint_path
        try:
            return self._written(path, lambda: save_checkpoint(path, payload))
        except RunDirectoryError as err:
            kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint yet"
            raise RunDirectoryError(f"{err}; {kept}") from None

    # --------------------------------------------------------------------- the records
    def start(self, config_record: dict, history: list[dict], replace: bool) -> None:
        """Begin writing a run: with ``replace`` the old run's files go first (:meth:`clear`),
        then ``config.json`` and the log, rewritten from ``history`` (the checkpoint's: lines
        a killed run wrote after its checkpoint are dropped, so the log matches it)."""
        if replace:
            self.clear()
        self.write_config({"format": RUN_FORMAT, **config_record})
        self.write_metrics(history)

    def save(self, payload: dict, rows: list[dict], epoch: int) -> None:
        """The checkpoint of ``epoch``, then its log lines (and TensorBoard scalars). The
        checkpoint comes first: a failed write leaves the log as it was, and a resumption
        rewrites the log from the checkpoint's history (so a kill between the two loses
        nothing)."""
        self.save_checkpoint(payload)
        if not rows:
            return
        self.append_metrics(rows)
        for row in rows:
            numbers = {k: v for k, v in row.items() if k not in ("epoch", "split")}
            self.log_scalars(numbers, epoch, row["split"])
        if self.tensorboard is not None:
            self.tensorboard.flush()

    # ---------------------------------------------------------------------- TensorBoard
    def open_tensorboard(self, folder: str | os.PathLike, first_step: int) -> None:
        """Log to TensorBoard in ``folder`` from now on; events a killed run wrote at steps
        from ``first_step`` on (after its checkpoint) are hidden. Needs the tensorboard package
        (:func:`check_tensorboard`)."""
        from torch.utils.tensorboard import SummaryWriter

        self.close_tensorboard()
        self.tensorboard = SummaryWriter(log_dir=str(folder), purge_step=first_step)

    def log_scalars(self, values: dict, step: int, prefix: str) -> None:
        """``{prefix}/{key}`` for each number of ``values`` (``{prefix}/{key}/{j}`` for the j-th,
        from 1, of a list) at ``step``; nothing without :meth:`open_tensorboard`."""
        if self.tensorboard is None:
            return
        for tag, value in scalars(values, f"{prefix}/").items():  # text (nc_undefined) left out
            self.tensorboard.add_scalar(tag, value, step)

    def close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


# Where the platform has it (POSIX): an open fails on a symbolic link instead of following it.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _check_regular(fd: int, path: Path) -> None:
    """Close ``fd`` and raise RunDirectoryError unless it is a regular file."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirectoryError(f"out: {path} is not a regular file; delete it")


def check_tensorboard() -> None:
    """ImportError naming the optional extra when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ImportError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install 'ncfast[tensorboard]' (or pip install tensorboard)"
        ) from None


__all__ = [
    "LOCK_FILE",
    "RUN_FORMAT",
    "SWEEP_FILE",
    "RunDirectory",
    "RunDirectoryError",
    "analysis_entries",
    "check_tensorboard",
    "check_writable_dir",
    "foreign_entries",
    "is_run_directory",
    "run_marker",
    "swap_in_folder",
]
