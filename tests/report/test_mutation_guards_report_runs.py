"""Guards of the run reader (ncfast/report/runs.py): the records a run's files give, in which
order, which record counts when an epoch was logged twice, the warning on a truncated last line,
the exact refusal of every malformed record or file (naming the file and line), the history
arrays, the Run's properties and the central-path fit's inputs and outputs, on tiny hand-made
runs, so that a small change of the module fails here. The figures' guards are in
test_mutation_guards_report_plots.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ncfast.report.runs
import ncfast.theory
from ncfast.report.runs import (
    ANALYSIS_DIR,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MAX_EPOCH,
    METRICS_FILE,
    ONLINE_REQUIRED_KEYS,
    ONLINE_SPLIT,
    RECORD_SPLITS,
    REQUIRED_KEYS,
    SPLITS,
    Run,
    RunError,
    central_path_fit,
    check_record,
    history_arrays,
    load_run,
    metrics_lines,
    read_config,
    read_metrics,
    run_from_history,
    to_json_value,
    zero_error_epoch,
)
from ncfast.theory import snr_closed_form
from tests.helpers.warning_origin import assert_warned_from


def train(epoch, error=0.5, **keys) -> dict:
    return {"epoch": epoch, "split": "train", "error": error, **keys}


def online(step, epoch, **keys) -> dict:
    return {"epoch": epoch, "split": "train_online", "step": step, **keys}


def refusal(record) -> str:
    with pytest.raises(RunError) as caught:
        check_record(record, "here")
    return str(caught.value)


def test_constants_of_a_run_directory():
    assert (METRICS_FILE, CONFIG_FILE) == ("metrics.jsonl", "config.json")
    assert (CHECKPOINT_FILE, ANALYSIS_DIR) == ("checkpoint.pt", "analysis")
    assert (SPLITS, ONLINE_SPLIT) == (("train", "test"), "train_online")
    assert RECORD_SPLITS == ("train", "test", "train_online")
    assert REQUIRED_KEYS == ("epoch", "split", "error")
    assert ONLINE_REQUIRED_KEYS == ("epoch", "split", "step")
    assert MAX_EPOCH == 2**53
    assert issubclass(RunError, ValueError)


@pytest.mark.parametrize(
    "record",
    [
        train(0, 0),
        train(2**53, 1),
        train(3, 0.25, nc1=None, snr_singular_values=[1, 2.5, None], tag="x"),
        {"epoch": 1, "split": "test", "error": 1.0, "snr_singular_values": []},
        online(0, 0),
        online(2**53, 2**53),
        online(7, 0.7, error=0.5, nc1=1.0),
        online(7, 2.0**53),
    ],
)
def test_valid_records_are_returned_unchanged(record):
    copy = json.loads(json.dumps(record))
    assert check_record(record, "here") is record
    assert record == copy


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], "here: expected a JSON object, got list"),
        ({"split": "train"}, "here: missing key(s) epoch, error"),
        ({"epoch": 1, "split": "train", "step": 3}, "here: missing key(s) error"),
        ({"epoch": 1, "split": "train_online", "error": 0.1}, "here: missing key(s) step"),
        ({"split": "train_online"}, "here: missing key(s) epoch, step"),
        ({"epoch": 1, "error": 0.1}, "here: missing key(s) split"),
        (train(-1), "here: 'epoch' must be an integer in 0..2**53, got -1"),
        (train(2**53 + 1), "here: 'epoch' must be an integer in 0..2**53, got 9007199254740993"),
        (train(1.0), "here: 'epoch' must be an integer in 0..2**53, got 1.0"),
        (train(True), "here: 'epoch' must be an integer in 0..2**53, got True"),
        (train(10**50), "here: 'epoch' must be an integer in 0..2**53, got a 51-digit number"),
        (train("e" * 38), f"here: 'epoch' must be an integer in 0..2**53, got '{'e' * 38}'"),
        (train("e" * 39), "here: 'epoch' must be an integer in 0..2**53, got a 39-digit number"),
        (online(-1, 0.5), "here: 'step' must be an integer in 0..2**53, got -1"),
        (
            online(2**53 + 1, 0.5),
            "here: 'step' must be an integer in 0..2**53, got 9007199254740993",
        ),
        (online(2.0, 0.5), "here: 'step' must be an integer in 0..2**53, got 2.0"),
        (online(False, 0.5), "here: 'step' must be an integer in 0..2**53, got False"),
        (online(3, -0.5), "here: 'epoch' must be a number in [0, 2**53], got -0.5"),
        (
            online(3, 2.0**54),
            "here: 'epoch' must be a number in [0, 2**53], got 1.8014398509481984e+16",
        ),
        (online(3, True), "here: 'epoch' must be a number in [0, 2**53], got True"),
        (online(3, "1"), "here: 'epoch' must be a number in [0, 2**53], got '1'"),
        (online(3, 0.5, error=1.5), "here: 'error' must be a fraction in [0, 1], got 1.5"),
        (
            {"epoch": 1, "split": "valid", "error": 0.1},
            "here: 'split' must be 'train', 'test' or 'train_online', got 'valid'",
        ),
        (
            {"epoch": 1, "split": None, "error": 0.1},
            "here: 'split' must be 'train', 'test' or 'train_online', got None",
        ),
        (train(1, -0.01), "here: 'error' must be a fraction in [0, 1], got -0.01"),
        (train(1, 1.0001), "here: 'error' must be a fraction in [0, 1], got 1.0001"),
        (train(1, True), "here: 'error' must be a fraction in [0, 1], got True"),
        (train(1, None), "here: 'error' must be a fraction in [0, 1], got None"),
        (train(1, "e" * 38), f"here: 'error' must be a fraction in [0, 1], got '{'e' * 38}'"),
        (train(1, "e" * 39), f"here: 'error' must be a fraction in [0, 1], got '{'e' * 36}..."),
        (train(1, nc1=[1.0, "x"]), "here: 'nc1' must be a list of numbers, got [1.0, 'x']"),
        (train(1, nc1=[True]), "here: 'nc1' must be a list of numbers, got [True]"),
        (
            train(1, snr=[0.5] * 19 + ["x"]),
            "here: 'snr' must be a list of numbers, got [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0...",
        ),
    ],
)
def test_invalid_records_are_refused_saying_what_is_wrong(record, message):
    assert refusal(record) == message


def test_to_json_value_converts_to_json_types():
    assert to_json_value(np.array([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    assert to_json_value(torch.tensor([1.5, 2.0])) == [1.5, 2.0]
    scalar = to_json_value(torch.tensor(3))
    assert scalar == 3 and type(scalar) is int
    assert type(to_json_value(np.float32(0.5))) is float
    assert to_json_value((1, (2, 3))) == [1, [2, 3]]
    assert to_json_value({1: Path("a/b"), "k": (np.int64(2),)}) == {"1": "a/b", "k": [2]}
    assert to_json_value("text") == "text" and to_json_value(b"by") == b"by"
    assert to_json_value(None) is None and to_json_value(True) is True
    kept = to_json_value([math.nan, math.inf, -math.inf, 0.5])
    assert math.isnan(kept[0]) and kept[1:] == [math.inf, -math.inf, 0.5]
    strict = to_json_value({"a": [math.nan, 1.0], "b": np.array([math.inf])}, strict=True)
    assert strict == {"a": [None, 1.0], "b": [None]}
    assert to_json_value((math.nan,), True) == [None]
    assert to_json_value(-math.inf, strict=True) is None and to_json_value(2.5, True) == 2.5


def test_metrics_lines_round_trip(tmp_path):
    records = [train(2, nc1=0.5), online(3, 0.25), train(1)]
    text = metrics_lines(records)
    assert text == "".join(json.dumps(r) + "\n" for r in records)
    assert text.count("\n") == 3 and text.endswith("}\n")
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    assert read_metrics(path) == records  # file order, not sorted
    assert metrics_lines([]) == ""


def write(tmp_path: Path, data: bytes | str, name: str = "metrics.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


GOOD = '{"epoch": 1, "split": "train", "error": 0.1}'
GOOD2 = '{"epoch": 2, "split": "test", "error": 0.2}'


def test_read_metrics_keeps_file_order_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, f"\n{GOOD2}\n  \n{GOOD}\r\n\n")
    assert read_metrics(str(path)) == [train(2, 0.2) | {"split": "test"}, train(1, 0.1)]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (f'{GOOD}\n{{"epoch": 2, oops\n{GOOD}\n', "line 2: not valid JSON (Expecting property"),
        (f"{GOOD}\n\n\nnope\n{GOOD}\n", "line 4: not valid JSON (Expecting value)"),
        (f"{GOOD}\n".encode() + b'{"a\xff"}\n' + f"{GOOD}\n".encode(), ""),
        (f"{GOOD}\n{'1' * 4301}\n{GOOD}\n", ""),
    ],
)
def test_a_malformed_line_before_the_last_is_an_error(tmp_path, data, problem):
    path = write(tmp_path, data)
    with pytest.raises(RunError) as caught:
        read_metrics(path)
    message = str(caught.value)
    assert message.startswith(f"{path}, ")
    if isinstance(data, bytes):
        assert message == f"{path}, line 2: not UTF-8 text (byte 0xff at column 4)"
    elif "1111" in data:
        assert message == (
            f"{path}, line 2: not valid JSON (Exceeds the limit (4300 digits) for integer string "
            "conversion: value has 4301 digits; use sys.set_int_max_str_digits() to increase "
            "the limit)"
        )
    else:
        assert message.startswith(f"{path}, {problem}")


def test_a_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    path = write(tmp_path, f'{GOOD}\n\n{GOOD2}\n{{"epoch": 3, "spl\n\n  \n')
    with pytest.warns(UserWarning) as caught:
        records = read_metrics(path)
    assert records == [train(1, 0.1), {"epoch": 2, "split": "test", "error": 0.2}]
    (warning,) = caught
    assert str(warning.message) == (
        f"{path}, line 4: incomplete last line skipped (not valid JSON (Unterminated string "
        "starting at))"
    )
    assert_warned_from(warning, __file__)  # attributed to the caller of read_metrics


def test_a_last_line_cut_inside_a_character_is_skipped(tmp_path):
    path = write(tmp_path, f"{GOOD}\n".encode() + '{"a": "é'.encode()[:-1])
    with pytest.warns(UserWarning) as caught:
        assert read_metrics(path) == [train(1, 0.1)]
    assert str(caught[0].message) == (
        f"{path}, line 2: incomplete last line skipped (not UTF-8 text (byte 0xc3 at column 8))"
    )


def test_a_lone_truncated_line_warns_then_has_no_measurements(tmp_path):
    path = write(tmp_path, '{"epoch": 1')
    with pytest.warns(UserWarning, match="line 1: incomplete last line skipped"):
        with pytest.raises(RunError) as caught:
            read_metrics(path)
    assert str(caught.value) == f"{path}: no measurements logged yet"


def test_an_invalid_but_complete_last_record_is_an_error(tmp_path):
    path = write(tmp_path, f'{GOOD}\n{{"epoch": 2, "split": "train"}}\n')
    with pytest.raises(RunError) as caught:
        read_metrics(path)
    assert str(caught.value) == f"{path}, line 2: missing key(s) error"


@pytest.mark.parametrize("data", ["", "\n \n\n"])
def test_a_log_without_records_is_refused(tmp_path, data):
    path = write(tmp_path, data)
    with pytest.raises(RunError) as caught:
        read_metrics(path)
    assert str(caught.value) == f"{path}: no measurements logged yet"


def test_a_missing_log_is_refused(tmp_path):
    for path in (tmp_path / "none.jsonl", tmp_path):
        with pytest.raises(RunError) as caught:
            read_metrics(path)
        assert str(caught.value) == (
            f"metrics log not found: {path} (expected a file written by ncfast train)"
        )


def test_read_config(tmp_path):
    assert read_config(write(tmp_path, '{"net": "vgg11", "epochs": 3}', "c.json")) == {
        "net": "vgg11",
        "epochs": 3,
    }
    cases = [
        (b'{"a": "\xfe"}', "not UTF-8 text (byte at offset 7)"),
        (b'{\n"a": oops}', "not valid JSON (Expecting value, line 2)"),
        (b"[1]", "expected a JSON object, got list"),
        (b"1" * 4301, "not valid JSON (Exceeds the limit (4300 digits) for integer string"),
    ]
    for data, problem in cases:
        path = write(tmp_path, data, "c.json")
        with pytest.raises(RunError) as caught:
            read_config(path)
        assert str(caught.value).startswith(f"{path}: {problem}")
    for missing in (tmp_path / "nope.json", tmp_path):
        with pytest.raises(RunError) as caught:
            read_config(missing)
        assert str(caught.value) == f"run config not found: {missing}"


def test_an_error_without_a_message_is_named_by_its_type(tmp_path, monkeypatch):
    """A decoding error whose message is empty (a JSON library raising a bare ValueError)
    still gives a reason: the error's type."""

    class BareJSON:
        JSONDecodeError = json.JSONDecodeError

        @staticmethod
        def loads(text):
            raise ValueError()

    monkeypatch.setattr(ncfast.report.runs, "json", BareJSON)
    path = write(tmp_path, "{}", "c.json")
    with pytest.raises(RunError) as caught:
        read_config(path)
    assert str(caught.value) == f"{path}: not valid JSON (ValueError)"
    path = write(tmp_path, "{}\n{}\n")
    with pytest.raises(RunError) as caught:
        read_metrics(path)
    assert str(caught.value) == f"{path}, line 1: not valid JSON (ValueError)"


