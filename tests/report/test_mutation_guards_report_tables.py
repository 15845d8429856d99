"""Guards of the report layer's text and tables: :func:`ncfast.report.read_runs` (frame.py),
Table 1 (tables.py) and ``ncfast analyze``'s summary (summary.py). Each test pins the exact
output a user sees (columns and their order, cells, row order, file names, lines of text) on tiny
hand-made runs, so that a small change of these modules (a flipped comparison, a changed label
or default, a dropped statement) fails here. The figures' guards are in
test_mutation_guards_report_figures.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ncfast.report import read_runs
from ncfast.report.frame import COLUMNS as FRAME_COLUMNS
from ncfast.report.runs import Run, RunError
from ncfast.report.summary import (
    SUMMARY_ROWS,
    format_table,
    format_value,
    robustness_lines,
    summary_lines,
    summary_markdown,
    summary_rows,
)
from ncfast.report.tables import COLUMNS as TABLE1_COLUMNS
from ncfast.report.tables import summary, table1_rows, to_csv, to_markdown, write_table1
from tests.helpers.synthetic_runs import write_run_dir

ROOT = Path(__file__).resolve().parents[2]

# ---- ncfast.report.frame: read_runs ---------------------------------------------------------

# Run "a": a list with a null entry, text and a dict value (left out), epoch 2 of train logged
# twice (a resume: the later record, in its later place) and test epoch 1 logged last.
RECORDS_A = [
    {
        "epoch": 1,
        "split": "train",
        "error": 0.5,
        "nc1": 2.0,
        "snr_singular_values": [3.0, None],
        "nc_undefined": "the class means do not separate",
        "note": {"edited": "by hand"},
        "lr": 0.1,
    },
    {"epoch": 2, "split": "train", "error": 0.25, "nc1": 1.5},
    {"epoch": 2, "split": "test", "error": 0.75},
    {"epoch": 2, "split": "train", "error": 0.0, "nc1": 1.25},
    {"epoch": 1, "split": "test", "error": 0.5},
]
# Run "b": training passes (train_online, keyed by their step; step 5 logged twice).
RECORDS_B = [
    {"epoch": 1, "split": "train", "error": 0.5},
    {"epoch": 0.5, "step": 5, "split": "train_online", "nc1": 3.0, "lr": 0.1},
    {"epoch": 1.0, "step": 10, "split": "train_online", "nc1": 2.5},
    {"epoch": 0.5, "step": 5, "split": "train_online", "nc1": 2.75},
]
NAN = "nan"
EXPECTED_ROWS = [
    ("a", 1.0, None, "train", "error", 0.5),
    ("a", 1.0, None, "train", "nc1", 2.0),
    ("a", 1.0, None, "train", "snr_singular_values/1", 3.0),
    ("a", 1.0, None, "train", "snr_singular_values/2", NAN),
    ("a", 1.0, None, "train", "lr", 0.1),
    ("a", 1.0, None, "test", "error", 0.5),
    ("a", 2.0, None, "test", "error", 0.75),
    ("a", 2.0, None, "train", "error", 0.0),
    ("a", 2.0, None, "train", "nc1", 1.25),
    ("b", 0.5, 5, "train_online", "nc1", 2.75),
    ("b", 1.0, None, "train", "error", 0.5),
    ("b", 1.0, 10, "train_online", "nc1", 2.5),
]


def frame_rows(df) -> list[tuple]:
    """The rows of a read_runs frame as tuples (NA step as None, NaN value as "nan")."""
    import pandas as pd

    return [
        (
            run,
            epoch,
            None if pd.isna(step) else int(step),
            split,
            key,
            NAN if math.isnan(value) else value,
        )
        for run, epoch, step, split, key, value in df.itertuples(index=False)
    ]


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    pytest.importorskip("pandas")
    return [
        write_run_dir(tmp_path / "a", records=RECORDS_A),
        write_run_dir(tmp_path / "b", records=RECORDS_B),
    ]


def test_read_runs_rows_columns_and_dtypes_exactly(two_runs):
    df = read_runs(two_runs)
    assert FRAME_COLUMNS == ("run", "epoch", "step", "split", "key", "value")
    assert list(df.columns) == list(FRAME_COLUMNS)
    assert str(df.epoch.dtype) == "float64" and str(df.value.dtype) == "float64"
    assert str(df.step.dtype) == "Int64"
    assert frame_rows(df) == EXPECTED_ROWS


def test_read_runs_keys_a_training_pass_by_its_step(tmp_path):
    """A step of the training passes logged twice with different epochs (a resume whose epoch
    length changed) keeps its last record: rows of ``train_online`` are keyed by step, not
    epoch; two records of one fractional epoch and different steps are both kept."""
    pytest.importorskip("pandas")
    records = [
        {"epoch": 0.5, "step": 5, "split": "train_online", "nc1": 3.0},
        {"epoch": 0.625, "step": 5, "split": "train_online", "nc1": 2.5},
        {"epoch": 0.625, "step": 6, "split": "train_online", "nc1": 2.0},
    ]
    df = read_runs(write_run_dir(tmp_path / "r", records=records))
    assert frame_rows(df) == [
        ("r", 0.625, 5, "train_online", "nc1", 2.5),
        ("r", 0.625, 6, "train_online", "nc1", 2.0),
    ]


def test_read_runs_takes_one_path_as_str_or_path_and_any_iterable(two_runs):
    a_rows = [row for row in EXPECTED_ROWS if row[0] == "a"]
    one = read_runs(str(two_runs[0]))
    assert frame_rows(one) == a_rows
    assert (str(one.epoch.dtype), str(one.step.dtype)) == ("float64", "Int64")  # whole epochs
    assert frame_rows(read_runs(two_runs[0])) == a_rows
    assert frame_rows(read_runs(p for p in reversed(two_runs)))[0][0] == "b"


def test_read_runs_names_runs_by_directory_then_by_path_on_collision(tmp_path):
    pytest.importorskip("pandas")
    one = write_run_dir(tmp_path / "x" / "a", records=RECORDS_A[:1])
    other = write_run_dir(tmp_path / "y" / "a", records=RECORDS_A[:1])
    b = write_run_dir(tmp_path / "y" / "b", records=RECORDS_A[:1])
    assert list(dict.fromkeys(read_runs([one, b]).run)) == ["a", "b"]
    assert list(dict.fromkeys(read_runs([one, other, b]).run)) == [str(one), str(other), str(b)]


def test_read_runs_names_the_current_directory_by_its_path(tmp_path, monkeypatch):
    pytest.importorskip("pandas")
    monkeypatch.chdir(write_run_dir(tmp_path / "here", records=RECORDS_A[:1]))
    assert set(read_runs(".").run) == {"."}


def test_read_runs_expands_directories_of_runs_only(tmp_path):
    pytest.importorskip("pandas")
    sweep = tmp_path / "sweep"
    for name in ("b", "a"):
        write_run_dir(sweep / name, records=RECORDS_A[:1])
    (sweep / "notes").mkdir()  # no metrics.jsonl: not a run
    (sweep / "readme.txt").write_text("not a run")
    extra = write_run_dir(tmp_path / "c", records=RECORDS_A[:1])
    assert list(dict.fromkeys(read_runs([sweep, extra]).run)) == ["a", "b", "c"]
    # A run directory holding a run of its own is one run, not a sweep.
    outer = write_run_dir(tmp_path / "outer", records=RECORDS_A[:1])
    write_run_dir(outer / "inner", records=RECORDS_A[:1])
    assert set(read_runs(outer).run) == {"outer"}
    with pytest.raises(RunError, match="metrics log not found"):
        read_runs(sweep / "notes")  # an empty directory: load_run says what is missing
    with pytest.raises(ValueError, match="no paths given"):
        read_runs([])
    with pytest.raises(TypeError, match="got int"):
        read_runs(3)


# ---- ncfast.report.tables: Table 1 -------------------------------------------------------------


def hand_run(name: str, config: dict, errors: list[tuple[int, str, float]]) -> Run:
    """A run in memory: ``errors`` = (epoch, split, error) records in file order."""
    records = [{"epoch": e, "split": s, "error": err} for e, s, err in errors]
    return Run(path=Path("runs") / name, config=config, records=records)


TABLE_RUNS = [
    # Zero training error at epoch 2 (test accuracy 75 %), 87.5 % at the end (epoch 3).
    hand_run(
        "r1",
        {"dataset": "mnist", "net": "vgg11", "loss": "mse"},
        [
            (1, "train", 0.5),
            (1, "test", 0.5),
            (2, "train", 0.0),
            (2, "test", 0.25),
            (3, "test", 0.125),
            (3, "train", 0.0),
        ],
    ),
    # Never reaches zero training error.
    hand_run(
        "r2",
        {"dataset": "svhn", "net": "resnet18", "loss": "ce"},
        [(1, "train", 0.5), (1, "test", 0.5), (2, "train", 0.25), (2, "test", 0.375)],
    ),
    # Zero error at epoch 1, where the test set was not measured.
    hand_run(
        "r3",
        {"dataset": "mnist", "net": "resnet18", "loss": "mse"},
        [(1, "train", 0.0), (2, "train", 0.0), (2, "test", 0.25)],
    ),
    # No test measurement at all, no config.
    hand_run("r4", {}, [(1, "train", 0.0)]),
]
TABLE_ROWS = [
    {
        "dataset": "mnist",
        "net": "vgg11",
        "loss": "mse",
        "run": "r1",
        "zero_error_epoch": 2,
        "acc_zero_error": 75.0,
        "final_epoch": 3,
        "acc_final": 87.5,
        "improvement": 12.5,
    },
    {
        "dataset": "svhn",
        "net": "resnet18",
        "loss": "ce",
        "run": "r2",
        "zero_error_epoch": None,
        "acc_zero_error": None,
        "final_epoch": 2,
        "acc_final": 62.5,
        "improvement": None,
    },
    {
        "dataset": "mnist",
        "net": "resnet18",
        "loss": "mse",
        "run": "r3",
        "zero_error_epoch": 1,
        "acc_zero_error": None,
        "final_epoch": 2,
        "acc_final": 75.0,
        "improvement": None,
    },
    {
        "dataset": "?",
        "net": "?",
        "loss": "?",
        "run": "r4",
        "zero_error_epoch": 1,
        "acc_zero_error": None,
        "final_epoch": None,
        "acc_final": None,
        "improvement": None,
    },
]
TABLE_MARKDOWN = (
    "| dataset | net | loss | run | 0-error epoch | acc. 0-error (%) | final epoch "
    "| acc. final (%) | improvement (pp) |\n"
    "|---|---|---|---|---:|---:|---:|---:|---:|\n"
    "| mnist | vgg11 | mse | r1 | 2 | 75.00 | 3 | 87.50 | 12.50 |\n"
    "| svhn | resnet18 | ce | r2 | — | — | 2 | 62.50 | — |\n"
    "| mnist | resnet18 | mse | r3 | 1 | — | 2 | 75.00 | — |\n"
    "| ? | ? | ? | r4 | 1 | — | — | — | — |\n"
    "\n"
    "Median improvement: 12.50 percentage points; mean: 12.50 "
    "(1 of 4 runs reached zero training error).\n"
)
TABLE_CSV = (
    "dataset,net,loss,run,zero_error_epoch,acc_zero_error,final_epoch,acc_final,improvement\n"
    "mnist,vgg11,mse,r1,2,75.0,3,87.5,12.5\n"
    "svhn,resnet18,ce,r2,,,2,62.5,\n"
    "mnist,resnet18,mse,r3,1,,2,75.0,\n"
    "?,?,?,r4,1,,,,\n"
)


def test_table1_columns_and_rows_exactly():
    assert [key for key, _ in TABLE1_COLUMNS] == list(TABLE_ROWS[0])
    assert table1_rows(TABLE_RUNS) == TABLE_ROWS
    assert table1_rows([]) == []


def test_table1_accuracy_is_the_test_record_of_that_epoch():
    """A train record of the zero-error epoch comes first in the file: the test one counts."""
    run = hand_run(
        "r",
        {},
        [(2, "train", 0.0), (1, "test", 0.5), (2, "test", 0.25), (1, "train", 0.5)],
    )
    (row,) = table1_rows([run])
    assert (row["acc_zero_error"], row["acc_final"], row["improvement"]) == (75.0, 75.0, 0.0)


def test_table1_takes_the_last_record_of_an_epoch_logged_twice():
    """A resumed run that logged epochs 2 and 3 again: the later records count, as in
    history_arrays, read_runs and the figures (the first ones were stale)."""
    run = hand_run(
        "resumed",
        {},
        [
            (1, "train", 0.5),
            (1, "test", 0.5),
            (2, "train", 0.0),
            (2, "test", 0.5),
            (3, "train", 0.0),
            (3, "test", 0.5),
            (2, "train", 0.0),
            (2, "test", 0.25),
            (3, "train", 0.0),
            (3, "test", 0.125),
        ],
    )
    (row,) = table1_rows([run])
    assert run.history("test")["error"].tolist() == [0.5, 0.25, 0.125]
    assert (row["zero_error_epoch"], row["final_epoch"]) == (2, 3)
    assert (row["acc_zero_error"], row["acc_final"], row["improvement"]) == (75.0, 87.5, 12.5)


def test_table1_summary_median_and_mean():
    rows = [{"improvement": v} for v in (6.0, None, 1.0, 2.0)]
    assert summary(rows) == {
        "runs": 4,
        "runs_with_zero_error": 3,
        "median_improvement": 2.0,
        "mean_improvement": 3.0,
    }
    assert summary(TABLE_ROWS) == {
        "runs": 4,
        "runs_with_zero_error": 1,
        "median_improvement": 12.5,
        "mean_improvement": 12.5,
    }
    assert summary([{"improvement": None}]) == {
        "runs": 1,
        "runs_with_zero_error": 0,
        "median_improvement": None,
        "mean_improvement": None,
    }


def test_table1_markdown_and_csv_exactly():
    assert to_markdown(TABLE_ROWS) == TABLE_MARKDOWN
    assert to_csv(TABLE_ROWS) == TABLE_CSV
    rows = [dict(TABLE_ROWS[0], improvement=v) for v in (6.0, 1.0, 2.0)]
    rows.append(TABLE_ROWS[1])
    assert to_markdown(rows).endswith(
        "\n\nMedian improvement: 2.00 percentage points; mean: 3.00 "
        "(3 of 4 runs reached zero training error).\n"
    )
    assert to_markdown([]).endswith(
        "|---:|\n\nMedian improvement: — percentage points; mean: — "
        "(0 of 0 runs reached zero training error).\n"
    )


def test_write_table1_files(tmp_path):
    out = tmp_path / "new" / "tables"
    for _ in range(2):  # a second write into the existing directory replaces the files
        text, paths = write_table1(TABLE_RUNS, out)
        assert text == TABLE_MARKDOWN
        assert paths == [out / "table1.md", out / "table1.csv"]
        assert sorted(p.name for p in out.iterdir()) == ["table1.csv", "table1.md"]
        assert paths[0].read_text(encoding="utf-8") == TABLE_MARKDOWN
        assert paths[1].read_text(encoding="utf-8") == TABLE_CSV
    with pytest.raises(ValueError, match="no runs given"):
        write_table1([], tmp_path / "none")
    assert not (tmp_path / "none").exists()


WRITE_UNDER_ASCII = """
import locale, sys
from pathlib import Path
from ncfast.report.runs import Run
from ncfast.report.tables import write_table1
print(locale.getpreferredencoding(False))
run = Run(path=Path("runs") / "\\u03bb-run", config={"dataset": "mnist"}, records=[])
write_table1([run], Path(sys.argv[1]))
"""  # ASCII source: the command line itself must survive the C locale


def test_write_table1_writes_utf8_whatever_the_locale(tmp_path):
    """Under an ASCII locale (LC_ALL=C, no UTF-8 mode) the files are still UTF-8: the "—" of a
    missing value and a run named "λ-run" (a subprocess: the locale is fixed at start)."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    env["PYTHONCOERCECLOCALE"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", WRITE_UNDER_ASCII, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert done.returncode == 0, done.stderr
    if done.stdout.split()[0].lower().replace("-", "") == "utf8":
        pytest.skip("this platform's C locale is UTF-8: nothing to tell apart")
    run = Run(path=Path("runs") / "λ-run", config={"dataset": "mnist"}, records=[])
    text, _ = write_table1([run], tmp_path / "here")
    assert (tmp_path / "table1.md").read_text(encoding="utf-8") == text
    assert "λ-run" in (tmp_path / "table1.csv").read_text(encoding="utf-8")


