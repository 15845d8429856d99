"""Fuzzing every file of a run directory that ncfast reads back (issue 19): the lock, config.json,
metrics.jsonl and each field of the checkpoint. Whatever is in them, the answer is one line (an
NCFastError) or a documented repair (a stale or garbage lock is taken over; a log's incomplete
last line is skipped with a warning), never a traceback from inside. In this process, on
tests/helpers/tiny_runs.py's synthetic data; the hypothesis seed is the test's ``seed``."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import ncfast.paper.train as train_module
import ncfast.paper.training_state as training_state
from ncfast.errors import NCFastError
from ncfast.paper import distributed as dist_utils
from ncfast.paper.checkpoint import load_checkpoint, save_checkpoint
from ncfast.paper.rundir import LOCK_FILE, RunDirectory, run_marker
from ncfast.report.runs import read_metrics
from tests.helpers.tiny_runs import synthetic_split, tiny_config

FUZZ = settings(
    max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

# Values of every JSON and checkpoint kind, the awkward ones included.
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(-3, 3), max_size=2),
    st.sampled_from([torch.float64, torch.int64, torch.bool, torch.complex64]).map(
        lambda dtype: torch.zeros(2, dtype=dtype)
    ),
)
# Fields of a checkpoint (paths into the payload) and of a config.
CHECKPOINT_FIELDS = (
    ("epoch",),
    ("config", "epochs"),
    ("config", "lr"),
    ("config", "momentum"),
    ("config", "lr_milestones"),
    ("optimizer", "param_groups", 0, "lr"),
    ("optimizer", "param_groups", 0, "momentum"),
    ("optimizer", "param_groups", 0, "weight_decay"),
    ("optimizer", "param_groups", 0, "nesterov"),
    ("optimizer", "param_groups", 0, "params"),
    ("optimizer", "state"),
    ("scheduler", "milestones"),
    ("scheduler", "gamma"),
    ("scheduler", "base_lrs"),
    ("scheduler", "last_epoch"),
    ("rng", "torch"),
    ("history",),
    ("history", 0, "epoch"),
    ("history", 0, "nc1"),
    ("wall_time",),
    ("epoch_times",),
    ("step",),
    ("online",),
    ("model", "body.0.weight"),
)


def one_line(exc: BaseException) -> None:
    assert isinstance(exc, NCFastError), repr(exc)
    assert str(exc).strip() and "\n" not in str(exc).strip(), str(exc)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, one_thread):
    """A tiny run stopped after epoch 1 of 2, and its data."""
    data = (synthetic_split("train", 20, 0), synthetic_split("test", 6, 1))
    out = tmp_path_factory.mktemp("fuzz") / "run"
    train_module.train(tiny_config(out, stop_after=1, measure_epochs="all"), False, data)
    return out, data


def test_fuzzed_locks_are_taken_over(tmp_path, seed):
    print(f"hypothesis seed {seed}")
    (tmp_path / "R").mkdir()
    (tmp_path / "R" / "mine.txt").write_text("mine")

    @FUZZ
    @given(content=st.binary(max_size=64) | VALUES.map(lambda v: json.dumps(repr(v)).encode()))
    def check(content: bytes) -> None:
        (tmp_path / "R" / LOCK_FILE).write_bytes(content)
        with RunDirectory(tmp_path / "R") as rundir:
            assert rundir.stale_owner is None or isinstance(rundir.stale_owner, dict)
            assert json.loads((tmp_path / "R" / LOCK_FILE).read_bytes())["token"] == rundir.token
        assert (tmp_path / "R" / "mine.txt").read_text() == "mine"

    hypothesis_seed(seed)(check)()


def test_fuzzed_configs_are_a_run_or_refused(tmp_path, stopped, seed):
    print(f"hypothesis seed {seed}")
    run = Path(shutil.copytree(stopped[0], tmp_path / "run"))
    good = json.loads((run / "config.json").read_text())

    @FUZZ
    @given(
        key=st.sampled_from([*list(good)[:6], "format", "ncfast_version"]),
        value=VALUES,
        raw=st.booleans(),
        junk=st.binary(max_size=32),
    )
    def check(key, value, raw, junk) -> None:
        if raw:
            (run / "config.json").write_bytes(junk)
        else:
            changed = {**good, key: value if not isinstance(value, torch.Tensor) else None}
            (run / "config.json").write_text(json.dumps(changed))
        marker = run_marker(run)
        assert marker is None or isinstance(marker, dict)
        for attempt in (
            lambda: RunDirectory(run).check_resumable(),
            lambda: RunDirectory(run).check_new_run(overwrite=True),
        ):
            try:
                attempt()
            except NCFastError as exc:
                one_line(exc)

    hypothesis_seed(seed)(check)()


def test_fuzzed_logs_give_a_line_or_a_repair(tmp_path, stopped, seed):
    print(f"hypothesis seed {seed}")
    good = (stopped[0] / "metrics.jsonl").read_bytes()

    @FUZZ
    @given(at=st.integers(0, len(good)), cut=st.integers(0, 40), insert=st.binary(max_size=24))
    def check(at: int, cut: int, insert: bytes) -> None:
        path = tmp_path / "metrics.jsonl"
        path.write_bytes(good[:at] + insert + good[at + cut :])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the documented repair: a last line skipped
            try:
                read_metrics(path)
            except NCFastError as exc:
                one_line(exc)

    hypothesis_seed(seed)(check)()


def test_fuzzed_checkpoint_fields_are_refused_naming_them(tmp_path, stopped, seed):
    print(f"hypothesis seed {seed}")
    out, data = stopped
    good = load_checkpoint(out / "checkpoint.pt")
    run = Path(shutil.copytree(out, tmp_path / "run"))
    config = tiny_config(run, stop_after=None, measure_epochs="all", resume=True).resolved()
    ctx = dist_utils.setup("cpu")

    @FUZZ
    @given(field=st.sampled_from(CHECKPOINT_FIELDS), value=VALUES)
    def check(field: tuple, value) -> None:
        payload = load_checkpoint(out / "checkpoint.pt")
        target = payload
        for step in field[:-1]:
            target = target[step]
        target[field[-1]] = value
        save_checkpoint(run / "checkpoint.pt", payload)
        try:
            resumed = training_state.resume_payload(config, RunDirectory(run))
            training_state.TrainingState.start(config, ctx, data[0], resumed, run / "checkpoint.pt")
        except NCFastError as exc:
            one_line(exc)

    try:
        hypothesis_seed(seed)(check)()
    finally:
        save_checkpoint(run / "checkpoint.pt", good)
        dist_utils.teardown(ctx)
