"""SPEC §5's law of the central path (HPD22 Thm. 3, Prop. 2), λ = 0, balanced: its closed-form
solution for the SNR singular values ω_j(t), and its fit to measured ω_j.

- :func:`snr_closed_form` solves ``C² log ω + C ω² + ω⁴/4 = a_j + t/N`` (a_j fixed by ω_j(0))
  for ω(t), t being the flow time of :func:`ncfast.theory.simulate_central_path` (the time units
  and the derivation of the law are in :mod:`ncfast.theory`).
- :func:`fit_central_path` fits ``c1 log ω + c2 ω² + c3 ω⁴ = a_j + κ t`` to the ω_j of a
  training run (``ncfast analyze``'s central-path fit).
"""

from __future__ import annotations

import itertools
from typing import TypedDict

import torch

from ncfast.checks import check_int

__all__ = ["CentralPathFit", "central_path_potential", "fit_central_path", "snr_closed_form"]

_F64 = torch.float64
_NEWTON_MAX_ITER = 200


# ----------------------------------------------------------------------------- input check


def as_vector(values: object, name: str, where: str) -> torch.Tensor:
    """``values`` (a tensor, list or array) as a 1-D float64 tensor of finite real numbers,
    checked: errors name ``name`` and ``where``."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach()
    else:
        try:
            tensor = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{where}: {name} must be a 1-D tensor of numbers") from exc
    if tensor.dim() != 1:
        raise ValueError(f"{where}: {name} must be 1-D, got a tensor of shape {list(tensor.shape)}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(_F64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where}: {name} contains NaN or inf")
    return tensor


# ----------------------------------------------------------------------------- closed form


def central_path_potential(omega: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Left side of the SPEC §5 law, ``C² log ω + C ω² + ω⁴/4``, elementwise (float64)."""
    c = float(num_classes)
    omega = omega.to(_F64)
    return c * c * omega.log() + c * omega.square() + omega.square().square() / 4.0