# ---- ncfast.report.summary: ncfast analyze's text ----------------------------------------------

ROBUSTNESS = {
    "robustness_samples": 100,
    "robustness_seed": 7,
    "robustness": 0.123456,
    "robustness_stderr": 0.01,
    "robustness_median": 0.1,
    "robustness_not_fooled": 2,
    "robustness_tight": 0.05,
    "robustness_tight_stderr": 0.005,
    "robustness_tight_median": 0.04,
    "robustness_tight_scale_median": 0.35,
    "robustness_out_of_range": 0.125,
}
ROBUSTNESS_LINES = [
    "DeepFool robustness ‖r‖/‖x‖ (test, 100 images, seed 7; HPD22 Fig. 9): mean 0.1235 ± 0.01, "
    "median 0.1; 2 not fooled",
    "tight bound ‖s*·r‖/‖x‖ (s* the smallest multiple of DeepFool's r that already changes the "
    "prediction, median s* = 0.35): mean 0.05 ± 0.005, median 0.04",
    "pixels of x + r outside the valid image range: 12.5% (DeepFool is unconstrained)",
]
FIT = {
    "fitted": True,
    "start_epoch": 2,
    "epochs": [2, 3, 4, 5],
    "r2_omega": 0.999,
    "r2_time": 0.98765,
    "c1": 100.0,
    "c2": 10.0,
    "c3": 0.25,
}
FIT_LINE = (
    "central-path fit (epochs ≥ 2, from zero training error, 4 epochs): R²(ω) = 0.999, "
    "R²(t) = 0.9877, c1, c2, c3 = 100, 10, 0.25 (κ = 1 per epoch; SPEC §5 predicts "
    "c1 : c2 : c3 = C² : C : 1/4)"
)


