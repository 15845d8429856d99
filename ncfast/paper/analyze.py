"""``analyze``: everything HPD22 reports about one trained network, from its checkpoint.

The checkpoint is read with ``torch.load(weights_only=True)`` (:mod:`ncfast.paper.checkpoint`); the
network and the data are rebuilt from the configuration it carries, exactly as training built
them; one streamed measurement per split goes through
:func:`ncfast.paper.evaluate.measure_split`, the
function training itself measures with, so the numbers agree with the run's log at the
checkpoint's epoch (the report says by how much). Then DeepFool robustness on a seeded sample of
test images (HPD22 Fig. 9, with SPEC §7's tight bound and out-of-range fraction), the
central-path fit of the logged SNR singular values (SPEC §5), Table 1's row, and the figures of
the run's history (with the figure of the training passes, ``online``, for a run trained with
``--online-every``).

Outputs in ``out_dir`` (default ``<checkpoint folder>/analysis``): ``report.json`` (strict JSON:
NaN/inf written as null), ``summary.md`` (its text: :mod:`ncfast.report.summary`) and ``figures/``
(the :mod:`ncfast.report.plots` figures). They are written into a temporary folder beside
``out_dir`` that then replaces it at once (:func:`ncfast.paper.rundir.swap_in_folder`): an
interrupted analysis leaves the previous one whole, never a mix. An ``out_dir`` holding files
ncfast analyze does not write is refused (they would be replaced).

The checkpoint of a run directory (``RUN/checkpoint.pt``) is analysed under the run's lock
(:meth:`ncfast.paper.rundir.RunDirectory.lock_for_reading`): a training or ``--overwrite`` of the
run meanwhile is refused, and so is this analysis while one runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch

from ncfast._version import __version__
from ncfast.backend.precision import check_precision as check_stats_precision
from ncfast.checks import check_device, check_int
from ncfast.paper.checkpoint import CheckpointError, load_checkpoint, load_state_checked
from ncfast.paper.config import TrainConfig
from ncfast.paper.evaluate import measure_split
from ncfast.paper.robustness import DEFAULT_SAMPLES, robustness
from ncfast.paper.rundir import (
    RunDirectory,
    RunDirectoryError,
    foreign_entries,
    is_run_directory,
    swap_in_folder,
)
from ncfast.paper.sgd_epoch import nonfinite_weights
from ncfast.paper.train import load_data
from ncfast.paper.training_state import build_model
from ncfast.report.plots import FORMATS, plot_runs
from ncfast.report.runs import (
    ANALYSIS_DIR,
    CHECKPOINT_FILE,
    SPLITS,
    central_path_fit,
    run_from_history,
    to_json_value,
)
from ncfast.report.summary import summary_markdown
from ncfast.report.tables import table1_rows
from ncfast.stats import InvalidInputError

REPORT_FORMAT = "ncfast-report-v1"
# The robustness numbers the Fig. 9 plot draws (ncfast.report.plots), put on the checkpoint's
# record.
ROBUSTNESS_PLOT_KEYS = ("robustness", "robustness_tight", "robustness_out_of_range")
DECOMPOSITION_KEYS = ("loss_mse", "loss_nc1", "loss_nc23", "loss_ls", "loss_ls_perp")


def _decomposition(metrics: dict) -> dict:
    out = {"lambda": metrics.get("weight_decay")}
    for key in DECOMPOSITION_KEYS:
        out[key] = metrics.get(key)
    if all(out.get(k) is not None for k in DECOMPOSITION_KEYS):
        ls, perp, mse = out["loss_ls"], out["loss_ls_perp"], out["loss_mse"]
        out["ls_perp_ratio"] = perp / ls if ls > 0 else None
        # SPEC §3: loss_mse = loss_nc1 + loss_nc23 + loss_ls_perp for any features.
        parts = out["loss_nc1"] + out["loss_nc23"] + perp
        out["identity_relative_error"] = abs(mse - parts) / max(abs(mse), 1e-300)
    return out


def _relative_difference(a, b) -> float | None:
    """Largest |a − b| / max(|a|, |b|) over matching numbers (lists element-wise)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return math.inf
        diffs = [_relative_difference(x, y) for x, y in zip(a, b, strict=True)]
        diffs = [d for d in diffs if d is not None]
        return max(diffs, default=None)
    if isinstance(a, bool) or isinstance(b, bool):
        return None
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return None
    if math.isnan(a) and math.isnan(b):
        return 0.0
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def compare_with_log(measured: dict, logged: dict) -> dict:
    """Per key present in both (numbers and lists of numbers): the relative difference; plus the
    largest one and its key."""
    per_key = {}
    for key, value in measured.items():
        if key in logged:
            diff = _relative_difference(to_json_value(value, strict=True), logged[key])
            if diff is not None:
                per_key[key] = diff
    worst = max(per_key, key=per_key.get, default=None)
    return {
        "max_relative_difference": per_key[worst] if worst is not None else None,
        "worst_key": worst,
        "per_key": per_key,
    }


