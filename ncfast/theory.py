"""Dynamics on the central path (SPEC §5; HPD22 Thm. 3, Prop. 2, Cors. 1–2), λ = 0, balanced.

Two independent routes to the SNR singular values ω_j(t):

- :func:`snr_closed_form` solves the implicit law
  ``C² log ω + C ω² + ω⁴/4 = a_j + t/N`` (a_j fixed by ω_j(0)) for ω(t). It lives in
  :mod:`ncfast.theory_law` with :func:`fit_central_path` (the law fitted to a training run's
  ω_j); both are importable from here too.
- :func:`simulate_central_path` integrates the continually renormalized gradient flow (HPD22 Eq. 5)
  on the unconstrained-features model: L_LS is computed by the SPEC §3 code
  (:func:`ncfast.backend.reference.least_squares` and :func:`ncfast.backend.reference.mse_loss`),
  differentiated with autograd with respect to the features, projected on the tangent space of
  {X : Σ_W(X) = I}, stepped (classical RK4) and renormalized back onto that manifold.

Features are a matrix ``H [P, C·N]`` whose columns are grouped by class: column ``c·N + i`` is
sample i of class c (balanced, N per class).

Time units. t is the time of the gradient flow ``dX/dt = −Π_X ∇_X L_LS(X)`` where L_LS is the
SPEC §3 loss (per-sample *averaged*, with the ½: ``½ (1/CN) Σ_i ‖W̃_LS h̃_i − e_{y_i}‖²``) and ∇ is
the Euclidean (Frobenius) gradient with respect to the P×CN feature matrix. Then
``dω_j/dt = (1/N) ω_j / (C + ω_j²)²``. A loss summed over samples instead of averaged runs CN
times faster (t_sum = t / CN); a loss without the ½ runs twice as fast.

Derivation (checked numerically by tests/library/test_theory.py). Let Z be the within-class
deviations (columns z_{ci} = x_{ci} − μ_c) and K = Z Zᵀ (= CN·I on the manifold).

- Tangent space of {Σ_W = const} at X: Σ_W = Z Zᵀ/CN and Σ_i z_{ci} = 0 give
  dΣ_W = (ξZᵀ + Zξᵀ)/CN, so T_X = {ξ : sym(ξ Zᵀ) = 0}; its Frobenius-orthogonal complement is
  {S Z : S symmetric} (⟨ξ, SZ⟩ = tr(S · sym(Zξᵀ)) = 0).
- Projection: Π_X G = G − S Z with S symmetric solving the Lyapunov equation
  S K + K S = G Zᵀ + Z Gᵀ (solved in the eigenbasis of K: S_ab = B_ab / (k_a + k_b)).
- The gradient of L_LS(μ, Σ_W) at sample (c, i) is (1/N) g_c + (2/CN) Γ z_{ci}, where
  g_c = ∂L/∂μ_c and Γ = ∂L/∂Σ_W (∂Σ_W/∂μ_c = 0 because Σ_i z_{ci} = 0). On the manifold
  G Zᵀ = 2Γ, hence S = 2Γ/CN and Π G has columns (1/N) g_c: the flow moves the class means only,
  every sample of class c by the same amount, and Σ_W is a first integral.
- With Σ_W = I, zero global mean and M̄ = U diag(ω) Vᵀ: W_LS = V diag(ω/(C+ω²)) Uᵀ and
  L_LS = ½ Σ_j 1/(C + ω_j²), so ∂L/∂M̄ = −U diag(ω/(C+ω²)²) Vᵀ (Vᵀ1 = 0: the centering is
  inert) and dM̄/dt = (1/N) U diag(ω/(C+ω²)²) Vᵀ: U, V fixed, dω_j/dt = (1/N) ω_j/(C+ω_j²)².
  Separating variables, (C²/ω + 2Cω + ω³) dω = dt/N integrates to the law above.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ncfast.backend import reference
from ncfast.checks import check_int
from ncfast.errors import NCFastError
from ncfast.theory_law import (
    CentralPathFit,
    as_vector,
    central_path_potential,
    fit_central_path,
    snr_closed_form,
)

__all__ = [
    "CentralPathFit",
    "CentralPathRun",
    "central_path_potential",
    "feature_statistics",
    "fit_central_path",
    "flow_velocity",
    "initial_features",
    "least_squares_loss",
    "renormalize",
    "simulate_central_path",
    "snr_closed_form",
    "snr_of_features",
    "tangent_projection",
]

_F64 = torch.float64
# Below this many feature entries every op is tiny and intra-op threads only add overhead (and
# spin against other processes on a loaded machine: 10× slower on 2 shared cores).
_SINGLE_THREAD_NUMEL = 1 << 16


# ----------------------------------------------------------------------------- input checks


def _check_features(features: object, num_classes: int, where: str) -> tuple[int, int]:
    """(P, N) of a balanced, class-grouped feature matrix ``[P, C·N]``."""
    check_int(num_classes, "num_classes", 2, where)
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{where}: features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2 or features.shape[1] % num_classes or features.shape[1] == 0:
        raise ValueError(
            f"{where}: features must have shape [P, C·N] with C = {num_classes} classes of N "
            f"samples each (columns grouped by class), got {list(features.shape)}"
        )
    if not features.dtype.is_floating_point:
        raise TypeError(f"{where}: features must be floating point, got {features.dtype}")
    if not torch.isfinite(features.detach()).all():
        raise ValueError(f"{where}: features contain NaN or inf")
    return features.shape[0], features.shape[1] // num_classes


# ----------------------------------------------------------------------------- features model


def _class_blocks(features: torch.Tensor, num_classes: int) -> torch.Tensor:
    p = features.shape[0]
    return features.reshape(p, num_classes, -1)  # [P, C, N], column c·N + i → [:, c, i]


def feature_statistics(
    features: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class means ``[C, P]``, Σ_W ``[P, P]``, within-class deviations Z ``[P, C·N]``).

    Differentiable (plain tensor ops, float64): the statistics of SPEC §1 for balanced,
    class-grouped features, Σ_W divided by the number of samples.
    """
    x = _class_blocks(features.to(_F64), num_classes)
    means = x.mean(dim=2)  # [P, C]
    deviations = (x - means[:, :, None]).reshape(features.shape[0], -1)
    sigma_w = deviations @ deviations.T / deviations.shape[1]
    return means.T, sigma_w, deviations