def test_history_sorts_keeps_the_last_duplicate_and_converts_values():
    records = [
        train(3, 0.0, nc1=3.0, omega=[2.0], tag="a"),
        {"epoch": 2, "split": "test", "error": 0.1, "nc1": 7.0},
        train(1, 0.5, nc1=None, omega=[4.0, 3.0], big=10**400, flag=True),
        online(10, 0.5, nc1=9.0),
        train(3, 0.25, nc1=30.0, omega=None, big=-(10**400), extra=1),
        train(2, 0.0, nc1=2, omega=[None, True, "x"]),
    ]
    hist = history_arrays(records, "train")
    assert list(hist) == ["epoch", "error", "nc1", "omega", "big", "extra"]
    assert hist["epoch"].dtype == np.int64 and hist["epoch"].tolist() == [1, 2, 3]
    assert hist["error"].dtype == np.float64 and hist["error"].tolist() == [0.5, 0.0, 0.25]
    np.testing.assert_array_equal(hist["nc1"], [np.nan, 2.0, 30.0])
    np.testing.assert_array_equal(hist["omega"], [[4.0, 3.0, np.nan], [np.nan] * 3, [np.nan] * 3])
    np.testing.assert_array_equal(hist["big"], [math.inf, np.nan, -math.inf])
    np.testing.assert_array_equal(hist["extra"], [np.nan, np.nan, 1.0])
    test = history_arrays(records, "test")
    assert {k: v.tolist() for k, v in test.items()} == {
        "epoch": [2],
        "error": [0.1],
        "nc1": [7.0],
    }


