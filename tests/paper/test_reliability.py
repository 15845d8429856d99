"""Run directories that cannot be corrupted, and a clear answer to every bad input (issue 10).

Each test drives ``ncfast`` the way a user would (the command line, in this process through
click's runner, or as a real second process) and checks the one-line error, the exit code and
what is on disk afterwards. Kills are real: a training process started here pauses at a chosen
point (a hook in ``PAUSED_RUN`` below) and gets SIGKILL. docs/bad_inputs.md lists the answers.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from ncfast.paper.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ncfast.paper.train import TrainingDivergedError, train
from ncfast.report.runs import RunError, load_run, read_config, read_metrics
from tests.helpers.cli_runs import RUN, assert_clean_error, copy_run, invoke, posix_only
from tests.helpers.synthetic_runs import write_run_dir
from tests.helpers.tiny_runs import read_rows, tiny_config, tiny_payload

REPO = Path(__file__).resolve().parents[2]
# A run of seconds: 50 training images of the embedded MNIST subset, a 1/16-width VGG11.

# A training process that stops at a chosen point until the test kills it (or lets it go on):
# NCFAST_PAUSE is "epoch:N" (at the start of epoch N: the run directory is set up), "rename:N"
# (after the N-th os.rename: an overwrite moving the old run aside) or "save:N" (halfway through
# writing the checkpoint of epoch N). It touches NCFAST_READY when it stops, and goes on once
# NCFAST_GO exists.
PAUSED_RUN = r"""
import os, sys, time

ready, go = os.environ["NCFAST_READY"], os.environ.get("NCFAST_GO")
kind, _, arg = os.environ["NCFAST_PAUSE"].partition(":")


def pause():
    open(ready, "w").close()
    while go is None or not os.path.exists(go):
        time.sleep(0.02)


if kind == "epoch":
    import ncfast.paper.sgd_epoch

    permutation = ncfast.paper.sgd_epoch.epoch_permutation

    def hooked(num_samples, seed, epoch, device):
        if epoch == int(arg):
            pause()
        return permutation(num_samples, seed, epoch, device)

    ncfast.paper.sgd_epoch.epoch_permutation = hooked