def least_squares_loss(features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L_LS(H) of SPEC §3 (λ = 0) for balanced class-grouped features ``[P, C·N]``.

    W̃_LS comes from :func:`ncfast.backend.reference.least_squares` (differentiable: a Cholesky
    solve whenever Σ_T is well conditioned) and the loss from
    :func:`ncfast.backend.reference.mse_loss`, the code of the SPEC §3 decomposition; autograd
    through both gives ∇_H L_LS. Equals the ``loss_ls`` of :func:`ncfast.nc_metrics`.
    """
    _check_features(features, num_classes, "least_squares_loss")
    class_means, sigma_w, _ = feature_statistics(features, num_classes)
    priors = torch.full((num_classes,), 1.0 / num_classes, dtype=_F64, device=features.device)
    weight, bias = reference.least_squares(class_means, priors, sigma_w, 0.0)
    return reference.mse_loss(weight, bias, class_means, priors, sigma_w, 0.0)


def tangent_projection(
    gradient: torch.Tensor, features: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Orthogonal (Frobenius) projection of ``gradient [P, C·N]`` on the tangent space at
    ``features`` of the level set {X : Σ_W(X) = Σ_W(features)} (= {Σ_W = I} on the manifold).

    Π G = G − S Z with S symmetric solving S K + K S = G Zᵀ + Z Gᵀ, K = Z Zᵀ (module docstring).
    """
    p, _ = _check_features(features, num_classes, "tangent_projection")
    if gradient.shape != features.shape:
        raise ValueError(
            f"tangent_projection: gradient must have the shape of features "
            f"{list(features.shape)}, got {list(gradient.shape)}"
        )
    _, _, z = feature_statistics(features.detach(), num_classes)
    g = gradient.to(_F64)
    k_evals: torch.Tensor  # torch.linalg is unannotated (Any) in torch's stubs
    k_evecs: torch.Tensor
    k_evals, k_evecs = torch.linalg.eigh(z @ z.T)
    if not bool(k_evals.min() > p * torch.finfo(_F64).eps * k_evals.max()):
        raise ValueError(
            "tangent_projection: Σ_W of features is singular; the manifold {Σ_W = I} needs "
            "C·(N−1) ≥ P within-class deviations spanning R^P"
        )
    b = g @ z.T
    b = k_evecs.T @ (b + b.T) @ k_evecs
    s = k_evecs @ (b / (k_evals[:, None] + k_evals[None, :])) @ k_evecs.T
    return g - s @ z


def renormalize(features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Renormalized features Σ_W^{-1/2} (H − μ_G 1ᵀ) (HPD22 §3.1): zero global mean, Σ_W = I.

    The retraction of the simulator; it leaves the SNR singular values unchanged (invariance).
    """
    p, _ = _check_features(features, num_classes, "renormalize")
    x = features.detach().to(_F64)
    _, sigma_w, _ = feature_statistics(x, num_classes)
    inv_sqrt, rank = reference.psd_inv_sqrt(sigma_w)
    if rank < p:
        raise ValueError(
            f"renormalize: Σ_W has rank {rank} < P = {p}; renormalization needs C·(N−1) ≥ P "
            "within-class deviations spanning R^P"
        )
    return inv_sqrt @ (x - x.mean(dim=1, keepdim=True))


def snr_of_features(features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """SNR = Σ_W^{-1/2} M̄ ``[P, C]`` (SPEC §4) of balanced class-grouped features."""
    _check_features(features, num_classes, "snr_of_features")
    class_means, sigma_w, _ = feature_statistics(features.detach(), num_classes)
    mbar = (class_means - class_means.mean(dim=0)).T
    return reference.psd_inv_sqrt(sigma_w)[0] @ mbar


def initial_features(
    num_classes: int,
    per_class: int,
    dim: int,
    omega0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random point ``[P, C·N]`` of the manifold {Σ_W = I} with zero global mean.

    With ``omega0`` (C−1 positive values), the SNR singular values are exactly ``omega0`` and the
    singular vectors random; otherwise Gaussian features, renormalized.
    """
    where = "initial_features"
    c = check_int(num_classes, "num_classes", 2, where)
    n = check_int(per_class, "per_class", 2, where)
    p = check_int(dim, "dim", 1, where)
    _check_dims(c, n, p, where)
    if omega0 is None:
        h = torch.randn(p, c * n, dtype=_F64, generator=generator)
        return renormalize(h, c)
    omega = as_vector(omega0, "omega0", where)
    if omega.numel() != c - 1 or (omega <= 0).any():
        raise ValueError(f"{where}: omega0 must hold {c - 1} positive values, got {omega.tolist()}")
    # V: an orthonormal basis of 1⊥ in R^C (centered means); U: orthonormal in R^P.
    basis: torch.Tensor = torch.linalg.qr(
        torch.cat(
            [torch.ones(c, 1, dtype=_F64), torch.randn(c, c - 1, dtype=_F64, generator=generator)],
            dim=1,
        )
    )[0][:, 1:]
    u: torch.Tensor = torch.linalg.qr(torch.randn(p, c - 1, dtype=_F64, generator=generator))[0]
    mbar = u @ torch.diag(omega) @ basis.T  # [P, C]
    z = torch.randn(p, c, n, dtype=_F64, generator=generator)
    z = (z - z.mean(dim=2, keepdim=True)).reshape(p, c * n)
    z = reference.psd_inv_sqrt(z @ z.T / (c * n))[0] @ z
    return (mbar[:, :, None] + z.reshape(p, c, n)).reshape(p, c * n)


def _check_dims(c: int, n: int, p: int, where: str) -> None:
    if p < c - 1:
        raise ValueError(
            f"{where}: dim P = {p} must be ≥ C − 1 = {c - 1} so the SNR has C − 1 nonzero "
            "singular values"
        )
    if c * (n - 1) < p:
        raise ValueError(
            f"{where}: Σ_W needs C·(N−1) = {c * (n - 1)} ≥ P = {p} within-class degrees of "
            "freedom to be invertible; use more samples per class or a smaller dim"
        )


# ----------------------------------------------------------------------------- simulator


@dataclass
class CentralPathRun:
    """Record of :func:`simulate_central_path`; index k is time ``times[k]`` (k = 0 initial).

    - ``omega [S+1, C−1]``: SNR singular values (descending) of the renormalized features
    - ``loss_ls [S+1]``: L_LS of SPEC §3 at each recorded point
    - ``alignment [S+1]``: ‖SNR_t / ω_max(t) − Û_0 V̂_0ᵀ‖_F (Corollary 2, Eq. 10)
    - ``feature_alignment [S+1]``: ‖X_t/ω_max(t) − (Û_0V̂_0ᵀ)⊗1_Nᵀ‖_F / ‖(Û_0V̂_0ᵀ)⊗1_Nᵀ‖_F
      (Eq. 11)
    - ``manifold_drift [S]``: max ``|Σ_W − I|`` after each step, before renormalization
    - ``u0 [P, C−1]``, ``v0 [C, C−1]``: singular vectors of SNR at t = 0; ``features``: final X
    """

    num_classes: int
    per_class: int
    dim: int
    times: torch.Tensor
    omega: torch.Tensor
    loss_ls: torch.Tensor
    alignment: torch.Tensor
    feature_alignment: torch.Tensor
    manifold_drift: torch.Tensor
    u0: torch.Tensor
    v0: torch.Tensor
    features: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready series (lists of floats)."""
        return {
            "num_classes": self.num_classes,
            "per_class": self.per_class,
            "dim": self.dim,
            "times": self.times.tolist(),
            "omega": self.omega.tolist(),
            "loss_ls": self.loss_ls.tolist(),
            "alignment": self.alignment.tolist(),
            "feature_alignment": self.feature_alignment.tolist(),
            "manifold_drift": self.manifold_drift.tolist(),
        }


def flow_velocity(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The continually renormalized flow's velocity −Π_X ∇_X L_LS(X) (HPD22 Eq. 5) at balanced,
    class-grouped features ``x [P, C·N]`` on the manifold (module docstring: every sample of
    class c moves by the same (1/N) g_c)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(least_squares_loss(x, num_classes), x)
    return -tangent_projection(grad, x.detach(), num_classes)


def _rk4_step(x: torch.Tensor, dt: float, num_classes: int) -> torch.Tensor:
    k1 = flow_velocity(x, num_classes)
    k2 = flow_velocity(_stage(x, 0.5, k1, dt), num_classes)
    k3 = flow_velocity(_stage(x, 0.5, k2, dt), num_classes)
    k4 = flow_velocity(_stage(x, 1.0, k3, dt), num_classes)
    return _stage(x, 1.0 / 6.0, k1 + 2.0 * k2 + 2.0 * k3 + k4, dt)


class SimulationOverflowError(NCFastError, ValueError):
    """A step of the simulated flow left the range of float64 (the step ``dt`` is too large)."""


def _stage(x: torch.Tensor, fraction: float, velocity: torch.Tensor, dt: float) -> torch.Tensor:
    """``x + fraction·dt·velocity``, checked to stay where Σ_W (sums of squares over the C·N
    samples) is finite in float64: a too large ``dt`` overflows here, and Σ_W would then be
    inf/NaN and look singular."""
    out = x + (fraction * dt) * velocity
    scale = float(out.abs().max())
    if not math.isfinite(scale) or scale * scale * out.shape[1] >= torch.finfo(_F64).max:
        raise SimulationOverflowError(
            f"simulate_central_path: the Runge-Kutta step of dt={dt:.3g} moves the features to "
            f"magnitude {scale:.3g}, where their squares (Σ_W) overflow float64: the step is far "
            "too large for these features; use a smaller dt (or dt=None, which bounds each step)"
        )
    return out


def simulate_central_path(
    features: torch.Tensor,
    num_classes: int,
    steps: int,
    dt: float | None = None,
    max_log_step: float = 0.02,
    progress: bool = False,
) -> CentralPathRun:
    """Integrate the continually renormalized gradient flow from ``features [P, C·N]``.

    Each step: classical RK4 on dX/dt = −Π_X ∇_X L_LS(X) (autograd through the SPEC §3 code,
    projection of :func:`tangent_projection`), then renormalization back to Σ_W = I, zero global
    mean (:func:`renormalize`). The features are renormalized once before the first step.

    ``dt``: fixed step in flow time t (the time of :func:`snr_closed_form`). ``dt=None`` picks
    ``dt_k = max_log_step · N · (C + ω_min²)²`` per step, which bounds the growth of every log ω_j
    per step by ``max_log_step`` (the relative rate is 1/(N(C+ω_j²)²) ≤ 1/(N(C+ω_min²)²)) and
    makes t grow geometrically once ω ≫ √C: long runs (Corollaries 1–2) in few steps.
    """
    where = "simulate_central_path"
    p, n = _check_features(features, num_classes, where)
    c = num_classes
    check_int(steps, "steps", 0, where)
    _check_dims(c, n, p, where)
    if dt is not None and not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"{where}: dt must be a positive finite number or None, got {dt!r}")
    if not (math.isfinite(max_log_step) and 0 < max_log_step <= 0.5):
        raise ValueError(f"{where}: max_log_step must be in (0, 0.5], got {max_log_step!r}")

    small = features.numel() < _SINGLE_THREAD_NUMEL
    with _single_thread() if small else contextlib.nullcontext():
        return _simulate(features, c, n, p, steps, dt, max_log_step, progress)


def _progress(steps: Iterable[int], show: bool) -> Iterable[int]:
    """``steps``, with a progress bar when ``show`` and tqdm (of the ``paper`` extra, imported
    only then) is installed."""
    if not show:
        return steps
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the library runs without the app's dependencies: no bar then
        return steps

    bar: Iterable[int] = tqdm(steps, desc="central path", leave=False)
    return bar


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _simulate(
    features: torch.Tensor,
    c: int,
    n: int,
    p: int,
    steps: int,
    dt: float | None,
    max_log_step: float,
    progress: bool,
) -> CentralPathRun:
    x = renormalize(features, c)
    snr0 = snr_of_features(x, c)
    u_full, _, vh0 = torch.linalg.svd(snr0, full_matrices=False)
    u0, v0 = u_full[:, : c - 1], vh0[: c - 1].T
    target = u0 @ v0.T  # Û_0 V̂_0ᵀ, [P, C]
    target_features = target.repeat_interleave(n, dim=1)  # (Û_0V̂_0ᵀ) ⊗ 1_Nᵀ

    def record(x_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        snr_t = snr_of_features(x_, c)
        omega_t = torch.linalg.svdvals(snr_t)[: c - 1]
        w_max = omega_t[0]
        align = (snr_t / w_max - target).norm()
        feat = (x_ / w_max - target_features).norm() / target_features.norm()
        return omega_t, least_squares_loss(x_, c).detach(), align, feat

    times = [0.0]
    records = [record(x)]
    drift = []
    eye = torch.eye(p, dtype=_F64)
    t = 0.0
    for _ in _progress(range(steps), progress):
        omega_min = float(records[-1][0][-1])
        step = dt if dt is not None else max_log_step * n * (c + omega_min**2) ** 2
        x_new = _rk4_step(x, float(step), c)
        _, sigma_w, _ = feature_statistics(x_new, c)
        drift.append(float((sigma_w - eye).abs().max()))
        x = renormalize(x_new, c)
        t += float(step)
        times.append(t)
        records.append(record(x))
    omega, loss, align, feat = (torch.stack(list(col)) for col in zip(*records, strict=True))
    return CentralPathRun(
        num_classes=c,
        per_class=n,
        dim=p,
        times=torch.tensor(times, dtype=_F64),
        omega=omega,
        loss_ls=loss,
        alignment=align,
        feature_alignment=feat,
        manifold_drift=torch.tensor(drift, dtype=_F64),
        u0=u0,
        v0=v0,
        features=x,
    )
