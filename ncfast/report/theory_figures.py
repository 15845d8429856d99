"""The figure of ``ncfast theory simulate``: a simulated central path against SPEC §5's law."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib import colormaps

from ncfast.report.figure_layout import new_figure, save_figure
from ncfast.theory import CentralPathRun
from ncfast.theory_summary import SIMULATION_NAME


def plot_simulation(
    run: CentralPathRun,
    closed_form: torch.Tensor,
    relative_error: torch.Tensor,
    out_dir: str | Path,
    adaptive: bool,
    formats: tuple[str, ...] = ("png", "pdf"),
) -> list[Path]:
    """Three panels over t/N: ω_j(t) simulated and closed form, their relative error, and
    ω_max/ω_min; log time axes for an ``adaptive`` run (it spans decades; t = 0 left out).
    Written as ``out_dir/theory_simulation.<format>``; returns the paths."""
    t = (run.times / run.per_class).numpy()
    first = 1 if adaptive and t.size > 1 else 0
    t = t[first:]
    omega = run.omega[first:].numpy()
    law = closed_form[first:].numpy()
    err = relative_error[first:].numpy()
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
    return save_figure(fig, out_dir, SIMULATION_NAME, formats)
