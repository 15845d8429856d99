"""Guards of ncfast/theory_law.py that mutmut found missing (issue 21): each test fails on the
surviving mutants that bench/results/mutation.md lists with it (checked by running the mutant).

References are independent of the module: the SPEC §5 law solved in 60-digit ``decimal``
arithmetic, the ODE's first-order step, data made from a known law, scipy's non-negative least
squares, and the law's invariance to the units of ω."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from ncfast import theory_law
from ncfast.theory_law import (
    as_vector,
    central_path_potential,
    fit_central_path,
    snr_closed_form,
)
from tests.helpers.synthetic_features import F64
from tests.helpers.tolerances import EPS

SNR = r"^snr_closed_form: "
FIT = r"^fit_central_path: "


def tensor(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def law_times(c: tuple[float, float, float], omega: torch.Tensor) -> torch.Tensor:
    """The times at which ``c1 log ω + c2 ω² + c3 ω⁴ = t`` (a = 0): data obeying a known law."""
    return c[0] * omega.log() + c[1] * omega.square() + c[2] * omega.pow(4)


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("omega0", "t", "c", "n", "error", "match"),
    [
        ([1.0], [1.0], 1, 2, ValueError, SNR + "num_classes must be an integer ≥ 2"),
        ([1.0], [1.0], 3.0, 2, TypeError, SNR + "num_classes must be an integer"),
        ([1.0], [1.0], 3, 0, ValueError, SNR + "per_class must be an integer ≥ 1"),
        ([1.0], [1.0], 3, 2.0, TypeError, SNR + "per_class must be an integer"),
        ([[1.0]], [1.0], 3, 2, ValueError, SNR + "omega0 must be 1-D"),
        ([1.0], [[1.0]], 3, 2, ValueError, SNR + "t must be 1-D"),
        ([1.0], [math.nan], 3, 2, ValueError, SNR + "t contains NaN or inf"),
        ([1.0, 2.0, 3.0], [1.0], 3, 2, ValueError, SNR + "omega0 has 3 values"),
        ([1.0], [-1.0], 3, 2, ValueError, SNR + "t must be ≥ 0"),
    ],
)
def test_closed_form_errors_name_the_function_and_the_argument(omega0, t, c, n, error, match):
    with pytest.raises(error, match=match):
        snr_closed_form(torch.tensor(omega0, dtype=F64), torch.tensor(t, dtype=F64), c, n)


@pytest.mark.parametrize(
    ("times", "omega", "match"),
    [
        (torch.ones(5, 1, dtype=F64), torch.ones(5, 2, dtype=F64), FIT + "times must be 1-D"),
        (tensor(0, 1, 2, math.inf, 4), torch.ones(5, 2, dtype=F64), FIT + "times contains NaN"),
        (tensor(0, 1, 2, 3, 4), torch.ones(4, 2, dtype=F64), FIT + "omega must have shape"),
    ],
)
def test_fit_errors_name_the_function_and_the_argument(times, omega, match):
    with pytest.raises(ValueError, match=match):
        fit_central_path(times, omega)


@pytest.mark.parametrize(
    ("omega0", "t", "match"),
    [
        (torch.tensor([1.0 + 0.5j]), tensor(1.0), "omega0 must hold real numbers, got dtype"),
        (tensor(1.0), torch.tensor([True, False]), "t must hold real numbers, got dtype"),
    ],
)
def test_complex_or_boolean_values_are_refused(omega0, t, match):
    """Neither kind is cast silently (a complex value would lose its imaginary part)."""
    with pytest.raises(TypeError, match=SNR + match):
        snr_closed_form(omega0, t, 3, 2)
    with pytest.raises(TypeError, match="times must hold real numbers"):
        fit_central_path(t if t.dtype == torch.bool else omega0.repeat(4), torch.ones(2, 1))


def test_as_vector_returns_float64_values():
    for values in ([1, 2, 3], torch.tensor([1.5, 2.5], dtype=torch.float32), np.arange(3)):
        vector = as_vector(values, "x", "here")
        assert vector.dtype == F64
        assert vector.tolist() == [float(v) for v in values]


def test_lists_and_integers_solve_as_their_float64_values():
    """Lists, integer t and a per-class count that does not divide t exactly give the values of
    the float64 call bit for bit (int → float64 is exact; t/N must be taken in float64)."""
    expected = snr_closed_form(tensor(0.5, 2.0), tensor(0, 1, 2, 7), 3, 3)
    assert torch.equal(snr_closed_form([0.5, 2.0], [0, 1, 2, 7], 3, 3), expected)
    assert torch.equal(
        snr_closed_form(tensor(0.5, 2.0), torch.tensor([0, 1, 2, 7]), 3, 3), expected
    )


def test_potential_of_float32_omega_is_computed_in_float64():
    """ω⁴ of ω = 1e10 overflows float32 (max 3.4e38), not float64; the values are the float32
    ones, taken exactly."""
    omega = torch.tensor([1e10, 0.5], dtype=torch.float32)
    got = central_path_potential(omega, 3)
    w = omega.double().numpy()
    expected = 9 * np.log(w) + 3 * w**2 + w**4 / 4
    assert got.dtype == F64
    np.testing.assert_allclose(got.numpy(), expected, rtol=4 * EPS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_closed_form_follows_omega0_to_its_device():
    """t on the CPU, omega0 on CUDA: the result is on omega0's device, equal to the CPU one."""
    expected = snr_closed_form(tensor(0.5, 2.0), tensor(0.0, 3.0), 3, 2)
    got = snr_closed_form(tensor(0.5, 2.0).cuda(), tensor(0.0, 3.0), 3, 2)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- fit: its data


