"""SPEC §5: the closed-form central-path law against the continually renormalized gradient flow
simulated through the SPEC §3 code, and the fit helper for measured SNR singular values."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.integrate import solve_ivp

import ncfast
from ncfast import theory
from ncfast.backend import reference
from ncfast.cli import main
from tests.helpers import oracle
from tests.helpers.feeding import stats_from
from tests.helpers.synthetic_features import F64, make_data
from tests.helpers.tolerances import EPS


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def omega_tensor(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def analytic_velocity(features: torch.Tensor, c: int) -> torch.Tensor:
    """The derived flow on the manifold: every column of class c moves by (1/N) U diag(ω/(C+ω²)²)
    Vᵀ e_c (module docstring of ncfast.theory), from an SVD of the SNR only."""
    n = features.shape[1] // c
    u, s, vh = torch.linalg.svd(theory.snr_of_features(features, c), full_matrices=False)
    w = s[: c - 1]
    mean_velocity = (u[:, : c - 1] * (w / (c + w.square()).square())) @ vh[: c - 1] / n
    return mean_velocity.repeat_interleave(n, dim=1)


def grouped_features(c: int, n: int, p: int, seed: int, **kwargs) -> torch.Tensor:
    """tests.helpers.synthetic_features.make_data's features (anisotropic within-class spread,
    bounded conditioning) as a class-grouped ``[P, C·N]`` matrix."""
    features, labels, _, _ = make_data([n] * c, p, seed, **kwargs)
    return features[torch.argsort(labels, stable=True)].T.contiguous()


def random_labels_layout(features: torch.Tensor, c: int):
    """Rows [C·N, P] and labels of a class-grouped feature matrix [P, C·N]."""
    n = features.shape[1] // c
    return features.T.contiguous(), torch.arange(c).repeat_interleave(n)


# ----------------------------------------------------------------------------- L_LS path


@pytest.mark.parametrize(("c", "n", "p"), [(2, 5, 3), (3, 4, 4), (5, 6, 12)])
def test_least_squares_loss_equals_metrics_and_oracle(c, n, p, seed):
    g = gen(seed)
    # Raw features: anisotropic spread, a large global offset, not on the manifold.
    h = grouped_features(c, n, p, seed, offset=50.0 * p**0.5)
    loss = float(theory.least_squares_loss(h, c))

    rows, labels = random_labels_layout(h, c)
    stats = stats_from(rows, labels, c, p)
    weight = torch.randn(c, p, dtype=F64, generator=g)
    expected = ncfast.nc_metrics(stats, weight=weight)["loss_ls"]
    # Each path rounds h − μ_c by eps·max|h|, against within-class deviations d whose thinnest
    # direction has variance λ_min(Σ_W) (SPEC §1: ‖h‖ times the spread), over N samples, then
    # solves the centered normal equations K (SPEC §3): N·eps·(max|h|·max|d|/λ_min + cond(K)).
    means, _ = stats.finalized()
    spread = float((rows - means[labels]).abs().max())
    lam_min = float(torch.linalg.eigvalsh(stats.sigma_w)[0])
    k, _, _ = reference.centered_normal_equations(means, stats.priors, stats.sigma_w, 0.0)
    kappa = float(h.abs().max()) * spread / lam_min + float(torch.linalg.cond(k))
    rtol = c * n * EPS * kappa
    assert loss == pytest.approx(expected, rel=rtol)
    brute = oracle.nc_metrics(rows.numpy(), labels.numpy(), c, weight.numpy())["loss_ls"]
    assert loss == pytest.approx(brute, rel=rtol)


def test_least_squares_loss_on_manifold_is_half_sum_inverse(seed):
    c, n, p = 4, 5, 6
    w = omega_tensor(2.5, 1.0, 0.3)
    x = theory.initial_features(c, n, p, omega0=w, generator=gen(seed))
    expected = 0.5 * float((1.0 / (c + w.square())).sum())
    # On the manifold Σ_T = I + M̄M̄ᵀ/C has condition 1 + ω_max²/C; the statistics of N samples
    # and the solve err by ≤ N·eps·that.
    rtol = c * n * EPS * (1 + float(w.max()) ** 2 / c)
    assert float(theory.least_squares_loss(x, c)) == pytest.approx(expected, rel=rtol)


def test_autograd_gradient_of_loss_is_correct(seed):
    c, n, p = 3, 3, 3
    h = grouped_features(c, n, p, seed).requires_grad_(True)  # bounded conditioning
    assert torch.autograd.gradcheck(lambda x: theory.least_squares_loss(x, c), (h,))


def test_gradient_envelope_theorem(seed):
    """W̃_LS minimises the loss for fixed features, so the full autograd gradient equals the one
    with W̃_LS held fixed: a check that the differentiation through least_squares is consistent."""
    c, n, p = 3, 5, 4
    h = grouped_features(c, n, p, seed).requires_grad_(True)  # bounded conditioning
    (full,) = torch.autograd.grad(theory.least_squares_loss(h, c), h)

    means, sigma_w, _ = theory.feature_statistics(h, c)
    priors = torch.full((c,), 1.0 / c, dtype=F64)
    weight, bias = reference.least_squares(means.detach(), priors, sigma_w.detach(), 0.0)
    frozen = reference.mse_loss(weight, bias, means, priors, sigma_w, 0.0)
    (partial,) = torch.autograd.grad(frozen, h)
    # The two differ by the stationarity residual of the computed W̃_LS: the solve in K (SPEC §3)
    # is accurate to cond(K)·eps, over statistics of N samples.
    k, _, _ = reference.centered_normal_equations(means.detach(), priors, sigma_w.detach(), 0.0)
    atol = c * n * float(torch.linalg.cond(k)) * EPS * float(full.abs().max())
    torch.testing.assert_close(full, partial, rtol=0, atol=atol)


# ----------------------------------------------------------------------------- projection


def test_tangent_projection_is_orthogonal_projection_off_manifold(seed):
    c, n, p = 3, 4, 5
    x = grouped_features(c, n, p, seed, mix_condition=30.0)
    grad = torch.randn(p, c * n, dtype=F64, generator=gen(seed))
    proj = theory.tangent_projection(grad, x, c)
    _, _, z = theory.feature_statistics(x, c)
    # The projection solves a Sylvester equation in K = Z Zᵀ through its eigendecomposition:
    # every identity below holds to P·cond(K)·eps relative.
    tol = p * float(torch.linalg.cond(z @ z.T)) * EPS
    # tangent: the derivative of Σ_W along proj vanishes
    d_sigma = proj @ z.T + z @ proj.T
    assert d_sigma.abs().max() <= tol * grad.norm() * z.norm()
    # idempotent and orthogonal: G − ΠG ⟂ ΠG, and G − ΠG = S Z with S symmetric
    again = theory.tangent_projection(proj, x, c)
    torch.testing.assert_close(again, proj, rtol=0, atol=tol * float(grad.norm()))
    normal = grad - proj
    assert abs(float((normal * proj).sum())) <= tol * float(grad.square().sum())
    s = normal @ torch.linalg.pinv(z)
    torch.testing.assert_close(s, s.T, rtol=0, atol=tol * float(s.norm()))
    torch.testing.assert_close(s @ z, normal, rtol=0, atol=tol * float(normal.norm()))
    # Σ_W is a first integral: a tiny step along proj changes it only to second order. The
    # change is step²·proj projᵀ/(CN), the first-order term left by rounding (≤ step·tol·‖G‖‖Z‖
    # /(CN)) and the rounding of the two Σ_W themselves (≤ 2(CN + 2)·eps·max|x|² each).
    step = 1e-6
    _, sigma_step, _ = theory.feature_statistics(x + step * proj, c)
    _, sigma_0, _ = theory.feature_statistics(x, c)
    bound = (step**2 * proj.square().sum() + step * tol * grad.norm() * z.norm()) / (c * n)
    bound += 4 * (c * n + 2) * EPS * x.abs().max() ** 2
    assert (sigma_step - sigma_0).abs().max() <= bound


def test_projected_gradient_moves_only_class_means(seed):
    c, n, p = 4, 5, 7
    x = theory.initial_features(c, n, p, omega0=omega_tensor(3.0, 1.2, 0.4), generator=gen(seed))
    velocity = theory.flow_velocity(x, c)
    torch.testing.assert_close(velocity, analytic_velocity(x, c), rtol=1e-10, atol=1e-14)
    blocks = velocity.reshape(p, c, n)
    torch.testing.assert_close(blocks, blocks[:, :, :1].expand_as(blocks), rtol=0, atol=1e-14)


def test_renormalize_whitens_and_keeps_snr_singular_values(seed):
    c, n, p = 4, 6, 5
    # cond(Σ_W) = 1e4 (mixing condition 100), a common offset: a real test of the whitening.
    h = grouped_features(c, n, p, seed, mix_condition=100.0, offset=7.0 * p**0.5)
    x = theory.renormalize(h, c)
    _, sigma_h, _ = theory.feature_statistics(h, c)
    kappa = float(torch.linalg.cond(sigma_h))
    # W = Σ_W^{-1/2} from a backward-stable eigendecomposition (error E with ‖E‖ ≤ P·eps·‖Σ_W‖):
    # W Σ_W W − I = −W E W, so ‖·‖ ≤ P·eps·‖Σ_W‖·‖W‖² = P·cond(Σ_W)·eps (measured: ≤ 0.2 of it).
    _, sigma_w, _ = theory.feature_statistics(x, c)
    atol = p * kappa * EPS
    torch.testing.assert_close(sigma_w, torch.eye(p, dtype=F64), rtol=0, atol=atol)
    # Zero in exact arithmetic: the centering rounds at max|h| (then whitened: × ‖W‖₂, √P entries)
    # and the mean over N columns adds N·eps·max|x|.
    w_norm = float(torch.linalg.matrix_norm(reference.psd_inv_sqrt(sigma_h)[0], ord=2))
    mean_bound = EPS * (p**0.5 * w_norm * float(h.abs().max()) + c * n * float(x.abs().max()))
    assert x.mean(dim=1).abs().max() <= mean_bound
    rows, labels = random_labels_layout(h, c)
    expected = ncfast.nc_metrics(stats_from(rows, labels, c, p))
    got = torch.linalg.svdvals(theory.snr_of_features(x, c))[: c - 1]
    # SNR = W M̄ with W off by P·cond·eps relative: singular values off by that times ω_1, i.e.
    # relative to ω_j by P·cond·eps·ω_1/ω_{C−1}.
    omega = expected["snr_singular_values"]
    rtol = p * kappa * EPS * float(omega[0] / omega[-1])
    torch.testing.assert_close(got, omega, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------- simulator


@pytest.mark.parametrize(
    ("c", "n", "p", "omega0", "dt", "steps"),
    [(3, 4, 4, (1.0, 0.5), 2.0, 110), (4, 3, 5, (1.2, 0.7, 0.35), 3.0, 120)],
)
def test_simulation_matches_closed_form(c, n, p, omega0, dt, steps, seed):
    x0 = theory.initial_features(c, n, p, omega0=omega_tensor(*omega0), generator=gen(seed))
    run = theory.simulate_central_path(x0, c, steps=steps, dt=dt)
    closed = theory.snr_closed_form(run.omega[0], run.times, c, n)
    growth = run.omega[-1] / run.omega[0]
    assert bool((growth >= 3.0).all()), growth
    rel = ((run.omega - closed) / closed).abs().max()
    assert rel <= 1e-3
    assert rel <= 1e-6  # RK4 with this dt is far better than the bar
    # A different time scaling (e.g. a summed loss, t/(CN)) is far off: the test can fail.
    wrong = theory.snr_closed_form(run.omega[0], run.times, c, c * n)
    assert ((run.omega - wrong) / wrong).abs().max() > 0.1
    # Σ_W = I is kept (renormalization restores it exactly; the step barely leaves it)
    assert run.manifold_drift.max() < 1e-8
    _, sigma_w, _ = theory.feature_statistics(run.features, c)
    torch.testing.assert_close(sigma_w, torch.eye(p, dtype=F64), rtol=0, atol=1e-13)
    expected_loss = 0.5 * (1.0 / (c + run.omega.square())).sum(dim=1)
    torch.testing.assert_close(run.loss_ls, expected_loss, rtol=1e-12, atol=0)
    assert bool((run.loss_ls.diff() < 0).all())


def test_singular_vectors_stay_fixed(seed):
    c, n, p = 4, 4, 6
    x0 = theory.initial_features(c, n, p, omega0=omega_tensor(2.0, 1.0, 0.5), generator=gen(seed))
    run = theory.simulate_central_path(x0, c, steps=40, dt=10.0)
    snr_t = theory.snr_of_features(run.features, c)
    reconstructed = run.u0 @ torch.diag(run.omega[-1]) @ run.v0.T
    assert (snr_t - reconstructed).norm() < 1e-9 * snr_t.norm()


def test_corollaries_long_run(seed):
    """Corollary 1: ω_j ~ (4t/N)^{1/4} and ω_max/ω_min → 1; Corollary 2: SNR_t/ω_max → Û_0V̂_0ᵀ
    (Eq. 10) and X_t/ω_max → (Û_0V̂_0ᵀ)⊗1ᵀ (Eq. 11). Adaptive steps reach t/N ~ 1e6."""
    c, n, p = 3, 4, 4
    x0 = theory.initial_features(c, n, p, omega0=omega_tensor(1.5, 0.3), generator=gen(seed))
    run = theory.simulate_central_path(x0, c, steps=120, max_log_step=0.05)
    assert float(run.times[-1]) / n > 1e6
    closed = theory.snr_closed_form(run.omega[0], run.times, c, n)
    assert ((run.omega - closed) / closed).abs().max() < 1e-5

    spread = run.omega[:, 0] / run.omega[:, -1]
    assert spread[0] == pytest.approx(5.0, rel=1e-12)
    assert bool((spread.diff() < 0).all())
    assert spread[-1] < 1 + 1e-4
    torch.testing.assert_close(spread, closed[:, 0] / closed[:, -1], rtol=1e-5, atol=0)

    # Eq. 10: with fixed singular vectors the distance is ‖ω/ω_max − 1‖.
    predicted = (run.omega / run.omega[:, :1] - 1).norm(dim=1)
    torch.testing.assert_close(run.alignment, predicted, rtol=1e-4, atol=1e-9)
    assert run.alignment[0] > 0.5 and run.alignment[-1] < 1e-4
    # Eq. 11: X_t = M̄_t ⊗ 1ᵀ + Z with fixed within-class deviations (‖Z‖² = C·N·P when Σ_W = I,
    # orthogonal to the means part), so the distance decays like 1/ω_max ~ t^{-1/4}.
    expected = (n * run.alignment.square() + c * n * p / run.omega[:, 0].square()).sqrt()
    expected = expected / math.sqrt(n * (c - 1))
    torch.testing.assert_close(run.feature_alignment, expected, rtol=1e-8, atol=0)
    assert bool((run.feature_alignment.diff() < 0).all()) and run.feature_alignment[-1] < 0.03

    asymptote = (4 * run.times[-1] / n) ** 0.25
    assert float(run.omega[-1, -1] / asymptote) == pytest.approx(1.0, abs=2e-3)


def test_simulator_bad_inputs(seed):
    x = theory.initial_features(3, 4, 4, generator=gen(seed))
    with pytest.raises(ValueError, match="dt must be a positive"):
        theory.simulate_central_path(x, 3, steps=2, dt=0.0)
    with pytest.raises(ValueError, match="steps must be an integer ≥ 0"):
        theory.simulate_central_path(x, 3, steps=-1)
    with pytest.raises(ValueError, match=r"shape \[P, C·N\]"):
        theory.simulate_central_path(x[:, :-1], 3, steps=1)
    with pytest.raises(ValueError, match="NaN or inf"):
        theory.simulate_central_path(x * float("nan"), 3, steps=1)
    with pytest.raises(ValueError, match="C·\\(N−1\\)"):
        theory.initial_features(3, 2, 4)
    with pytest.raises(ValueError, match="must be ≥ C − 1"):
        theory.initial_features(5, 4, 3)
    with pytest.raises(ValueError, match="omega0 must hold 2 positive"):
        theory.initial_features(3, 4, 4, omega0=omega_tensor(1.0, -1.0))
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        theory.least_squares_loss(np.zeros((3, 6)), 3)


# ----------------------------------------------------------------------------- closed form


def test_closed_form_round_trip_and_shapes():
    c, n = 5, 7
    omega0 = torch.logspace(-6, 3, 4, dtype=F64)
    t = torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-8, 15, 40, dtype=F64)])
    omega = theory.snr_closed_form(omega0, t, c, n)
    assert omega.shape == (len(t), len(omega0)) and omega.dtype == F64
    torch.testing.assert_close(omega[0], omega0, rtol=0, atol=0)
    lhs = theory.central_path_potential(omega, c)
    rhs = theory.central_path_potential(omega0, c)[None, :] + t[:, None] / n
    terms = torch.stack(
        [c * c * omega.log().abs(), c * omega.square(), omega.pow(4) / 4, rhs.abs()]
    ).amax(dim=0)
    assert ((lhs - rhs).abs() / terms).max() <= 1e-12
    assert bool((omega.diff(dim=0) >= 0).all())
    assert bool((omega[-1] > omega[1]).all())
    # empty inputs keep their shapes
    assert theory.snr_closed_form(omega0, torch.zeros(0, dtype=F64), c, n).shape == (0, 4)


def test_closed_form_solves_the_ode():
    """Independent of the integrated law: scipy integrates dω/dt = (1/N) ω/(C+ω²)²."""
    c, n = 3, 4
    omega0 = np.array([2.0, 0.7])
    t = np.linspace(0, 400, 9)
    sol = solve_ivp(
        lambda _t, w: w / (n * (c + w**2) ** 2),
        (0, 400),
        omega0,
        t_eval=t,
        rtol=1e-12,
        atol=1e-14,
        method="DOP853",
    )
    got = theory.snr_closed_form(torch.from_numpy(omega0), torch.from_numpy(t), c, n)
    np.testing.assert_allclose(got.numpy(), sol.y.T, rtol=1e-9)


def test_closed_form_asymptote():
    c, n = 4, 10
    t = torch.tensor([1e8, 1e12, 1e16], dtype=F64)
    omega = theory.snr_closed_form(omega_tensor(3.0, 0.01), t, c, n)
    ratio = omega / (4 * t[:, None] / n) ** 0.25
    assert bool(((ratio - 1).abs().diff(dim=0) < 0).all())
    assert (ratio[-1] - 1).abs().max() < 1e-5
    assert float(omega[-1, 0] / omega[-1, 1]) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    ("omega0", "t", "c", "n", "error", "match"),
    [
        (omega_tensor(1.0, 0.0), omega_tensor(1.0), 3, 2, ValueError, "omega0 must be > 0"),
        (omega_tensor(1.0, -2.0), omega_tensor(1.0), 3, 2, ValueError, "omega0 must be > 0"),
        (omega_tensor(1.0, math.nan), omega_tensor(1.0), 3, 2, ValueError, "omega0 contains NaN"),
        (torch.ones(2, 1, dtype=F64), omega_tensor(1.0), 3, 2, ValueError, "omega0 must be 1-D"),
        (omega_tensor(1.0), torch.ones(2, 2, dtype=F64), 3, 2, ValueError, "t must be 1-D"),
        (omega_tensor(1.0), omega_tensor(-1.0), 3, 2, ValueError, "t must be ≥ 0"),
        (omega_tensor(1.0), omega_tensor(math.inf), 3, 2, ValueError, "t contains NaN or inf"),
        (omega_tensor(1.0, 2.0, 3.0), omega_tensor(1.0), 3, 2, ValueError, "at most 2"),
        (
            omega_tensor(1.0),
            omega_tensor(1.0),
            1,
            2,
            ValueError,
            "num_classes must be an integer ≥ 2",
        ),
        (
            omega_tensor(1.0),
            omega_tensor(1.0),
            3,
            0,
            ValueError,
            "per_class must be an integer ≥ 1",
        ),
        (omega_tensor(1.0), omega_tensor(1.0), 3.0, 2, TypeError, "num_classes must be an int"),
        ("abc", omega_tensor(1.0), 3, 2, TypeError, "omega0 must be a 1-D tensor"),
    ],
)
def test_closed_form_bad_inputs(omega0, t, c, n, error, match):
    with pytest.raises(error, match=match):
        theory.snr_closed_form(omega0, t, c, n)


# ----------------------------------------------------------------------------- fit


@pytest.mark.parametrize(("c", "n", "time_scale"), [(3, 4, 1.0), (10, 50, 390.0)])
def test_fit_recovers_closed_form_constants(c, n, time_scale):
    """Flow time t = time_scale · epoch: on the central path c = (N/time_scale)(C², C, ¼)."""
    epochs = torch.linspace(0, 300, 40, dtype=F64)
    omega0 = torch.linspace(0.3, 2.0, c - 1, dtype=F64)
    omega = theory.snr_closed_form(omega0, epochs * time_scale, c, n)
    fit = theory.fit_central_path(epochs, omega)
    expected = [n / time_scale * k for k in (c * c, c, 0.25)]
    assert [fit["c1"], fit["c2"], fit["c3"]] == pytest.approx(expected, rel=1e-6)
    assert fit["c1_over_c3"] == pytest.approx(4 * c * c, rel=1e-6)
    assert fit["c2_over_c3"] == pytest.approx(4 * c, rel=1e-6)
    torch.testing.assert_close(
        fit["a"], n / time_scale * theory.central_path_potential(omega0, c), rtol=1e-6, atol=1e-6
    )
    assert fit["r2_time"] == pytest.approx(1.0, abs=1e-12)
    assert fit["r2_omega"] == pytest.approx(1.0, abs=1e-10)
    torch.testing.assert_close(fit["predicted_omega"], omega, rtol=1e-7, atol=0)
    torch.testing.assert_close(fit["spread"], omega.max(1).values / omega.min(1).values)


def test_fit_with_noise_and_nonnegative_constants(seed):
    c, n = 4, 8
    epochs = torch.linspace(0, 200, 30, dtype=F64)
    omega = theory.snr_closed_form(omega_tensor(1.5, 0.8, 0.4), epochs * 5.0, c, n)
    noisy = omega * (1 + 1e-3 * torch.randn(omega.shape, dtype=F64, generator=gen(seed)))
    fit = theory.fit_central_path(epochs, noisy)
    assert min(fit["c1"], fit["c2"], fit["c3"]) >= 0
    assert fit["r2_omega"] > 0.99
    assert ((fit["predicted_omega"] - omega) / omega).abs().max() < 0.05
    # Data with no log term: the c1 ≥ 0 constraint is active and the fit stays exact.
    omega_pure = (torch.linspace(1, 3, 20, dtype=F64)[:, None] * omega_tensor(1.0, 1.1)) ** 0.5
    t_pure = 2.0 * omega_pure[:, 0] ** 2 + 0.5 * omega_pure[:, 0] ** 4
    fit_pure = theory.fit_central_path(t_pure, omega_pure[:, :1])
    assert fit_pure["c1"] >= 0 and fit_pure["r2_time"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    ("times", "omega", "match"),
    [
        (torch.arange(5.0), torch.ones(4, 2), "shape"),
        (torch.arange(5.0), -torch.ones(5, 2), "positive"),
        (torch.arange(5.0), torch.ones(5), "shape"),
        (torch.arange(2.0), torch.ones(2, 3), "at least 3 times"),
        (torch.zeros(5), torch.ones(5, 2), "not all be equal"),
        (torch.arange(5.0), torch.ones(5, 0), "J = 0"),
    ],
)
def test_fit_bad_inputs(times, omega, match):
    with pytest.raises(ValueError, match=match):
        theory.fit_central_path(times, omega)


def test_fit_accepts_numpy():
    epochs = np.linspace(0, 50, 12)
    omega = theory.snr_closed_form(omega_tensor(1.0, 0.5), torch.from_numpy(epochs), 3, 4)
    fit = theory.fit_central_path(epochs, omega.numpy())
    assert fit["c3"] == pytest.approx(1.0, rel=1e-6)  # N · ¼ with N = 4


def test_compare_with_closed_form_summarises_the_run(seed):
    # ncfast.theory_summary: the comparison the CLI prints and writes, from the library alone.
    from ncfast.theory_summary import compare_with_closed_form, simulation_record

    g = torch.Generator().manual_seed(seed)
    run = theory.simulate_central_path(theory.initial_features(3, 4, 4, generator=g), 3, 30)
    comparison = compare_with_closed_form(run)
    closed = theory.snr_closed_form(run.omega[0], run.times, 3, 4)
    assert torch.equal(comparison["closed_form"], closed)  # the same call, the same numbers
    summary = comparison["summary"]
    assert summary["max_relative_error"] == float(comparison["relative_error"].max())
    assert summary["max_relative_error"] < 1e-6  # RK4 at the adaptive default step (CLI test)
    growth = run.omega[-1] / run.omega[0]
    assert (summary["growth_min"], summary["growth_max"]) == (
        float(growth.min()),
        float(growth.max()),
    )
    assert summary["final_time"] == float(run.times[-1])
    record = simulation_record(run, comparison, seed=seed, dt=None, max_log_step=0.02)
    assert record["summary"] is summary and record["max_log_step"] == 0.02
    assert (
        simulation_record(run, comparison, seed=seed, dt=0.1, max_log_step=0.02)["max_log_step"]
        is None
    )  # a fixed-step run has no adaptive bound


# ----------------------------------------------------------------------------- CLI


def test_cli_simulate_writes_figure_and_series(tmp_path):
    out = tmp_path / "sim"
    args = ["theory", "simulate", "--classes", "3", "--per-class", "4", "--dim", "4"]
    args += ["--steps", "60", "--omega0", "1.0,0.5", "--seed", "3", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "max relative error" in result.output and "ω_max law" in result.output
    for suffix in ("png", "pdf", "json"):
        assert (out / f"theory_simulation.{suffix}").stat().st_size > 0
    series = json.loads((out / "theory_simulation.json").read_text())
    omega = torch.tensor(series["omega"], dtype=F64)
    assert omega.shape == (61, 2)
    torch.testing.assert_close(omega[0], omega_tensor(1.0, 0.5), rtol=1e-12, atol=0)
    closed = theory.snr_closed_form(omega[0], torch.tensor(series["times"], dtype=F64), 3, 4)
    torch.testing.assert_close(torch.tensor(series["omega_closed_form"], dtype=F64), closed)
    assert series["summary"]["max_relative_error"] < 1e-6
    assert series["summary"]["growth_min"] > 1.5


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--classes", "3", "--per-class", "2", "--dim", "4"], "C·\\(N−1\\)"),
        (["--classes", "3", "--per-class", "4", "--dim", "4", "--omega0", "1,2,3"], "C − 1 = 2"),
        (["--classes", "3", "--per-class", "4", "--dim", "4", "--omega0", "1,-2"], "positive"),
        (["--classes", "3", "--per-class", "4", "--dim", "4", "--dt", "0"], "--dt"),
        (["--classes", "1", "--per-class", "4", "--dim", "4"], "--classes"),
    ],
)
def test_cli_simulate_bad_input(tmp_path, extra, match):
    args = ["theory", "simulate", *extra, "--steps", "2", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert re.search(match, result.output), result.output
