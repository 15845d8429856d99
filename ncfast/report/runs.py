"""Training-run directories: their file names, and reading ``metrics.jsonl`` and
``config.json`` (written by ``ncfast train``) with errors that say which file and line was wrong.

A run's history is one flat record per measured epoch and split (``train``/``test``, eval
mode), and with ``ncfast train --online-every K`` one record every K SGD steps of split
``train_online`` (the training passes themselves: an integer ``step`` and a fractional
``epoch``). Here it becomes, per split, an array per key over the measured epochs (over the
steps for ``train_online``; ``snr_singular_values`` a ``[T, J]`` array padded with NaN where
the rank changed).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ncfast.errors import NCFastError

# The files of a run directory (ncfast.paper.rundir.RunDirectory writes them).
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
ANALYSIS_DIR = "analysis"  # ncfast analyze's report of the checkpoint
SPLITS = ("train", "test")  # the eval-mode measurements at whole epochs
ONLINE_SPLIT = "train_online"  # the training passes, every K SGD steps
RECORD_SPLITS = (*SPLITS, ONLINE_SPLIT)
REQUIRED_KEYS = ("epoch", "split", "error")
ONLINE_REQUIRED_KEYS = ("epoch", "split", "step")


class RunError(NCFastError, ValueError):
    """A run directory, metrics log or config that cannot be read; the message says why."""


# Epochs beyond this are not a run's (and would lose precision as float64 on a plot's axis).
MAX_EPOCH = 2**53


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_EPOCH


def _shown(value) -> str:
    return repr(value) if len(repr(value)) <= 40 else f"a {len(str(value))}-digit number"


def check_record(rec, where: str) -> dict:
    """``rec`` if it is a valid metrics record, else RunError saying what is wrong at ``where``:
    ``split`` train/test with ``epoch`` an integer in 0..2**53 and ``error`` a fraction, or
    ``split`` train_online with ``step`` an integer in 0..2**53 and ``epoch`` a number in
    [0, 2**53] (fractional); every list (the SNR singular values) a list of numbers."""
    if not isinstance(rec, dict):
        raise RunError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    online = rec.get("split") == ONLINE_SPLIT
    missing = [k for k in (ONLINE_REQUIRED_KEYS if online else REQUIRED_KEYS) if k not in rec]
    if missing:
        raise RunError(f"{where}: missing key(s) {', '.join(missing)}")
    epoch = rec["epoch"]
    if online:
        if not _is_count(rec["step"]):
            raise RunError(
                f"{where}: 'step' must be an integer in 0..2**53, got {_shown(rec['step'])}"
            )
        if not _is_number(epoch) or not 0 <= epoch <= MAX_EPOCH:
            raise RunError(f"{where}: 'epoch' must be a number in [0, 2**53], got {_shown(epoch)}")
    elif not _is_count(epoch):
        raise RunError(f"{where}: 'epoch' must be an integer in 0..2**53, got {_shown(epoch)}")
    if rec["split"] not in RECORD_SPLITS:
        raise RunError(
            f"{where}: 'split' must be 'train', 'test' or '{ONLINE_SPLIT}', got {rec['split']!r}"
        )
    err = rec.get("error", 0)
    if not _is_number(err) or not 0 <= err <= 1:
        raise RunError(f"{where}: 'error' must be a fraction in [0, 1], got {_short(err)}")
    for key, value in rec.items():
        if isinstance(value, list) and not all(v is None or _is_number(v) for v in value):
            raise RunError(f"{where}: {key!r} must be a list of numbers, got {_short(value)}")
    return rec


def to_json_value(value, strict: bool = False):
    """``value`` in JSON's types: tensors and numpy arrays to (nested) lists, numpy and 0-d
    tensor scalars to Python numbers, tuples to lists, dict keys to strings, paths to strings.
    NaN and ±inf stay (``metrics.jsonl`` holds them as Python's json writes them) unless
    ``strict``, which makes them None (strict JSON, as ``report.json``)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # torch tensors (any dtype), numpy arrays and scalars
    if isinstance(value, float):
        return value if math.isfinite(value) or not strict else None
    if isinstance(value, dict):
        return {str(k): to_json_value(v, strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, strict) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def metrics_lines(records: list[dict]) -> str:
    """``records`` as lines of ``metrics.jsonl`` (one JSON object per line)."""
    return "".join(json.dumps(record) + "\n" for record in records)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, validated, in file order.

    A malformed *last* line (a run killed while writing: not UTF-8, or not JSON) is skipped with
    a warning; a malformed line anywhere else is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"metrics log not found: {path} (expected a file written by ncfast train)")
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise RunError(f"cannot read {path} ({exc.strerror})") from None
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"{path}, line {i + 1}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
            problem = f"not valid JSON ({getattr(exc, 'msg', None) or _first_line(exc)})"
        else:
            records.append(check_record(rec, where))
            continue
        if i == last:
            warnings.warn(f"{where}: incomplete last line skipped ({problem})", stacklevel=2)
            continue
        raise RunError(f"{where}: {problem}")
    if not records:
        raise RunError(f"{path}: no measurements logged yet")
    return records


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def read_config(path: str | Path) -> dict:
    """The run's ``config.json`` as a dict."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"run config not found: {path}")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise RunError(f"cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise RunError(f"{path}: not UTF-8 text (byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except ValueError as exc:
        raise RunError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _to_float(value) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float64 (e.g. 10**400)
            return math.inf if value > 0 else -math.inf
    return math.nan


def history_arrays(records: list[dict], split: str) -> dict[str, np.ndarray]:
    """Per-key arrays over the measured epochs of ``split``, sorted by epoch (``train_online``:
    over the steps, sorted by step).

    Scalars become float64 arrays (NaN where a record lacks the key); list-valued keys (the SNR
    singular values) become ``[T, J]`` arrays padded with NaN. A repeated epoch (a resumed run
    that logged it twice) keeps the last record, as does a repeated step. ``epoch`` is an int
    array (float64 for ``train_online``, whose ``step`` is the int array).
    """
    if split not in RECORD_SPLITS:
        raise ValueError(
            f"history_arrays: split must be 'train', 'test' or '{ONLINE_SPLIT}', got {split!r}"
        )
    index = "step" if split == ONLINE_SPLIT else "epoch"
    by_index: dict[int, dict] = {}
    for rec in records:
        if rec.get("split") == split:
            by_index[int(rec[index])] = rec
    order = sorted(by_index)
    rows = [by_index[i] for i in order]
    out: dict[str, np.ndarray] = {index: np.asarray(order, dtype=np.int64)}
    keys: list[str] = []
    for rec in rows:
        keys.extend(k for k in rec if k not in keys and k not in (index, "split"))
    for key in keys:
        values = [rec.get(key) for rec in rows]
        if any(isinstance(v, (list, tuple)) for v in values):
            width = max((len(v) for v in values if isinstance(v, (list, tuple))), default=0)
            arr = np.full((len(rows), width), np.nan)
            for t, v in enumerate(values):
                if isinstance(v, (list, tuple)):
                    arr[t, : len(v)] = [_to_float(x) for x in v]
            out[key] = arr
        elif all(v is None or _is_number(v) for v in values):
            out[key] = np.asarray([_to_float(v) for v in values], dtype=np.float64)
        # other types (strings) are not history curves and are left out
    return out


def zero_error_epoch(records_or_history) -> int | None:
    """The first measured epoch with training error exactly 0, or None if never reached."""
    hist = (
        records_or_history
        if isinstance(records_or_history, dict)
        else history_arrays(records_or_history, "train")
    )
    epochs, errors = hist.get("epoch"), hist.get("error")
    if epochs is None or errors is None:
        return None
    hit = np.flatnonzero(errors == 0)
    return int(epochs[hit[0]]) if hit.size else None


@dataclass
class Run:
    """A training run: its directory, config and validated metrics records.

    :meth:`history` arrays are computed once per split and cached; after changing
    ``records``, call :meth:`forget_history`."""

    path: Path
    config: dict
    records: list[dict]
    _history: dict = field(default_factory=dict, repr=False)

    def history(self, split: str = "train") -> dict[str, np.ndarray]:
        """:func:`history_arrays` of ``split`` (cached)."""
        if split not in self._history:
            self._history[split] = history_arrays(self.records, split)
        return self._history[split]

    def forget_history(self) -> None:
        """Drop the cached :meth:`history` (``records`` were changed)."""
        self._history.clear()

    @property
    def zero_error_epoch(self) -> int | None:
        return zero_error_epoch(self.history("train"))

    @property
    def last_epoch(self) -> int:
        """The last epoch measured in eval mode (of any record, if none was)."""
        measured = [r for r in self.records if r["split"] in SPLITS] or self.records
        return max(math.ceil(r["epoch"]) for r in measured)

    @property
    def has_online(self) -> bool:
        """Whether the run logged rows of its training passes (``--online-every``)."""
        return any(r["split"] == ONLINE_SPLIT for r in self.records)

    def last_record(self, split: str) -> dict | None:
        """The record of the last measured epoch of ``split`` (None if never measured); of an
        epoch logged twice (a resumed run), the later record, as in :meth:`history`."""
        recs = [r for r in self.records if r["split"] == split]
        # max() keeps the first of equal keys: search from the end for the later record.
        return max(reversed(recs), key=lambda r: r["epoch"]) if recs else None

    @property
    def dataset(self) -> str:
        return str(self.config.get("dataset", "?"))

    @property
    def net(self) -> str:
        return str(self.config.get("net", "?"))

    @property
    def loss(self) -> str:
        return str(self.config.get("loss", "?"))

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    @property
    def label(self) -> str:
        return f"{self.dataset} · {self.net} · {self.loss}"


def load_run(path: str | Path) -> Run:
    """Read a run directory (``metrics.jsonl`` required; ``config.json`` if present)."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"run directory not found: {path}")
    if not path.is_dir():
        raise RunError(
            f"not a run directory: {path} (expected a directory written by ncfast "
            f"train --out, holding {METRICS_FILE})"
        )
    records = read_metrics(path / METRICS_FILE)
    config_path = path / CONFIG_FILE
    config = read_config(config_path) if config_path.exists() else {}
    return Run(path=path, config=config, records=records)


def run_from_history(records: list[dict], config: dict, path: str | Path = ".") -> Run:
    """A :class:`Run` from in-memory records (e.g. a checkpoint's ``history``)."""
    if not isinstance(records, list) or not records:
        raise RunError("history: expected a non-empty list of metric records")
    checked = [check_record(r, f"history record {i}") for i, r in enumerate(records)]
    return Run(path=Path(path), config=dict(config or {}), records=checked)


def central_path_fit(run: Run, split: str = "train", start_epoch: int | None = None) -> dict:
    """The SPEC §5 central-path law fitted to the run's logged SNR singular values.

    Fitted over the terminal phase (epochs ≥ the zero-error epoch, where HPD22's theory
    applies; all epochs if zero error was never reached; or from ``start_epoch``) by
    :func:`ncfast.theory.fit_central_path` with t = epoch. Returns ``fitted`` (bool), ``epochs``
    (the t used), ``start_epoch``, and, when fitted, that function's result with tensors as
    numpy arrays (``c1, c2, c3, kappa, a, c1_over_c3, c2_over_c3, r2_time, r2_omega, spread,
    predicted_omega``); otherwise ``reason``.
    """
    hist = run.history(split)
    omega = hist.get("snr_singular_values")
    if start_epoch is None:
        start_epoch = run.zero_error_epoch if run.zero_error_epoch is not None else 0
    out: dict = {"fitted": False, "start_epoch": int(start_epoch), "epochs": np.zeros(0, int)}
    if omega is None or omega.ndim != 2 or omega.shape[1] == 0:
        out["reason"] = f"no snr_singular_values logged on the {split} split"
        return out
    epochs = hist["epoch"]
    # Rows where the rank dropped (NaN padding) or ω is not positive cannot enter the law.
    keep = (epochs >= start_epoch) & np.isfinite(omega).all(axis=1) & (omega > 0).all(axis=1)
    out["epochs"] = epochs[keep]
    if keep.sum() < 3:
        out["reason"] = f"only {int(keep.sum())} measured epochs ≥ {start_epoch} (need 3)"
        return out
    from ncfast.theory import fit_central_path

    try:
        fit = fit_central_path(epochs[keep].astype(np.float64), omega[keep])
    except ValueError as exc:
        out["reason"] = str(exc)
        return out
    for key, value in fit.items():
        out[key] = value.numpy() if hasattr(value, "numpy") else value
    out["fitted"] = True
    return out