def test_fit_of_float32_or_integer_data_equals_fit_of_their_float64_values():
    """float32 ω and integer times convert exactly to float64: the same fit, bit for bit."""
    times = torch.arange(0, 40, 3)
    omega = snr_closed_form(tensor(0.5, 1.5), times.double(), 3, 2).float()
    expected = fit_central_path(times.double(), omega.double())
    for got in (fit_central_path(times, omega), fit_central_path(times.tolist(), omega)):
        assert [got[k] for k in ("c1", "c2", "c3")] == [expected[k] for k in ("c1", "c2", "c3")]
        assert torch.equal(got["predicted_omega"], expected["predicted_omega"])


def test_fit_refuses_a_zero_omega():
    omega = torch.ones(5, 2, dtype=F64)
    omega[2, 1] = 0.0
    with pytest.raises(ValueError, match=FIT + "omega must be positive and finite"):
        fit_central_path(torch.arange(5.0), omega)


@pytest.mark.parametrize(("num_t", "num_j"), [(4, 1), (2, 5)])
def test_fit_needs_three_times_and_more_equations_than_unknowns(num_t, num_j):
    omega = torch.arange(1, num_t * num_j + 1, dtype=F64).reshape(num_t, num_j)
    with pytest.raises(ValueError, match=FIT + "need at least 3 times and more equations"):
        fit_central_path(torch.arange(float(num_t)), omega)


