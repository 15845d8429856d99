"""Guards of the checkpoint module's checks that mutants of the partial mutmut run survived
(issue 21): each malformed field of a payload (plain fields, optimizer, RNG states, history,
times) is one CheckpointError naming the field, what it must be and what it is; the valid
edges load; a state that does not fit its module lists what is missing, unexpected or of the
wrong shape or dtype; the opcode scan names each global a pickle imports (memoised names, the
extension registry, malformed pickles); atomic writes create their folders, name their
temporary files ``.NAME.*.tmp`` and raise the write's own error. Fast: everything is built by
hand, nothing trains (see bench/results/mutation.md)."""

from __future__ import annotations

import collections
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile

import pytest
import torch

from ncfast.paper.checkpoint import (
    CheckpointError,
    atomic_write,
    check_payload,
    load_checkpoint,
    load_state_checked,
    pickle_globals,
    save_checkpoint,
    write_text_atomic,
)
from ncfast.paper.config import MAX_EPOCHS
from tests.helpers.checkpoint_payloads import valid_payload

WHERE = "checkpoint run/checkpoint.pt"
RNG_BYTES = torch.get_rng_state().numel()


def _refusal(payload: dict) -> str:
    with pytest.raises(CheckpointError) as info:
        check_payload(payload, "run/checkpoint.pt")
    return str(info.value)


# --------------------------------------------------------------- a malformed field is named
OPTIMIZER = "an optimizer state dict ('state' and 'param_groups')"
RNG_TORCH = "a dict with the 'torch' generator state (a 1-d uint8 tensor)"
RNG_CUDA = "a dict whose 'cuda' entry is a list of uint8 tensors"
JSON_VALUE = "a JSON value (number, string, list, dict or null)"

