"""An independent float64 numpy brute force of every SPEC quantity: explicit loops, dense pinv.

Shares no code with ncfast. Deliberately naive: per-sample loops, P×P pseudo-inverses, the
uncentered normal equations of SPEC §3 exactly as written.
"""

from __future__ import annotations

import itertools

import numpy as np


def statistics(h: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    h = np.asarray(h, dtype=np.float64)
    n, p = h.shape
    counts = np.zeros(num_classes, dtype=np.int64)
    sums = np.zeros((num_classes, p))
    for i in range(n):
        counts[y[i]] += 1
        sums[y[i]] += h[i]
    present = counts > 0
    means = np.full((num_classes, p), np.nan)
    means[present] = sums[present] / counts[present, None]
    mu_g = h.mean(axis=0)
    sigma_w = np.zeros((p, p))
    sigma_t = np.zeros((p, p))
    for i in range(n):
        d = h[i] - means[y[i]]
        sigma_w += np.outer(d, d)
        t = h[i] - mu_g
        sigma_t += np.outer(t, t)
    sigma_w /= n
    sigma_t /= n
    mbar = (means[present] - mu_g).T  # [P, C_present]
    c = int(present.sum())
    sigma_b = mbar @ mbar.T / c
    return {
        "counts": counts,
        "present": present,
        "means": means,
        "global_mean": mu_g,
        "sigma_w": sigma_w,
        "sigma_b": sigma_b,
        "sigma_t": sigma_t,
        "mbar": mbar,
        "c": c,
        "n": n,
    }


def _std_over_mean(x):
    return np.std(x, ddof=1) / np.mean(x)


def _pair_stats(vectors: np.ndarray):
    c = vectors.shape[0]
    cosines = []
    for a, b in itertools.combinations(range(c), 2):
        va, vb = vectors[a], vectors[b]
        cosines.append(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))
    cosines = np.array(cosines)
    std = np.std(cosines, ddof=1) if len(cosines) > 1 else 0.0
    return std, np.mean(np.abs(cosines + 1.0 / (c - 1)))


def inv_sqrt(matrix: np.ndarray):
    evals, evecs = np.linalg.eigh(matrix)
    p = matrix.shape[0]
    keep = evals > p * np.finfo(np.float64).eps * np.abs(evals).max()
    inv = np.zeros_like(evals)
    inv[keep] = 1.0 / np.sqrt(evals[keep])
    return (evecs * inv) @ evecs.T, int(keep.sum())


def least_squares(h, y, num_classes, lam):
    """W̃_LS = R A⁺ from the uncentered (P+1)-dimensional normal equations, dense pinv."""
    h = np.asarray(h, dtype=np.float64)
    n, p = h.shape
    ht = np.hstack([h, np.ones((n, 1))])
    a = ht.T @ ht / n + lam * np.eye(p + 1)
    r = np.zeros((num_classes, p + 1))
    for i in range(n):
        r[y[i]] += ht[i] / n
    w_ls = r @ np.linalg.pinv(a, rcond=1e-13, hermitian=True)
    return w_ls, a, r


def nc_metrics(h, y, num_classes, weight=None, bias=None, lam=0.0):
    s = statistics(h, y, num_classes)
    c, mbar, present = s["c"], s["mbar"], s["present"]
    out = {"classes_present": c, "num_samples": s["n"]}
    out["nc1"] = np.trace(s["sigma_w"] @ np.linalg.pinv(s["sigma_b"], rcond=1e-12)) / c
    out["nc2_equinorm_means"] = _std_over_mean(np.linalg.norm(mbar, axis=0))
    out["nc2_equiangular_means"], out["nc2_maxangle_means"] = _pair_stats(mbar.T)
    w_isqrt, out["sigma_w_rank"] = inv_sqrt(s["sigma_w"])
    sv = np.linalg.svd(w_isqrt @ mbar, compute_uv=False)
    sv = sv[sv > 1e-10 * sv.max()]
    out["snr_singular_values"] = sv
    out["snr_condition"] = sv[0] / sv[-1]
    if weight is None:
        return out
    weight = np.asarray(weight, np.float64)
    bias = np.zeros(num_classes) if bias is None else np.asarray(bias, np.float64)
    wp = weight[present]
    out["nc2_equinorm_classifiers"] = _std_over_mean(np.linalg.norm(wp, axis=1))
    out["nc2_equiangular_classifiers"], out["nc2_maxangle_classifiers"] = _pair_stats(wp)
    out["nc3_self_duality"] = np.sum((wp.T / np.linalg.norm(wp) - mbar / np.linalg.norm(mbar)) ** 2)
    # NC4, sample by sample.
    means = s["means"]
    mismatches = 0
    for i in range(len(y)):
        logits = weight @ h[i] + bias
        dists = [
            np.linalg.norm(h[i] - means[k]) if present[k] else np.inf for k in range(num_classes)
        ]
        mismatches += int(np.argmax(logits) != np.argmin(dists))
    out["nc4_ncc_mismatch"] = mismatches / len(y)
    # SPEC §3 literally.
    w_ls, a, _ = least_squares(h, y, num_classes, lam)
    wt = np.hstack([weight, bias[:, None]])
    n, p = np.asarray(h).shape
    ht = np.hstack([np.asarray(h, np.float64), np.ones((n, 1))])
    onehot = np.eye(num_classes)[y]
    out["loss_mse"] = 0.5 * np.mean(np.sum((ht @ wt.T - onehot) ** 2, axis=1)) + 0.5 * lam * np.sum(
        wt**2
    )
    d = wt - w_ls
    out["loss_ls_perp"] = 0.5 * np.trace(d @ a @ d.T)
    sw_t = np.zeros((p + 1, p + 1))
    sw_t[:p, :p] = s["sigma_w"]
    out["loss_nc1"] = 0.5 * np.trace(w_ls @ (sw_t + lam * np.eye(p + 1)) @ w_ls.T)
    nc23 = 0.0
    for k in range(num_classes):
        if present[k]:
            mt = np.append(means[k], 1.0)
            nc23 += s["counts"][k] / n * np.sum((w_ls @ mt - np.eye(num_classes)[k]) ** 2)
    out["loss_nc23"] = 0.5 * nc23
    out["loss_ls"] = out["loss_nc1"] + out["loss_nc23"]
    return out