@pytest.mark.parametrize(("num_t", "num_j", "span"), [(5, 1, 40.0), (3, 2, 40.0), (8, 2, 0.5)])
def test_fit_of_the_fewest_data_or_the_shortest_times_recovers_the_law(num_t, num_j, span):
    """T·J = J + 4 and T = 3 are enough, and times spanning less than one unit are fine: on the
    central path (C = num_j + 1 classes of N = 2) the fit gives back N·(C², C, ¼) in the time
    units of t, with κ = 1."""
    c, n = num_j + 1, 2
    times = torch.linspace(0.0, span, num_t, dtype=F64)
    omega = snr_closed_form(torch.linspace(0.4, 1.3, num_j, dtype=F64), times, c, n)
    fit = fit_central_path(times, omega)
    # The law holds to rounding at the data; the fit's normal equations amplify that by the
    # conditioning of the (column-scaled) design, ~1e6 for the tightest of these data.
    assert [fit["c1"], fit["c2"], fit["c3"]] == pytest.approx([n * c * c, n * c, n / 4], rel=1e-7)
    assert fit["kappa"] == 1.0
    torch.testing.assert_close(fit["predicted_omega"], omega, rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------- fit: solution


def test_a_law_without_log_term_has_exactly_zero_log_constant():
    """t = 2ω² + ω⁴/2 − 0.05 log ω: the unconstrained c1 is negative, so the best c ≥ 0 lies on
    the face c1 = 0, reported as exactly 0, with c2, c3 the least squares fit of that face."""
    omega = torch.linspace(1.0, 3.0, 12, dtype=F64)[:, None]
    times = law_times((-0.05, 2.0, 0.5), omega[:, 0])
    fit = fit_central_path(times, omega)
    w, t = omega[:, 0].numpy(), times.numpy()
    face = np.stack([w**2, w**4], axis=1)
    reference = np.linalg.lstsq(face - face.mean(axis=0), t - t.mean(), rcond=None)[0]
    assert fit["c1"] == 0.0
    # one well-conditioned 12 × 2 least squares problem solved two ways
    assert [fit["c2"], fit["c3"]] == pytest.approx(reference.tolist(), rel=1e-10)


def test_noisy_fit_is_the_nonnegative_least_squares_optimum(seed):
    """scipy's NNLS on the problem with the offsets a_j projected out (each j's rows centred)
    is the reference: the same minimum over c ≥ 0, found by an active-set method."""
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    times = torch.linspace(0, 200, 30, dtype=F64)
    omega = snr_closed_form(tensor(1.5, 0.8, 0.4), times * 5.0, 4, 8)
    omega = omega * (1 + 3e-3 * torch.randn(omega.shape, dtype=F64, generator=g))
    fit = fit_central_path(times, omega)
    w = omega.numpy()
    terms = np.stack([np.log(w), w**2, w**4], axis=-1)  # [T, J, 3]
    design = (terms - terms.mean(axis=0)).reshape(-1, 3)
    target = np.repeat(times.numpy() - times.numpy().mean(), w.shape[1])
    scale = np.linalg.norm(design, axis=0)
    reference, _ = nnls(design / scale, target)
    reference /= scale
    # Both solve the same least squares problem of condition ~1e4 (scaled): 1e-8 relative,
    # or absolute on the scale of the largest constant where a constant is 0 on one side.
    got = np.array([fit["c1"], fit["c2"], fit["c3"]])
    np.testing.assert_allclose(got, reference, rtol=1e-8, atol=1e-9 * reference.max())


def test_the_fit_is_invariant_to_the_units_of_omega():
    """ω in units k times smaller: c1 log(kω) = c1 log ω + c1 log k goes into a, c2 and c3 scale
    by k⁻² and k⁻⁴. For k = 1e8 the ω⁴ column is 1e32 times the log column: only a fit that
    scales each column finds the same law (a common scale would drop the small ones)."""
    times = torch.linspace(0, 300, 25, dtype=F64)
    omega = snr_closed_form(tensor(0.3, 1.0, 2.0), times, 4, 5)
    base = fit_central_path(times, omega)
    for k in (1e-6, 1e4, 1e8):
        fit = fit_central_path(times, omega * k)
        got = [fit["c1"], fit["c2"] * k**2, fit["c3"] * k**4]
        assert got == pytest.approx([base["c1"], base["c2"], base["c3"]], rel=1e-8)


def test_equally_good_faces_keep_all_three_constants():
    """ω constant in time: every combination of the three terms fits equally well (all columns
    constant), so the tie goes to the first face tried, all three constants, not a later one."""
    omega = torch.full((6, 2), 2.0, dtype=F64)
    fit = fit_central_path(torch.arange(6.0, dtype=F64), omega)
    assert min(fit["c1"], fit["c2"], fit["c3"]) > 0
    # the predicted ω of a law that cannot follow the data is still defined; R²_ω is not
    assert math.isnan(fit["r2_omega"])
    assert fit["r2_time"] == pytest.approx(0.0, abs=1e-12)


def test_r2_omega_is_defined_for_a_small_spread_of_omega():
    """Σ(ω − mean)² below 1 is still a spread: R²_ω of exact data is 1."""
    times = torch.linspace(0, 3, 10, dtype=F64)
    omega = snr_closed_form(tensor(0.2, 0.25), times, 3, 4)
    assert float((omega - omega.mean()).square().sum()) < 1
    assert fit_central_path(times, omega)["r2_omega"] == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------- the solver


def expm1_decimal(x: Decimal) -> Decimal:
    """e^x − 1 without cancellation: the series below 1e-6 (error < x⁵ < 1e-30 relative)."""
    if abs(x) < Decimal("1e-6"):
        return x + x * x / 2 + x**3 / 6 + x**4 / 24
    return x.exp() - 1


def law_root_decimal(num_classes: int, omega0: float, s: float) -> tuple[Decimal, Decimal]:
    """(ω, δ = log ω/ω0) of ``C² log ω + C ω² + ω⁴/4 = (same at ω0) + s`` in 60 digits, s ≥ 0:
    G(δ) = C² δ + C ω0² expm1(2δ) + ω0⁴ expm1(4δ)/4 = s, increasing and convex in δ, solved by
    Newton from an upper bound (monotone from above) to 1e-45 relative."""
    with localcontext() as ctx:
        ctx.prec = 60
        c, w0, target = Decimal(num_classes), Decimal(omega0), Decimal(s)
        e2, e4 = w0 * w0, w0**4

        def excess(d: Decimal) -> Decimal:
            return (
                c * c * d + c * e2 * expm1_decimal(2 * d) + e4 * expm1_decimal(4 * d) / 4 - target
            )

        def slope(d: Decimal) -> Decimal:
            return c * c + 2 * c * e2 * (2 * d).exp() + e4 * (4 * d).exp()

        d = Decimal(1)
        while excess(d) < 0:
            d *= 2
        for _ in range(200):
            step = excess(d) / slope(d)
            d -= step
            if abs(step) <= abs(d) * Decimal("1e-45") or step == 0:
                break
        return w0 * d.exp(), d


@pytest.mark.parametrize("num_classes", [2, 3, 1000])
def test_closed_form_is_accurate_to_rounding(num_classes):
    """Against the law solved in 60 digits, from a subnormal t to 1e16: ω = ω0·e^δ rounds by
    ≤ 1.5 ulp (exp, product) plus δ's own rounding eps·|δ|/2; δ solves G(δ) = s where every
    term of G has the sign of δ (no cancellation: relative error of a few eps in G), which
    moves δ by a few eps·s/G'(δ) ≤ a few eps·|δ| (G convex, G(0) = 0). Bound 2·eps·(1 + |δ|);
    seen ≤ 0.85 of it."""
    omega0 = tensor(1e-8, 0.3, 3.9, 1e3)
    t = tensor(2.0**-1070, 1e-20, 1.0, 1e16)
    # one ω0 a call: C = 2 has a single SNR singular value
    got = torch.cat([snr_closed_form(w0[None], t, num_classes, 1) for w0 in omega0], dim=1)
    for i, s in enumerate(t.tolist()):
        for j, w0 in enumerate(omega0.tolist()):
            reference, delta = law_root_decimal(num_classes, w0, s)
            error = abs(Decimal(float(got[i, j])) / reference - 1)
            assert error <= Decimal(2 * EPS) * (1 + abs(delta)), (s, w0, float(error))


def potential_root_decimal(
    c: tuple[float, float, float], base: float, s: float
) -> tuple[Decimal, Decimal] | None:
    """(ω, δ = log ω/base) of ``F(log ω) = F(log base) + s``, F(u) = c1 u + c2 e^{2u} + c3 e^{4u},
    in 60 digits, any sign of s; None where there is no root (c1 = 0 and F(log base) + s ≤ 0).
    G(δ) = c1 δ + c2 b² expm1(2δ) + c3 b⁴ expm1(4δ) = s is increasing: a bracket by doubling,
    then 300 bisections (to 2^-300 of the bracket)."""
    with localcontext() as ctx:
        ctx.prec = 60
        c1, c2, c3 = (Decimal(x) for x in c)
        b, target = Decimal(base), Decimal(s)
        b2, b4 = b * b, b**4
        if c1 == 0 and c2 * b2 + c3 * b4 + target <= 0:
            return None

        def g(d: Decimal) -> Decimal:
            return c1 * d + c2 * b2 * expm1_decimal(2 * d) + c3 * b4 * expm1_decimal(4 * d)

        lo, hi = Decimal(-1), Decimal(1)
        while g(hi) < target:
            lo, hi = hi, 2 * hi
        while g(lo) > target:
            lo, hi = 2 * lo, lo
        for _ in range(300):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if g(mid) < target else (lo, mid)
        d = (lo + hi) / 2
        return b * d.exp(), d


POTENTIALS = {  # (c1, c2, c3): each zero/nonzero pattern, weak and strong terms
    "log": (1.0, 0.0, 0.0),
    "weak log": (0.1, 0.0, 0.0),
    "square": (0.0, 1.5, 0.0),
    "fourth": (0.0, 0.0, 0.7),
    "square+fourth": (0.0, 2.0, 0.5),
    "log+square": (2.0, 1.0, 0.0),
    "log+fourth": (3.0, 0.0, 0.5),
    "all": (9.0, 3.0, 0.25),
    "weak log, strong fourth": (0.1, 0.0, 10.0),
}


@pytest.mark.parametrize("potential", POTENTIALS)
@pytest.mark.parametrize("base", [1e-3, 1.0, 30.0])
def test_the_potential_is_solved_to_rounding_from_any_base_and_increment(potential, base):
    """The solve behind both the closed form and the fit, called directly (the fit now starts
    from the measured ω, so its increments are residuals, tiny): increments of both signs from
    1e-6 to 30 in size, against the 60-digit root. Every term of G has the sign of δ (no
    cancellation), so the bound of the closed-form test holds: 2·eps·(1 + |δ|). Where the law
    has no root (c1 = 0, F(log base) + s ≤ 0, including exactly 0 from base 1) ω is 0."""
    c = POTENTIALS[potential]
    increments = [-30.0, -1.0, -1e-6, 0.0, 1e-6, 0.5, 1.0, 30.0]
    f_base = c[1] * base**2 + c[2] * base**4  # F(log base) + c1·log base, minus the log term
    if c[0] == 0 and base == 1.0:
        # F(0) + s = 0 exactly: no root. (Elsewhere the solve's b² = e^{2 log b} rounds, and
        # near that edge ω ~ sqrt(F(log b) + s) turns a rounding into a root of ~1e-5.)
        increments.append(-f_base)
    s = tensor(*increments)
    got = theory_law._solve_potential(torch.full_like(s, base), s, *c)
    for value, increment in zip(got.tolist(), increments, strict=True):
        root = potential_root_decimal(c, base, increment)
        if root is None:
            assert value == 0.0, (increment, value)
            continue
        reference, delta = root
        error = abs(Decimal(value) / reference - 1)
        assert error <= Decimal(2 * EPS) * (1 + abs(delta)), (increment, value, float(error))


def counted_expm1_calls(monkeypatch) -> list[int]:
    """A list that grows by one at each torch.expm1 call: the solve evaluates one expm1 per
    nonzero power term (c2, c3) at each Newton step."""
    calls: list[int] = []
    expm1 = torch.expm1

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return expm1(x)

    monkeypatch.setattr(torch, "expm1", counted)
    return calls


def test_newton_converges_in_a_few_steps(monkeypatch):
    """Newton from the analytic upper bracket (a bound from the dominant power term, a few
    units of log ω above the root at most; far from the root a step removes at least a quarter
    unit) then quadratic convergence: 10 steps on each grid, ω0 from 1e-3 or 1e-8 to 1e6 and t
    from 0 to 1e30. 20 leaves room; a plain bisection needs ~60 halvings to reach 1e-17, a
    loop that never stops early runs all 200, a bracket from a wrong target or a wrong slope
    takes 24 to 41 steps on one of the grids."""
    calls = counted_expm1_calls(monkeypatch)
    t = torch.cat([tensor(0.0), torch.logspace(-20, 30, 26, dtype=F64)])
    for smallest in (1e-3, 1e-8):
        calls.clear()
        snr_closed_form(torch.logspace(math.log10(smallest), 6, 10, dtype=F64), t, 12, 1)
        steps = len(calls) // 2  # c2 = C and c3 = 1/4 both nonzero: two expm1 a step
        assert 3 <= steps <= 20, (smallest, steps)


LAWS = {
    "log": (2.0, 0.0, 0.0),
    "square": (0.0, 1.5, 0.0),
    "fourth": (0.0, 0.0, 0.7),
    "log+square": (2.0, 1.0, 0.0),
    "log+fourth": (3.0, 0.0, 0.5),
    "square+fourth": (0.0, 2.0, 0.5),
    "all": (9.0, 3.0, 0.25),
    "steep square": (0.0, 10.0, 0.0),
    "weak log": (0.1, 0.0, 0.0),
    "weak log, strong fourth": (0.1, 0.0, 10.0),
}
RANGES = [(1e-3, 0.1), (0.05, 0.9), (0.5, 3.0), (1.2, 40.0)]


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize(("low", "high"), RANGES)
def test_fit_of_data_obeying_a_law_predicts_the_data(law, low, high):
    """ω_k on a grid, t_k from the law (a = 0): every combination of zero and nonzero
    constants, ω below and above 1. The fitted constants reproduce t to rounding (R²_t = 1)
    and, solved, give ω back: to 1e-9 (the constants are least squares estimates, ~1e-12
    relative) plus the law's conditioning: the fitted offset a is known to a few eps of the
    largest |t|, and an absolute error δ in F moves ω by δ over ω·F'(ω) = c1 + 2c2ω² + 4c3ω⁴
    (relative)."""
    c = LAWS[law]
    omega = torch.linspace(low, high, 12, dtype=F64)
    times = law_times(c, omega)
    fit = fit_central_path(times, omega[:, None])
    assert fit["r2_time"] == pytest.approx(1.0, abs=1e-12)
    slope = c[0] + 2 * c[1] * omega.square() + 4 * c[2] * omega.pow(4)
    tolerance = 1e-9 + 8 * EPS * (times.abs().max() + times.abs()) / slope
    error = (fit["predicted_omega"][:, 0] / omega - 1).abs()
    assert bool((error <= tolerance).all()), (error / tolerance).max()


def test_weak_log_law_over_four_decades_predicts_the_data():
    """t = 0.1·log ω for ω up to 1e4: the root in log ω (9.2) lies far above r/c1 = t/0.1 when
    r is mistaken for r·c1; the fitted law must still give ω back."""
    omega = torch.logspace(0, 4, 10, dtype=F64)
    fit = fit_central_path(law_times((0.1, 0.0, 0.0), omega), omega[:, None])
    assert [fit["c2"], fit["c3"]] == [0.0, 0.0]
    torch.testing.assert_close(fit["predicted_omega"][:, 0], omega, rtol=1e-9, atol=0)


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-1.0, 1.0)])
def test_log_law_of_unit_constant_predicts_the_data(low, high):
    """t = log ω (c1 = 1, the others 0): G(δ) = δ, whose Newton step from the bracket r + 1
    leaves an excess of exactly 1 (a value the solve must treat like any other) and lands on
    the root."""
    omega = torch.logspace(low, high, 10, dtype=F64)
    fit = fit_central_path(omega.log(), omega[:, None])
    assert [fit["c1"], fit["c2"], fit["c3"]] == pytest.approx([1.0, 0.0, 0.0], abs=1e-12)
    torch.testing.assert_close(fit["predicted_omega"][:, 0], omega, rtol=1e-12, atol=0)


