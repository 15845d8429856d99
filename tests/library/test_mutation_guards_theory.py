"""Guards of the central-path simulator's machinery (ncfast/theory.py, issue 21): the record's
JSON form and dtypes, the step rule (fixed ``dt`` or the adaptive one from the smallest ω), the
overflow check of each Runge-Kutta stage, the progress bar and the errors' prefix. The dynamics
themselves are checked against the closed form in tests/library/test_theory.py."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import tqdm.auto

from ncfast import theory

F64 = torch.float64
FLOAT64_MAX = torch.finfo(F64).max


def features_on_the_manifold(c: int, n: int, p: int, seed: int) -> torch.Tensor:
    return theory.initial_features(c, n, p, generator=torch.Generator().manual_seed(seed))


def test_the_record_as_json_has_every_series_under_its_name(seed):
    c, n, p = 3, 4, 3
    run = theory.simulate_central_path(features_on_the_manifold(c, n, p, seed), c, steps=2)
    record = json.loads(json.dumps(run.to_dict()))
    assert record == {
        "num_classes": c,
        "per_class": n,
        "dim": p,
        "times": run.times.tolist(),
        "omega": run.omega.tolist(),
        "loss_ls": run.loss_ls.tolist(),
        "alignment": run.alignment.tolist(),
        "feature_alignment": run.feature_alignment.tolist(),
        "manifold_drift": run.manifold_drift.tolist(),
    }
    assert (run.num_classes, run.per_class, run.dim) == (c, n, p)
    # Every series is float64: the times and the drift are built from Python floats, which a
    # default-dtype tensor would round to float32.
    for name in ("times", "omega", "loss_ls", "alignment", "feature_alignment", "manifold_drift"):
        assert getattr(run, name).dtype == F64, name
    assert run.times.shape == (3,) and run.manifold_drift.shape == (2,)


def test_a_fixed_step_advances_time_by_dt(seed):
    c, n, p = 4, 5, 4
    dt = 0.37
    run = theory.simulate_central_path(features_on_the_manifold(c, n, p, seed), c, 3, dt=dt)
    # t accumulates dt three times: exact to a few ulps of 1.11.
    torch.testing.assert_close(run.times, torch.tensor([0.0, dt, 2 * dt, 3 * dt], dtype=F64))


def test_the_adaptive_step_follows_the_smallest_omega_of_the_previous_point(seed):
    # C = 4: three ω, so the smallest (the last) differs from the second.
    c, n, p, max_log_step = 4, 5, 4, 0.01
    run = theory.simulate_central_path(
        features_on_the_manifold(c, n, p, seed), c, 3, max_log_step=max_log_step
    )
    omega_min = run.omega[:-1, -1]
    assert bool((run.omega[:-1, 1] > omega_min).all())
    expected = max_log_step * n * (c + omega_min.square()).square()
    # The same formula in float64, accumulated: rounding ~1e-16 relative.
    torch.testing.assert_close(run.times.diff(), expected, rtol=1e-12, atol=0.0)


def first_stage_dt(features: torch.Tensor, c: int, scale: float) -> float | None:
    """A ``dt`` whose first Runge-Kutta stage ``x + (dt/2)·v`` (x: the renormalized features, as
    the simulation computes them) has largest magnitude ``scale`` exactly, or None. ``x`` ~1
    vanishes next to ``scale`` ~1e153; ``(dt/2)·max|v|`` rounds onto ``scale`` for some dt/2
    when the mantissa of max|v| exceeds the one of ``scale`` (the products then step by less
    than an ulp of ``scale``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the simulation of small features: the same bits
    try:
        x = theory.renormalize(features, c)
        velocity = theory.flow_velocity(x, c)
    finally:
        torch.set_num_threads(previous)
    largest = float(velocity.abs().max())
    if math.frexp(largest)[0] <= math.frexp(scale)[0]:
        return None
    half = scale / largest
    for _ in range(64):
        reached = float((x + half * velocity).abs().max())
        if reached == scale:
            return 2.0 * half
        half = math.nextafter(half, math.inf if reached < scale else -math.inf)
    return None


def overflow_case(c: int, n: int, p: int, seed: int, scale: float):
    """Features (rotated at random, seeded, until one fits: the flow is rotation-equivariant, the
    largest velocity entry is not) and a dt whose first stage reaches ``scale`` exactly."""
    generator = torch.Generator().manual_seed(seed)
    base = features_on_the_manifold(c, n, p, seed)
    for _ in range(200):
        rotation = torch.linalg.qr(torch.randn(p, p, dtype=F64, generator=generator))[0]
        features = rotation @ base
        dt = first_stage_dt(features, c, scale)
        if dt is not None:
            return features, dt
    raise AssertionError(f"no rotation of the features lets a stage reach {scale!r} exactly")


@pytest.mark.parametrize(
    ("c", "n", "scale"),
    [
        # Finite, but its square times C·N = 20 overflows float64 (0.49·20 = 9.8 × the max).
        (4, 5, 0.7 * math.sqrt(FLOAT64_MAX)),
        # The boundary: scale²·35 equals the largest float64 exactly (found by search).
        (5, 7, 2.266333183714746e153),
    ],
    ids=["square-overflows", "at-the-boundary"],
)
def test_a_stage_whose_squares_reach_the_float64_maximum_stops_the_run(seed, c, n, scale):
    assert scale < math.sqrt(FLOAT64_MAX) and scale * scale * (c * n) >= FLOAT64_MAX
    features, dt = overflow_case(c, n, 4, seed, scale)
    with pytest.raises(theory.SimulationOverflowError, match=re.escape(f"magnitude {scale:.3g},")):
        theory.simulate_central_path(features, c, 1, dt=dt)


def test_a_bar_shows_progress_only_when_asked(seed, monkeypatch):
    bars = []

    def spy(steps, **kwargs):
        bars.append(kwargs)
        return steps

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    c, n, p = 3, 4, 3
    x = features_on_the_manifold(c, n, p, seed)
    theory.simulate_central_path(x, c, 2)
    assert bars == []
    run = theory.simulate_central_path(x, c, 2, progress=True)
    assert bars == [{"desc": "central path", "leave": False}]
    assert run.times.shape == (3,)


def test_errors_name_simulate_central_path(seed):
    x = features_on_the_manifold(3, 4, 3, seed)
    with pytest.raises(ValueError, match=r"^simulate_central_path: steps must be an integer"):
        theory.simulate_central_path(x, 3, -1)
    with pytest.raises(TypeError, match=r"^simulate_central_path: features must be a torch"):
        theory.simulate_central_path(x.tolist(), 3, 1)
    with pytest.raises(ValueError, match=r"^simulate_central_path: dim P = 1 must be ≥ C − 1"):
        theory.simulate_central_path(x[:1], 3, 1)
