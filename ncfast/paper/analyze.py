"""``analyze``: everything HPD22 reports about one trained network, from its checkpoint.

The checkpoint is read with ``torch.load(weights_only=True)`` (:mod:`ncfast.paper.checkpoint`); the
network and the data are rebuilt from the configuration it carries, exactly as training built
them; one streamed measurement per split goes through
:func:`ncfast.paper.evaluate.measure_split`, the
function training itself measures with, so the numbers agree with the run's log at the
checkpoint's epoch (the report says by how much). Then DeepFool robustness on a seeded sample of
test images (HPD22 Fig. 9, with SPEC §7's tight bound and out-of-range fraction), the
central-path fit of the logged SNR singular values (SPEC §5), Table 1's row, and the figures of
the run's history.

Outputs in ``out_dir`` (default ``<checkpoint folder>/analysis``): ``report.json`` (strict JSON:
NaN/inf written as null), ``summary.md`` and ``figures/`` (the :mod:`ncfast.report.plots` figures).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from ncfast import __version__
from ncfast.paper.checkpoint import CheckpointError, load_checkpoint
from ncfast.paper.evaluate import measure_split
from ncfast.paper.robustness import DEFAULT_SAMPLES, robustness
from ncfast.paper.train import TrainConfig, build_model, jsonable, load_data
from ncfast.report.plots import FORMATS, plot_runs
from ncfast.report.runs import central_path_fit, run_from_history
from ncfast.report.tables import table1_rows

REPORT_FORMAT = "ncfast-report-v1"
# The robustness numbers the Fig. 9 plot draws (ncfast.report.plots), put on the checkpoint's
# record.
ROBUSTNESS_PLOT_KEYS = ("robustness", "robustness_tight", "robustness_out_of_range")
DECOMPOSITION_KEYS = ("loss_mse", "loss_nc1", "loss_nc23", "loss_ls", "loss_ls_perp")
# Rows of the compact table (report key, label).
SUMMARY_ROWS = (
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


def _pick_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here")
    return dev


def _json_safe(value):
    """Tensors/arrays to lists, numpy scalars to Python, NaN/inf to None (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


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
            diff = _relative_difference(_json_safe(value), logged[key])
            if diff is not None:
                per_key[key] = diff
    worst = max(per_key, key=per_key.get, default=None)
    return {
        "max_relative_difference": per_key[worst] if worst is not None else None,
        "worst_key": worst,
        "per_key": per_key,
    }


def _rebuild(payload: dict, path: Path, data_root, device: torch.device):
    """The run's TrainConfig with this machine's device/data root, and the empty network."""
    stored = payload["config"]
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {path}: 'config' is not a dict of options")
    overrides = {"device": str(device), "download": False, "resume": False, "overwrite": False}
    if data_root is not None:
        overrides["data_root"] = str(data_root)
    try:
        config = dataclasses.replace(TrainConfig.from_json(stored), **overrides).resolved()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: its training options are unusable ({exc})"
        ) from None
    return config


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
) -> dict:
    """Analyze the checkpoint at ``checkpoint_path``; write the report files; return the report.

    ``robustness_samples`` test images (a sample fixed by ``robustness_seed``) are attacked with
    DeepFool; 0 skips it. ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when
    available). Raises :class:`ncfast.paper.checkpoint.CheckpointError` for a missing, corrupt or
    untrusted checkpoint (nothing in it is executed), ``ncfast.paper.data.DatasetError`` when the
    run's data cannot be loaded, ValueError for bad arguments.
    """
    if (
        not isinstance(robustness_samples, int)
        or isinstance(robustness_samples, bool)
        or robustness_samples < 0
    ):
        raise ValueError(
            f"robustness_samples must be an integer ≥ 0 (0 skips DeepFool), got "
            f"{robustness_samples!r}"
        )
    dev = _pick_device(device)
    path = Path(checkpoint_path)
    payload = load_checkpoint(path, map_location="cpu")
    config = _rebuild(payload, path, data_root, dev)
    out = Path(out_dir) if out_dir is not None else path.parent / "analysis"
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} exists and is not a directory")

    train_data, test_data = load_data(config)
    model = build_model(config, train_data.num_classes, train_data.channels, train_data.image_size)
    from ncfast.paper.checkpoint import load_state_checked  # names the missing/unexpected keys

    what = f"a {config.net} (width {config.width}) for {config.dataset}"
    load_state_checked(model, payload["model"], path, "model", what)
    model = model.to(dev).eval()

    measure_kwargs = config.measure_options()
    splits = {}
    for name, data in (("train", train_data), ("test", test_data)):
        metrics = jsonable(measure_split(model, data, **measure_kwargs))
        decomposition = _decomposition(metrics)
        metrics["ls_perp_ratio"] = decomposition.get("ls_perp_ratio")
        splits[name] = (metrics, decomposition)

    robust = None
    if robustness_samples > 0:
        robust = robustness(
            model,
            test_data,
            samples=robustness_samples,
            seed=robustness_seed,
            device=dev,
            progress=progress,
        )

    epoch = int(payload["epoch"])
    history = list(payload["history"])
    run = run_from_history(history, payload["config"], path.parent) if history else None
    logged = {}
    for name in splits:
        rec = next((r for r in history if r.get("epoch") == epoch and r.get("split") == name), None)
        if rec is not None:
            logged[name] = compare_with_log(splits[name][0], rec)
    fit = central_path_fit(run) if run is not None else None
    table_row = table1_rows([run])[0] if run is not None else None

    report = {
        "format": REPORT_FORMAT,
        "ncfast_version": __version__,
        "checkpoint": str(path),
        "epoch": epoch,
        "device": str(dev),
        "config": payload["config"],
        "lambda": splits["train"][0].get("weight_decay"),
        "splits": {name: metrics for name, (metrics, _) in splits.items()},
        "decomposition": {name: dec for name, (_, dec) in splits.items()},
        "snr_singular_values": {
            name: metrics.get("snr_singular_values") for name, (metrics, _) in splits.items()
        },
        "robustness": robust,
        "zero_error_epoch": run.zero_error_epoch if run is not None else None,
        "table1": table_row,
        "central_path": fit,
        "agreement_with_log": logged or None,
        "history_epochs": len({r["epoch"] for r in history}),
    }

    out.mkdir(parents=True, exist_ok=True)
    figure_paths = []
    if run is not None:
        if robust is not None:
            _attach_robustness(run, epoch, robust)
        figure_paths = plot_runs([run], out / "figures", formats=formats, fits={0: fit})
    report["files"] = {
        "report": str(out / "report.json"),
        "summary": str(out / "summary.md"),
        "figures": [str(p) for p in figure_paths],
    }
    report = _json_safe(report)
    (out / "report.json").write_text(
        json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    (out / "summary.md").write_text(summary_markdown(report, out), encoding="utf-8")
    return report


def _attach_robustness(run, epoch: int, robust: dict) -> None:
    """Put the measured robustness numbers (those the Fig. 9 plot draws) on the test record of
    the checkpoint's epoch (a copy), so the robustness figure shows them."""
    values = {k: robust[k] for k in ROBUSTNESS_PLOT_KEYS}
    for i, rec in enumerate(run.records):
        if rec["epoch"] == epoch and rec["split"] == "test":
            run.records[i] = {**rec, **values}
            run._history.clear()


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(label, train, test) rows of the compact table."""
    rows = []
    for key, label in SUMMARY_ROWS:
        values = [report["splits"].get(s, {}).get(key) for s in ("train", "test")]
        if all(v is None for v in values):
            continue
        rows.append((label, *(_fmt(v) for v in values)))
    return rows


def summary_lines(report: dict) -> list[str]:
    """The facts under the table: robustness, zero-error epoch, Table 1, fit, agreement."""
    lines = []
    cfg = report.get("config", {})
    lines.append(
        f"λ (HPD22 Eq. 3) = {_fmt(report.get('lambda'))} "
        f"(SGD weight decay {_fmt(cfg.get('weight_decay'))}, λ = C·wd/2)"
    )
    rob = report.get("robustness")
    if rob:
        lines += robustness_lines(rob)
    zero = report.get("zero_error_epoch")
    row = report.get("table1") or {}
    if not report.get("history_epochs"):
        lines.append("the checkpoint's history holds no measurements (no Table 1, fit or figures)")
    elif zero is None:
        lines.append("zero training error: not reached at any measured epoch")
    else:
        lines.append(
            f"zero training error first at epoch {zero}: test accuracy "
            f"{_fmt(row.get('acc_zero_error'))}% then, {_fmt(row.get('acc_final'))}% at epoch "
            f"{row.get('final_epoch')} ({_fmt(row.get('improvement'))} pp, HPD22 Table 1)"
        )
    fit = report.get("central_path")
    if fit and fit.get("fitted"):
        lines.append(
            f"central-path fit ({_fit_range(fit)}, {len(fit['epochs'])} epochs): "
            f"R²(ω) = {_fmt(fit['r2_omega'])}, R²(t) = {_fmt(fit['r2_time'])}, "
            f"c1, c2, c3 = {_fmt(fit['c1'])}, {_fmt(fit['c2'])}, {_fmt(fit['c3'])} (κ = 1 per "
            f"epoch; SPEC §5 predicts c1 : c2 : c3 = C² : C : 1/4)"
        )
    elif fit:
        lines.append(f"central-path fit: none ({fit.get('reason')})")
    agreement = report.get("agreement_with_log")
    if agreement:
        parts = []
        for split, a in agreement.items():
            worst = a["max_relative_difference"]
            keys = len(a["per_key"])
            parts.append(
                f"{split} identical ({keys} keys)"
                if worst == 0
                else f"{split} max relative difference {_fmt(worst)} ({a['worst_key']})"
            )
        lines.append(f"agreement with the log at epoch {report['epoch']}: " + ", ".join(parts))
    else:
        lines.append(f"the log has no measurement at the checkpoint's epoch {report['epoch']}")
    return lines


def robustness_lines(rob: dict) -> list[str]:
    """SPEC §7's three numbers in words: the papers' measure, the tight bound, the range."""
    lines = [
        f"DeepFool robustness ‖r‖/‖x‖ (test, {rob['robustness_samples']} images, seed "
        f"{rob['robustness_seed']}; HPD22 Fig. 9): mean {_fmt(rob['robustness'])} ± "
        f"{_fmt(rob['robustness_stderr'])}, median {_fmt(rob['robustness_median'])}; "
        f"{rob['robustness_not_fooled']} not fooled"
    ]
    if "robustness_tight" in rob:  # reports written before SPEC §7 lack them
        lines.append(
            f"tight bound ‖s*·r‖/‖x‖ (s* the smallest multiple of DeepFool's r that already "
            f"changes the prediction, median s* = {_fmt(rob['robustness_tight_scale_median'])}): "
            f"mean {_fmt(rob['robustness_tight'])} ± {_fmt(rob['robustness_tight_stderr'])}, "
            f"median {_fmt(rob['robustness_tight_median'])}"
        )
        outside = rob.get("robustness_out_of_range")
        lines.append(
            "pixels of x + r outside the valid image range: "
            + ("not measured" if outside is None else f"{_fmt(100 * outside)}%")
            + " (DeepFool is unconstrained)"
        )
    return lines


def _fit_range(fit: dict) -> str:
    start = fit["start_epoch"]
    return f"epochs ≥ {start}, from zero training error" if start > 0 else "all measured epochs"


def format_table(report: dict) -> str:
    """The compact plain-text table the CLI prints."""
    rows = [("", "train", "test"), *summary_rows(report)]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    text = [f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}" for a, b, c in rows]
    return "\n".join([*text, "", *summary_lines(report)]) + "\n"


def summary_markdown(report: dict, out: Path) -> str:
    cfg = report.get("config", {})
    title = (
        f"# ncfast analysis: {cfg.get('dataset')} · {cfg.get('net')} · {cfg.get('loss')}, "
        f"epoch {report['epoch']}"
    )
    table = ["| | train | test |", "|---|---:|---:|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    facts = [f"- {line}" for line in summary_lines(report)]
    figures = [
        f"![{Path(p).stem}]({Path(p).relative_to(out).as_posix()})"
        for p in report["files"]["figures"]
        if p.endswith(".png")
    ]
    parts = [
        title,
        "",
        f"Checkpoint `{report['checkpoint']}` on {report['device']}.",
        "",
        *table,
        "",
        *facts,
    ]
    if figures:
        parts += ["", "## Figures", "", *figures]
    return "\n".join(parts) + "\n"
