"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict (everything in types the restricted unpickler accepts: tensors, numbers,
strings, lists, dicts):

- ``format``: ``"ncfast-checkpoint-v1"``; ``ncfast_version``; ``epoch`` (last completed epoch)
- ``config``: the JSON-able training configuration
- ``model``, ``optimizer``, ``scheduler``: their ``state_dict()``
- ``rng``: ``{"torch": CPU generator state, "cuda": [per-device states]}`` (uint8 tensors)
- ``history``: the list of metric dicts written to ``metrics.jsonl`` so far
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

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


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, untrusted or not an ncfast checkpoint."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Create ``path`` through ``write(file)`` atomically: a temporary file in the same folder,
    flushed to disk, then renamed over ``path``, so a killed process leaves the old or the new
    file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically with ``torch.save`` (see :func:`atomic_write`)."""
    if not isinstance(payload, dict):
        raise TypeError(f"save_checkpoint: payload must be a dict, got {type(payload).__name__}")
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read an ncfast checkpoint; :class:`CheckpointError` says what is wrong with a bad one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(str(err))
        if "global" in detail.lower():
            # weights_only refuses arbitrary Python objects: we never write those.
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that torch.load(weights_only=True) "
                f"refuses ({detail}); it is untrusted or not an ncfast checkpoint"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({detail})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else "no detail"
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be read "
            f"({type(err).__name__}: {first})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"checkpoint {path} is not an ncfast checkpoint: expected format {FORMAT!r}, "
            f"found {found!r}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the entries {missing}")
    return payload


def _unpickler_detail(message: str) -> str:
    """The one informative sentence of torch's long weights-only error."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", message)
    if match is None:
        return message.splitlines()[0] if message else "no detail"
    return match.group(1).split(". Please use")[0].strip()
