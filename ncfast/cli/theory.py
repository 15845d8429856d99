"""``ncfast theory simulate``: the continually renormalized gradient flow against SPEC §5's law."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from ncfast.cli import main
from ncfast.cli._shared import check_output_dir

FIGURE_NAME = "theory_simulation"


@main.group("theory")
def theory_group() -> None:
    """HPD22's central-path theory (SPEC §5): simulate and compare with the closed form."""


def _parse_omega0(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint="--omega0"
        ) from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise click.BadParameter(
            f"values must be positive and finite, got {text!r}", param_hint="--omega0"
        )
    return values


@theory_group.command("simulate")
@click.option("--classes", "num_classes", required=True, type=click.IntRange(min=2), help="C.")
@click.option("--per-class", required=True, type=click.IntRange(min=2), help="N samples/class.")
@click.option("--dim", required=True, type=click.IntRange(min=1), help="Feature dimension P.")
@click.option("--steps", required=True, type=click.IntRange(min=1), help="Integrator steps.")
@click.option(
    "--dt",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Fixed step in flow time t. Default: adaptive, each log ω_j grows ≤ --max-log-step "
    "per step (t then grows geometrically: long runs in few steps).",
)
@click.option(
    "--max-log-step",
    type=click.FloatRange(min=0, max=0.5, min_open=True),
    default=0.02,
    show_default=True,
    help="Bound on the growth of log ω per adaptive step.",
)
@click.option(
    "--omega0",
    default=None,
    help="Initial SNR singular values, C−1 comma-separated positive numbers "
    "(default: those of renormalized Gaussian features).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Directory for {FIGURE_NAME}.png/.pdf/.json.",
)
def simulate_command(
    num_classes: int,
    per_class: int,
    dim: int,
    steps: int,
    dt: float | None,
    max_log_step: float,
    omega0: str | None,
    seed: int,
    out: Path,
) -> None:
    """Simulate the continually renormalized gradient flow (HPD22 Eq. 5) of C·N unconstrained
    features in R^P and compare the SNR singular values ω_j(t) with the closed form
    C² log ω + C ω² + ω⁴/4 = a_j + t/N. Prints a table; writes a figure and the series."""
    import torch

    from ncfast import theory

    omega_list = _parse_omega0(omega0)
    if omega_list is not None and len(omega_list) != num_classes - 1:
        raise click.BadParameter(
            f"needs C − 1 = {num_classes - 1} values, got {len(omega_list)}", param_hint="--omega0"
        )
    check_output_dir(out)
    generator = torch.Generator().manual_seed(seed)
    x0 = theory.initial_features(
        num_classes,
        per_class,
        dim,
        omega0=None if omega_list is None else torch.tensor(omega_list, dtype=torch.float64),
        generator=generator,
    )
    run = theory.simulate_central_path(
        x0, num_classes, steps, dt=dt, max_log_step=max_log_step, progress=True
    )
    closed = theory.snr_closed_form(run.omega[0], run.times, num_classes, per_class)
    rel_error = ((run.omega - closed) / closed).abs()
    spread = run.omega[:, 0] / run.omega[:, -1]
    summary = {
        "max_relative_error": float(rel_error.max()),
        "growth_min": float((run.omega[-1] / run.omega[0]).min()),
        "growth_max": float((run.omega[-1] / run.omega[0]).max()),
        "spread_start": float(spread[0]),
        "spread_end": float(spread[-1]),
        "alignment_start": float(run.alignment[0]),
        "alignment_end": float(run.alignment[-1]),
        "max_manifold_drift": float(run.manifold_drift.max()),
        "final_time": float(run.times[-1]),
    }

    _print_table(run, closed, rel_error, per_class)
    click.echo(
        f"max relative error {summary['max_relative_error']:.2e}; ω_j grew "
        f"{summary['growth_min']:.3g}×–{summary['growth_max']:.3g}×; ω_max/ω_min "
        f"{summary['spread_start']:.4g} → {summary['spread_end']:.6g}; "
        f"‖SNR/ω_max − Û₀V̂₀ᵀ‖ {summary['alignment_start']:.3g} → "
        f"{summary['alignment_end']:.3g}; max |Σ_W − I| before renormalization "
        f"{summary['max_manifold_drift']:.1e}"
    )

    series = run.to_dict()
    series.update(
        {
            "seed": seed,
            "dt": dt,
            "max_log_step": None if dt is not None else max_log_step,
            "omega_closed_form": closed.tolist(),
            "relative_error": rel_error.tolist(),
            "summary": summary,
            "time_units": "gradient-flow time of the per-sample averaged SPEC §3 loss L_LS "
            "w.r.t. the P×CN features; the closed form is C² log ω + C ω² + ω⁴/4 = a_j + t/N",
        }
    )
    json_path = out / f"{FIGURE_NAME}.json"
    out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(series, indent=1))
    paths = _write_figure(run, closed, rel_error, out, adaptive=dt is None)
    click.echo("written: " + ", ".join(str(p) for p in [*paths, json_path]))