def analyze_report(**changes) -> dict:
    """A report dict as ncfast.paper.analyze returns it (report.json), with ``changes``."""
    report = {
        "epoch": 40,
        "checkpoint": "runs/x/checkpoint.pt",
        "device": "cpu",
        "config": {"dataset": "mnist5k", "net": "vgg11", "loss": "mse", "weight_decay": 0.0005},
        "lambda": 0.0025,
        "splits": {
            "train": {"error": 0.0, "loss": 0.012345678, "nc1": 0.5, "sigma_w_rank": 31},
            "test": {"error": 0.0625, "loss": 0.25, "nc3_self_duality": 0.1, "nc1": None},
        },
        "history_epochs": [1, 2, 40],
        "zero_error_epoch": 2,
        "table1": {
            "acc_zero_error": 75.0,
            "acc_final": 87.5,
            "final_epoch": 40,
            "improvement": 12.5,
        },
        "central_path": FIT,
        "agreement_with_log": {
            "train": {"max_relative_difference": 0, "per_key": {"a": 0, "b": 0}, "worst_key": "a"},
            "test": {"max_relative_difference": 1.5e-7, "per_key": {"a": 0}, "worst_key": "nc1"},
        },
        "files": {"figures": []},
    }
    report.update(changes)
    return report


LAMBDA_LINE = "λ (HPD22 Eq. 3) = 0.0025 (SGD weight decay 0.0005, λ = C·wd/2)"
ZERO_LINE = (
    "zero training error first at epoch 2: test accuracy 75% then, 87.5% at epoch 40 "
    "(12.5 pp, HPD22 Table 1)"
)
AGREEMENT_LINE = (
    "agreement with the log at epoch 40: train identical (2 keys), "
    "test max relative difference 1.5e-07 (nc1)"
)
TABLE_TEXT = (  # widths: the longest label (18), train value (7) and test value (6)
    "                      train    test\n"
    "error (fraction)          0  0.0625\n"
    "loss (as trained)   0.01235    0.25\n"
    "NC1 tr(Σ_W Σ_B†)/C      0.5       —\n"
    "self-duality              —     0.1\n"
    "rank Σ_W                 31       —\n"
)


