"""A simulated central path against SPEC §5's closed form: the comparison ``ncfast theory
simulate`` prints, plots and writes (the command line only parses and prints)."""

from __future__ import annotations

from typing import TypedDict

import torch

from ncfast.theory import CentralPathRun, snr_closed_form

# The files ``ncfast theory simulate`` writes: <name>.json (the record), <name>.png/.pdf.
SIMULATION_NAME = "theory_simulation"

TIME_UNITS = (
    "gradient-flow time of the per-sample averaged SPEC §3 loss L_LS w.r.t. the P×CN features; "
    "the closed form is C² log ω + C ω² + ω⁴/4 = a_j + t/N"
)


class ClosedFormComparison(TypedDict):
    """:func:`compare_with_closed_form`'s result: ``closed_form`` and ``relative_error`` are
    ``[S+1, C−1]`` like ``run.omega``; ``summary`` holds the headline numbers (floats)."""

    closed_form: torch.Tensor
    relative_error: torch.Tensor
    summary: dict[str, float]


def compare_with_closed_form(run: CentralPathRun) -> ClosedFormComparison:
    """The closed-form ω_j(t) at the run's times (from its ω_j(0)), the relative error
    ``|ω_sim − ω_law| / ω_law``, and a summary: the largest relative error, the growth of ω_j
    (min and max over j of ω_j(end) / ω_j(0)), the spread ω_max/ω_min and the alignment
    (Corollary 2) at the start and the end, the largest drift off the manifold, the final time.

    Args:
        run: a :func:`ncfast.theory.simulate_central_path` record.

    Returns:
        A :class:`ClosedFormComparison` (a plain dict).
    """
    closed = snr_closed_form(run.omega[0], run.times, run.num_classes, run.per_class)
    rel_error = ((run.omega - closed) / closed).abs()
    growth = run.omega[-1] / run.omega[0]
    spread = run.omega[:, 0] / run.omega[:, -1]
    summary = {
        "max_relative_error": float(rel_error.max()),
        "growth_min": float(growth.min()),
        "growth_max": float(growth.max()),
        "spread_start": float(spread[0]),
        "spread_end": float(spread[-1]),
        "alignment_start": float(run.alignment[0]),
        "alignment_end": float(run.alignment[-1]),
        "max_manifold_drift": float(run.manifold_drift.max()),
        "final_time": float(run.times[-1]),
    }
    return {"closed_form": closed, "relative_error": rel_error, "summary": summary}


def simulation_record(
    run: CentralPathRun,
    comparison: ClosedFormComparison,
    *,
    seed: int,
    dt: float | None,
    max_log_step: float,
) -> dict[str, object]:
    """The JSON-ready record of a simulation: the run's series, how it was integrated (``dt``;
    ``max_log_step`` only for an adaptive run, ``dt`` None), the closed form, the relative error,
    the summary and the time units."""
    record = run.to_dict()
    record.update(
        {
            "seed": seed,
            "dt": dt,
            "max_log_step": None if dt is not None else max_log_step,
            "omega_closed_form": comparison["closed_form"].tolist(),
            "relative_error": comparison["relative_error"].tolist(),
            "summary": comparison["summary"],
            "time_units": TIME_UNITS,
        }
    )
    return record
