"""Training checkpoints: written atomically, read only after checks that nothing in them can run.

A checkpoint is a dict (everything in types the restricted unpickler accepts: tensors, numbers,
strings, lists, dicts):

- ``format``: ``"ncfast-checkpoint-v1"``; ``ncfast_version``; ``epoch`` (last completed epoch)
- ``config``: the JSON-able training configuration
- ``model``, ``optimizer``, ``scheduler``: their ``state_dict()``
- ``rng``: ``{"torch": CPU generator state, "cuda": [per-device states]}`` (uint8 tensors)
- ``history``: the list of metric dicts written to ``metrics.jsonl`` so far
- optional: ``wall_time`` (seconds), ``epoch_times`` (seconds per epoch)

:func:`load_checkpoint` first reads the pickle opcodes of the file (without unpickling) and
refuses, naming it, any global outside the few a checkpoint holds (:data:`ALLOWED_GLOBALS`): a
file that would call ``os.system`` or ``builtins.eval`` on loading is refused before torch sees
it. Only then ``torch.load(weights_only=True)`` reads it (its own allow-list is a second guard),
and :func:`check_payload` checks the type of every field, so a damaged or foreign checkpoint is
one :class:`CheckpointError` naming the field, never a crash later.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from ncfast.errors import NCFastError
from ncfast.paper.config import MAX_EPOCHS
from ncfast.report.runs import CHECKPOINT_FILE, RunError, check_record

FORMAT = "ncfast-checkpoint-v1"
REQUIRED_KEYS = (
    "format",
    "ncfast_version",
    "epoch",
    "config",
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "history",
)


# mkstemp creates files readable by the owner only; results are ordinary files.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


class CheckpointError(NCFastError, ValueError):
    """A checkpoint file is missing, unreadable, untrusted or not an ncfast checkpoint."""


# The tag of the temporary files written in this context (see temporary_prefix, tagged).
_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("ncfast_tag", default=None)


@contextlib.contextmanager
def tagged(tag: str):
    """Within it, the temporary files of :func:`atomic_write` carry ``tag`` (a run directory's
    lock token, :class:`ncfast.paper.rundir.RunDirectory`)."""
    reset = _TAG.set(tag)
    try:
        yield
    finally:
        _TAG.reset(reset)


def temporary_prefix(name: str) -> str:
    """The prefix of the temporary files of ``name``: ``.NAME.`` and, within :func:`tagged`,
    ``ncfast-TAG-``, so that only the files of a known (killed) writer are ever cleaned up."""
    tag = _TAG.get()
    return f".{name}." + (f"ncfast-{tag}-" if tag else "")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Create ``path`` through ``write(file)`` atomically: a temporary file in the same folder
    (named by :func:`temporary_prefix`), flushed to disk, then renamed over ``path``, so a
    killed process leaves the old or the new file, never half of one. The folder is flushed
    after the rename, so that the new name also survives a crash of the machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = temporary_prefix(path.name)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename lives there) to disk, where the system allows it
    (Windows cannot open a folder; some file systems refuse to flush one)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically with ``torch.save`` (see :func:`atomic_write`).

    A failed write (disk full) is the OSError behind it, naming ``path``; torch reports it as a
    RuntimeError chained to that OSError."""
    if not isinstance(payload, dict):
        raise TypeError(f"save_checkpoint: payload must be a dict, got {type(payload).__name__}")
    try:
        return atomic_write(path, lambda f: torch.save(payload, f))
    except RuntimeError as exc:
        cause = _os_error_in_chain(exc)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from None


