"""Pure-torch float64 implementations of every op: the oracle and the benchmark baseline.

Each function here has a native twin in ``ncfast._C`` (same arguments, same results to
rounding). ``ncfast.backend.ops`` chooses between them; tests compare both against float64 numpy.

The accumulator state they update has the layout of :mod:`ncfast.backend.state` (re-exported
here for the tests and benchmarks that build states next to the reference).
"""

from __future__ import annotations

import torch

from ncfast.backend.precision import ieee_float32_matmul
from ncfast.backend.state import INVALID_LABEL, INVALID_NONFINITE
from ncfast.backend.state import STATE_KEYS as STATE_KEYS
from ncfast.backend.state import new_state as new_state

_WELL_CONDITIONED = 1e-8  # smallest/largest squared Cholesky pivot for a trusted solve


def count_invalid_rows_(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, invalid: torch.Tensor
) -> torch.Tensor:
    """Count, into ``invalid``, rows whose label is outside [0, C) and (of the others) rows with
    a non-finite feature; return the bool mask of valid rows. The one definition of validity."""
    label_ok = (labels >= 0) & (labels < num_classes)
    finite = torch.isfinite(features).all(dim=1)
    invalid[INVALID_LABEL] += (~label_ok).sum()
    invalid[INVALID_NONFINITE] += (label_ok & ~finite).sum()
    return label_ok & finite


def update_stats_(
    features: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    shift: torch.Tensor,
    sums: torch.Tensor,
    scatter: torch.Tensor,
    invalid: torch.Tensor,
    fast: bool = False,
) -> None:
    """Add one batch ``features [B, P]``, ``labels [B]`` to the accumulator state, in place.

    Invalid rows (label outside [0, C) or any non-finite feature) are counted in ``invalid`` and
    contribute nothing. No host synchronisation: every decision is a device-side ``where``.
    ``fast``: the scatter product of the (float64) centred rows in IEEE float32, added into the
    float64 scatter (the ``fast`` precision policy, docs/precision.md); else all float64.
    """
    num_classes = counts.shape[0]
    # A float64 copy of our own, worked on in place: with it, at most three [B, P] float64
    # buffers exist at once (docs/memory.md). Never the caller's tensor, even if already float64.
    x = features.to(torch.float64, copy=True)
    valid = count_invalid_rows_(x, labels, num_classes, invalid)

    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    x.masked_fill_(~valid[:, None], 0.0)
    batch_counts = torch.zeros_like(counts).index_add_(0, y, valid.long())
    # A class seen for the first time takes this batch's class mean as its shift. The batch's
    # class sums live in a [B, P] buffer, one row per class at the row of its first sample, so
    # no [C, P] temporary exists per batch (C can be tens of thousands).
    first_seen = (counts == 0) & (batch_counts > 0)
    rows = torch.arange(x.shape[0], device=x.device)
    first_row = torch.full_like(counts, x.shape[0]).scatter_reduce_(0, y, rows, "amin")
    slot = first_row.index_select(0, y)
    row_shift = torch.zeros_like(x).index_add_(0, slot, x).index_select(0, slot)
    row_shift.div_(batch_counts.index_select(0, y).clamp(min=1).to(x.dtype)[:, None])
    torch.where(
        first_seen.index_select(0, y)[:, None],
        row_shift,
        shift.index_select(0, y),
        out=row_shift,
    )
    # Every row of a class carries the same shift, so duplicate indices write identical values.
    shift.index_copy_(0, y, row_shift)

    centered = x.sub_(row_shift).mul_(valid.to(x.dtype)[:, None])
    del row_shift
    sums.index_add_(0, y, centered)
    if fast:
        rounded = centered.to(torch.float32)
        with ieee_float32_matmul():
            scatter.add_(rounded.T @ rounded)
    else:
        scatter.addmm_(centered.T, centered)
    counts += batch_counts


