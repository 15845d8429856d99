"""Guards of the checkpoint module that a mutant of the partial mutmut run survived (issue 21):
the value an error message shows of a wrong field, the first line of a cause it quotes, the
OSError behind a failed write (disk full) found in torch's chain of exceptions, and the names of
the temporary files. Fast: payloads and failures are made by hand, nothing trains. Each test
fails when its check is changed (see bench/results/mutation.md)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from ncfast.paper import checkpoint
from ncfast.paper.checkpoint import (
    CheckpointError,
    atomic_write,
    check_payload,
    load_state_checked,
    save_checkpoint,
    tagged,
    temporary_prefix,
)
from tests.helpers.checkpoint_payloads import valid_payload


# ------------------------------------------------------ the value a wrong field is shown as
def test_the_hand_built_payload_is_valid():
    check_payload(valid_payload())


def _long_string(repr_length: int) -> str:
    """A string whose repr is ``repr_length`` characters long (quotes included)."""
    return "e" * (repr_length - 2)


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("model", {}, "{}"),  # an empty container: its repr
        ("epoch_times", [1.0, -1.0], "a list of 2 entries"),  # a full one: type and size
        ("wall_time", -1.0, "-1.0"),  # a scalar: its repr
        ("epoch", _long_string(60), repr(_long_string(60))),  # 60 characters: whole
        ("epoch", _long_string(61), repr(_long_string(61))[:57] + "..."),  # 61: cut to 60
        ("rng", torch.zeros(3, dtype=torch.uint8), "a Tensor"),  # anything else: its type
    ],
    ids=["empty", "list", "scalar", "60-chars", "61-chars", "tensor"],
)
def test_an_error_shows_the_wrong_value_briefly(field, value, shown):
    payload = valid_payload()
    payload[field] = value
    with pytest.raises(CheckpointError) as info:
        check_payload(payload, "run/checkpoint.pt")
    message = str(info.value)
    assert message.startswith(f"checkpoint run/checkpoint.pt: '{field}' must be ")
    assert message.endswith(f", got {shown}")


# ------------------------------------------------------------ the first line of a cause
class _RefusingModule:
    """A module with no entries whose ``load_state_dict`` raises RuntimeError(message)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        raise RuntimeError(self.message)


@pytest.mark.parametrize(
    ("cause", "quoted"),
    [
        ("  Error(s) in loading state_dict  \n\n\tmore detail", "Error(s) in loading state_dict"),
        ("single line", "single line"),
        # torch's advice to load with weights_only=False (the unsafe path) is never repeated
        ("Use torch.load(weights_only=False)\n\n  the real cause\nmore", "the real cause"),
        ("", "no detail"),
        ("set weights_only=False", "no detail"),
    ],
    ids=["first-of-several", "single", "advice-skipped", "empty", "only-advice"],
)
def test_a_refused_state_quotes_the_first_line_of_its_cause(cause, quoted):
    with pytest.raises(CheckpointError) as info:
        load_state_checked(_RefusingModule(cause), {}, "ck.pt", "model", "the network")
    expected = f"checkpoint ck.pt: its weights do not fit the network ('model': {quoted})"
    assert str(info.value) == expected


# ------------------------------------------------------------- a failed write (disk full)
class _FullDisk:
    """The file ``os.fdopen`` opened, whose writes after the first fail with ENOSPC (each
    other attribute is the file's)."""

    def __init__(self, file) -> None:
        self.file = file
        self.writes = 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()


def test_a_full_disk_is_the_oserror_naming_the_checkpoint(tmp_path, monkeypatch):
    """torch.save reports the failed write as a RuntimeError whose context is the OSError:
    save_checkpoint raises that OSError (errno, cause) naming the file, and leaves nothing."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda *a, **k: _FullDisk(real_fdopen(*a, **k)))
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"weights": torch.ones(100_000)})
    assert type(info.value) is OSError  # not torch's RuntimeError
    assert info.value.errno == errno.ENOSPC
    assert info.value.strerror == os.strerror(errno.ENOSPC)
    assert info.value.filename == str(path)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []


def test_an_explicitly_chained_oserror_is_found(tmp_path, monkeypatch):
    """A RuntimeError raised ``from`` the OSError outside its handler (cause, no context)."""
    failure = RuntimeError("write failed")
    failure.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")

    def failing_save(payload, f):
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path / "c.pt", {})
    assert (info.value.errno, info.value.filename) == (errno.EDQUOT, str(tmp_path / "c.pt"))


class _SelfCausedError(RuntimeError):
    """A RuntimeError that is its own cause (a cyclic chain). Reading its cause a 100th time
    fails, so that a walk of the chain that does not stop at the cycle fails instead of
    looping forever."""

    def __init__(self) -> None:
        super().__init__("cyclic")
        self.reads = 0

    @property  # type: ignore[override]
    def __cause__(self):
        self.reads += 1
        if self.reads == 100:
            raise AssertionError("the walk of the exception chain did not stop at its cycle")
        return self if self.reads < 100 else None


@pytest.mark.parametrize(
    "make_failure", [lambda: RuntimeError("no OSError behind it"), _SelfCausedError]
)
def test_a_runtime_error_without_an_oserror_is_raised_as_is(tmp_path, monkeypatch, make_failure):
    failure = make_failure()

    def failing_save(payload, f):
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(RuntimeError) as info:
        save_checkpoint(tmp_path / "c.pt", {})
    assert info.value is failure
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------- temporary file names
def test_temporary_files_carry_the_tag_only_within_tagged(tmp_path):
    """Outside :func:`tagged`, ``.NAME.``; within it, ``.NAME.ncfast-TAG-``: the name a cleanup
    of a killed writer's files looks for."""
    seen: list[str] = []

    def record_names(f) -> None:
        seen.extend(p.name for p in Path(tmp_path).iterdir())
        f.write(b"x")

    assert temporary_prefix("checkpoint.pt") == ".checkpoint.pt."
    atomic_write(tmp_path / "checkpoint.pt", record_names)
    with tagged("token123"):
        assert temporary_prefix("checkpoint.pt") == ".checkpoint.pt.ncfast-token123-"
        atomic_write(tmp_path / "checkpoint.pt", record_names)
    assert temporary_prefix("checkpoint.pt") == ".checkpoint.pt."
    untagged, tagged_names = seen[0], [n for n in seen[1:] if n != "checkpoint.pt"]
    assert untagged.startswith(".checkpoint.pt.") and "ncfast-" not in untagged
    assert len(tagged_names) == 1 and tagged_names[0].startswith(".checkpoint.pt.ncfast-token123-")