def test_history_of_the_training_passes_is_over_steps():
    records = [online(20, 1.5, nc1=2.0), train(1), online(10, 0.5, nc1=1.0), online(20, 2.0)]
    hist = history_arrays(records, "train_online")
    assert list(hist) == ["step", "epoch", "nc1"]
    assert hist["step"].dtype == np.int64 and hist["step"].tolist() == [10, 20]
    assert hist["epoch"].dtype == np.float64 and hist["epoch"].tolist() == [0.5, 2.0]
    np.testing.assert_array_equal(hist["nc1"], [1.0, np.nan])
    assert set(history_arrays([train(1)], "train_online")) == {"step"}
    assert history_arrays([train(1)], "train_online")["step"].dtype == np.int64


def test_history_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="split must be 'train', 'test' or 'train_online'"):
        history_arrays([train(1)], "val")


def test_zero_error_epoch_is_the_first_measured_zero():
    records = [
        train(5, 0.0),
        train(1, 0.3),
        train(3, 0.0),
        {"epoch": 1, "split": "test", "error": 0},
    ]
    records += [train(4, 0.01), train(2, 0.001)]
    assert zero_error_epoch(records) == 3
    assert zero_error_epoch([train(0, 0.0), train(1, 0.0)]) == 0
    assert zero_error_epoch([train(1, 0.1), {"epoch": 2, "split": "test", "error": 0.0}]) is None
    hist = {"epoch": np.array([1, 4, 9]), "error": np.array([0.2, 0.0, 0.0])}
    assert zero_error_epoch(hist) == 4 and type(zero_error_epoch(hist)) is int
    assert zero_error_epoch({"epoch": np.array([1])}) is None
    assert zero_error_epoch({"error": np.array([0.0])}) is None
    assert zero_error_epoch([online(1, 0.5, error=0.0)]) is None