def test_summary_rows_constant():
    assert SUMMARY_ROWS == (
        ("error", "error (fraction)"),
        ("loss", "loss (as trained)"),
        ("nc1", "NC1 tr(Σ_W Σ_B†)/C"),
        ("nc2_equinorm_means", "equinorm, means"),
        ("nc2_equinorm_classifiers", "equinorm, classifiers"),
        ("nc2_equiangular_means", "equiangular, means"),
        ("nc2_equiangular_classifiers", "equiangular, classifiers"),
        ("nc2_maxangle_means", "max-angle, means"),
        ("nc2_maxangle_classifiers", "max-angle, classifiers"),
        ("nc3_self_duality", "self-duality"),
        ("nc4_ncc_mismatch", "NCC mismatch"),
        ("loss_mse", "L (MSE, Eq. 3)"),
        ("loss_nc1", "L_NC1"),
        ("loss_nc23", "L_NC2/3"),
        ("loss_ls_perp", "L_LS⊥"),
        ("ls_perp_ratio", "L_LS⊥ / L_LS"),
        ("snr_condition", "ω_max/ω_min"),
        ("sigma_w_rank", "rank Σ_W"),
        ("num_samples", "samples"),
    )


@pytest.mark.parametrize(
    ("value", "float_format", "text"),
    [
        (None, ".4g", "—"),
        (0.123456, ".4g", "0.1235"),
        (1234567.0, ".4g", "1.235e+06"),
        (3, ".4g", "3"),
        (True, ".4g", "True"),
        ("vgg11", ".4g", "vgg11"),
        (2.0, ".2f", "2.00"),
        (None, ".2f", "—"),
    ],
)
def test_format_value(value, float_format, text):
    assert format_value(value, float_format) == text