def finalize_stats(
    counts: torch.Tensor, shift: torch.Tensor, sums: torch.Tensor, scatter: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means ``[C, P]`` (zero rows for absent classes) and Σ_W ``[P, P]`` from the state."""
    n = counts.to(torch.float64)
    inv_n = torch.where(n > 0, 1.0 / n.clamp(min=1), torch.zeros_like(n))
    # In place where possible: one [C, P] and one [P, P] result, no temporaries of those sizes
    # beyond the scaled sums (docs/memory.md).
    means = torch.addcmul(shift, sums, inv_n[:, None])
    means.masked_fill_((n <= 0)[:, None], 0.0)
    within = torch.addmm(scatter, (sums * inv_n[:, None]).T, sums, alpha=-1.0)
    symmetrize_(within)
    within.div_(n.sum().clamp(min=1))
    return means, within


def symmetrize_(matrix: torch.Tensor, tile: int = 512) -> None:
    """matrix ← (matrix + matrixᵀ) / 2 in place, in row tiles: no second [P, P] matrix.

    Tile t averages rows t with columns t onward and mirrors them; both blocks it reads are
    untouched by earlier tiles, which only wrote rows and columns before t.
    """
    p = matrix.shape[0]
    for start in range(0, p, tile):
        stop = min(p, start + tile)
        block = (matrix[start:stop, start:] + matrix[start:, start:stop].T) * 0.5
        matrix[start:stop, start:] = block
        matrix[start:, start:stop] = block.T


def reshift(
    counts: torch.Tensor,
    shift: torch.Tensor,
    sums: torch.Tensor,
    scatter: torch.Tensor,
    new_shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Express ``sums`` and ``scatter`` relative to ``new_shift`` instead of ``shift``.

    With δ_c = s_c − s'_c: d'_c = d_c + n_c δ_c and
    S' = S + Σ_c (δ_c d_cᵀ + d_c δ_cᵀ + n_c δ_c δ_cᵀ).
    Exact when δ_c is of the size of the within-class spread (both shifts near μ_c).
    """
    n = counts.to(torch.float64)
    delta = torch.where((n > 0)[:, None], shift - new_shift, torch.zeros_like(shift))
    cross = delta.T @ sums
    new_scatter = scatter + cross + cross.T + (delta * n[:, None]).T @ delta
    new_sums = sums + delta * n[:, None]
    return new_sums, new_scatter


def psd_inv_sqrt(matrix: torch.Tensor, rel_eps: float | None = None) -> tuple[torch.Tensor, int]:
    """Symmetric (pseudo-)inverse square root of a PSD matrix and its numerical rank (SPEC §4).

    Eigenvalues ≤ ``rel_eps · λ_max`` (default ``P · eps64``) count as zero.
    """
    p = matrix.shape[0]
    if rel_eps is None:
        rel_eps = p * torch.finfo(torch.float64).eps
    evals, evecs = torch.linalg.eigh(matrix.to(torch.float64))
    lam_max = evals.abs().max() if p else evals.new_zeros(())
    keep = evals > rel_eps * lam_max
    inv_sqrt = torch.where(keep, evals.clamp(min=0).rsqrt(), torch.zeros_like(evals))
    # V D^{-1/2} Vᵀ in row tiles: no scaled copy of V next to V and the result.
    out = torch.empty_like(evecs)
    for start in range(0, p, 512):
        stop = min(p, start + 512)
        torch.mm(evecs[start:stop] * inv_sqrt, evecs.T, out=out[start:stop])
    return out, int(keep.sum())


def _kept(s: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Singular values that count: above ``rtol · max`` (SPEC §2) and above ``atol``, the
    rounding level of M̄ (:func:`ncfast.metrics.check_separation`; a large common offset of the
    features puts rounding-noise directions into M̄ far above rtol · max)."""
    if s.numel() == 0:
        return s > 0
    return (s > rtol * s.max()) & (s > atol)


def left_singular_pairs(
    mbar: torch.Tensor, rtol: float = 1e-10, atol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, s) of the thin SVD of M̄ ``[P, C]`` above ``rtol · max`` and ``atol``, without the
    right factor.

    With C > P the right factor [P, C] and its SVD workspace would dominate memory (1 GiB each
    at C = 32000, P = 4096), so M̄ᵀ = QR is reduced to R ``[P, P]`` first (only R is formed):
    M̄ = Rᵀ Qᵀ has the left singular vectors and singular values of Rᵀ. Householder QR is
    backward stable, so this is as accurate as the direct SVD (LAPACK's gesdd does the same
    internally when C ≫ P).
    """
    p, c = mbar.shape
    if c > p:
        mbar = torch.linalg.qr(mbar.T, mode="r").R.T
    u, s, _ = torch.linalg.svd(mbar, full_matrices=False)
    keep = _kept(s, rtol, atol)
    return u[:, keep], s[keep]


def nc1(
    sigma_w: torch.Tensor, mbar: torch.Tensor, rtol: float = 1e-10, atol: float = 0.0
) -> tuple[float, int]:
    """NC1 = tr(Σ_W Σ_B^†) / C with Σ_B = M̄M̄ᵀ/C, in class space: Σ_j u_jᵀ Σ_W u_j / s_j², over
    the directions of M̄ above ``rtol · max`` and ``atol``; and their number (``sigma_b_rank``)."""
    u, s = left_singular_pairs(mbar, rtol, atol)
    value = ((sigma_w @ u) * u).sum(0) / s.square()
    return float(value.sum()), int(s.numel())


def snr_singular_values(
    sigma_w_inv_sqrt: torch.Tensor, mbar: torch.Tensor, rtol: float = 1e-10, atol: float = 0.0
) -> torch.Tensor:
    """Nonzero singular values of SNR = Σ_W^{-1/2} M̄, descending (SPEC §4): those above
    ``rtol · max`` and ``atol`` (the rounding level of M̄ after whitening)."""
    # torch.linalg's functions are untyped (Any) in torch's stubs: name the result's type.
    s: torch.Tensor = torch.linalg.svdvals(sigma_w_inv_sqrt @ mbar)
    return s[_kept(s, rtol, atol)]


def pairwise_cosine_stats(vectors: torch.Tensor, tile: int = 0) -> tuple[float, float]:
    """Over unordered pairs of rows of ``vectors [C, P]``: (std of cosines with Bessel's
    correction, mean of ``|cos + 1/(C−1)|``), accumulated in row tiles so no C×C matrix exists
    when ``tile`` < C. Sums are taken of cos + 1/(C−1), which is small near a simplex ETF, so
    the variance does not cancel catastrophically.
    """
    c = vectors.shape[0]
    unit = vectors.to(torch.float64)
    unit = unit / unit.norm(dim=1, keepdim=True)
    target = -1.0 / (c - 1)
    tile = tile if tile > 0 else max(1, min(c, (1 << 24) // max(c, 1)))
    total = unit.new_zeros(())
    total_sq = unit.new_zeros(())
    total_abs = unit.new_zeros(())
    cols = torch.arange(c, device=unit.device)
    for start in range(0, c, tile):
        stop = min(c, start + tile)
        dev = unit[start:stop] @ unit.T - target
        upper = cols[None, :] > torch.arange(start, stop, device=unit.device)[:, None]
        dev = torch.where(upper, dev, torch.zeros((), dtype=dev.dtype, device=dev.device))
        total += dev.sum()
        total_sq += dev.square().sum()
        total_abs += dev.abs().sum()
    pairs = c * (c - 1) / 2
    mean_dev = total / pairs
    var = (total_sq - pairs * mean_dev.square()) / max(pairs - 1, 1)
    return float(var.clamp(min=0).sqrt()), float(total_abs / pairs)


def least_squares(
    class_means: torch.Tensor,
    priors: torch.Tensor,
    sigma_w: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W̃_LS = R A⁻¹ of SPEC §3 as (W_LS ``[C, P]``, b_LS ``[C]``).

    ``class_means [C, P]`` and ``priors [C]`` (π_c, zero for absent classes). Solved in centered
    coordinates: with T = [[I, μ_G], [0, 1]], A = T (D + λ T⁻¹T⁻ᵀ) Tᵀ where D = diag(Σ_T, 1), so
    V = W̃ T solves V K = R_c with K = D + λ T⁻¹T⁻ᵀ and R_c = [Π M̄ᵀ, π]. K is far better
    conditioned than A when the global mean is large (post-ReLU features): for λ = 0 it is Σ_T.
    Differentiable (ncfast.theory takes gradients through it) whenever the Cholesky solve is used.
    """
    p = class_means.shape[1]
    k, r_c, mu_g = centered_normal_equations(class_means, priors, sigma_w, lam)
    v = _solve_psd_right(k, r_c, positive_definite=lam > 0)
    weight = v[:, :p]
    bias = v[:, p] - weight @ mu_g
    return weight, bias


def centered_normal_equations(
    class_means: torch.Tensor, priors: torch.Tensor, sigma_w: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K ``[P+1, P+1]``, R_c ``[C, P+1]``, μ_G ``[P]``): the normal equations V K = R_c of
    :func:`least_squares` in centered coordinates. cond(K) bounds the error of the solve, and
    so of every SPEC §3 key (the tests' tolerances use it)."""
    p = class_means.shape[1]
    mu_g = priors @ class_means
    centered = class_means - mu_g
    # K is assembled in place: Σ_T = Σ_W + Σ_c π_c (μ_c − μ_G)(μ_c − μ_G)ᵀ and the λ terms go
    # straight into K's [P, P] block, so K is the only [P, P]-sized allocation here.
    k = sigma_w.new_zeros(p + 1, p + 1)
    top = k[:p, :p]
    top.copy_(sigma_w)
    top.addmm_((centered * priors[:, None]).T, centered)
    k[p, p] = 1.0
    if lam:
        # λ T⁻¹T⁻ᵀ with T⁻¹ = [[I, −μ_G], [0, 1]]
        top.diagonal().add_(lam)
        top.addr_(mu_g, mu_g, alpha=lam)
        k[:p, p] -= lam * mu_g
        k[p, :p] -= lam * mu_g
        k[p, p] += lam
    r_c = torch.cat([centered * priors[:, None], priors[:, None]], dim=1)
    return k, r_c, mu_g


def _solve_psd_right(k: torch.Tensor, rhs: torch.Tensor, positive_definite: bool) -> torch.Tensor:
    """X with X K = rhs for symmetric PSD K; the minimum-norm solution when K is singular.

    On a singular K, Cholesky can succeed on rounding noise and return a huge, meaningless
    solution; so without λ > 0 (K positive definite in exact arithmetic) it is used only when
    its pivots stay well away from zero, and an eigendecomposition is used otherwise.
    """
    chol, info = torch.linalg.cholesky_ex(k)
    if int(info) == 0:
        pivots = torch.diagonal(chol).square()
        # Without λ, Cholesky is trusted only when its pivots show K is well away from singular
        # (it also keeps the common case differentiable: eigh's backward fails on repeated
        # eigenvalues, e.g. Σ_W = I in the theory simulator).
        if positive_definite or bool(pivots.min() > _WELL_CONDITIONED * pivots.max()):
            # X L Lᵀ = rhs as two triangular solves: cholesky_solve would copy L.
            y = torch.linalg.solve_triangular(chol.mT, rhs, upper=True, left=False)
            solution: torch.Tensor = torch.linalg.solve_triangular(chol, y, upper=False, left=False)
            return solution
    evecs: torch.Tensor
    evals, evecs = torch.linalg.eigh(k)
    keep = evals > k.shape[0] * torch.finfo(k.dtype).eps * evals.abs().max()
    inv = torch.where(keep, 1.0 / evals.clamp(min=torch.finfo(k.dtype).tiny), 0.0)
    return ((rhs @ evecs) * inv) @ evecs.T


def _centered_classifier(
    weight: torch.Tensor, bias: torch.Tensor, mu_g: torch.Tensor
) -> torch.Tensor:
    """V = W̃ T = [W, b + W μ_G] ``[C, P+1]``: the classifier (float64) in centered coordinates."""
    return torch.cat([weight, (bias + weight @ mu_g)[:, None]], dim=1)


def _squared_error_terms(
    v: torch.Tensor,
    class_means: torch.Tensor,
    priors: torch.Tensor,
    sigma_w: torch.Tensor,
    mu_g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, spread) of SPEC §3 for V = [W, b + W μ_G]: fit = Σ_c π_c ‖V g̃_c − e_c‖² with
    g̃_c = [μ_c − μ_G; 1] (class means against their targets) and spread = tr(W Σ_W Wᵀ) (the
    within-class scatter through W). Both are sums of non-negative terms (no cancellation)
    and differentiable in every argument.
    """
    c, p = class_means.shape
    g = torch.cat([class_means - mu_g, torch.ones_like(priors)[:, None]], dim=1)  # g̃_c
    # Only the classes present carry a term (π_c = 0 otherwise): at a language model's
    # vocabulary most are absent, and [C, C] work would take minutes at C = 50257.
    present = torch.nonzero(priors > 0).squeeze(1)
    # In class tiles: the [C_present, C] outputs would be 8 GB at C = 32000.
    tile = max(1, min(c, (1 << 24) // max(c, 1)))
    fit = v.new_zeros(())
    for start in range(0, present.numel(), tile):
        classes = present[start : start + tile]
        block = g.index_select(0, classes) @ v.T
        rows = torch.arange(classes.numel(), device=block.device)
        block[rows, classes] -= 1.0
        fit = fit + (priors.index_select(0, classes) * block.square().sum(1)).sum()
    weight = v[:, :p]
    spread = ((weight @ sigma_w) * weight).sum()
    return fit, spread


def mse_loss(
    weight: torch.Tensor,
    bias: torch.Tensor,
    class_means: torch.Tensor,
    priors: torch.Tensor,
    sigma_w: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """The MSE objective of SPEC §3 (HPD22 Eq. 3) for classifier (weight ``[C, P]``, bias
    ``[C]``) from the class statistics, as a differentiable float64 scalar tensor:
    ½ (Σ_c π_c ‖V g̃_c − e_c‖² + tr(W Σ_W Wᵀ) + λ ‖W̃‖²) (the ``loss_mse`` of
    :func:`mse_decomposition`; at (W_LS, b_LS), ``loss_ls``)."""
    weight = weight.to(torch.float64)  # a float32 classifier's terms are float64's too
    bias = bias.to(torch.float64)
    mu_g = priors @ class_means
    fit, spread = _squared_error_terms(
        _centered_classifier(weight, bias, mu_g), class_means, priors, sigma_w, mu_g
    )
    loss = fit + spread
    if lam:
        loss = loss + lam * (weight.square().sum() + bias.square().sum())
    return 0.5 * loss


def mse_decomposition(
    weight: torch.Tensor,
    bias: torch.Tensor,
    class_means: torch.Tensor,
    priors: torch.Tensor,
    sigma_w: torch.Tensor,
    lam: float,
) -> dict[str, float]:
    """SPEC §3 terms for classifier (weight ``[C, P]``, bias ``[C]``): loss_mse, loss_ls,
    loss_nc1, loss_nc23, loss_ls_perp. All sums of non-negative terms in centered coordinates.
    """
    p = class_means.shape[1]
    k, r_c, mu_g = centered_normal_equations(class_means, priors, sigma_w, lam)
    v_ls = _solve_psd_right(k, r_c, positive_definite=lam > 0)
    del r_c  # [C, P + 1]: keeps it out of the peak below
    w_ls = v_ls[:, :p]
    b_ls = v_ls[:, p] - w_ls @ mu_g
    weight = weight.to(torch.float64)
    bias = bias.to(torch.float64)
    v = _centered_classifier(weight, bias, mu_g)
    fit, spread = _squared_error_terms(v, class_means, priors, sigma_w, mu_g)
    fit_ls, spread_ls = _squared_error_terms(v_ls, class_means, priors, sigma_w, mu_g)
    sq_norm = weight.square().sum() + bias.square().sum()
    sq_norm_ls = w_ls.square().sum() + b_ls.square().sum()
    delta = v - v_ls
    loss_mse = 0.5 * (fit + spread + lam * sq_norm)
    loss_nc1 = 0.5 * (spread_ls + lam * sq_norm_ls)
    loss_nc23 = 0.5 * fit_ls
    loss_ls_perp = 0.5 * (delta @ k).mul_(delta).sum()
    return {
        "loss_mse": float(loss_mse),
        "loss_ls": float(loss_nc1 + loss_nc23),
        "loss_nc1": float(loss_nc1),
        "loss_nc23": float(loss_nc23),
        "loss_ls_perp": float(loss_ls_perp.clamp(min=0)),
    }


def ncc_mismatch_count(
    features: torch.Tensor,
    valid: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    class_means: torch.Tensor,
    present: torch.Tensor,
) -> torch.Tensor:
    """Number of rows with ``valid`` set where argmax_c (w_c·h + b_c) differs from the
    argmin over present classes c of ‖h − μ_c‖ (SPEC §2, NC4), as a device int64 scalar.
    Ties go to the lowest index (torch's argmax/argmin). Distances are taken after centering on
    the mean of the present class means so that a large common offset does not swamp them.
    """
    x = torch.where(valid[:, None], features.to(torch.float64), 0.0)
    mask = present.to(torch.float64)
    center = (class_means * mask[:, None]).sum(0) / mask.sum().clamp(min=1)
    mu = class_means - center
    # ‖h − μ_c‖² − ‖h‖² = −2 h·μ_c + ‖μ_c‖², written into one [B, C] buffer (B·C·8 bytes is
    # 256 MiB at B = 1024, C = 32000: no second or third copy).
    scores = torch.addmm(mu.square().sum(1), x - center, mu.T, alpha=-2.0)
    scores.masked_fill_(~present[None, :], float("inf"))
    ncc = scores.argmin(1)
    del scores
    logits = torch.addmm(bias.to(torch.float64), x, weight.to(torch.float64).T)
    return ((logits.argmax(1) != ncc) & valid).sum()