def assert_solves_fitted_law(fit, times: torch.Tensor) -> int:
    """The fit's predicted ω solve its own law, ``c1 log ω + c2 ω² + c3 ω⁴ = a_j + t``, to
    rounding (checked in numpy from the returned constants), or are 0 where c1 = 0 and
    a_j + t ≤ 0 (no solution: the limit); returns how many are 0."""
    w_all = fit["predicted_omega"].numpy()
    rhs = fit["a"].numpy()[None, :] + times.numpy()[:, None]
    unsolvable = (fit["c1"] == 0) & (rhs <= 0)
    assert (w_all[unsolvable] == 0).all()
    w, rhs = w_all[~unsolvable], rhs[~unsolvable]
    assert (w > 0).all()
    terms = np.stack([fit["c1"] * np.log(w), fit["c2"] * w**2, fit["c3"] * w**4, rhs])
    # Per entry: each term rounds by eps, ω by ~eps, and a_j + t by eps of the larger (the
    # solve starts from the measured ω, so nothing larger enters): a few eps of that entry's
    # largest term. A solve started from ω = 1 would add eps·(c2 + c3), far above the terms of
    # an ω ≪ 1 (ω = 1e-3: ω⁴ = 1e-12).
    a_and_t = np.broadcast_to(
        np.maximum(np.abs(fit["a"].numpy())[None, :], np.abs(times.numpy())[:, None]), w_all.shape
    )[~unsolvable]
    scale = np.maximum(np.abs(terms).max(axis=0), a_and_t)
    assert (np.abs(terms[:3].sum(axis=0) - rhs) <= 16 * EPS * scale).all()
    return int(unsolvable.sum())


