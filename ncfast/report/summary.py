"""The text of ``ncfast analyze``'s report: the compact train/test table, the facts under it
(λ, robustness, zero-error epoch, Table 1, the central-path fit, the agreement with the log),
as the plain text the CLI prints and as ``summary.md``.

Everything here reads a report dict (:func:`ncfast.paper.analyze.analyze`'s result, as in
``report.json``); nothing is measured.
"""

from __future__ import annotations

from pathlib import Path

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


def format_value(value, float_format: str = ".4g") -> str:
    """A value as the reports print it: floats with ``float_format`` (4 significant digits by
    default), ``—`` for None (not measured, not reached), anything else as ``str``."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, float_format)
    return str(value)


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(label, train, test) rows of the compact table."""
    rows = []
    for key, label in SUMMARY_ROWS:
        values = [report["splits"].get(s, {}).get(key) for s in ("train", "test")]
        if all(v is None for v in values):
            continue
        rows.append((label, *(format_value(v) for v in values)))
    return rows


def summary_lines(report: dict) -> list[str]:
    """The facts under the table: λ, robustness, zero-error epoch and Table 1, the central-path
    fit, the agreement with the log."""
    cfg = report.get("config", {})
    lines = [
        f"λ (HPD22 Eq. 3) = {format_value(report.get('lambda'))} "
        f"(SGD weight decay {format_value(cfg.get('weight_decay'))}, λ = C·wd/2)"
    ]
    if report.get("robustness"):
        lines += robustness_lines(report["robustness"])
    lines.append(_zero_error_line(report))
    fit_line = _central_path_line(report.get("central_path"))
    if fit_line:
        lines.append(fit_line)
    lines.append(_agreement_line(report))
    return lines


def _zero_error_line(report: dict) -> str:
    zero = report.get("zero_error_epoch")
    row = report.get("table1") or {}
    if not report.get("history_epochs"):
        return "the checkpoint's history holds no measurements (no Table 1, fit or figures)"
    if zero is None:
        return "zero training error: not reached at any measured epoch"
    return (
        f"zero training error first at epoch {zero}: test accuracy "
        f"{format_value(row.get('acc_zero_error'))}% then, {format_value(row.get('acc_final'))}% "
        f"at epoch {row.get('final_epoch')} ({format_value(row.get('improvement'))} pp, "
        "HPD22 Table 1)"
    )


def _central_path_line(fit: dict | None) -> str | None:
    if not fit:
        return None
    if not fit.get("fitted"):
        return f"central-path fit: none ({fit.get('reason')})"
    start = fit["start_epoch"]
    fitted_range = (
        f"epochs ≥ {start}, from zero training error" if start > 0 else "all measured epochs"
    )
    return (
        f"central-path fit ({fitted_range}, {len(fit['epochs'])} epochs): "
        f"R²(ω) = {format_value(fit['r2_omega'])}, R²(t) = {format_value(fit['r2_time'])}, "
        f"c1, c2, c3 = {format_value(fit['c1'])}, {format_value(fit['c2'])}, "
        f"{format_value(fit['c3'])} (κ = 1 per epoch; SPEC §5 predicts c1 : c2 : c3 = "
        "C² : C : 1/4)"
    )


def _agreement_line(report: dict) -> str:
    agreement = report.get("agreement_with_log")
    if not agreement:
        return f"the log has no measurement at the checkpoint's epoch {report['epoch']}"
    parts = []
    for split, a in agreement.items():
        worst = a["max_relative_difference"]
        parts.append(
            f"{split} identical ({len(a['per_key'])} keys)"
            if worst == 0
            else f"{split} max relative difference {format_value(worst)} ({a['worst_key']})"
        )
    return f"agreement with the log at epoch {report['epoch']}: " + ", ".join(parts)


def robustness_lines(rob: dict) -> list[str]:
    """SPEC §7's three numbers in words: the papers' measure, the tight bound, the range."""
    lines = [
        f"DeepFool robustness ‖r‖/‖x‖ (test, {rob['robustness_samples']} images, seed "
        f"{rob['robustness_seed']}; HPD22 Fig. 9): mean {format_value(rob['robustness'])} ± "
        f"{format_value(rob['robustness_stderr'])}, median "
        f"{format_value(rob['robustness_median'])}; {rob['robustness_not_fooled']} not fooled"
    ]
    if "robustness_tight" in rob:  # reports written before SPEC §7 lack them
        lines.append(
            f"tight bound ‖s*·r‖/‖x‖ (s* the smallest multiple of DeepFool's r that already "
            "changes the prediction, median s* = "
            f"{format_value(rob['robustness_tight_scale_median'])}): mean "
            f"{format_value(rob['robustness_tight'])} ± "
            f"{format_value(rob['robustness_tight_stderr'])}, median "
            f"{format_value(rob['robustness_tight_median'])}"
        )
        outside = rob.get("robustness_out_of_range")
        lines.append(
            "pixels of x + r outside the valid image range: "
            + ("not measured" if outside is None else f"{format_value(100 * outside)}%")
            + " (DeepFool is unconstrained)"
        )
    return lines


def format_table(report: dict) -> str:
    """The compact plain-text table the CLI prints, with the facts under it."""
    rows = [("", "train", "test"), *summary_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    text = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    return "\n".join([*text, "", *summary_lines(report)]) + "\n"


def summary_markdown(report: dict, out: Path) -> str:
    """``summary.md`` of a report written to ``out``: the table, the facts and the figures."""
    cfg = report.get("config", {})
    # The run's known fields only: a report without its config (made by hand) has none.
    run = " · ".join(str(cfg[k]) for k in ("dataset", "net", "loss") if cfg.get(k) is not None)
    title = f"# ncfast analysis{': ' + run if run else ''}, epoch {report['epoch']}"
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
