"""HPD22's Table 1: test accuracy when zero training error is first reached vs at the end.

Accuracy is ``100·(1 − test error)`` at the first measured epoch with training error 0 and at
the last measured epoch; the improvement is their difference in percentage points. Runs that
never reach zero training error are listed with blanks and left out of the median and mean.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from pathlib import Path

from ncfast.report.runs import Run
from ncfast.report.summary import format_value

COLUMNS = (
    ("dataset", "dataset"),
    ("net", "net"),
    ("loss", "loss"),
    ("run", "run"),
    ("zero_error_epoch", "0-error epoch"),
    ("acc_zero_error", "acc. 0-error (%)"),
    ("final_epoch", "final epoch"),
    ("acc_final", "acc. final (%)"),
    ("improvement", "improvement (pp)"),
)


def _test_accuracy_at(run: Run, epoch: int) -> float | None:
    # The last record of the epoch: a resumed run may have logged it twice, and the later one
    # counts (as in history_arrays, read_runs and the figures).
    for rec in reversed(run.records):
        if rec["split"] == "test" and rec["epoch"] == epoch:
            return 100.0 * (1.0 - float(rec["error"]))
    return None


def table1_rows(runs: Sequence[Run]) -> list[dict]:
    """One row per run (keys: the first element of each :data:`COLUMNS` entry)."""
    rows = []
    for run in runs:
        final = run.last_record("test")
        zero = run.zero_error_epoch
        acc_zero = _test_accuracy_at(run, zero) if zero is not None else None
        final_epoch = final["epoch"] if final is not None else None
        acc_final = _test_accuracy_at(run, final_epoch) if final_epoch is not None else None
        both = acc_zero is not None and acc_final is not None
        rows.append(
            {
                "dataset": run.dataset,
                "net": run.net,
                "loss": run.loss,
                "run": run.name,
                "zero_error_epoch": zero,
                "acc_zero_error": acc_zero,
                "final_epoch": final_epoch,
                "acc_final": acc_final,
                "improvement": acc_final - acc_zero if both else None,
            }
        )
    return rows


def summary(rows: Sequence[dict]) -> dict:
    """Median and mean improvement (pp) over the rows that reached zero error."""
    values = [r["improvement"] for r in rows if r["improvement"] is not None]
    return {
        "runs": len(rows),
        "runs_with_zero_error": len(values),
        "median_improvement": statistics.median(values) if values else None,
        "mean_improvement": statistics.fmean(values) if values else None,
    }


def _cell(value) -> str:
    """A cell of Table 1: percentages and epochs to 2 decimals, ``—`` where there is none."""
    return format_value(value, ".2f")


def to_markdown(rows: Sequence[dict]) -> str:
    """Table 1 as a Markdown table followed by the median and mean improvement."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = (
        "|"
        + "|".join("---" if k in ("dataset", "net", "loss", "run") else "---:" for k, _ in COLUMNS)
        + "|"
    )
    body = ["| " + " | ".join(_cell(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    s = summary(rows)
    foot = (
        f"Median improvement: {_cell(s['median_improvement'])} percentage points; "
        f"mean: {_cell(s['mean_improvement'])} "
        f"({s['runs_with_zero_error']} of {s['runs']} runs reached zero training error)."
    )
    return "\n".join([head, rule, *body, "", foot]) + "\n"


def to_csv(rows: Sequence[dict]) -> str:
    """Table 1 as CSV (empty cells where a run never reached zero error)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([k for k, _ in COLUMNS])
    for r in rows:
        writer.writerow(["" if r[k] is None else r[k] for k, _ in COLUMNS])
    return buf.getvalue()


def write_table1(runs: Sequence[Run], out_dir: str | Path) -> tuple[str, list[Path]]:
    """Write ``table1.md`` and ``table1.csv`` to ``out_dir``; return the Markdown and paths."""
    if not runs:
        raise ValueError("write_table1: no runs given")
    rows = table1_rows(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows)
    md_path, csv_path = out_dir / "table1.md", out_dir / "table1.csv"
    md_path.write_text(markdown, encoding="utf-8")
    csv_path.write_text(to_csv(rows), encoding="utf-8")
    return markdown, [md_path, csv_path]