def _print_table(run, closed, rel_error, per_class: int, rows: int = 8) -> None:
    last = run.times.numel() - 1
    picks = sorted({round(k * last / (rows - 1)) for k in range(rows)})
    header = (
        f"{'step':>6} {'t/N':>11} {'ω_max sim':>11} {'ω_max law':>11} "
        f"{'ω_min sim':>11} {'ω_min law':>11} {'rel err':>9}"
    )
    click.echo(header)
    for k in picks:
        click.echo(
            f"{k:>6d} {float(run.times[k]) / per_class:>11.4g} {float(run.omega[k, 0]):>11.5g} "
            f"{float(closed[k, 0]):>11.5g} {float(run.omega[k, -1]):>11.5g} "
            f"{float(closed[k, -1]):>11.5g} {float(rel_error[k].max()):>9.1e}"
        )


def _write_figure(run, closed, rel_error, out: Path, adaptive: bool) -> list[Path]:
    from matplotlib import colormaps

    from ncfast.report.plots import new_figure, save_figure

    t = (run.times / run.per_class).numpy()
    # Adaptive runs span decades of t: log axis without t = 0.
    first = 1 if adaptive and t.size > 1 else 0
    t = t[first:]
    omega, law, err = run.omega[first:].numpy(), closed[first:].numpy(), rel_error[first:].numpy()
    fig, grid = new_figure(1, 3, (13, 3.8))
    axes = grid[0]
    colors = colormaps["viridis"](
        [i / max(1, omega.shape[1] - 1) * 0.9 for i in range(omega.shape[1])]
    )
    for j in range(omega.shape[1]):
        axes[0].plot(t, omega[:, j], color=colors[j], lw=2, label=f"ω_{j + 1} simulated")
        axes[0].plot(t, law[:, j], "k--", lw=1, label="closed form" if j == 0 else None)
        axes[1].plot(t, err[:, j].clip(min=1e-17), color=colors[j])
    axes[2].plot(t, omega[:, 0] / omega[:, -1], lw=2, label="simulated")
    axes[2].plot(t, law[:, 0] / law[:, -1], "k--", lw=1, label="closed form")
    titles = ["SNR singular values ω_j(t)", "relative error |sim − law| / law", "ω_max / ω_min"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("t / N")
        ax.grid(alpha=0.3)
        if adaptive:
            ax.set_xscale("log")
    axes[0].set_yscale("log" if adaptive else "linear")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(
        f"Continually renormalized gradient flow, C={run.num_classes}, N={run.per_class}, "
        f"P={run.dim}: simulation vs C² log ω + C ω² + ω⁴/4 = a_j + t/N"
    )
    return save_figure(fig, out, FIGURE_NAME, ("png", "pdf"))