elif kind == "rename":
    rename, count = os.rename, [0]

    def hooked(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        count[0] += 1
        if count[0] == int(arg):
            pause()

    os.rename = hooked
elif kind == "save":
    import torch

    save = torch.save

    def hooked(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == int(arg):
            f.write(b"PK\x03\x04 the first bytes of a checkpoint")
            f.flush()
            pause()
        return save(obj, f, *args, **kwargs)

    torch.save = hooked
from ncfast.cli import main

main(sys.argv[1:], prog_name="ncfast")
"""


class PausedRun:
    """``ncfast ARGS`` in a process of its own, stopped at ``stage`` (see PAUSED_RUN)."""

    def __init__(self, tmp_path: Path, stage: str, *args: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.ready, self.go = tmp_path / f"ready-{tag}", tmp_path / f"go-{tag}"
        env = {
            **os.environ,
            "NCFAST_PAUSE": stage,
            "NCFAST_READY": str(self.ready),
            "NCFAST_GO": str(self.go),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PAUSED_RUN, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not self.ready.exists():
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before {stage}:\n{err}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the run did not reach {stage}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()

    def finish(self) -> subprocess.CompletedProcess:
        self.go.touch()
        out, err = self.proc.communicate(timeout=300)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def __enter__(self) -> PausedRun:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


@pytest.fixture(scope="module")
def resumable_run(tmp_path_factory) -> Path:
    """A run stopped after epoch 1 of 2 (checkpoint, log and config of epoch 1)."""
    out = tmp_path_factory.mktemp("resumable") / "run"
    result = invoke(*RUN, "--stop-after", "1", "--out", out)
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------ 1. two writers, one dir
@posix_only
@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_run_trains(tmp_path):
    out = tmp_path / "R"
    with PausedRun(tmp_path, "epoch:2", *RUN, "--seed", "1", "--out", out) as first:
        # The first run holds out (its epoch-1 checkpoint is written): a new run, an overwrite
        # and a resumption from another process are all refused, naming the owner.
        for extra in (("--seed", "2"), ("--seed", "2", "--overwrite")):
            result = invoke(*RUN, *extra, "--out", out)
            assert_clean_error(result, 1, f"{out} is in use by PID {first.pid}")
        result = invoke("train", "--resume", "--out", out, "--quiet")
        assert_clean_error(result, 1, f"is in use by PID {first.pid}")
        done = first.finish()
    assert done.returncode == 0, done.stderr
    rows = read_rows(out)
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (1, "train"),
        (1, "test"),
        (2, "train"),
        (2, "test"),
    ]
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 1
    assert not (out / ".ncfast.lock").exists()  # released at the end


@posix_only
@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "R"
    with PausedRun(tmp_path, "epoch:2", *RUN, "--out", out) as first:
        first.kill()
    owner = json.loads((out / ".ncfast.lock").read_text())
    assert owner["pid"] == first.pid  # stale: its process is gone
    result = invoke("train", "--resume", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert not (out / ".ncfast.lock").exists()


def test_without_flock_the_lock_file_itself_is_the_lock(tmp_path, monkeypatch):
    import ncfast.paper.rundir as rundir_module
    from ncfast.paper.rundir import RunDirectory, RunDirectoryError

    monkeypatch.setattr(rundir_module, "fcntl", None)
    first = RunDirectory(tmp_path / "R").lock()
    with pytest.raises(RunDirectoryError, match=f"in use by PID {os.getpid()}.*delete"):
        RunDirectory(tmp_path / "R").lock()
    first.unlock()
    RunDirectory(tmp_path / "R").lock().unlock()


# --------------------------------------------------------------------------- 2. divergence
def _assert_finite_checkpoint(out: Path, epoch: int) -> None:
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["epoch"] == epoch
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())
    assert {r["epoch"] for r in read_rows(out)} <= set(range(1, epoch + 1))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    # lr 50 on one batch per epoch: finite after epoch 1, non-finite outputs in eval mode (the
    # measurement) after epoch 2.
    out = tmp_path / "run"
    config = tiny_config(out, lr=50.0, batch_size=80, epochs=3, measure_epochs="all")
    with pytest.raises(TrainingDivergedError, match=r"diverged at epoch 2 \(.*lower --lr"):
        train(config, progress=False, data=tiny_data)
    _assert_finite_checkpoint(out, 1)


def test_divergence_in_the_loss_is_caught_in_the_epoch_it_appears(tmp_path, tiny_data):
    # lr 1e6: the weights explode in the first steps and a training loss turns NaN before
    # the only measurement (epoch 5): the per-epoch check is the one that sees it.
    out = tmp_path / "run"
    config = tiny_config(out, lr=1e6, batch_size=80, epochs=5, measure_epochs=(5,))
    with pytest.raises(TrainingDivergedError, match=r"diverged at epoch [1-4] \(loss nan\)"):
        train(config, progress=False, data=tiny_data)
    assert not (out / "checkpoint.pt").exists()


def test_non_finite_weights_are_caught_in_the_epoch_they_appear(tmp_path, tiny_data):
    # lr 1e38 (float32 holds it) and weight decay 100: the one step of epoch 1 moves the batch
    # norm weights (1 at the start) by 1e40, past float32's range, while the epoch's loss
    # (taken before the step) is finite.
    out = tmp_path / "run"
    config = tiny_config(
        out, lr=1e38, weight_decay=100.0, batch_size=80, epochs=1, measure_epochs="none"
    )
    with pytest.raises(TrainingDivergedError, match=r"epoch 1 \(non-finite weights\)"):
        train(config, progress=False, data=tiny_data)
    assert not (out / "checkpoint.pt").exists()


def test_divergence_without_measurement_never_saves_the_diverged_model(tmp_path, tiny_data):
    out = tmp_path / "run"
    config = tiny_config(out, lr=50.0, batch_size=80, epochs=3, measure_epochs="none")
    with pytest.raises(TrainingDivergedError, match="no checkpoint was written"):
        train(config, progress=False, data=tiny_data)
    assert not (out / "checkpoint.pt").exists()


def test_divergence_first_seen_by_the_measurement(tmp_path, tiny_data, monkeypatch):
    # Where the one-batch check before measuring misses it, the measurement's non-finite
    # features end the run the same way (not as the library's InvalidInputError).
    import ncfast.paper.train as train_module

    monkeypatch.setattr(train_module, "eval_outputs_finite", lambda *args: True)
    out = tmp_path / "run"
    config = tiny_config(out, lr=50.0, batch_size=80, epochs=3, measure_epochs="all")
    with pytest.raises(TrainingDivergedError, match="diverged at epoch 2"):
        train(config, progress=False, data=tiny_data)
    _assert_finite_checkpoint(out, 1)


def test_divergence_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = invoke(*RUN, "--lr", "50", "--batch-size", "50", "--epochs", "3", "--out", out)
    assert_clean_error(result, 1, "training diverged at epoch", "lower --lr (now 50)")


# --------------------------------------------------------------------- 3. overwrite, killed
@posix_only
@pytest.mark.slow
@pytest.mark.parametrize(
    "stage",
    [
        "rename:1",  # in the middle of moving the old run aside
        "epoch:1",  # after the new config is written, before the first checkpoint
    ],
)
def test_an_overwrite_killed_early_never_resumes_the_old_run(tmp_path, stage):
    out = tmp_path / "R"
    assert invoke(*RUN, "--seed", "1", "--out", out).exit_code == 0
    (out / "analysis").mkdir()
    (out / "analysis" / "report.json").write_text("{}")
    with PausedRun(tmp_path, stage, *RUN, "--seed", "2", "--overwrite", "--out", out) as second:
        second.kill()
    assert not (out / "checkpoint.pt").exists()  # the old run's went first
    result = invoke("train", "--resume", "--out", out, "--quiet")
    assert_clean_error(result, 1, "--overwrite")
    result = invoke(*RUN, "--seed", "2", "--out", out)
    assert_clean_error(result, 1, "--overwrite")
    assert invoke(*RUN, "--seed", "2", "--overwrite", "--out", out).exit_code == 0
    assert load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 2
    assert json.loads((out / "config.json").read_text())["seed"] == 2
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint.pt"}


# ------------------------------------------------------------------ 5. outputs not writable
def _unwritable(tmp_path: Path) -> list[Path]:
    (tmp_path / "afile").write_text("")
    paths = [tmp_path / "afile" / "sub"]
    if Path("/proc/self").is_dir():
        paths.append(Path("/proc/ncfast-test"))
    if os.name == "posix" and os.geteuid() != 0:  # root writes to read-only directories
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
        paths.append(readonly / "run")
    return paths


def test_train_checks_its_output_before_loading_anything(tmp_path, monkeypatch):
    import ncfast.paper.train as train_module

    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded before the run directory was checked")

    monkeypatch.setattr(train_module, "load_data", no_loading)
    for out in _unwritable(tmp_path):
        result = invoke(*RUN, "--out", out)
        assert_clean_error(result, 1, "out: cannot", str(out))
        assert not out.exists()


def test_commands_check_their_output_directory(tmp_path, resumable_run):
    run = copy_run(resumable_run, tmp_path)
    for out in _unwritable(tmp_path):
        for args in (
            ("plot", run, "--format", "png"),
            ("table", run),
            ("analyze", run / "checkpoint.pt", "--robustness-samples", "0"),
            ("theory", "simulate", "--classes", "3", "--per-class", "2", "--dim", "4"),
        ):
            extra = ("--steps", "2") if args[0] == "theory" else ()
            result = invoke(*args, *extra, "--out", out)
            assert_clean_error(result, 2, "--out: cannot", str(out))


def _disk_full_after(monkeypatch, predicate, room: int = 100) -> None:
    """Every file opened by os.fdopen whose name satisfies ``predicate`` takes ``room`` bytes,
    then gets ENOSPC (as on a full disk; torch then raises a RuntimeError chained to it)."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self._f, self._written = f, 0

        def write(self, data):
            if self._written + len(data) > room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._written += len(data)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{fd}")
        return Full(f) if predicate(Path(name).name) else f

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names files through /proc")
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, resumable_run, monkeypatch):
    run = copy_run(resumable_run, tmp_path)
    before = load_checkpoint(run / "checkpoint.pt")
    log_before = (run / "metrics.jsonl").read_bytes()
    _disk_full_after(monkeypatch, lambda name: name.startswith(".checkpoint.pt."))
    result = invoke("train", "--resume", "--out", run, "--quiet")
    assert_clean_error(
        result, 1, f"cannot write {run / 'checkpoint.pt'} (No space left on device)", "intact"
    )
    assert result.output.count("\n") <= 2  # one message, not a chain of tracebacks
    monkeypatch.undo()
    after = load_checkpoint(run / "checkpoint.pt")
    assert after["epoch"] == before["epoch"] == 1
    assert (run / "metrics.jsonl").read_bytes() == log_before  # the log matches it
    assert not list(run.glob(".*.tmp"))


def test_disk_full_while_plotting_is_one_line(tmp_path, resumable_run, monkeypatch):
    import matplotlib.figure

    def full(self, fname, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    result = invoke("plot", resumable_run, "--out", tmp_path / "figures", "--format", "png")
    assert_clean_error(result, 1, "cannot write", "No space left on device")


# ------------------------------------------------------------- 6. checkpoints carrying code
class _RunsCode:
    """Pickles as a call of os.system (``posix.system`` on Linux and macOS)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL, and STACK_GLOBAL of memoised strings
def test_a_checkpoint_carrying_code_is_refused_naming_it(tmp_path, protocol, monkeypatch):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = tiny_payload()
    payload["model"]["weight"] = _RunsCode(marker)
    torch.save(payload, path, pickle_protocol=protocol)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load saw a file that carries code")

    monkeypatch.setattr(torch, "load", no_torch_load)  # refused by ncfast, whatever torch says
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "contains code" in message and f"{os.system.__module__}.system" in message
    assert "refused" in message and "weights_only" not in message
    assert not marker.exists()
    monkeypatch.undo()
    result = invoke("analyze", path, "--robustness-samples", "0", "--out", tmp_path / "a")
    assert_clean_error(result, 1, "contains code")
    assert "weights_only" not in result.output and not marker.exists()


# ----------------------------------------------------- 7. checkpoints with wrong contents
def _another_nets_weights(payload):
    from ncfast.paper.models import build

    payload["model"] = build("resnet18", 10, 1, 32, 0.0625).state_dict()


def _misshapen_momentum(payload):
    state = payload["optimizer"]["state"]
    first = next(iter(state))
    state[first]["momentum_buffer"] = torch.zeros(3)


CORRUPTIONS = {
    "a missing model key": (
        lambda p: p["model"].pop("body.0.weight"),
        "weights do not fit a vgg11 of width 0.0625 ('model': missing: body.0.weight)",
    ),
    "another net's weights": (_another_nets_weights, "weights do not fit a vgg11"),
    "epoch 'two'": (lambda p: p.update(epoch="two"), "'epoch' must be an integer in 0.."),
    "an empty rng": (lambda p: p.update(rng={}), "'rng' must be"),
    "an empty optimizer": (lambda p: p.update(optimizer={}), "'optimizer' must be"),
    "misshapen momentum": (_misshapen_momentum, "'optimizer' state momentum_buffer"),
    "an empty scheduler": (lambda p: p.update(scheduler={}), "'scheduler' must be"),
    "history not a list": (lambda p: p.update(history="notalist"), "'history' must be a list"),
    "history of a later epoch": (
        lambda p: p["history"][0].update(epoch=9),
        "after the checkpoint's epoch 1",
    ),
    "config not a dict": (lambda p: p.update(config=[1]), "'config' must be a dict"),
    "config with a bad option": (
        lambda p: p["config"].update(epochs="two"),
        "'config' is unusable (epochs must be an integer",
    ),
    # Issue 19, item 5: settings and dtypes that torch would load, and train differently with.
    "milestones of another schedule": (
        lambda p: p["scheduler"].update(milestones={"a": 1}),
        "'scheduler' setting milestones is {'a': 1}, the run's config.json gives",
    ),
    "a negative weight decay": (
        lambda p: p["optimizer"]["param_groups"][0].update(weight_decay=-5),
        "'optimizer' setting weight_decay is -5, the run's config.json gives 0.0005",
    ),
    "nesterov 'yes'": (
        lambda p: p["optimizer"]["param_groups"][0].update(nesterov="yes"),
        "'optimizer' setting nesterov is 'yes'",
    ),
    "lr 'abc'": (
        lambda p: p["optimizer"]["param_groups"][0].update(lr="abc"),
        "'optimizer' setting lr must be a positive number, got 'abc'",
    ),
    "a scheduler's gamma": (
        lambda p: p["scheduler"].update(gamma=0.5),
        "'scheduler' setting gamma is 0.5",
    ),
    "bool weights": (
        lambda p: p["model"].update({"body.0.weight": p["model"]["body.0.weight"] > 0}),
        "('model': dtype: body.0.weight torch.bool (expected torch.float32))",
    ),
    "complex weights": (
        lambda p: p["model"].update({"body.0.weight": p["model"]["body.0.weight"].cfloat()}),
        "dtype: body.0.weight torch.complex64",
    ),
    "int momentum buffers": (
        lambda p: _each_momentum(p, lambda m: m.long()),
        "'optimizer' state momentum_buffer of parameter 0 is torch.int64",
    ),
    "an epoch beyond any run": (lambda p: p.update(epoch=10**12), "'epoch' must be an integer in"),
    "a config of 10**12 epochs": (
        lambda p: p["config"].update(epochs=10**12),
        "'config' is unusable (epochs must be",
    ),
}


def _each_momentum(payload, change) -> None:
    for state in payload["optimizer"]["state"].values():
        state["momentum_buffer"] = change(state["momentum_buffer"])


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_checkpoint_with_wrong_contents_is_refused_naming_the_field(
    tmp_path, resumable_run, name
):
    run = copy_run(resumable_run, tmp_path)
    payload = load_checkpoint(run / "checkpoint.pt")
    corrupt, expected = CORRUPTIONS[name]
    corrupt(payload)
    save_checkpoint(run / "checkpoint.pt", payload)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = invoke("train", "--resume", "--out", run, "--quiet")
    assert_clean_error(result, 1, expected)
    # Nothing was rewritten from the unchecked checkpoint.
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files


# --------------------------------------------------------- 8. killed before a checkpoint
@posix_only
@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_names_overwrite(tmp_path):
    out = tmp_path / "R"
    with PausedRun(tmp_path, "epoch:1", *RUN, "--out", out) as run:
        run.kill()
    result = invoke("train", "--resume", "--out", out, "--quiet")
    assert_clean_error(result, 1, "stopped before its first checkpoint", "--overwrite")
    result = invoke(*RUN, "--out", out)
    assert_clean_error(result, 1, "stopped before its first checkpoint", "--overwrite")
    assert "--resume" not in result.output  # nothing to resume
    assert invoke(*RUN, "--overwrite", "--out", out).exit_code == 0


def test_resume_of_a_directory_without_a_run(tmp_path):
    result = invoke("train", "--resume", "--out", tmp_path / "none", "--quiet")
    assert_clean_error(result, 1, "does not exist; start the run without --resume")
    (tmp_path / "empty").mkdir()
    result = invoke("train", "--resume", "--out", tmp_path / "empty", "--quiet")
    assert_clean_error(result, 1, "holds no run")


# ------------------------------------------------------------ 10. partial checkpoint files
@posix_only
@pytest.mark.slow
def test_partial_checkpoints_of_killed_writes_are_removed(tmp_path):
    out = tmp_path / "R"
    args = (*RUN, "--epochs", "3", "--measure-epochs", "all")
    with PausedRun(tmp_path, "save:2", *args, "--out", out) as run:
        run.kill()
    assert len(list(out.glob(".checkpoint.pt.*.tmp"))) == 1
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the old one, whole
    # Killed again in the same place: the first partial file does not stay behind.
    with PausedRun(tmp_path, "save:2", "train", "--resume", "--out", str(out), "--quiet") as run:
        run.kill()
    assert len(list(out.glob(".checkpoint.pt.*.tmp"))) == 1
    result = invoke("train", "--resume", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert not list(out.glob(".*.tmp"))
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3


# ---------------------------------------------------------------- 11. damaged run files
def test_damaged_logs_give_a_line_not_a_traceback(tmp_path):
    run = write_run_dir(tmp_path / "run")
    good = (run / "metrics.jsonl").read_bytes()
    lines = good.splitlines(keepends=True)

    def check(content: bytes, *phrases: str) -> None:
        (run / "metrics.jsonl").write_bytes(content)
        with pytest.raises(RunError) as info:
            read_metrics(run / "metrics.jsonl")
        for phrase in phrases:
            assert phrase in str(info.value)
        for command in (("plot", run, "--out", tmp_path / "f", "--format", "png"), ("table", run)):
            extra = ("--out", tmp_path / "t") if command[0] == "table" else ()
            assert_clean_error(invoke(*command, *extra), 1, *phrases)

    check(lines[0] + b"\xff\xfe\n" + b"".join(lines[1:]), "line 2: not UTF-8")
    record = json.loads(lines[0])
    check(good + json.dumps({**record, "epoch": 10**30}).encode() + b"\n", "'epoch' must be")
    snr = {**record, "epoch": 99, "snr_singular_values": ["a", 1]}
    check(good + json.dumps(snr).encode() + b"\n", "'snr_singular_values' must be a list")

    # A crash's leftover last line, even one that is not UTF-8, is skipped with a warning.
    (run / "metrics.jsonl").write_bytes(good + b'{"epoch": 41, "split": "tr\xff')
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert len(read_metrics(run / "metrics.jsonl")) == len(lines)
    # Numbers beyond float64 read as ±inf; a metric stored as a string is not a curve.
    huge = json.dumps({**record, "epoch": 99, "nc1": 0.5})
    huge = huge.replace('"nc1": 0.5', '"nc1": 1' + "0" * 400)  # 10**400, an int in JSON
    strings = {**record, "epoch": 98, "snr_singular_values": "abc"}
    (run / "metrics.jsonl").write_bytes(good + json.dumps(strings).encode() + b"\n" + huge.encode())
    history = load_run(run).history("train")
    assert history["nc1"][-1] == float("inf")
    for command in (("plot", run, "--out", tmp_path / "f", "--format", "png"), ("table", run)):
        extra = ("--out", tmp_path / "t") if command[0] == "table" else ()
        result = invoke(*command, *extra)
        assert result.exit_code == 0, result.output

    (run / "config.json").write_bytes(b'{"dataset": "\xff"}')
    with pytest.raises(RunError, match="config.json: not UTF-8"):
        read_config(run / "config.json")
    assert_clean_error(invoke("table", run, "--out", tmp_path / "t"), 1, "not UTF-8")


# --------------------------------------------------------------- 12. TensorBoard on resume
def _event_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*")) if folder.exists() else []


def test_tensorboard_folder_on_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard (an optional extra) not installed")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert invoke(*RUN, "--stop-after", "1", "--tensorboard", "tb", "--out", run).exit_code == 0
    stored = load_checkpoint(run / "checkpoint.pt")["config"]["tensorboard"]
    assert stored == str(tmp_path / "tb")  # absolute: the same folder from anywhere
    # A checkpoint naming a relative folder: where it points is unknown, so it is not used.
    payload = load_checkpoint(run / "checkpoint.pt")
    payload["config"]["tensorboard"] = "../outside"
    save_checkpoint(run / "checkpoint.pt", payload)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("train", "--resume", "--out", run, "--quiet")
    assert_clean_error(result, 2, "TensorBoard folder '../outside'", "--tensorboard")
    assert not (tmp_path / "outside").exists()
    # Turned off when resuming: no new events anywhere.
    before = _event_files(tmp_path / "tb")
    assert (
        invoke("train", "--resume", "--out", run, "--tensorboard", "none", "--quiet").exit_code == 0
    )
    assert _event_files(tmp_path / "tb") == before and not (tmp_path / "outside").exists()
    assert load_checkpoint(run / "checkpoint.pt")["config"]["tensorboard"] is None


def test_tensorboard_folder_can_change_on_resume(tmp_path, resumable_run):
    pytest.importorskip("tensorboard", reason="tensorboard (an optional extra) not installed")
    run = copy_run(resumable_run, tmp_path)
    result = invoke("train", "--resume", "--out", run, "--tensorboard", tmp_path / "tb2", "--quiet")
    assert result.exit_code == 0, result.output
    assert _event_files(tmp_path / "tb2")


# ------------------------------------------------------------------ 13. options and more
@pytest.mark.parametrize(
    ("args", "exit_code", "phrase"),
    [
        (("--width", "1e9"), 2, "width: a vgg11 of width 1e+09 cannot be built"),
        (("--width", "1000"), 2, "choose a smaller --width"),
        (("--seed", "99999999999999999999"), 2, "'--seed'"),
        (("--lr", "1e300"), 2, "lr must be a finite number in (0, 3.403e+38]"),
        (("--lr", "nan"), 2, "lr must be a finite number"),
        (("--lr-milestones", ","), 2, "'--lr-milestones'"),
        (("--lr-milestones", "1,,2"), 2, "'--lr-milestones'"),
        (("--measure-epochs", ","), 2, "'--measure-epochs'"),
        (("--lr-gamma", "1e30", "--lr-milestones", "1,2"), 2, "lr_gamma"),
        (("--momentum", "1e300"), 2, "momentum must be a finite number"),
        (("--momentum", "5"), 2, "momentum must be a finite number in [0, 1]"),
        (("--epochs", "99999999999999999999999"), 2, "'--epochs'"),
        (("--stop-after", "99999999999999999999999"), 2, "'--stop-after'"),
    ],
)
def test_option_errors_are_one_line(tmp_path, args, exit_code, phrase):
    result = invoke(*RUN, *args, "--out", tmp_path / "run")
    assert_clean_error(result, exit_code, phrase)
    assert not (tmp_path / "run").exists()


def test_lr_milestones_none_means_a_constant_learning_rate(tmp_path):
    out = tmp_path / "run"
    assert invoke(*RUN, "--lr-milestones", "none", "--lr", "0.01", "--out", out).exit_code == 0
    assert [r["lr"] for r in read_rows(out)] == [0.01] * 4


def test_analyze_takes_a_run_directory(tmp_path, resumable_run):
    run = copy_run(resumable_run, tmp_path)
    result = invoke("analyze", run, "--robustness-samples", "0", "--quiet", "--format", "png")
    assert result.exit_code == 0, result.output
    assert (run / "analysis" / "report.json").is_file()
    (tmp_path / "empty").mkdir()
    result = invoke("analyze", tmp_path / "empty")
    assert_clean_error(result, 2, "is a directory without a checkpoint.pt")
