"""Guards of the run machinery that a mutant used to survive (issue 21, items 1-3): the run
directory's lock against a lock file replaced between ``open`` and ``flock``, the checkpoint scan
against every pickle opcode that imports, and divergence that only the loss or only a buffer
shows. Each test fails when its check is removed (see bench/results/mutation.md)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from ncfast.paper.checkpoint import CheckpointError, load_checkpoint
from ncfast.paper.rundir import RunDirectory, RunDirectoryError
from ncfast.paper.train import TrainingDivergedError, train
from tests.helpers.tiny_runs import synthetic_split, tiny_config

fcntl = pytest.importorskip("fcntl", reason="the lock is an flock")


# ------------------------------------------------------------------------ 1. the lock
def test_a_lock_file_replaced_between_open_and_flock_is_not_taken(tmp_path, monkeypatch):
    """Writer B opens the lock file; before B's flock, owner A releases (unlinking the file)
    and writer C locks a new file of the same name. B's flock on the old, unlinked file
    succeeds, but B must see that it no longer is the lock and be refused by C's."""
    out = tmp_path / "run"
    owner_a = RunDirectory(out).lock()
    real_flock = fcntl.flock
    others: list[RunDirectory] = []
    swapped = []

    def flock_after_a_swap(fd, operation):
        if operation & fcntl.LOCK_EX and not swapped:
            swapped.append(fd)
            owner_a.unlock()  # unlinks the file B has open
            others.append(RunDirectory(out).lock())  # C: a new file under the same name
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_swap)
    with pytest.raises(RunDirectoryError, match=f"pid {os.getpid()}|in use|running"):
        RunDirectory(out).lock()
    monkeypatch.undo()
    (owner_c,) = others
    assert owner_c.locked and (out / ".ncfast.lock").is_file()
    owner_c.unlock()
    RunDirectory(out).lock().unlock()  # free again once C is done


# ------------------------------------------------------------------ 2. the pickle scan
# Hand-made pickles, one per opcode that imports; each would run os.system (or whatever the
# extension registry names) if unpickled.
COMMAND = b"touch /nonexistent-ncfast-marker"
IMPORTING_PICKLES = {
    # GLOBAL 'os system', MARK, STRING, TUPLE, REDUCE (protocol 0)
    "GLOBAL": (b"cos\nsystem\n(S'" + COMMAND + b"'\ntR.", "os.system"),
    # MARK, STRING, INST 'os system' (protocol 0: imports and calls in one opcode)
    "INST": (b"(S'" + COMMAND + b"'\nios\nsystem\n.", "os.system"),
    # PROTO 4, SHORT_BINUNICODE 'os', SHORT_BINUNICODE 'system', STACK_GLOBAL, ...
    "STACK_GLOBAL": (
        b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(COMMAND)]) + COMMAND + b"\x85R.",
        "os.system",
    ),
    # The extension registry (copyreg): the import it names is known only at load time.
    "EXT1": (b"\x80\x02\x82\x01)R.", "<computed>"),
    "EXT2": (b"\x80\x02\x83\x01\x01)R.", "<computed>"),
    "EXT4": (b"\x80\x02\x84\x01\x01\x01\x00)R.", "<computed>"),
}


def _checkpoint_holding(path: Path, data_pkl: bytes) -> Path:
    """A torch-style zip archive whose data.pkl is ``data_pkl``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("opcode", sorted(IMPORTING_PICKLES))
def test_every_importing_opcode_is_refused_before_torch_reads_it(tmp_path, opcode, monkeypatch):
    import pickletools

    data, shown = IMPORTING_PICKLES[opcode]
    assert opcode in {op.name for op, _, _ in pickletools.genops(data)}  # the pickle is valid
    path = _checkpoint_holding(tmp_path / f"{opcode}.pt", data)

    def no_torch_load(*args, **kwargs):
        raise AssertionError(f"torch.load saw a checkpoint that imports through {opcode}")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(CheckpointError, match="contains code") as info:
        load_checkpoint(path)
    assert f"would call {shown}" in str(info.value)


def test_a_pickle_of_plain_data_passes_the_scan(tmp_path, monkeypatch):
    """The other side: a protocol-0 pickle without an import reaches torch's loader."""
    path = _checkpoint_holding(tmp_path / "plain.pt", b"(dp0\nS'epoch'\np1\nI3\ns.")
    seen = []

    def torch_load(*args, **kwargs):
        seen.append(args)
        return {}

    monkeypatch.setattr(torch, "load", torch_load)
    with pytest.raises(CheckpointError, match="checkpoint"):  # {} lacks every field
        load_checkpoint(path)
    assert len(seen) == 1


# --------------------------------------------------------------------- 3. divergence
@pytest.fixture(scope="module")
def tiny_data():
    return synthetic_split("train", 20, 0), synthetic_split("test", 5, 1)


def test_an_infinite_loss_with_finite_weights_stops_the_run(tmp_path, tiny_data, monkeypatch):
    """+inf added to every batch's loss as a constant: the gradients (and so the weights and
    the eval-mode outputs) stay finite, only the loss shows the divergence."""
    import ncfast.paper.sgd_epoch as sgd_epoch

    compute_loss = sgd_epoch.compute_loss

    def infinite_loss(*args):
        return compute_loss(*args) + torch.tensor(float("inf"))

    monkeypatch.setattr(sgd_epoch, "compute_loss", infinite_loss)
    out = tmp_path / "run"
    config = tiny_config(out, batch_size=80, epochs=1, measure_epochs="none")
    with pytest.raises(TrainingDivergedError, match=r"diverged at epoch 1 \(loss inf\)"):
        train(config, progress=False, data=tiny_data)
    assert not (out / "checkpoint.pt").exists()


def test_a_non_finite_buffer_with_finite_outputs_stops_the_run(tmp_path, tiny_data):
    """Batch norm's running_var set to +inf before each training pass: the parameters stay
    finite, and so do the eval-mode outputs ((x − mean)/√inf = 0: the layer outputs its bias);
    only the buffer shows the divergence."""

    def poison(module, args):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            module.running_var.fill_(float("inf"))

    handle = nn.modules.module.register_module_forward_pre_hook(poison)
    try:
        out = tmp_path / "run"
        config = tiny_config(out, batch_size=80, epochs=1, measure_epochs="none")
        with pytest.raises(TrainingDivergedError, match=r"epoch 1 \(non-finite weights\)"):
            train(config, progress=False, data=tiny_data)
    finally:
        handle.remove()
    assert not (out / "checkpoint.pt").exists()