MALFORMED = {
    # field: (value, 'field' must be EXPECTED, got SHOWN)
    "version-not-a-string": ("ncfast_version", 3, "ncfast_version", "a string", "3"),
    "epoch-negative": ("epoch", -1, "epoch", f"an integer in 0..{MAX_EPOCHS}", "-1"),
    "epoch-past-the-limit": (
        "epoch",
        MAX_EPOCHS + 1,
        "epoch",
        f"an integer in 0..{MAX_EPOCHS}",
        str(MAX_EPOCHS + 1),
    ),
    "config-non-string-key": (
        "config",
        {1: 2},
        "config",
        "a dict of options",
        "a dict of 1 entries",
    ),
    "config-tensor-option": ("config", {"a": torch.zeros(1)}, "config/a", JSON_VALUE, "a Tensor"),
    "config-tensor-in-list": (
        "config",
        {"a": [1, torch.zeros(1)]},
        "config/a",
        JSON_VALUE,
        "a list of 2 entries",
    ),
    "config-tensor-in-dict": (
        "config",
        {"a": {"b": torch.zeros(1)}},
        "config/a",
        JSON_VALUE,
        "a dict of 1 entries",
    ),
    "model-non-tensor-weight": (
        "model",
        {"weight": 3},
        "model",
        "a non-empty state dict (names to tensors)",
        "a dict of 1 entries",
    ),
    "scheduler-non-string-key": (
        "scheduler",
        {1: 2},
        "scheduler",
        "a state dict",
        "a dict of 1 entries",
    ),
    "scheduler-tensor-milestone": (
        "scheduler",
        {"milestones": {2: torch.zeros(1)}},
        "scheduler/milestones",
        "numbers, lists or the milestones",
        "a dict of 1 entries",
    ),
    "scheduler-tensor-before-a-number": (
        "scheduler",
        {"milestones": {1: torch.zeros(1), 2: 3}},
        "scheduler/milestones",
        "numbers, lists or the milestones",
        "a dict of 2 entries",
    ),
    "optimizer-without-groups": (
        "optimizer",
        {"state": {}},
        "optimizer",
        OPTIMIZER,
        "a dict of 1 entries",
    ),
    "optimizer-no-group": (
        "optimizer",
        {"state": {}, "param_groups": []},
        "optimizer",
        OPTIMIZER,
        "a dict of 2 entries",
    ),
    "optimizer-state-a-list": (
        "optimizer",
        {"state": [], "param_groups": [{"params": [0]}]},
        "optimizer",
        OPTIMIZER,
        "a dict of 2 entries",
    ),
    "optimizer-groups-a-dict": (
        "optimizer",
        {"state": {}, "param_groups": {"params": [0]}},
        "optimizer",
        OPTIMIZER,
        "a dict of 2 entries",
    ),
    "optimizer-group-params-not-a-list": (
        "optimizer",
        {"state": {}, "param_groups": [{"params": 3}]},
        "optimizer",
        OPTIMIZER + " whose groups list their 'params'",
        "a dict of 1 entries",
    ),
    "optimizer-group-a-string": (
        "optimizer",
        {"state": {}, "param_groups": ["g"]},
        "optimizer",
        OPTIMIZER + " whose groups list their 'params'",
        "'g'",
    ),
    "optimizer-list-momentum-buffer": (
        "optimizer",
        {"state": {0: {"momentum_buffer": [1.0]}}, "param_groups": [{"params": [0]}]},
        "optimizer",
        OPTIMIZER + " with tensors in 'state'",
        "a dict of 1 entries",
    ),
    "optimizer-state-a-string": (
        "optimizer",
        {"state": {0: "x"}, "param_groups": [{"params": [0]}]},
        "optimizer",
        OPTIMIZER + " with tensors in 'state'",
        "'x'",
    ),
    "rng-float-state": (
        "rng",
        {"torch": torch.zeros(RNG_BYTES)},
        "rng",
        RNG_TORCH,
        "a dict of 1 entries",
    ),
    "rng-2d-state": (
        "rng",
        {"torch": torch.get_rng_state().reshape(1, -1)},
        "rng",
        RNG_TORCH,
        "a dict of 1 entries",
    ),
    "rng-cuda-not-a-list": (
        "rng",
        {"torch": torch.get_rng_state(), "cuda": "x"},
        "rng",
        RNG_CUDA,
        "a dict of 2 entries",
    ),
    "rng-cuda-float-state": (
        "rng",
        {"torch": torch.get_rng_state(), "cuda": [torch.zeros(3)]},
        "rng",
        RNG_CUDA,
        "a dict of 2 entries",
    ),
    "history-a-dict": (
        "history",
        {"epoch": 1},
        "history",
        "a list of metric records",
        "a dict of 1 entries",
    ),
    "wall-time-infinite": (
        "wall_time",
        float("inf"),
        "wall_time",
        "a finite number of seconds ≥ 0",
        "inf",
    ),
    "wall-time-a-bool": ("wall_time", True, "wall_time", "a finite number of seconds ≥ 0", "True"),
    "epoch-times-infinite": (
        "epoch_times",
        [float("-inf")],
        "epoch_times",
        "a list of seconds",
        "a list of 1 entries",
    ),
}


@pytest.mark.parametrize(
    ("field", "value", "named", "expected", "shown"), MALFORMED.values(), ids=MALFORMED.keys()
)
def test_a_malformed_field_is_refused_naming_it_what_it_must_be_and_what_it_is(
    field, value, named, expected, shown
):
    message = _refusal(valid_payload(**{field: value}))
    assert message == f"{WHERE}: '{named}' must be {expected}, got {shown}"


def test_a_malformed_history_record_is_refused_naming_its_index():
    history = [{"epoch": 1, "split": "train", "error": 0.5}, {"epoch": 1, "split": "train"}]
    message = _refusal(valid_payload(history=history))
    assert message == f"{WHERE}: 'history' record 1: missing key(s) error"


VALID = {
    "epoch-zero": {"epoch": 0, "history": []},
    "epoch-at-the-limit": {"epoch": MAX_EPOCHS},
    "cuda-states": {"rng": {"torch": torch.get_rng_state(), "cuda": [torch.zeros(8).byte()]}},
    "nested-json-config": {"config": {"a": [1, 2.5, None, "s", [True]], "b": {"c": {"d": []}}}},
    "counter-milestones": {"scheduler": {"milestones": collections.Counter({2: 1, 4: 1})}},
    "optimizer-numbers-and-tensors": {
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.zeros(2), "step": 3, "lr": 0.5, "x": None}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        }
    },
    "finite-times": {"wall_time": 0, "epoch_times": [0, 1.5]},
}


