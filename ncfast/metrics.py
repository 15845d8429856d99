"""Neural Collapse metrics (SPEC §2–§4) from streamed :class:`~ncfast.stats.ClassStats`."""

from __future__ import annotations

import math
from typing import TypedDict, cast

import torch

from ncfast.backend import ops
from ncfast.checks import check_classifier, check_weight_decay
from ncfast.errors import NCFastError
from ncfast.stats import ClassStats

DEFAULT_RTOL = 1e-10

# Every key nc_metrics returns when given a classifier and NC4 (SPEC §2–§4 and bookkeeping).
SPEC_KEYS = (
    "nc1",
    "nc2_equinorm_means",
    "nc2_equinorm_classifiers",
    "nc2_equiangular_means",
    "nc2_equiangular_classifiers",
    "nc2_maxangle_means",
    "nc2_maxangle_classifiers",
    "nc3_self_duality",
    "nc4_ncc_mismatch",
    "loss_mse",
    "loss_ls",
    "loss_nc1",
    "loss_nc23",
    "loss_ls_perp",
    "snr_singular_values",
    "snr_condition",
    "sigma_b_rank",
    "sigma_w_rank",
    "classes_present",
    "weight_decay",
    "num_samples",
)


class NCMetrics(TypedDict, total=False):
    """What :func:`nc_metrics` returns: the keys of :data:`SPEC_KEYS` that its inputs allow
    (SPEC §2–§4; the classifier keys need a classifier, ``nc4_ncc_mismatch`` a per-sample pass).
    Scalars are Python floats or ints; ``snr_singular_values`` is a float64 CPU tensor."""

    nc1: float
    nc2_equinorm_means: float
    nc2_equinorm_classifiers: float
    nc2_equiangular_means: float
    nc2_equiangular_classifiers: float
    nc2_maxangle_means: float
    nc2_maxangle_classifiers: float
    nc3_self_duality: float
    nc4_ncc_mismatch: float
    loss_mse: float
    loss_ls: float
    loss_nc1: float
    loss_nc23: float
    loss_ls_perp: float
    snr_singular_values: torch.Tensor
    snr_condition: float
    sigma_b_rank: int
    sigma_w_rank: int
    classes_present: int
    weight_decay: float
    num_samples: int
    nc_undefined: str  # why every metric is NaN (on_degenerate="nan" only)


