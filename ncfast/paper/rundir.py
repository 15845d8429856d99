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
- the overwrite: :meth:`RunDirectory.clear` moves the old run's files into a trash folder inside
  ``R`` (the checkpoint first, so a run can never be resumed from a half-cleared directory) and
  then deletes the folder; nothing new is written before it has run. A trash folder that a kill
  left behind is deleted the next time the directory is locked;
- partial files: the temporary ``.checkpoint.pt.*.tmp`` (and ``.config.json.*.tmp``,
  ``.metrics.jsonl.*.tmp``) files of a write that was killed are deleted when the directory is
  locked: nobody else can be writing them then;
- the records: :meth:`RunDirectory.start` writes ``config.json`` and the log a run begins (or
  resumes) with, :meth:`RunDirectory.save` each checkpoint and the log lines of its epoch, and
  with :meth:`RunDirectory.open_tensorboard` every logged number also goes to TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from ncfast.errors import NCFastError
from ncfast.measure import scalars
from ncfast.paper.checkpoint import save_checkpoint, write_text_atomic
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
TRASH_PREFIX = ".ncfast-trash-"
# The files of a run, in the order an overwrite removes them (the checkpoint first).
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE, ANALYSIS_DIR)


class RunDirectoryError(NCFastError, ValueError):
    """The run directory cannot be used as asked (in use, holds another run, not writable, or
    the resumed run had other options); the message says what to do."""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable_dir(path: str | os.PathLike, option: str) -> None:
    """RunDirectoryError naming ``option`` unless ``path`` is a directory that can be written,
    or can be created. Nothing is left behind: a probe file is written (and removed) in
    ``path`` or in its nearest existing parent, which creating it needs to write to."""
    path = Path(path)
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
        raise RunDirectoryError(f"{option}: cannot {action} {path} ({_reason(exc)})") from None


class RunDirectory:
    """The run directory ``path`` of one training run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
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

    def partial_files(self) -> list[Path]:
        """Temporary files of atomic writes that never finished (a killed process's)."""
        if not self.path.is_dir():
            return []
        names = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE)
        return sorted(p for name in names for p in self.path.glob(f".{name}.*.tmp"))

    def holds_run(self) -> bool:
        """True when a run's config, log or checkpoint is here."""
        return any((self.path / name).exists() for name in RUN_FILES[:3])

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
        for path in self.partial_files():
            path.unlink(missing_ok=True)
        for trash in self.path.glob(f"{TRASH_PREFIX}*"):
            shutil.rmtree(trash, ignore_errors=True)
        return self

    def unlock(self) -> None:
        """Release the lock (and remove the folders :meth:`lock` created if they stayed empty)."""
        if self._lock_fd is None:
            return
        # Unlinked while still held: a process that opened the file before this can tell that
        # it no longer is the lock (see _take_lock).
        with contextlib.suppress(OSError):
            self.lock_path.unlink()
        os.close(self._lock_fd)
        self._lock_fd = None
        self._remove_created_dirs()

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
            fd = os.open(self.lock_path, os.O_RDONLY)
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
            raise RunDirectoryError(f"out: cannot create {self.path} ({_reason(exc)})") from None
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
        while True:
            try:
                fd = os.open(self.lock_path, flags, 0o644)
            except FileExistsError:
                raise RunDirectoryError(
                    self._in_use_message() + f"; if no such process runs, delete {self.lock_path}"
                ) from None
            except OSError as exc:
                raise RunDirectoryError(
                    f"out: cannot write to {self.path} ({_reason(exc)})"
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
                    f"out: cannot lock {self.lock_path} ({_reason(exc)})"
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
        }
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(owner) + "\n").encode())
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            raise RunDirectoryError(f"out: cannot write to {self.path} ({_reason(exc)})") from None
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
        return (
            f"out: {self.path} is in use by PID {owner.get('pid')} on {owner.get('host', '?')}"
            f"{since}; wait for that run to end, or choose another --out"
        )

    # ------------------------------------------------------------------ state of the run
    def check_new_run(self, overwrite: bool) -> None:
        """A new run may start here: the directory holds no run, or ``overwrite`` is set."""
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
        """``--resume`` can continue the run here: its checkpoint exists."""
        if self.checkpoint_path.is_file():
            return
        if not self.path.exists():
            raise RunDirectoryError(
                f"--resume: {self.path} does not exist; start the run without --resume"
            )
        if not self.path.is_dir():
            raise RunDirectoryError(f"--resume: {self.path} is not a directory")
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
        """Remove the old run's files (``--overwrite``): renamed into a trash folder, the
        checkpoint first, then the folder is deleted."""
        self._require_lock()
        trash = self.path / f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            trash.mkdir()
            for name in RUN_FILES:
                if (self.path / name).exists() or (self.path / name).is_symlink():
                    os.rename(self.path / name, trash / name)
            for path in self.partial_files():
                os.rename(path, trash / path.name)
        except OSError as exc:
            raise RunDirectoryError(
                f"--overwrite: cannot remove the old run in {self.path} ({_reason(exc)})"
            ) from None
        shutil.rmtree(trash, ignore_errors=True)

    def _written(self, path: Path, write) -> Path:
        self._require_lock()
        try:
            return write()
        except OSError as exc:
            raise RunDirectoryError(f"cannot write {path} ({_reason(exc)})") from None

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
            raise RunDirectoryError(f"cannot write {path} ({_reason(exc)})") from None

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
        self.write_config(config_record)
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
    "RunDirectory",
    "RunDirectoryError",
    "check_tensorboard",
    "check_writable_dir",
]