@pytest.mark.parametrize("fields", VALID.values(), ids=VALID.keys())
def test_a_valid_payload_at_the_edges_is_accepted(fields):
    check_payload(valid_payload(**fields), "run/checkpoint.pt")


def test_a_valid_checkpoint_round_trips_through_save_and_load(tmp_path):
    payload = valid_payload(
        rng={"torch": torch.get_rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8)]},
        scheduler={"milestones": collections.Counter({2: 1}), "last_epoch": 1},
        wall_time=2.5,
        epoch_times=[2.5],
    )
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", payload)
    loaded = load_checkpoint(path)
    assert loaded["scheduler"]["milestones"] == collections.Counter({2: 1})
    assert torch.equal(loaded["rng"]["torch"], payload["rng"]["torch"])
    assert loaded["history"] == payload["history"] and loaded["epoch_times"] == [2.5]


def test_a_dict_of_another_format_is_not_an_ncfast_checkpoint():
    """Every field present but the format: refused for the format (and the check reads the
    format only of a dict: a list is named by its type)."""
    with pytest.raises(CheckpointError, match=r"expected format .*, found 'other'$"):
        check_payload(valid_payload(format="other"), "run/checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"expected format .*, found 'list'$"):
        check_payload([], "run/checkpoint.pt")


def test_a_payload_checked_without_a_file_is_named_by_the_default():
    """check_payload(payload) with no path: the messages say "checkpoint: ..."."""
    with pytest.raises(CheckpointError, match=r"^checkpoint: 'epoch' must be"):
        check_payload(valid_payload(epoch=-1))


def test_a_payload_without_required_entries_lists_them():
    payload = valid_payload()
    del payload["epoch"], payload["history"]
    with pytest.raises(CheckpointError, match=r"lacks the entries \['epoch', 'history'\]$"):
        check_payload(payload, "run/checkpoint.pt")


def test_a_generator_state_of_the_wrong_size_is_named_with_the_checkpoint():
    rng = {"torch": torch.zeros(7, dtype=torch.uint8)}
    with pytest.raises(
        CheckpointError, match=r"^checkpoint run/checkpoint\.pt: 'rng': the 'torch' generator"
    ):
        check_payload(valid_payload(rng=rng), "run/checkpoint.pt")


def test_load_asks_torch_for_weights_only_and_the_given_device(tmp_path, monkeypatch):
    """Defence in depth behind the opcode scan: torch's weights-only unpickler, always; and the
    caller's map_location reaches torch.load."""
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", valid_payload())
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(path, map_location="meta")
    load_checkpoint(path)
    assert calls == [
        {"map_location": "meta", "weights_only": True},
        {"map_location": "cpu", "weights_only": True},
    ]


def test_a_field_error_of_a_loaded_checkpoint_names_its_file(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", valid_payload(epoch=-1))
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(str(path))}: 'epoch'"):
        load_checkpoint(path)


def test_a_run_directory_given_as_the_checkpoint_points_to_its_file(tmp_path):
    """A folder is refused; where it holds checkpoint.pt the message gives that file."""
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file$"):
        load_checkpoint(folder)
    save_checkpoint(folder / "checkpoint.pt", valid_payload())
    hint = re.escape(f"; give {folder / 'checkpoint.pt'}")
    with pytest.raises(CheckpointError, match=f"is a directory, not a checkpoint file{hint}$"):
        load_checkpoint(folder)


# ------------------------------------------------------- a state that does not fit its module
class _StateHolder:
    """A module whose state dict is ``entries`` and whose ``load_state_dict`` records what it
    was given."""

    def __init__(self, entries: dict) -> None:
        self.entries = entries
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return dict(self.entries)

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def test_a_state_lists_its_missing_unexpected_misshaped_and_mistyped_entries():
    own = {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2)}
    state = {"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int64), "d": torch.zeros(1)}
    module = _StateHolder(own)
    with pytest.raises(CheckpointError) as info:
        load_state_checked(module, state, "ck.pt", "model", "the network")
    assert str(info.value) == (
        "checkpoint ck.pt: its weights do not fit the network ('model': missing: c; "
        "unexpected: d; shape: a [3] (expected [2]); dtype: b torch.int64 (expected torch.float32))"
    )
    assert module.loaded is None


def test_a_state_naming_something_else_where_a_tensor_is_expected_is_refused():
    own = {"a": torch.zeros(2), "b": torch.zeros(2), "step": 1}
    state = {"a": 1.5, "b": torch.zeros(3), "step": torch.tensor(2)}
    module = _StateHolder(own)
    with pytest.raises(CheckpointError) as info:
        load_state_checked(module, state, "ck.pt", "optimizer", "SGD")
    assert str(info.value) == (
        "checkpoint ck.pt: its state does not fit SGD ('optimizer': not a tensor: a float; "
        "shape: b [3] (expected [2]))"
    )
    assert module.loaded is None


@pytest.mark.parametrize(
    ("count", "listed"),
    [
        (1, "missing: k0"),
        (3, "missing: k0, k1, k2"),
        (4, "missing: k0, k1, k2 and 1 more"),
        (6, "missing: k0, k1, k2 and 3 more"),
    ],
)
def test_a_state_shows_three_entries_of_a_kind_and_counts_the_rest(count, listed):
    module = _StateHolder({f"k{i}": torch.zeros(1) for i in range(count)})
    with pytest.raises(CheckpointError) as info:
        load_state_checked(module, {}, "ck.pt", "optimizer", "SGD of the network")
    expected = (
        f"checkpoint ck.pt: its state does not fit SGD of the network ('optimizer': {listed})"
    )
    assert str(info.value) == expected


def test_a_fitting_state_is_loaded():
    module = _StateHolder({"a": torch.zeros(2), "step": 3})
    state = {"a": torch.ones(2), "step": 4}
    load_state_checked(module, state, "ck.pt", "scheduler", "the schedule")
    assert module.loaded is state


# --------------------------------------------------------- the globals a pickle would import
def _unicode(text: str) -> bytes:
    """BINUNICODE: push ``text``."""
    return b"X" + struct.pack("<I", len(text)) + text.encode()


BINPUT, BINGET, POP, STACK_GLOBAL, STOP = b"q", b"h", b"0", b"\x93", b"."


def test_globals_named_through_memoised_strings_are_found():
    """Protocol 4 memoises each string (MEMOIZE) and takes a module name already written from
    the memo (BINGET): the second global is still named, as are the ones after the first
    MEMOIZE."""
    data = pickle.dumps([collections.OrderedDict, collections.Counter], protocol=4)
    assert pickle_globals(data) == ["collections OrderedDict", "collections Counter"]


def test_a_string_put_at_any_memo_index_is_known_when_got_back():
    """A hand-written pickle may memoise at any index (BINPUT 7, not the next free one): the
    global built from what BINGET 7 gives back is named, so it is refused by name."""
    data = (
        _unicode("os") + BINPUT + b"\x07" + POP
        + BINGET + b"\x07" + _unicode("system") + STACK_GLOBAL + STOP
    )  # fmt: skip
    assert pickle_globals(data) == ["os system"]


BININT1 = b"K"


@pytest.mark.parametrize("unknown", ["module", "name"])
def test_a_stack_global_of_a_value_not_known_to_be_a_string_is_computed(unknown):
    """STACK_GLOBAL takes the two values on top of the stack: where either was not pushed as a
    literal string (here an integer), the name is known only at load time."""
    operands = [_unicode("os"), _unicode("system")]
    operands[0 if unknown == "module" else 1] = BININT1 + b"\x05"
    data = b"".join(operands) + STACK_GLOBAL + STOP
    assert pickle_globals(data) == ["<computed>"]


def test_a_global_from_the_extension_registry_is_computed_even_after_two_strings():
    """EXT1 imports what copyreg's registry holds under a code: the strings before it are not
    its name."""
    data = _unicode("os") + _unicode("system") + b"\x82\x01" + STOP
    assert pickle_globals(data) == ["<computed>"]


def _archive_of(path, entries: list[tuple[str, bytes]]):
    """A zip archive at ``path`` holding ``entries`` in order (a name may repeat)."""
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of a duplicate name
        for name, data in entries:
            archive.writestr(name, data)
    return path


def test_a_refusal_names_each_refused_global_once_in_order(tmp_path):
    """Three imports of two globals: the message lists both, joined by ", ", each once."""
    data = b"cos\nsystem\n0cbuiltins\neval\n0cos\nsystem\n."
    path = _archive_of(tmp_path / "code.pt", [("archive/data.pkl", data)])
    with pytest.raises(CheckpointError, match=r"it would call os\.system, builtins\.eval when"):
        load_checkpoint(path)


def test_an_altered_archive_is_refused_naming_the_checkpoint(tmp_path):
    """Two entries of one name: the refusal names the checkpoint file (its path)."""
    entry = ("archive/data.pkl", pickle.dumps({}, protocol=2))
    path = _archive_of(tmp_path / "twice.pt", [entry, entry])
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(str(path))} was refused"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "data",
    [
        pickle.dumps("os", protocol=1),  # no PROTO: a PUT right after the first opcode
        BINPUT + b"\x00" + b"N" + STOP,  # a PUT as the first opcode (nothing to memoise)
    ],
    ids=["put-second", "put-first"],
)
def test_a_put_early_in_a_pickle_is_read_without_crashing(data):
    assert pickle_globals(data) == []