class DegenerateFeaturesError(NCFastError, ValueError):
    """The class means do not separate (or every feature is zero): the Neural Collapse metrics
    are undefined for these features (SPEC §2, "Degenerate data"). ``reason`` says what was found,
    without the name of the function that raised."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def mse_lambda(sgd_weight_decay: float, num_classes: int) -> float:
    """λ of HPD22 Eq. 3 for a training loss ``MSELoss()`` (mean over B×C entries) with SGD weight
    decay ``wd`` on every parameter: the objective is (2/C)·L(W̃) when λ = C·wd/2 (SPEC §3).
    """
    return num_classes * sgd_weight_decay / 2.0


def _require_two_classes(stats: ClassStats, where: str) -> None:
    if not isinstance(stats, ClassStats):
        raise TypeError(f"{where}: stats must be a ClassStats, got {type(stats).__name__}")
    present = stats.classes_present
    if present < 2:
        raise ValueError(
            f"{where}: needs at least two classes with samples; {present} of "
            f"{stats.num_classes} classes were seen ({stats.num_samples} samples)"
        )


# Features are accumulated as float64 sums of squares: beyond ~1e154 they overflow.
_OVERFLOW = (
    "the features are too large for float64 statistics: their squares overflow (Σ_W or the "
    "class means are inf/NaN; float64 holds up to 1.8e308, so features must stay below about "
    "1e150); rescale the features"
)


def _rounding_gamma(terms: int) -> float:
    """γ_k = k·eps / (1 − k·eps): the worst-case relative error of a float64 sum of k terms."""
    eps = torch.finfo(torch.float64).eps
    return terms * eps / (1.0 - terms * eps)


def check_separation(stats: ClassStats, mbar: torch.Tensor, where: str) -> float:
    """Raise :class:`DegenerateFeaturesError` when the class means do not separate (SPEC §2);
    else return ``bound``, the rounding level of M̄ defined below.

    Every metric compares the centered class means M̄ (NC1 inverts Σ_B = M̄M̄ᵀ/C, NC2/NC3 normalise
    its columns, NC4 measures distances to the means, the SNR whitens M̄), so they are undefined
    when M̄ is indistinguishable from zero. The rounding level, from the error bound of the
    float64 class means:

    - feature scale: r_c, the RMS norm of class c's features, bounded from the statistics as
      r_c² ≤ ‖μ_c‖² + (N/n_c)·tr Σ_W (class c's scatter is part of N·Σ_W); r = max_c r_c.
    - each μ_c is a float64 sum of at most n_c deviations from a shift that is itself a mean of
      at most n_c samples, divided by n_c: ‖fl(μ_c) − μ_c‖ ≤ γ_{2n_c+2}·r_c (γ_k = k·eps/(1−k·eps),
      the worst-case bound of a k-term sum in any order), and μ_G = Σ π_c μ_c errs by no more
      than the largest of them, so ‖δM̄‖₂ ≤ ‖δM̄‖_F ≤ 2√C·γ_{2·max n_c+2}·r =: bound.

    Degenerate: max σ(M̄) ≤ bound (the computed M̄ could be rounding noise around a zero M̄,
    e.g. all samples identical), or every feature is exactly zero (r = 0). The bound is far
    below any real separation: with C = 10, n_c = 5000 it is 1.4e-11·r, while float32 features
    resolve 6e-8·r. ‖M̄‖_F (one pass) decides unless it lies within √rank of the bound, where
    σ_max is computed.

    The same bound sets which directions of M̄ count (with SPEC §2's rtol): a singular value
    ≤ bound is indistinguishable from rounding. It matters under a large common offset: with
    features of norm 1e6 the class means carry ~eps·1e6 of noise in every direction, far above
    rtol·max σ(M̄) when the means are 1 apart, and that noise inverted by Σ_B^† would dominate NC1.
    """
    means, sigma_w = stats.finalized()
    present = stats.present
    counts = stats.counts[present].to(torch.float64)
    num_samples = int(counts.sum())
    c = int(present.sum())
    trace_w = sigma_w.diagonal().sum()
    sq_norms = means[present].square().sum(1)
    class_rms = (sq_norms + trace_w * (counts.sum() / counts)).sqrt()
    rms = float(class_rms.max())
    if not math.isfinite(rms):
        raise DegenerateFeaturesError(where, _OVERFLOW)
    if rms == 0.0:
        raise DegenerateFeaturesError(
            where,
            f"every feature is zero ({num_samples} samples of {c} classes): the class means "
            "coincide, so NC1-NC4 and the SNR are undefined (is the feature layer dead?)",
        )
    bound = 2.0 * math.sqrt(c) * _rounding_gamma(2 * int(counts.max()) + 2) * rms
    size = float(torch.linalg.matrix_norm(mbar))  # Frobenius: ≥ σ_max ≥ it / √rank
    if size > math.sqrt(min(mbar.shape)) * bound:
        return bound
    if size > bound:
        size = float(torch.linalg.matrix_norm(mbar, ord=2))
    if size <= bound:
        raise DegenerateFeaturesError(
            where,
            f"the class means do not separate: max σ(M̄) = {size:.3g} is within the rounding "
            f"error bound {bound:.3g} of float64 class means of features of RMS norm up to "
            f"{rms:.3g} ({num_samples} samples of {c} classes; e.g. every sample identical), so "
            "NC1-NC4 and the SNR are undefined",
        )
    return bound


def _float64_classifier(
    stats: ClassStats, weight: torch.Tensor, bias: torch.Tensor | None, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier checked against the statistics' shape, in float64 on their device, with
    finite entries (read here: the metrics read the statistics anyway)."""
    weight, bias = check_classifier(weight, bias, where, stats.num_classes, stats.dim)
    weight = weight.to(stats.device, torch.float64)
    bias = bias.to(stats.device, torch.float64)
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ValueError(f"{where}: weight or bias contains NaN/inf")
    return weight, bias


def least_squares_classifier(
    stats: ClassStats, weight_decay: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_LS ``[C, P]``, b_LS ``[C]``) minimising HPD22 Eq. 3 with λ = ``weight_decay`` (SPEC §3).

    Rows of absent classes are zero (their target is always 0). With λ = 0 and a singular
    second-moment matrix, the minimum-norm minimiser.
    """
    _require_two_classes(stats, "least_squares_classifier")
    lam = check_weight_decay(weight_decay, "least_squares_classifier")
    # Read-only, as cached: class_means and sigma_w would copy (docs/memory.md). Absent
    # classes have zero rows and prior 0.
    means, sigma_w = stats.finalized()
    return ops.least_squares(means, stats.priors, sigma_w, lam)


def whiten(stats: ClassStats) -> torch.Tensor:
    """Σ_W^{-1/2} ``[P, P]``: the symmetric (pseudo-)inverse square root (SPEC §4)."""
    sigma_w = stats.finalized()[1]
    if not bool(torch.isfinite(sigma_w).all()):
        raise DegenerateFeaturesError("whiten", _OVERFLOW)
    return ops.psd_inv_sqrt(sigma_w)[0]


def snr(stats: ClassStats) -> torch.Tensor:
    """SNR = Σ_W^{-1/2} M̄ ``[P, C_present]`` (SPEC §4)."""
    _require_two_classes(stats, "snr")
    mbar = stats.centered_means
    check_separation(stats, mbar, "snr")
    return whiten(stats) @ mbar


def nc_metrics(
    stats: ClassStats,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    weight_decay: float = 0.0,
    ncc_mismatch: float | None = None,
    rtol: float = DEFAULT_RTOL,
) -> NCMetrics:
    """Every SPEC §2–§4 key the inputs allow, plus ``classes_present``, ``sigma_b_rank``,
    ``sigma_w_rank``, ``weight_decay`` (λ of Eq. 3) and ``num_samples``.

    Classifier keys (``nc2_*_classifiers``, ``nc3_self_duality``, ``loss_*``) need ``weight``
    ``[C, P]`` (``bias`` ``[C]`` defaults to zero). ``nc4_ncc_mismatch`` needs a per-sample pass:
    pass the result of :class:`ncfast.nc4.NCCMismatch` (or use :class:`ncfast.Measurement`,
    which does both). Scalars are Python floats; ``snr_singular_values`` is a float64 tensor.

    Absent classes are left out of class-indexed quantities (C below means classes present);
    the MSE decomposition keeps all C outputs of the classifier, as the training loss does.

    Degenerate features (class means that do not separate beyond rounding, or all-zero
    features) raise :class:`DegenerateFeaturesError`: every metric is undefined there, and
    rounding noise would otherwise read as perfect collapse (see :func:`check_separation`).

    Args:
        stats: the class statistics (at least two classes with samples).
        weight: the classifier's weight ``[C, P]``, or None for the feature-only keys.
        bias: its bias ``[C]`` (default zero).
        weight_decay: λ of HPD22 Eq. 3 (:func:`mse_lambda` converts an SGD weight decay).
        ncc_mismatch: NC4, as computed by :class:`ncfast.nc4.NCCMismatch`.
        rtol: the relative tolerance of the ranks (SPEC §2).

    Returns:
        the SPEC dict (:class:`NCMetrics`).

    Example:
        >>> import torch, ncfast
        >>> features = torch.tensor(
        ...     [[2.0, 0.0], [2.2, 0.2], [0.0, 2.0], [0.2, 2.2], [-2.0, -2.0], [-2.2, -1.8]]
        ... )
        >>> stats = ncfast.ClassStats(3, 2)
        >>> stats.update(features, torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> metrics = ncfast.nc_metrics(stats)
        >>> round(metrics["nc1"], 4), metrics["classes_present"]
        (0.0027, 3)
    """
    _require_two_classes(stats, "nc_metrics")
    lam = check_weight_decay(weight_decay, "nc_metrics")
    present = stats.present
    c = int(present.sum())
    mbar = stats.centered_means  # [P, C]
    noise = check_separation(stats, mbar, "nc_metrics")
    # Read-only, as cached: class_means and sigma_w would copy (docs/memory.md). Absent
    # classes have zero rows and prior 0.
    means, sigma_w = stats.finalized()

    out: NCMetrics = {"num_samples": stats.num_samples, "classes_present": c, "weight_decay": lam}
    out["nc1"], out["sigma_b_rank"] = ops.nc1(sigma_w, mbar, rtol, noise)

    norms = mbar.norm(dim=0)
    out["nc2_equinorm_means"] = float(norms.std() / norms.mean())
    out["nc2_equiangular_means"], out["nc2_maxangle_means"] = ops.pairwise_cosine_stats(mbar.T)

    inv_sqrt, out["sigma_w_rank"] = ops.psd_inv_sqrt(sigma_w)
    # Whitening scales M̄'s rounding by at most ‖Σ_W^{-1/2}‖₂ ≤ ‖Σ_W^{-1/2}‖_F (one pass, no SVD).
    omega = ops.snr_singular_values(inv_sqrt, mbar, rtol, noise * float(inv_sqrt.norm()))
    del inv_sqrt  # [P, P], not needed below: keeps it out of the peak (docs/memory.md)
    out["snr_singular_values"] = omega.cpu()
    out["snr_condition"] = float(omega[0] / omega[-1]) if omega.numel() else float("nan")

    if weight is not None:
        weight, bias = _float64_classifier(stats, weight, bias, "nc_metrics")
        w_present = weight[present]
        w_norms = w_present.norm(dim=1)
        out["nc2_equinorm_classifiers"] = float(w_norms.std() / w_norms.mean())
        eq, mx = ops.pairwise_cosine_stats(w_present)
        out["nc2_equiangular_classifiers"], out["nc2_maxangle_classifiers"] = eq, mx
        dual = w_present.T / w_present.norm() - mbar / mbar.norm()
        out["nc3_self_duality"] = float(dual.square().sum())
        del w_present, dual  # [C, P] each, not needed by the decomposition
        terms = ops.mse_decomposition(weight, bias, means, stats.priors, sigma_w, lam)
        out["loss_mse"], out["loss_ls"] = terms["loss_mse"], terms["loss_ls"]
        out["loss_nc1"], out["loss_nc23"] = terms["loss_nc1"], terms["loss_nc23"]
        out["loss_ls_perp"] = terms["loss_ls_perp"]
    elif bias is not None:
        raise ValueError("nc_metrics: bias was given without weight")

    if ncc_mismatch is not None:
        out["nc4_ncc_mismatch"] = float(ncc_mismatch)
    return out


def undefined_metrics(stats: ClassStats, weight_decay: float, reason: str) -> dict[str, object]:
    """The result of :func:`nc_metrics` for degenerate features, for logs: every metric NaN
    (the ranks too: not an :class:`NCMetrics`; ``snr_singular_values`` empty), the bookkeeping
    keys as measured, and ``nc_undefined`` holding ``reason`` (the
    :attr:`DegenerateFeaturesError.reason`)."""
    out: dict[str, object] = {key: math.nan for key in SPEC_KEYS}
    out["snr_singular_values"] = torch.zeros(0, dtype=torch.float64)
    out.update(
        num_samples=stats.num_samples,
        classes_present=stats.classes_present,
        weight_decay=float(weight_decay),
        nc_undefined=reason,
    )
    return out


ON_DEGENERATE = ("raise", "nan")


def undefined_reason(
    stats: ClassStats, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> str | None:
    """Why the metrics of ``stats`` with this classifier are undefined before any is computed
    (fewer than two classes with samples, a classifier with NaN/inf), or None. The features'
    own degeneracy is found by :func:`nc_metrics` (:class:`DegenerateFeaturesError`)."""
    present = stats.classes_present
    if present < 2:
        return (
            f"{present} of {stats.num_classes} classes had samples (at least two are needed; "
            f"{stats.num_samples} samples)"
        )
    if weight is not None and not (
        bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))
    ):
        return "the classifier's weight or bias is not finite (training diverged)"
    return None


def nc_metrics_or_nan(
    stats: ClassStats,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    weight_decay: float = 0.0,
    ncc_mismatch: float | None = None,
) -> NCMetrics:
    """The one policy for logs and monitors: :func:`nc_metrics`, or, where the metrics are
    undefined (:func:`undefined_reason`, :class:`DegenerateFeaturesError`), the row of
    :func:`undefined_metrics`: NaN metrics with the reason in ``nc_undefined``.
    :meth:`ncfast.Measurement.compute` with ``on_degenerate="nan"`` applies it."""
    reason = undefined_reason(stats, weight, bias)
    if reason is None:
        try:
            return nc_metrics(stats, weight, bias, weight_decay, ncc_mismatch=ncc_mismatch)
        except DegenerateFeaturesError as exc:
            reason = exc.reason
    return cast(NCMetrics, undefined_metrics(stats, weight_decay, reason))
