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


# ----------------------------------------------------------------------------- input checks
def bad_features_calls():
    """(name, call) of every public function that reads class-grouped features."""
    return [
        ("snr_of_features", lambda f, c: theory.snr_of_features(f, c)),
        ("least_squares_loss", lambda f, c: theory.least_squares_loss(f, c)),
        ("renormalize", lambda f, c: theory.renormalize(f, c)),
        ("tangent_projection", lambda f, c: theory.tangent_projection(f, f, c)),
        ("simulate_central_path", lambda f, c: theory.simulate_central_path(f, c, 1)),
    ]


def test_every_function_names_itself_and_the_argument_in_its_errors(seed):
    x = features_on_the_manifold(3, 4, 3, seed)
    for name, call in bad_features_calls():
        with pytest.raises(ValueError, match=rf"^{name}: num_classes must be an integer ≥ 2"):
            call(x, 1)
        with pytest.raises(TypeError, match=rf"^{name}: features must be a torch\.Tensor"):
            call(x.tolist(), 3)
        # No samples at all: 0 columns divide into any number of classes.
        with pytest.raises(ValueError, match=rf"^{name}: features must have shape \[P, C·N\]"):
            call(x[:, :0], 3)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((1, 4, 3), {}, r"num_classes must be an integer ≥ 2"),
        ((3, 1, 3), {}, r"per_class must be an integer ≥ 2"),
        ((3, 4, 0), {}, r"dim must be an integer ≥ 1"),
        ((3, 4, 1), {}, r"dim P = 1 must be ≥ C − 1 = 2"),
        ((3, 4, 10), {}, r"Σ_W needs C·\(N−1\) = 9 ≥ P = 10"),
        ((3, 4, 3), {"omega0": [1.0, 0.0]}, r"omega0 must hold 2 positive values"),
        ((3, 4, 3), {"omega0": [1.0, 2.0, 3.0]}, r"omega0 must hold 2 positive values"),
        ((3, 4, 3), {"omega0": [[1.0, 2.0]]}, r"omega0 must be 1-D"),
    ],
)
def test_initial_features_names_the_bad_argument(args, kwargs, message):
    with pytest.raises(ValueError, match=rf"^initial_features: {message}"):
        theory.initial_features(*args, **kwargs)


@pytest.mark.parametrize(
    ("c", "n", "p"),
    [
        (2, 2, 1),  # the smallest: C = 2, N = 2, P = 1 = C − 1 = C·(N − 1) / 2
        (4, 3, 3),  # P = C − 1
        (3, 4, 9),  # P = C·(N − 1)
    ],
)
def test_the_smallest_and_tightest_dimensions_are_accepted(seed, c, n, p):
    x = features_on_the_manifold(c, n, p, seed)
    assert x.shape == (p, c * n) and x.dtype == F64
    run = theory.simulate_central_path(x, c, 1, dt=0.1)
    assert run.omega.shape == (2, c - 1)


def test_a_dimension_beyond_the_within_class_degrees_of_freedom_is_refused(seed):
    # C·(N − 1) = 9 < P = 10 (< C·(N + 1) = 15): Σ_W would be singular.
    x = torch.randn(10, 12, dtype=F64, generator=torch.Generator().manual_seed(seed))
    with pytest.raises(ValueError, match=r"^simulate_central_path: Σ_W needs C·\(N−1\) = 9 ≥ P"):
        theory.simulate_central_path(x, 3, 1)


@pytest.mark.parametrize(
    ("kwargs", "valid"),
    [
        ({"max_log_step": 0.5}, True),
        ({"max_log_step": 0.0}, False),
        ({"max_log_step": 0.7}, False),
        ({"max_log_step": 1.2}, False),
        ({"max_log_step": math.nan}, False),
        ({"dt": 0.5}, True),
        ({"dt": 0.0}, False),
        ({"dt": math.inf}, False),
    ],
)
def test_the_step_settings_are_checked_at_both_ends(seed, kwargs, valid):
    x = features_on_the_manifold(3, 4, 3, seed)
    if valid:
        assert theory.simulate_central_path(x, 3, 1, **kwargs).times.shape == (2,)
        return
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"^simulate_central_path: {name} must be"):
        theory.simulate_central_path(x, 3, 1, **kwargs)


# ----------------------------------------------------------------------------- features model
@pytest.mark.parametrize("with_omega", [False, True], ids=["gaussian", "omega0"])
def test_initial_features_are_drawn_from_the_generator_only(seed, with_omega):
    c, n, p = 3, 5, 4
    omega0 = [3.0, 0.5] if with_omega else None

    def draw():
        generator = torch.Generator().manual_seed(seed)
        return theory.initial_features(c, n, p, omega0=omega0, generator=generator)

    first = draw()
    torch.manual_seed(seed + 1)  # the global generator differs between the draws
    torch.randn(7)
    second = draw()
    assert torch.equal(first, second)
    assert first.dtype == F64