def test_format_value_default_is_four_significant_digits():
    assert format_value(0.123456) == "0.1235"


def test_summary_rows_skip_keys_measured_on_no_split():
    assert summary_rows(analyze_report()) == [
        ("error (fraction)", "0", "0.0625"),
        ("loss (as trained)", "0.01235", "0.25"),
        ("NC1 tr(Σ_W Σ_B†)/C", "0.5", "—"),
        ("self-duality", "—", "0.1"),
        ("rank Σ_W", "31", "—"),
    ]
    only_train = analyze_report(splits={"train": {"nc1": 0.5}})
    assert summary_rows(only_train) == [("NC1 tr(Σ_W Σ_B†)/C", "0.5", "—")]
    assert summary_rows(analyze_report(splits={})) == []


def test_summary_lines_in_order():
    assert summary_lines(analyze_report()) == [LAMBDA_LINE, ZERO_LINE, FIT_LINE, AGREEMENT_LINE]
    with_rob = summary_lines(analyze_report(robustness=ROBUSTNESS))
    assert with_rob == [LAMBDA_LINE, *ROBUSTNESS_LINES, ZERO_LINE, FIT_LINE, AGREEMENT_LINE]
    bare = {"epoch": 3, "splits": {}}
    assert summary_lines(bare) == [
        "λ (HPD22 Eq. 3) = — (SGD weight decay —, λ = C·wd/2)",
        "the checkpoint's history holds no measurements (no Table 1, fit or figures)",
        "the log has no measurement at the checkpoint's epoch 3",
    ]