def _rebuild(
    payload: dict, path: Path, data_root, device: torch.device, stats_precision=None
) -> TrainConfig:
    """The run's TrainConfig with this machine's device/data root (and scatter precision)."""
    stored = payload["config"]
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {path}: 'config' is not a dict of options")
    overrides = {"device": str(device), "download": False, "resume": False, "overwrite": False}
    if data_root is not None:
        overrides["data_root"] = str(data_root)
    if stats_precision is not None:
        overrides["stats_precision"] = stats_precision
    try:
        return dataclasses.replace(TrainConfig.from_json(stored), **overrides).resolved()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: its training options are unusable ({exc})"
        ) from None


def analyze(
    checkpoint_path: str | Path,
    data_root: str | Path | None = None,
    out_dir: str | Path | None = None,
    robustness_samples: int = DEFAULT_SAMPLES,
    device: str | torch.device | None = None,
    *,
    robustness_seed: int = 0,
    formats=FORMATS,
    progress: bool = True,
    stats_precision: str | None = None,
) -> dict:
    """Analyze the checkpoint at ``checkpoint_path``; write the report files; return the report.

    ``robustness_samples`` test images (a sample fixed by ``robustness_seed``) are attacked with
    DeepFool; 0 skips it. ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when
    available). Raises :class:`ncfast.paper.checkpoint.CheckpointError` for a missing, corrupt or
    untrusted checkpoint (nothing in it is executed), ``ncfast.paper.data.DatasetError`` when the
    run's data cannot be loaded, ValueError (TypeError) for bad arguments. ``stats_precision``
    (exact, fast, auto) overrides the run's scatter precision (docs/precision.md).
    """
    check_int(robustness_samples, "robustness_samples", 0, "analyze")
    if stats_precision is not None:
        check_stats_precision(stats_precision, "analyze")
    dev = check_device(device, "device", "analyze")
    path = Path(checkpoint_path)
    out = Path(out_dir) if out_dir is not None else path.parent / ANALYSIS_DIR
    option = "out_dir" if out_dir is not None else f"the run's analysis folder {out}"
    rundir = RunDirectory(path.parent, command="analyze")
    with contextlib.ExitStack() as stack:
        if path.name == CHECKPOINT_FILE and is_run_directory(path.parent):
            stack.enter_context(rundir.lock_for_reading())
        _check_out_dir(out, option)
        payload = load_checkpoint(path, map_location="cpu")
        config = _rebuild(payload, path, data_root, dev, stats_precision)
        report, run, robust = _analysis(
            payload,
            path,
            config,
            dev,
            robustness_samples,
            {
                "seed": robustness_seed,
                "progress": progress,
            },
        )
        return _write(report, run, robust, out, formats, rundir.token)