def test_run_history_is_cached_per_split_until_forgotten():
    run = Run(
        Path("runs/a"), {}, [train(1, 0.2, nc1=1.0), {"epoch": 1, "split": "test", "error": 0.3}]
    )
    first = run.history()
    assert run.history("train") is first and first["nc1"].tolist() == [1.0]
    assert run.history("test")["error"].tolist() == [0.3]
    run.records.append(train(2, 0.0, nc1=0.5))
    assert run.history("train") is first and run.zero_error_epoch is None
    run.forget_history()
    assert run.history("train")["nc1"].tolist() == [1.0, 0.5]
    assert run.zero_error_epoch == 2


def test_run_properties():
    records = [
        train(1, 0.5),
        online(30, 7.5),
        {"epoch": 3, "split": "test", "error": 0.25},
        train(3, 0.0),
        train(2, 0.0),
    ]
    config = {"dataset": "mnist", "net": "vgg11", "loss": "ce"}
    run = Run(Path("runs") / "r1", config, records)
    assert run.last_epoch == 3  # the training passes' epoch 7.5 is not an eval-mode epoch
    assert run.has_online is True and run.zero_error_epoch == 2
    assert (run.dataset, run.net, run.loss, run.name) == ("mnist", "vgg11", "ce", "r1")
    assert run.label == "mnist · vgg11 · ce"
    only_online = Run(Path("."), {"net": 5}, [online(10, 1.25), online(20, 2.5)])
    assert only_online.last_epoch == 3 and type(only_online.last_epoch) is int
    assert (only_online.dataset, only_online.net, only_online.loss) == ("?", "5", "?")
    assert only_online.name == "." and only_online.label == "? · 5 · ?"
    bare = Run(Path("runs/r"), {}, [train(4)])
    assert bare.has_online is False and bare.label == "? · ? · ?"