def test_zero_error_line_cases():
    never = analyze_report(zero_error_epoch=None, table1=None)
    assert summary_lines(never)[1] == "zero training error: not reached at any measured epoch"
    empty = analyze_report(history_epochs=[], zero_error_epoch=None)
    assert summary_lines(empty)[1] == (
        "the checkpoint's history holds no measurements (no Table 1, fit or figures)"
    )


def test_central_path_line_cases():
    from_start = dict(FIT, start_epoch=0)
    assert summary_lines(analyze_report(central_path=from_start))[2] == FIT_LINE.replace(
        "epochs ≥ 2, from zero training error", "all measured epochs"
    )
    from_one = dict(FIT, start_epoch=1)
    assert summary_lines(analyze_report(central_path=from_one))[2] == FIT_LINE.replace(
        "epochs ≥ 2,", "epochs ≥ 1,"
    )
    not_fitted = {"fitted": False, "reason": "only 2 measured epochs ≥ 0 (need 3)"}
    assert summary_lines(analyze_report(central_path=not_fitted))[2] == (
        "central-path fit: none (only 2 measured epochs ≥ 0 (need 3))"
    )
    for absent in (None, {}):
        lines = summary_lines(analyze_report(central_path=absent))
        assert lines == [LAMBDA_LINE, ZERO_LINE, AGREEMENT_LINE]


