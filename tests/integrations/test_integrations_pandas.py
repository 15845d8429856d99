"""ncfast.report.read_runs: every logged number of every run as one long pandas DataFrame."""

from __future__ import annotations

import json
import math
import sys

import pytest

from ncfast.report import read_runs
from ncfast.report.runs import RunError
from tests.helpers.synthetic_runs import synthetic_records, write_run_dir

pd = pytest.importorskip("pandas")


def numbers_of(record: dict) -> dict:
    """The rows a record should give: numbers as they are, list entries as key/j."""
    out = {}
    for key, value in record.items():
        if key in ("epoch", "split") or isinstance(value, (str, bool)):
            continue
        if isinstance(value, list):
            for j, v in enumerate(value, start=1):
                out[f"{key}/{j}"] = math.nan if v is None else float(v)
        else:
            out[key] = float(value)
    return out


def as_dict(df, run: str, epoch: int, split: str) -> dict:
    rows = df[(df.run == run) & (df.epoch == epoch) & (df.split == split)]
    assert not rows.key.duplicated().any()
    return dict(zip(rows.key, rows.value, strict=True))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a
    )


def test_every_number_of_every_run_in_long_format(tmp_path, seed):
    mse = write_run_dir(tmp_path / "mse", loss="mse", seed=seed)
    ce = write_run_dir(tmp_path / "ce", loss="ce", seed=seed + 1, epochs=(1, 3, 9))
    df = read_runs([mse, str(ce)])
    assert list(df.columns) == ["run", "epoch", "step", "split", "key", "value"]
    assert df.epoch.dtype == "float64" and df.value.dtype == "float64"
    assert df.step.isna().all()  # a step only on the rows of the training passes (test_online)
    assert list(dict.fromkeys(df.run)) == ["mse", "ce"]  # runs in the order given
    for name in ("mse", "ce"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        assert len(df[df.run == name]) == sum(len(numbers_of(r)) for r in records)
        for record in records:
            got = as_dict(df, name, record["epoch"], record["split"])
            assert same(got, numbers_of(record)), (name, record["epoch"], record["split"])
        omega = records[-1]["snr_singular_values"]
        assert len(omega) > 1 and f"snr_singular_values/{len(omega)}" in set(df.key)
    assert (df[df.run == "ce"].epoch.unique() == [1, 3, 9]).all()


def test_repeated_epochs_text_and_missing_entries(tmp_path, seed):
    """A resumed run logged epoch 2 twice: the later record counts. NaN (null) entries of a list
    are NaN rows; text (why the metrics are undefined) is left out."""
    records = synthetic_records(seed=seed, epochs=(1, 2, 3))
    again = [dict(r, error=0.0, nc1=123.0) for r in records if r["epoch"] == 2]
    records[0]["snr_singular_values"] = [1.0, None, 3.0]
    records[0]["nc_undefined"] = "the class means do not separate"
    records[1]["note"] = {"edited": "by hand"}  # a dict value: left out, as plot and table do
    run = write_run_dir(tmp_path / "resumed", records=records + again)
    df = read_runs(run)
    assert as_dict(df, "resumed", 2, "train")["nc1"] == 123.0
    assert len(df[(df.epoch == 2) & (df.key == "nc1")]) == 2  # train and test, once each
    first = as_dict(df, "resumed", 1, records[0]["split"])
    assert math.isnan(first["snr_singular_values/2"]) and first["snr_singular_values/3"] == 3.0
    assert "nc_undefined" not in set(df.key) and "note" not in set(df.key)
    assert as_dict(df, "resumed", records[1]["epoch"], records[1]["split"])["nc1"] is not None
    assert list(df.epoch) == sorted(df.epoch)


def test_a_directory_of_runs_and_colliding_names(tmp_path, seed):
    for name in ("b", "a"):
        write_run_dir(tmp_path / "sweep" / name, seed=seed, epochs=(1, 2))
    assert list(dict.fromkeys(read_runs(tmp_path / "sweep").run)) == ["a", "b"]
    write_run_dir(tmp_path / "other" / "a", seed=seed, epochs=(1,))
    runs = set(read_runs([tmp_path / "sweep" / "a", tmp_path / "other" / "a"]).run)
    assert runs == {str(tmp_path / "sweep" / "a"), str(tmp_path / "other" / "a")}


def test_bad_paths_and_missing_pandas_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(RunError, match="run directory not found"):
        read_runs(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no paths given"):
        read_runs([])
    with pytest.raises(TypeError, match="paths must be a run directory"):
        read_runs(3)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install 'ncfast\[pandas\]'"):
        read_runs(tmp_path)