def _solve_potential(
    base: torch.Tensor, increment: torch.Tensor, c1: float, c2: float, c3: float
) -> torch.Tensor:
    """ω ≥ 0 with F(log ω) = F(log base) + increment, F(u) = c1 u + c2 e^{2u} + c3 e^{4u}
    (c_k ≥ 0, not all zero), elementwise; ``base`` > 0 broadcasts against ``increment``.

    Solved for the increment δ = log ω − log base of G(δ) = F(u0 + δ) − F(u0) =
    c1 δ + c2 e^{2u0} expm1(2δ) + c3 e^{4u0} expm1(4δ): no cancellation against F(u0), so ω is
    accurate to rounding even when the increment is far below F(u0)'s ulp. G is increasing and
    convex: Newton from an analytic upper bracket descends monotonically to the root; a bisection
    safeguard keeps every iterate inside the bracket under rounding. Where c1 = 0 and the target
    F(u0) + increment ≤ 0 there is no solution (F > 0) and ω = 0 (the limit) is returned.
    """
    # torch.broadcast_tensors is unannotated in torch (def broadcast_tensors(*tensors)).
    base, s = torch.broadcast_tensors(base.to(_F64), increment.to(_F64))  # type: ignore[no-untyped-call]
    u0 = base.log()
    e2, e4 = torch.exp(2.0 * u0), torch.exp(4.0 * u0)
    r = c1 * u0 + c2 * e2 + c3 * e4 + s  # target of F, only for the bracket

    def excess_and_slope(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = c1 * d - s
        slope = torch.full_like(d, c1)
        if c2:
            value = value + c2 * e2 * torch.expm1(2.0 * d)
            slope = slope + 2.0 * c2 * e2 * torch.exp(2.0 * d)
        if c3:
            value = value + c3 * e4 * torch.expm1(4.0 * d)
            slope = slope + 4.0 * c3 * e4 * torch.exp(4.0 * d)
        return value, slope

    # Upper bracket on u: for u ≥ 0 the largest-power term alone bounds F from below.
    big = r.clamp(min=1.0)
    if c3:
        hi = (big / c3).log().clamp(min=0.0) / 4.0 + 1.0
    elif c2:
        hi = (big / c2).log().clamp(min=0.0) / 2.0 + 1.0
    else:
        hi = (r / c1).clamp(min=0.0) + 1.0
    # Lower bracket on u: for u ≤ 0, F(u) ≤ c1 u + c2 + c3 (c1 > 0) or (c2 + c3) e^{2u} (c1 = 0).
    unsolvable = torch.zeros_like(r, dtype=torch.bool)
    if c1:
        lo = ((r - c2 - c3) / c1).clamp(max=0.0) - 1.0
    else:
        unsolvable = r <= 0
        safe = torch.where(unsolvable, torch.ones_like(r), r)
        lo = ((safe / (c2 + c3)).log() / 2.0).clamp(max=0.0) - 1.0
    # In δ, and with the sign of the increment (G(0) = 0, G increasing).
    hi = torch.where(s > 0, (hi - u0).clamp(min=0.0), torch.zeros_like(s))
    lo = torch.where(s < 0, (lo - u0).clamp(max=0.0), torch.zeros_like(s))
    d = hi.clone()
    tol = 4 * torch.finfo(_F64).eps
    for _ in range(_NEWTON_MAX_ITER):
        excess, slope = excess_and_slope(d)
        lo = torch.where(excess < 0, d, lo)
        hi = torch.where(excess > 0, d, hi)
        newton = d - excess / slope
        inside = (newton >= lo) & (newton <= hi)
        new_d = torch.where(inside, newton, 0.5 * (lo + hi))
        new_d = torch.where(unsolvable | (excess == 0), d, new_d)
        step = (new_d - d).abs()
        d = new_d
        if bool((step <= 1e-17 + tol * d.abs()).all()):
            break
    return torch.where(unsolvable, torch.zeros_like(d), base * d.exp())


def snr_closed_form(
    omega0: torch.Tensor, t: torch.Tensor, num_classes: int, per_class: int
) -> torch.Tensor:
    """SNR singular values ω_j(t) on the central path: ``[len(t), len(omega0)]``, float64.

    Solves ``C² log ω + C ω² + ω⁴/4 = a_j + t/N`` with ``a_j`` fixed by ``ω_j(0) = omega0[j]``
    (SPEC §5; C = ``num_classes``, N = ``per_class``). t is the time of the gradient flow of the
    per-sample averaged SPEC §3 loss with respect to the features (module docstring), the time
    of :func:`simulate_central_path`. Vectorised over t and j; Newton in log ω, float64, accurate
    to rounding (the law holds to ~1e-15 relative at the returned ω).
    """
    where = "snr_closed_form"
    c = check_int(num_classes, "num_classes", 2, where)
    n = check_int(per_class, "per_class", 1, where)
    omega0_vec = as_vector(omega0, "omega0", where)
    t_vec = as_vector(t, "t", where)
    if omega0_vec.numel() > c - 1:
        raise ValueError(
            f"{where}: omega0 has {omega0_vec.numel()} values but the SNR matrix of "
            f"{c} classes has at most {c - 1} nonzero singular values"
        )
    if (omega0_vec <= 0).any():
        raise ValueError(f"{where}: omega0 must be > 0 (nonzero SNR singular values)")
    if (t_vec < 0).any():
        raise ValueError(f"{where}: t must be ≥ 0 (time since entering the central path)")
    device = omega0.device if isinstance(omega0, torch.Tensor) else None
    omega0_vec = omega0_vec.to(device)
    t_vec = t_vec.to(device)
    if not torch.isfinite(central_path_potential(omega0_vec, c)).all():
        raise ValueError(f"{where}: omega0 is too large (ω⁴ overflows float64)")
    return _solve_potential(omega0_vec[None, :], t_vec[:, None] / n, float(c * c), float(c), 0.25)


# ----------------------------------------------------------------------------- fit


class CentralPathFit(TypedDict):
    """What :func:`fit_central_path` returns (float64 CPU tensors)."""

    c1: float
    c2: float
    c3: float
    kappa: float
    a: torch.Tensor
    c1_over_c3: float
    c2_over_c3: float
    r2_time: float
    r2_omega: float
    spread: torch.Tensor
    predicted_omega: torch.Tensor


def fit_central_path(times: object, omega: object) -> CentralPathFit:
    """Fit ``c1 log ω + c2 ω² + c3 ω⁴ = a_j + κ t`` to measured SNR singular values.

    ``times [T]`` (epochs or steps, any units) and ``omega [T, J]`` (positive). Linear least
    squares in the time direction over all (k, j): unknowns c1, c2, c3 ≥ 0 (shared) and one
    offset a_j per singular value. The law is invariant to a common scale of (c, a, κ): it is
    fixed by κ = 1, so the c's are in units of the given time (on the SPEC §5 central path with
    flow time t, c = N·(C², C, ¼)); the scale-free shape is reported as c1/c3 and c2/c3 (SPEC:
    4C² and 4C). c ≥ 0 is enforced exactly by trying every face of the constraint set.

    Returns ``c1, c2, c3, kappa`` (floats), ``a [J]``, ``c1_over_c3``, ``c2_over_c3``
    (nan if c3 = 0), ``r2_time`` (R² of the law's time prediction), ``r2_omega`` (R² of the
    predicted ω over all entries), ``spread [T]`` (ω_max/ω_min per time), ``predicted_omega
    [T, J]`` (the fitted law solved for ω at each time).
    """
    t, w = _checked_fit_data(times, omega, "fit_central_path")
    num_t, num_j = w.shape
    terms = torch.stack([w.log(), w.square(), w.square().square()], dim=-1).reshape(-1, 3)
    offsets = -torch.eye(num_j, dtype=_F64).repeat(num_t, 1)  # −a_j column per j
    target = t.repeat_interleave(num_j)
    residual, (c1, c2, c3), a = _nonnegative_fit(terms, offsets, target)
    total = float((target - target.mean()).square().sum())
    # Solve the fitted law from each measured ω: the increment is that entry's residual, so an
    # ω far below 1 keeps its relative accuracy (from ω = 1 it would cancel against c2 + c3).
    fitted = c1 * w.log() + c2 * w.square() + c3 * w.square().square()
    increment = a[None, :] + t[:, None] - fitted
    predicted = _solve_potential(w, increment, c1, c2, c3)
    w_total = float((w - w.mean()).square().sum())
    w_res = float((predicted - w).square().sum())
    return {
        "c1": c1,
        "c2": c2,
        "c3": c3,
        "kappa": 1.0,
        "a": a,
        "c1_over_c3": c1 / c3 if c3 > 0 else float("nan"),
        "c2_over_c3": c2 / c3 if c3 > 0 else float("nan"),
        "r2_time": 1.0 - residual / total,
        "r2_omega": 1.0 - w_res / w_total if w_total > 0 else float("nan"),
        "spread": w.max(dim=1).values / w.min(dim=1).values,
        "predicted_omega": predicted,
    }


def _checked_fit_data(
    times: object, omega: object, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(times ``[T]``, omega ``[T, J]``) as float64 CPU tensors, checked for the fit."""
    t = as_vector(times, "times", where).cpu()
    w = (omega if isinstance(omega, torch.Tensor) else torch.as_tensor(omega)).detach()
    w = w.to(_F64).cpu()
    if w.dim() != 2 or w.shape[0] != t.numel():
        raise ValueError(
            f"{where}: omega must have shape [len(times), J] = [{t.numel()}, J], "
            f"got {list(w.shape)}"
        )
    num_t, num_j = w.shape
    if num_j == 0:
        raise ValueError(f"{where}: omega has no singular values (J = 0)")
    if not torch.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"{where}: omega must be positive and finite")
    if num_t * num_j < num_j + 4 or num_t < 3:
        raise ValueError(
            f"{where}: need at least 3 times and more equations (T·J = {num_t * num_j}) than "
            f"unknowns (3 + J = {3 + num_j}) plus one"
        )
    if float(t.max() - t.min()) <= 0:
        raise ValueError(f"{where}: times must not all be equal")
    return t, w


def _nonnegative_fit(
    terms: torch.Tensor, offsets: torch.Tensor, target: torch.Tensor
) -> tuple[float, list[float], torch.Tensor]:
    """(residual, [c1, c2, c3], offsets a) of the least-squares fit ``terms·c + offsets·a ≈
    target`` with c ≥ 0: the best unconstrained fit over every face of the orthant (the
    subsets of c allowed to be nonzero) whose coefficients come out non-negative."""
    best: tuple[float, list[float], torch.Tensor] | None = None
    for size in (3, 2, 1):
        for face in itertools.combinations(range(3), size):
            design = torch.cat([terms[:, list(face)], offsets], dim=1)
            scale = design.norm(dim=0).clamp(min=torch.finfo(_F64).tiny)
            solution = torch.linalg.lstsq(design / scale, target[:, None], driver="gelsd")
            sol: torch.Tensor = solution.solution[:, 0] / scale
            if (sol[:size] < 0).any():
                continue
            residual = float((design @ sol - target).square().sum())
            if best is None or residual < best[0] * (1 - 1e-12):
                coeffs = [0.0, 0.0, 0.0]
                for i, k in enumerate(face):
                    coeffs[k] = float(sol[i])
                best = (residual, coeffs, sol[size:])
    if best is None:  # every face negative: data decreasing in time
        raise ValueError("fit_central_path: no fit with c ≥ 0 exists (ω decreasing over time?)")
    return best
