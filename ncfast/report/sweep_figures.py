"""The figure of a learning-rate sweep (``ncfast sweep``): final test error against learning
rate, drawn from the sweep's selection (:meth:`ncfast.paper.sweep.Sweep.select`)."""

from __future__ import annotations

import os

from ncfast.report.figure_layout import LOSS_COLORS, OTHER_COLORS, new_figure, save_figure


def lr_sweep_figure(selection: dict, out_dir: str | os.PathLike, formats=("png", "pdf")):
    """Final test error against learning rate (log x): a panel per (dataset, network), a line
    per loss (mean over seeds), the selected rate circled, failed rates marked × at the top.
    Written as ``lr_sweep.<format>``; returns the paths."""
    from matplotlib.lines import Line2D

    entries = selection["selected"]
    datasets = list(dict.fromkeys(e["dataset"] for e in entries))
    rows: dict[str, list[str]] = {}
    for e in entries:
        rows.setdefault(e["dataset"], [])
        if e["net"] not in rows[e["dataset"]]:
            rows[e["dataset"]].append(e["net"])
    nrows = max(len(v) for v in rows.values())
    fig, axes = new_figure(nrows, len(datasets), (3.4 * len(datasets), 2.6 * nrows))
    losses = list(dict.fromkeys(e["loss"] for e in entries))
    colors = {
        loss: LOSS_COLORS.get(loss, OTHER_COLORS[k % len(OTHER_COLORS)])
        for k, loss in enumerate(losses)
    }
    for col, dataset in enumerate(datasets):
        for row in range(nrows):
            ax = axes[row][col]
            if row >= len(rows[dataset]):
                ax.set_visible(False)
                continue
            net = rows[dataset][row]
            cell = [e for e in entries if (e["dataset"], e["net"]) == (dataset, net)]
            _lr_panel(ax, f"{dataset} · {net}", cell, colors)
    handles = [Line2D([], [], color=colors[loss], marker="o", ms=3, label=loss) for loss in losses]
    handles.append(
        Line2D([], [], color="gray", marker="o", ms=9, mfc="none", ls="", label="selected")
    )
    handles.append(Line2D([], [], color="gray", marker="x", ls="", label="failed"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    return save_figure(fig, out_dir, "lr_sweep", formats)


def _lr_panel(ax, title: str, entries: list[dict], colors: dict) -> None:
    """One (dataset, network) panel of :func:`lr_sweep_figure`: a line per loss."""
    for e in entries:
        color = colors[e["loss"]]
        by_lr = {float(k): v for k, v in (e.get("test_error_by_lr") or {}).items()}
        if by_lr:
            lrs = sorted(by_lr)
            ax.plot(lrs, [by_lr[x] for x in lrs], "o-", color=color, ms=3, label=e["loss"])
            ax.plot([e["lr"]], [e["test_error"]], "o", ms=10, mfc="none", mec=color, mew=1.5)
        if e["lrs_failed"]:
            ax.plot(e["lrs_failed"], [1.0] * len(e["lrs_failed"]), "x", color=color)
    ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("learning rate", fontsize=8)
    ax.set_ylabel("final test error", fontsize=8)
    ax.tick_params(which="both", labelsize=7)
    ax.grid(True, which="major", alpha=0.3)


__all__ = ["lr_sweep_figure"]