# ------------------------------------------------------------------------ atomic writes
def test_an_atomic_write_creates_the_missing_folders(tmp_path):
    path = tmp_path / "a" / "b" / "notes.txt"
    assert write_text_atomic(path, "é\n") == path
    assert path.read_bytes() == "é\n".encode()


def test_the_temporary_file_is_a_hidden_tmp_file_beside_the_target(tmp_path):
    """``.NAME.<random>.tmp``: the partial files a run directory's cleanup knows."""
    seen: list[str] = []

    def write(f) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())
        f.write(b"x")

    atomic_write(tmp_path / "checkpoint.pt", write)
    assert len(seen) == 1 and re.fullmatch(r"\.checkpoint\.pt\.[^.]+\.tmp", seen[0])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_an_atomic_write_flushes_the_file_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    """The file's bytes before the rename, the folder holding the new name after it: without
    the second flush a crash of the machine can lose the rename (POSIX leaves it in memory)."""
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace",))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = atomic_write(tmp_path / "sub" / "checkpoint.pt", lambda f: f.write(b"x"))
    folder = os.stat(tmp_path / "sub").st_ino
    assert events == [
        ("fsync", "file", os.stat(path).st_ino),
        ("replace",),
        ("fsync", "folder", folder),
    ]
    assert path.read_bytes() == b"x"