def test_last_record_is_the_last_logged_of_the_last_epoch():
    """A resumed run that logged epoch 3 twice: the later record counts (as in the history)."""
    first, later = train(3, 0.25, nc1=1.0), train(3, 0.0, nc1=2.0)
    test = {"epoch": 2, "split": "test", "error": 0.3}
    run = Run(Path("r"), {}, [train(1), first, test, later, train(2)])
    assert run.last_record("train") is later
    assert run.last_record("test") is test
    assert run.last_record("train_online") is None
    assert run.history("train")["nc1"][-1] == later["nc1"]
    steps = Run(Path("r"), {}, [online(5, 0.5), online(15, 1.5), online(10, 1.0)])
    assert steps.last_record("train_online")["step"] == 15


def test_load_run(tmp_path):
    records = [train(2, 0.1), train(1, 0.2)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(metrics_lines(records))
    run = load_run(str(run_dir))
    assert (run.path, run.config, run.records) == (run_dir, {}, records)
    (run_dir / "config.json").write_text('{"loss": "mse"}')
    assert load_run(run_dir).config == {"loss": "mse"}


def test_load_run_refusals(tmp_path):
    with pytest.raises(RunError) as caught:
        load_run(tmp_path / "nope")
    assert str(caught.value) == f"run directory not found: {tmp_path / 'nope'}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError) as caught:
        load_run(tmp_path / "file")
    assert str(caught.value) == (
        f"not a run directory: {tmp_path / 'file'} (expected a directory written by ncfast "
        "train --out, holding metrics.jsonl)"
    )
    with pytest.raises(RunError) as caught:
        load_run(tmp_path)
    assert str(caught.value).startswith(f"metrics log not found: {tmp_path / 'metrics.jsonl'}")
    (tmp_path / "metrics.jsonl").write_text(GOOD)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(RunError) as caught:
        load_run(tmp_path)
    assert str(caught.value) == f"{tmp_path / 'config.json'}: expected a JSON object, got list"


def test_run_from_history():
    config = {"net": "vgg11"}
    records = [train(1), online(5, 0.5)]
    run = run_from_history(records, config)
    assert run.records == records and run.records[0] is records[0]
    assert run.config == config and run.config is not config
    assert run.path == Path(".") and run_from_history(records, None, "x/y").path == Path("x/y")
    assert run_from_history(records, None).config == {}
    for bad in ([], (train(1),), None):
        with pytest.raises(RunError, match="history: expected a non-empty list"):
            run_from_history(bad, {})
    with pytest.raises(RunError) as caught:
        run_from_history([train(1), train(2, 2.0)], {})
    assert str(caught.value) == "history record 1: 'error' must be a fraction in [0, 1], got 2.0"


# ---- central_path_fit ------------------------------------------------------------------------


def omega_run(rows, split="train") -> Run:
    """Records (epoch, error, ω) on ``split`` (test rows also get a train row without ω)."""
    records = []
    for epoch, error, omega in rows:
        rec = {"epoch": epoch, "split": split, "error": error}
        if omega is not None:
            rec["snr_singular_values"] = omega
        records.append(rec)
        if split != "train":
            records.append(train(epoch, error))
    return Run(Path("r"), {}, records)


@pytest.fixture
def fake_fit(monkeypatch):
    """Replaces the law's fit: records its inputs, returns a tensor and floats."""
    calls = []

    def fit(times, omega):
        calls.append((times, omega))
        if len(times) == 4:
            raise ValueError("fit_central_path: times must not all be equal")
        return {"c1": 2.0, "predicted_omega": torch.tensor([[1.0, 2.0]])}

    monkeypatch.setattr(ncfast.theory, "fit_central_path", fit)
    return calls


ROWS = [
    (1, 0.5, [4.0, 2.0]),
    (2, 0.0, [5.0, 3.0]),
    (3, 0.0, [6.0]),  # the rank dropped: NaN padding
    (4, 0.0, [7.0, 0.0]),  # ω not positive
    (5, 0.0, [8.0, 4.0]),
    (6, 0.0, [9.0, 5.0]),
    (7, 0.0, [math.inf, 6.0]),  # not finite
]


def test_central_path_fit_from_the_zero_error_epoch(fake_fit):
    fit = central_path_fit(omega_run(ROWS))
    ((times, omega),) = fake_fit
    assert times.dtype == np.float64 and times.tolist() == [2.0, 5.0, 6.0]
    assert omega.tolist() == [[5.0, 3.0], [8.0, 4.0], [9.0, 5.0]]
    assert set(fit) == {"fitted", "start_epoch", "epochs", "c1", "predicted_omega"}
    assert fit["fitted"] is True and fit["start_epoch"] == 2 and fit["c1"] == 2.0
    assert fit["epochs"].tolist() == [2, 5, 6]
    assert isinstance(fit["predicted_omega"], np.ndarray)
    assert fit["predicted_omega"].tolist() == [[1.0, 2.0]]


def test_central_path_fit_start_epoch_and_split(fake_fit):
    never = [(e, 0.5, w) for e, _, w in ROWS]
    fit = central_path_fit(omega_run(never))
    assert fit["start_epoch"] == 0 and fit["epochs"].tolist() == [1, 2, 5, 6]
    assert fit == {
        "fitted": False,
        "start_epoch": 0,
        "epochs": fit["epochs"],
        "reason": "fit_central_path: times must not all be equal",
    }
    fit = central_path_fit(omega_run(never), start_epoch=5)
    assert fit["fitted"] is False and fit["start_epoch"] == 5
    assert fit["reason"] == "only 2 measured epochs ≥ 5 (need 3)"
    assert fit["epochs"].tolist() == [5, 6]
    fit = central_path_fit(omega_run(ROWS, "test"), "test", start_epoch=np.int64(1))
    assert type(fit["start_epoch"]) is int and fit["fitted"] is False
    assert fake_fit[-1][0].tolist() == [1.0, 2.0, 5.0, 6.0]


def test_central_path_fit_keeps_singular_values_below_one(fake_fit):
    """ω in (0, 1] is positive and enters the law (early in training the SNR is small)."""
    rows = [(1, 0.0, [0.5, 0.25]), (2, 0.0, [1.0, 0.5]), (3, 0.0, [2.0, 0.75])]
    central_path_fit(omega_run(rows))
    ((times, omega),) = fake_fit
    assert times.tolist() == [1.0, 2.0, 3.0]
    assert omega.tolist() == [[0.5, 0.25], [1.0, 0.5], [2.0, 0.75]]


def test_central_path_fit_without_singular_values(fake_fit):
    for rows, split in (([(1, 0.0, None), (2, 0.0, None)], "train"), ([(1, 0.0, [])], "train")):
        fit = central_path_fit(omega_run(rows), split)
        assert fit["fitted"] is False and fit["start_epoch"] == 1
        assert fit["reason"] == "no snr_singular_values logged on the train split"
        assert fit["epochs"].shape == (0,) and fit["epochs"].dtype.kind == "i"
    fit = central_path_fit(omega_run([(1, 0.0, [1.0])]), "test")
    assert fit["reason"] == "no snr_singular_values logged on the test split"
    assert fake_fit == []


def test_central_path_fit_recovers_the_law():
    """ω_j(t) of the SPEC §5 closed form at four epochs (C = 4): c1/c3 = 4C², c2/c3 = 4C."""
    epochs = np.array([2, 5, 9, 14])
    omega = snr_closed_form(
        torch.tensor([2.0, 1.2], dtype=torch.float64),
        torch.tensor(epochs, dtype=torch.float64),
        4,
        3,
    )
    rows = [(int(e), 0.0, omega[k].tolist()) for k, e in enumerate(epochs)]
    fit = central_path_fit(omega_run(rows), start_epoch=5)
    assert fit["fitted"] is True and fit["epochs"].tolist() == [5, 9, 14]
    assert fit["c1_over_c3"] == pytest.approx(64, rel=1e-6)
    assert fit["c2_over_c3"] == pytest.approx(16, rel=1e-6)
    assert isinstance(fit["a"], np.ndarray) and fit["kappa"] == 1.0
    np.testing.assert_allclose(fit["predicted_omega"], omega[1:].numpy(), rtol=1e-6)
