"""Runs as one pandas DataFrame in long format, the shape people explore logs in::

    from ncfast.report import read_runs

    df = read_runs(["runs/mnist-mse", "runs/mnist-ce"])      # or read_runs("runs/")
    df[(df.split == "test") & (df.key == "nc1")].pivot(index="epoch", columns="run")
    df[(df.split == "train_online") & (df.key == "nc1")]      # every K SGD steps (--online-every)

pandas is optional (``pip install 'ncfast[pandas]'``) and imported here, on first use.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ncfast.measure import scalars
from ncfast.report.runs import METRICS_FILE, ONLINE_SPLIT, load_run

__all__ = ["COLUMNS", "read_runs"]

COLUMNS = ("run", "epoch", "step", "split", "key", "value")
# What identifies a record within a run: its split and epoch (its SGD step for train_online).
_RecordKey = tuple[str, float]


def read_runs(paths: str | Path | Iterable[str | Path]):
    """A DataFrame with one row per run, measured epoch, split and number: columns ``run``
    (the directory's name; its path where two names collide), ``epoch`` (float64: whole epochs
    for ``train``/``test``, fractional for ``train_online``, the rows of ``ncfast train
    --online-every K``), ``step`` (nullable Int64: the SGD step of a ``train_online`` row,
    ``<NA>`` elsewhere), ``split``, ``key`` and ``value`` (float64).

    ``paths``: run directories (written by ``ncfast train``), or directories whose
    subdirectories are runs (a sweep's output), one or many. Every logged number is a row: the
    SPEC keys, errors, losses, timings; list values (``snr_singular_values``) become one row per
    entry, keyed ``snr_singular_values/1``, ``/2``, … (j from 1; ``null`` entries are NaN). Text
    values (``nc_undefined``) and values that are no numbers (a dict) are left out. An epoch
    logged twice (a resumed run) keeps its last record, as
    :func:`ncfast.report.runs.history_arrays` does (a step, for ``train_online``). Rows follow
    the runs in the order given, each by epoch, then in file order.

    Args:
        paths: a run directory, a directory of runs, or an iterable of them.

    Returns:
        a ``pandas.DataFrame`` with the columns of :data:`COLUMNS`.

    Example:
        >>> from ncfast.report import read_runs
        >>> df = read_runs("runs/")  # doctest: +SKIP
        >>> df[(df.split == "test") & (df.key == "nc1")].pivot(  # doctest: +SKIP
        ...     index="epoch", columns="run", values="value"
        ... )
    """
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError(
            "read_runs needs pandas, which is not installed: pip install 'ncfast[pandas]' "
            "(or pip install pandas)"
        ) from exc
    runs = [load_run(path) for path in _run_dirs(paths)]
    names = [run.path.name or str(run.path) for run in runs]
    if len(set(names)) < len(names):
        names = [str(run.path) for run in runs]
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for name, run in zip(names, runs, strict=True):
        last: dict[_RecordKey, dict] = {}
        for record in run.records:
            online = record["split"] == ONLINE_SPLIT
            key = (record["split"], float(record["step"] if online else record["epoch"]))
            last.pop(key, None)  # re-inserted: a repeated epoch takes its later place
            last[key] = record
        for record in sorted(last.values(), key=lambda rec: float(rec["epoch"])):
            step = record["step"] if record["split"] == ONLINE_SPLIT else None
            numbers = {k: v for k, v in record.items() if k not in ("epoch", "step", "split")}
            for key, value in _numbers(numbers).items():
                columns["run"].append(name)
                columns["epoch"].append(float(record["epoch"]))
                columns["step"].append(step)
                columns["split"].append(record["split"])
                columns["key"].append(key)
                columns["value"].append(value)
    return pd.DataFrame(columns).astype({"epoch": "float64", "step": "Int64", "value": "float64"})


def _numbers(record: dict) -> dict[str, float]:
    """The numbers of ``record`` as :func:`ncfast.measure.scalars` flattens them; values that
    are not numbers nor lists of numbers (a dict in a hand-edited log) are left out, as plot
    and table leave them out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        try:
            out.update(scalars({key: value}))
        except TypeError:
            continue
    return out


def _run_dirs(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    try:
        paths = [Path(p) for p in paths]
    except TypeError:
        raise TypeError(
            "read_runs: paths must be a run directory or an iterable of them, got "
            f"{type(paths).__name__}"
        ) from None
    if not paths:
        raise ValueError("read_runs: no paths given")
    found: list[Path] = []
    for path in paths:
        if path.is_dir() and not (path / METRICS_FILE).exists():
            inner = sorted(d for d in path.iterdir() if (d / METRICS_FILE).is_file())
            if inner:
                found.extend(inner)
                continue
        found.append(path)  # a run, or load_run's error saying what is missing
    return found