@pytest.mark.parametrize("law", ["log", "square", "fourth", "square+fourth", "all", "steep square"])
@pytest.mark.parametrize(("low", "high"), RANGES)
def test_predicted_omega_solves_the_fitted_law(law, low, high, seed):
    """Noisy data (0.1 %): whatever constants the fit finds, its predicted ω solve that law."""
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    omega = torch.linspace(low, high, 12, dtype=F64)
    times = law_times(LAWS[law], omega)
    noisy = omega[:, None] * (1 + 1e-3 * torch.randn(12, 2, dtype=F64, generator=g))
    assert_solves_fitted_law(fit_central_path(times, noisy), times)


@pytest.mark.parametrize(
    ("c", "low", "high", "zeros"),
    [((-1.0, 1.0, 0.0), 0.3, 2.0, 3), ((-0.2, 0.0, 1.0), 0.05, 0.9, 6)],
)
def test_a_fitted_law_without_log_term_has_no_solution_below_its_minimum(
    c, low, high, zeros, monkeypatch
):
    """Data with a negative log term: the fit keeps c1 = 0, and its law c2 ω² + c3 ω⁴ = a + t
    (> 0 for ω > 0) has no solution at the early times where a + t ≤ 0: ω is 0 there. Those
    entries are set aside at once: the solve takes the ~10 Newton steps of the others (one
    expm1 a step and power term: 9 and 11 calls here; 20 leaves room), not a search for a root
    that does not exist (~50)."""
    calls = counted_expm1_calls(monkeypatch)
    omega = torch.linspace(low, high, 12, dtype=F64)
    times = law_times(c, omega)
    fit = fit_central_path(times, omega[:, None])
    assert len(calls) <= 20
    assert fit["c1"] == 0.0
    assert assert_solves_fitted_law(fit, times) == zeros


def test_omega_that_never_moves_is_fitted_by_the_offsets_alone():
    """ω ≡ 1 (log ω = 0, ω² = ω⁴ = 1: the terms are constant, absorbed by a_j) at times before 0:
    no c ≥ 0 does better than c = 0, which is a fit (κ = 1, a_j = −mean t), not 'no fit'."""
    times = tensor(-4, -3, -2, -1)
    fit = fit_central_path(times, torch.ones(4, 2, dtype=F64))
    assert [fit["c1"], fit["c2"], fit["c3"]] == [0.0, 0.0, 0.0]
    torch.testing.assert_close(fit["a"], tensor(2.5, 2.5), rtol=4 * EPS, atol=0)