def test_agreement_line_cases():
    one = {"test": {"max_relative_difference": 0.0, "per_key": {"a": 0, "b": 0, "c": 0}}}
    lines = summary_lines(analyze_report(agreement_with_log=one))
    assert lines[-1] == "agreement with the log at epoch 40: test identical (3 keys)"
    assert summary_lines(analyze_report(agreement_with_log={}))[-1] == (
        "the log has no measurement at the checkpoint's epoch 40"
    )


def test_robustness_lines_old_and_new_reports():
    assert robustness_lines(ROBUSTNESS) == ROBUSTNESS_LINES
    old = {k: v for k, v in ROBUSTNESS.items() if not k.startswith("robustness_tight")}
    assert robustness_lines(old) == ROBUSTNESS_LINES[:1]
    for unmeasured in ({"robustness_out_of_range": None}, {}):
        rob = {k: v for k, v in ROBUSTNESS.items() if k != "robustness_out_of_range"}
        lines = robustness_lines({**rob, **unmeasured})
        assert lines == [
            *ROBUSTNESS_LINES[:2],
            "pixels of x + r outside the valid image range: not measured "
            "(DeepFool is unconstrained)",
        ]


def test_format_table_exactly():
    report = analyze_report(robustness=ROBUSTNESS)
    lines = [LAMBDA_LINE, *ROBUSTNESS_LINES, ZERO_LINE, FIT_LINE, AGREEMENT_LINE]
    assert format_table(report) == TABLE_TEXT + "\n" + "\n".join(lines) + "\n"


def test_summary_markdown_exactly(tmp_path):
    figures = [tmp_path / "figures" / f for f in ("nc1.png", "nc1.pdf", "decomposition.png")]
    report = analyze_report(files={"figures": [str(p) for p in figures]})
    facts = [LAMBDA_LINE, ZERO_LINE, FIT_LINE, AGREEMENT_LINE]
    head = [
        "# ncfast analysis: mnist5k · vgg11 · mse, epoch 40",
        "",
        "Checkpoint `runs/x/checkpoint.pt` on cpu.",
        "",
        "| | train | test |",
        "|---|---:|---:|",
        "| error (fraction) | 0 | 0.0625 |",
        "| loss (as trained) | 0.01235 | 0.25 |",
        "| NC1 tr(Σ_W Σ_B†)/C | 0.5 | — |",
        "| self-duality | — | 0.1 |",
        "| rank Σ_W | 31 | — |",
        "",
        *[f"- {line}" for line in facts],
    ]
    tail = [
        "",
        "## Figures",
        "",
        "![nc1](figures/nc1.png)",
        "![decomposition](figures/decomposition.png)",
    ]
    assert summary_markdown(report, tmp_path) == "\n".join(head + tail) + "\n"
    pdf_only = analyze_report(files={"figures": [str(figures[1])]})
    assert summary_markdown(pdf_only, tmp_path) == "\n".join(head) + "\n"
    # A report without its config (made by hand), or with part of it: written, the title
    # naming what is known.
    bare = {k: v for k, v in pdf_only.items() if k != "config"}
    lines = summary_markdown(bare, tmp_path).splitlines()
    assert lines[0] == "# ncfast analysis, epoch 40"
    part = {**bare, "config": {"dataset": "mnist5k", "net": None, "loss": "mse"}}
    assert summary_markdown(part, tmp_path).splitlines()[0] == (
        "# ncfast analysis: mnist5k · mse, epoch 40"
    )
    assert lines[1:7] == head[1:7]