def _check_out_dir(out: Path, option: str) -> None:
    """ValueError unless ``out`` is missing, or a folder that holds only what ncfast analyze
    writes (it is replaced as a whole)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        what = "a symbolic link" if out.is_symlink() else "not a directory"
        raise ValueError(f"{option}: {out} is {what}")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(str(p.relative_to(out)) for p in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise RunDirectoryError(
            f"{option}: {out} holds files ncfast analyze did not write ({shown}{more}); the "
            "analysis replaces that folder as a whole: move them away, or give another --out"
        )


def _analysis(payload, path: Path, config, dev, samples: int, robust_options: dict):
    """The report (before its files are written), the run of the checkpoint's history and the
    robustness measured."""
    model, test_data, splits = _measure(payload, path, config, dev)
    robust = None
    if samples > 0:
        robust = robustness(
            model,
            test_data,
            samples=samples,
            seed=robust_options["seed"],
            device=dev,
            progress=robust_options["progress"],
        )
    history = list(payload["history"])
    run = run_from_history(history, payload["config"], path.parent) if history else None
    return _report(payload, path, dev, splits, robust, run), run, robust


def _measure(payload: dict, path: Path, config: TrainConfig, device: torch.device):
    """The checkpoint's network, the test split, and per split (metrics, decomposition): one
    streamed measurement each, as training measures."""
    train_data, test_data = load_data(config)
    model = build_model(config, train_data.num_classes, train_data.channels, train_data.image_size)
    what = f"a {config.net} (width {config.width}) for {config.dataset}"
    load_state_checked(model, payload["model"], path, "model", what)
    if bool(nonfinite_weights(model)):
        raise CheckpointError(
            f"checkpoint {path}: its weights are not finite (NaN or infinity): its training "
            "diverged; analyze a checkpoint from before, or train again with a lower --lr"
        )
    model = model.to(device).eval()
    splits = {}
    for name, data in (("train", train_data), ("test", test_data)):
        try:
            measured = measure_split(model, data, **config.measure_options())
        except InvalidInputError:  # the labels are the dataset's: non-finite features
            raise CheckpointError(
                f"checkpoint {path}: its network's features on the {name} split are not finite "
                "(NaN or infinity; weights too large): its training diverged; analyze a "
                "checkpoint from before, or train again with a lower --lr"
            ) from None
        metrics = to_json_value(measured)
        decomposition = _decomposition(metrics)
        metrics["ls_perp_ratio"] = decomposition.get("ls_perp_ratio")
        splits[name] = (metrics, decomposition)
    return model, test_data, splits


def _report(payload: dict, path: Path, device, splits: dict, robust: dict | None, run) -> dict:
    """The report (before its files are written): the measurement, its agreement with the log
    at the checkpoint's epoch, and what the run's history ``run`` gives (zero-error epoch,
    Table 1, central-path fit)."""
    epoch = int(payload["epoch"])
    history = list(payload["history"])
    logged = {}
    for name, (metrics, _) in splits.items():
        rec = next((r for r in history if r.get("epoch") == epoch and r.get("split") == name), None)
        if rec is not None:
            logged[name] = compare_with_log(metrics, rec)
    return {
        "format": REPORT_FORMAT,
        "ncfast_version": __version__,
        "checkpoint": str(path),
        "epoch": epoch,
        "device": str(device),
        "config": payload["config"],
        "lambda": splits["train"][0].get("weight_decay"),
        "splits": {name: metrics for name, (metrics, _) in splits.items()},
        "decomposition": {name: dec for name, (_, dec) in splits.items()},
        "snr_singular_values": {
            name: metrics.get("snr_singular_values") for name, (metrics, _) in splits.items()
        },
        "robustness": robust,
        "zero_error_epoch": run.zero_error_epoch if run is not None else None,
        "table1": table1_rows([run])[0] if run is not None else None,
        "central_path": central_path_fit(run) if run is not None else None,
        "agreement_with_log": logged or None,
        # Measured epochs (eval mode): rows of the training passes (train_online) are not.
        "history_epochs": len({r["epoch"] for r in history if r.get("split") in SPLITS}),
    }


def _write(report: dict, run, robust: dict | None, out: Path, formats, token: str) -> dict:
    """The figures of the run's history ``run`` (with the measured robustness on the
    checkpoint's epoch), ``report.json`` and ``summary.md``, written into a temporary folder
    (named by ``token``) that then replaces ``out``; returns the report as written (strict
    JSON, with the paths of its files in ``out``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.ncfast-{token}.tmp"
    staging.mkdir()
    try:
        figure_paths = []
        if run is not None:
            if robust is not None:
                _attach_robustness(run, report["epoch"], robust)
            fits = {0: report["central_path"]}
            figure_paths = plot_runs([run], staging / "figures", formats=formats, fits=fits)
        report["files"] = {
            "report": str(out / "report.json"),
            "summary": str(out / "summary.md"),
            "figures": [str(out / "figures" / p.name) for p in figure_paths],
        }
        report = to_json_value(report, strict=True)
        (staging / "report.json").write_text(
            json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        (staging / "summary.md").write_text(summary_markdown(report, out), encoding="utf-8")
        swap_in_folder(staging, out, out.parent / f".{out.name}.ncfast-{token}-trash")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _attach_robustness(run, epoch: int, robust: dict) -> None:
    """Put the measured robustness numbers (those the Fig. 9 plot draws) on the test record of
    the checkpoint's epoch (a copy), so the robustness figure shows them."""
    values = {k: robust[k] for k in ROBUSTNESS_PLOT_KEYS}
    for i, rec in enumerate(run.records):
        if rec["epoch"] == epoch and rec["split"] == "test":
            run.records[i] = {**rec, **values}
            run.forget_history()