def _os_error_in_chain(exc: BaseException) -> OSError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# The globals an ncfast checkpoint's pickle refers to (torch.save of tensors, OrderedDicts of
# state dicts, the scheduler's Counter of milestones), as "module name".
_STORAGE_TYPES = (
    "Float",
    "Double",
    "Half",
    "BFloat16",
    "Long",
    "Int",
    "Short",
    "Char",
    "Byte",
    "Bool",
    "ComplexFloat",
    "ComplexDouble",
    "Untyped",
)
ALLOWED_GLOBALS = frozenset(
    {
        "collections OrderedDict",
        "collections Counter",
        "torch._utils _rebuild_tensor_v2",
        "torch._utils _rebuild_parameter",
        *(f"torch {name}Storage" for name in _STORAGE_TYPES),
    }
)
_STRING_OPS = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    }
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_IMPORT_OPS = frozenset({"GLOBAL", "INST", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4"})


def pickle_globals(data: bytes) -> list[str]:
    """The globals (``"module name"``) a pickle would import, read from its opcodes without
    unpickling it. A global whose name is computed at load time (``STACK_GLOBAL`` on anything
    but two literal strings, or the extension registry) is listed as ``"<computed>"``.
    Raises ValueError for data that is not a complete pickle."""
    import pickletools

    found = []
    memo: dict[int, str | None] = {}
    # The strings on top of the stack, as far as they are known from the last opcodes: each
    # opcode other than PUT/MEMOIZE pushes or pops, so only literal strings (or GETs of
    # memoised strings) right before STACK_GLOBAL are known to be its operands.
    recent: list[str | None] = []
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in _PUT_OPS:
            index = len(memo) if name == "MEMOIZE" else arg
            memo[index] = recent[-1] if recent else None
            continue
        if name in _IMPORT_OPS:
            if name in ("GLOBAL", "INST"):
                found.append(str(arg))
            elif name == "STACK_GLOBAL" and len(recent) >= 2 and None not in recent[-2:]:
                found.append(f"{recent[-2]} {recent[-1]}")
            else:
                found.append("<computed>")
        if name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else bytes(arg).decode("latin1"))
        elif name in _GET_OPS:
            recent.append(memo.get(arg))
        else:
            recent.append(None)
        del recent[:-2]
    return found


def _refuse_code(path: Path) -> None:
    """CheckpointError if the archive is damaged (an entry's CRC-32 does not match: a flipped
    byte anywhere), holds two entries of one name (torch would read one, this check another),
    or its pickles import anything outside ALLOWED_GLOBALS."""
    try:
        with zipfile.ZipFile(path) as archive:
            _check_archive(archive, path)
            names = [n for n in archive.namelist() if n.endswith(".pkl")]
            if not names:
                raise CheckpointError(
                    f"checkpoint {path} is corrupt or not a torch checkpoint (no data.pkl "
                    "inside the archive)"
                )
            for name in names:
                found = pickle_globals(archive.read(name))
                refused = [g for g in found if g not in ALLOWED_GLOBALS]
                if refused:
                    shown = ", ".join(dict.fromkeys(g.replace(" ", ".") for g in refused))
                    raise CheckpointError(
                        f"checkpoint {path} was refused without loading it: it contains code "
                        f"(it would call {shown} when loaded), which an ncfast checkpoint never "
                        "does; it is not a checkpoint written by ncfast train"
                    )
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch checkpoint (not a zip archive: {exc})"
        ) from None
    except (ValueError, EOFError, OSError, RuntimeError, zipfile.LargeZipFile) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be read "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _check_archive(archive: zipfile.ZipFile, path: Path) -> None:
    """Each name once, and every entry's bytes match the CRC-32 the writer recorded."""
    names = archive.namelist()
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CheckpointError(
            f"checkpoint {path} was refused: its archive holds several entries named "
            f"{', '.join(repeated[:3])} (torch.save never writes that: it was altered)"
        )
    damaged = archive.testzip()
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: the entry {damaged} does not match its checksum "
            "(CRC-32); the file was damaged after it was written"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # torch's weights-only errors advise weights_only=False, the unsafe path: never repeat it.
    lines = [ln for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0].strip() if lines else "no detail"


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read an ncfast checkpoint; :class:`CheckpointError` says what is wrong with a bad one
    (missing, a directory, corrupt, containing code, or a field of the wrong type)."""
    path = Path(path)
    if path.is_dir():
        hint = path / CHECKPOINT_FILE
        raise CheckpointError(
            f"checkpoint {path} is a directory, not a checkpoint file"
            + (f"; give {hint}" if hint.is_file() else "")
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    _refuse_code(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path} was refused: torch's weights-only loader rejected it "
            f"({_first_line(err)})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be read "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from None
    check_payload(payload, path)
    return payload


def check_payload(payload, path: str | os.PathLike | None = None) -> None:
    """CheckpointError naming the first field of ``payload`` that is missing or of the wrong
    type or shape (the checks that need the network are :func:`load_state_checked`'s); the
    messages name ``path``, the file it was read from, when given."""
    where = "checkpoint" if path is None else f"checkpoint {path}"
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{where} is not an ncfast checkpoint: expected format {FORMAT!r}, found {found!r}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{where} lacks the entries {missing}")

    def bad(field: str, expected: str, value) -> CheckpointError:
        return CheckpointError(f"{where}: '{field}' must be {expected}, got {_describe(value)}")

    _check_plain_fields(payload, bad)
    _check_optimizer_payload(payload["optimizer"], bad)
    _check_rng_payload(payload["rng"], bad, where)
    _check_history_payload(payload["history"], payload["epoch"], bad, where)
    wall_time = payload.get("wall_time", 0.0)
    if not _is_number(wall_time) or wall_time < 0:
        raise bad("wall_time", "a finite number of seconds ≥ 0", wall_time)
    epoch_times = payload.get("epoch_times", [])
    if not isinstance(epoch_times, list) or not all(_is_number(t) and t >= 0 for t in epoch_times):
        raise bad("epoch_times", "a list of seconds", epoch_times)


def _check_plain_fields(payload: dict, bad) -> None:
    """The version, epoch, config, model and scheduler entries have their types."""
    if not isinstance(payload["ncfast_version"], str):
        raise bad("ncfast_version", "a string", payload["ncfast_version"])
    epoch = payload["epoch"]
    if not _is_int(epoch) or not 0 <= epoch <= MAX_EPOCHS:
        raise bad("epoch", f"an integer in 0..{MAX_EPOCHS}", epoch)
    config = payload["config"]
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise bad("config", "a dict of options", config)
    for key, value in config.items():
        if not _is_json(value):
            raise bad(f"config/{key}", "a JSON value (number, string, list, dict or null)", value)
    model = payload["model"]
    if (
        not isinstance(model, dict)
        or not model
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items())
    ):
        raise bad("model", "a non-empty state dict (names to tensors)", model)
    scheduler = payload["scheduler"]
    if not isinstance(scheduler, dict) or not all(isinstance(k, str) for k in scheduler):
        raise bad("scheduler", "a state dict", scheduler)
    for key, value in scheduler.items():  # numbers, lists and the Counter of milestones
        plain = {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
        if not _is_json(plain):
            raise bad(f"scheduler/{key}", "numbers, lists or the milestones", value)


def _check_history_payload(history, epoch: int, bad, where: str) -> None:
    """Valid metrics records (:func:`ncfast.report.runs.check_record`), none after ``epoch``."""
    if not isinstance(history, list):
        raise bad("history", "a list of metric records", history)
    for i, record in enumerate(history):
        try:
            check_record(record, f"{where}: 'history' record {i}")
        except RunError as exc:
            raise CheckpointError(str(exc)) from None
        if record["epoch"] > epoch:
            raise CheckpointError(
                f"{where}: 'history' record {i} is of epoch {record['epoch']}, after the "
                f"checkpoint's epoch {epoch}"
            )


def _describe(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return repr(value) if not value else f"a {type(value).__name__} of {len(value)} entries"
    if isinstance(value, (int, float, str, bool, type(None))):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(value).__name__}"


def _is_json(value) -> bool:
    """Whether ``value`` is made of JSON's kinds only (as config.json holds)."""
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_optimizer_payload(optimizer, bad) -> None:
    expected = "an optimizer state dict ('state' and 'param_groups')"
    if (
        not isinstance(optimizer, dict)
        or not isinstance(optimizer.get("state"), dict)
        or not isinstance(optimizer.get("param_groups"), list)
        or not optimizer["param_groups"]
    ):
        raise bad("optimizer", expected, optimizer)
    for group in optimizer["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise bad("optimizer", expected + " whose groups list their 'params'", group)
    for state in optimizer["state"].values():
        if not isinstance(state, dict) or not all(
            isinstance(v, (torch.Tensor, int, float, type(None))) for v in state.values()
        ):
            raise bad("optimizer", expected + " with tensors in 'state'", state)


def _check_rng_payload(rng, bad, where: str) -> None:
    def is_state(value) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1

    if not isinstance(rng, dict) or not is_state(rng.get("torch")):
        raise bad("rng", "a dict with the 'torch' generator state (a 1-d uint8 tensor)", rng)
    if rng["torch"].numel() != torch.get_rng_state().numel():
        raise CheckpointError(
            f"{where}: 'rng': the 'torch' generator state has {rng['torch'].numel()} bytes, "
            f"expected {torch.get_rng_state().numel()}"
        )
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list) or not all(is_state(s) for s in cuda):
        raise bad("rng", "a dict whose 'cuda' entry is a list of uint8 tensors", rng)


def load_state_checked(module, state: dict, path, field: str, what: str) -> None:
    """``module.load_state_dict(state)``, or a CheckpointError naming ``field`` and the
    missing, unexpected and mis-shaped entries (``what`` describes ``module``)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    # Entries where both sides hold a tensor are compared; a tensor expected and something
    # else found is named as such (not an AttributeError on its .shape).
    tensors = {
        k: (state[k], v) for k, v in own.items() if k in state and isinstance(v, torch.Tensor)
    }
    not_tensors = [
        f"{k} {type(theirs).__name__}"
        for k, (theirs, _) in tensors.items()
        if not isinstance(theirs, torch.Tensor)
    ]
    pairs = {k: pair for k, pair in tensors.items() if isinstance(pair[0], torch.Tensor)}
    shapes = [
        f"{k} {list(theirs.shape)} (expected {list(ours.shape)})"
        for k, (theirs, ours) in pairs.items()
        if theirs.shape != ours.shape
    ]
    # load_state_dict would cast: int, bool or complex weights would train silently otherwise.
    dtypes = [
        f"{k} {theirs.dtype} (expected {ours.dtype})"
        for k, (theirs, ours) in pairs.items()
        if theirs.dtype != ours.dtype
    ]
    problems = []
    kinds = (
        ("missing", missing),
        ("unexpected", unexpected),
        ("not a tensor", not_tensors),
        ("shape", shapes),
        ("dtype", dtypes),
    )
    for label, items in kinds:
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    subject = "its weights do" if field == "model" else "its state does"
    if problems:
        raise CheckpointError(
            f"checkpoint {path}: {subject} not fit {what} ('{field}': {'; '.join(problems)})"
        )
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: {subject} not fit {what} ('{field}': {_first_line(exc)})"
        ) from None