def test_gaussian_initial_features_are_float64_draws_renormalized(seed):
    c, n, p = 3, 5, 4
    expected = theory.renormalize(
        torch.randn(p, c * n, dtype=F64, generator=torch.Generator().manual_seed(seed)), c
    )
    actual = theory.initial_features(c, n, p, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(actual, expected)


def test_initial_features_with_omega0_lie_on_the_manifold_with_those_values(seed):
    c, n, p = 4, 6, 5
    omega0 = torch.tensor([5.0, 2.0, 0.25], dtype=F64)
    x = theory.initial_features(
        c, n, p, omega0=omega0, generator=torch.Generator().manual_seed(seed)
    )
    means, sigma_w, _ = theory.feature_statistics(x, c)
    # Constructed exactly up to rounding of a P×P inverse square root and QR: ~1e-14.
    torch.testing.assert_close(sigma_w, torch.eye(p, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(means.mean(dim=0), torch.zeros(p, dtype=F64), rtol=0, atol=1e-12)
    omega = torch.linalg.svdvals(theory.snr_of_features(x, c))[: c - 1]
    torch.testing.assert_close(omega, omega0, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- statistics
def test_snr_centres_the_means_per_dimension(seed):
    """SNR = Σ_W^{-1/2} (M − μ_G 1ᵀ) from a float64 oracle, on features far from the origin
    with a different offset in every dimension (a mean over all entries would not remove it)."""
    c, n, p = 3, 6, 4
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(p, c * n, dtype=F64, generator=generator)
    x = x + torch.tensor([[40.0], [-25.0], [3.0], [90.0]], dtype=F64)
    blocks = x.reshape(p, c, n)
    means = blocks.mean(dim=2)
    deviations = (blocks - means[:, :, None]).reshape(p, -1)
    evals, evecs = torch.linalg.eigh(deviations @ deviations.T / (c * n))
    inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    expected = inv_sqrt @ (means - means.mean(dim=1, keepdim=True))
    # A well-conditioned P×P inverse square root: rounding ~1e-13 relative.
    torch.testing.assert_close(theory.snr_of_features(x, c), expected, rtol=1e-10, atol=1e-10)


def test_float32_inputs_are_computed_in_float64(seed):
    c, n, p = 3, 5, 4
    x = features_on_the_manifold(c, n, p, seed)
    x32 = x.float()
    x64 = x32.double()
    assert theory.renormalize(x32, c).dtype == F64
    for ours, oracle in zip(
        theory.feature_statistics(x32, c), theory.feature_statistics(x64, c), strict=True
    ):
        assert ours.dtype == F64
        torch.testing.assert_close(ours, oracle, rtol=0, atol=0)
    torch.testing.assert_close(
        theory.renormalize(x32, c), theory.renormalize(x64, c), rtol=0, atol=0
    )
    gradient = torch.randn(p, c * n, generator=torch.Generator().manual_seed(seed))
    projected = theory.tangent_projection(gradient, x, c)
    assert projected.dtype == F64
    torch.testing.assert_close(
        projected, theory.tangent_projection(gradient.double(), x, c), rtol=0, atol=0
    )


def test_the_projection_refuses_features_whose_within_class_spread_is_degenerate(seed):
    c, n, p = 3, 4, 3
    x = features_on_the_manifold(c, n, p, seed)
    flat = x.clone()
    flat[2] = 2.0 * flat[0] - flat[1]  # one direction without within-class spread
    with pytest.raises(ValueError, match=r"^tangent_projection: Σ_W of features is singular"):
        theory.tangent_projection(torch.ones_like(x), flat, c)


def test_small_problems_run_on_one_thread_and_restore_the_count(seed, monkeypatch):
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda k: (calls.append(k), real(k))[1])
    previous = torch.get_num_threads()
    # 4·3·3 entries: small.
    theory.simulate_central_path(features_on_the_manifold(3, 4, 3, seed), 3, 0)
    assert calls == [1, previous]
    calls.clear()
    # Exactly 2**16 entries (P = 128, C·N = 512): no longer small.
    x = features_on_the_manifold(8, 64, 128, seed)
    assert x.numel() == 1 << 16
    theory.simulate_central_path(x, 8, 0)
    assert calls == []


def test_the_projection_refuses_features_without_any_within_class_spread(seed):
    # Z = 0: K's eigenvalues all 0, on the bound itself (0 > 0 fails).
    c, n, p = 3, 4, 3
    means = torch.randn(p, c, 1, dtype=F64, generator=torch.Generator().manual_seed(seed))
    collapsed = means.expand(p, c, n).reshape(p, c * n)
    with pytest.raises(ValueError, match=r"^tangent_projection: Σ_W of features is singular"):
        theory.tangent_projection(torch.ones_like(collapsed), collapsed, c)


def test_the_projection_does_not_depend_on_the_scale_of_the_features(seed):
    """Π at s·X: Z scales by s, S by 1/s, S Z not at all; the singularity test is relative
    (K's eigenvalues 1e-12 × those at X here must still pass)."""
    c, n, p = 3, 4, 3
    x = features_on_the_manifold(c, n, p, seed)
    gradient = torch.randn(p, c * n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    # A well-conditioned P×P eigen-solve, rescaled: rounding ~1e-14 relative.
    torch.testing.assert_close(
        theory.tangent_projection(gradient, 1e-6 * x, c),
        theory.tangent_projection(gradient, x, c),
        rtol=1e-10,
        atol=1e-12,
    )