def test_an_atomic_write_on_a_folder_that_cannot_be_flushed_still_writes(tmp_path, monkeypatch):
    """Where a folder cannot be opened (Windows) or flushed (some network file systems), the
    write is done, as far as the system allows: no error, the file in place, no fd left."""
    real_open, real_fsync = os.open, os.fsync
    opened: list[int] = []

    def refuse_folder(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            opened.append(fd)
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", refuse_folder)
    assert write_text_atomic(tmp_path / "a.txt", "a").read_text() == "a"
    with pytest.raises(OSError):  # the folder's descriptor was closed
        os.fstat(opened[0])

    def no_folders(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_folders)
    assert write_text_atomic(tmp_path / "b.txt", "b").read_text() == "b"


class _WriteFailed(Exception):
    pass


def test_a_failed_write_whose_temporary_file_is_gone_raises_its_own_error(tmp_path):
    """Another process (a cleanup) may have removed the temporary file already: the write's
    error is raised, not the FileNotFoundError of removing it again."""

    def write(f) -> None:
        for leftover in tmp_path.glob(".*.tmp"):
            leftover.unlink()
        raise _WriteFailed("disk gone")

    with pytest.raises(_WriteFailed):
        atomic_write(tmp_path / "checkpoint.pt", write)
    assert list(tmp_path.iterdir()) == []
