"""Exact (rational) class statistics of float64 data, rounded once to float64 at the end.

Every float64 is an integer times a power of two, so with one common scale 2^E the features are
Python integers and the class sums and Σ h hᵀ are exact; N_k Σ_W,k = (N_k Q_k − s_k s_kᵀ) / N_k
is then one exact fraction per entry. Unlike numpy's long double (80-bit on x86, plain float64
on macOS arm64 and Windows), this is the same reference on every platform.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def class_statistics(h: np.ndarray, y: np.ndarray, num_classes: int):
    """Class means [C, P] and N Σ_W [P, P] (the scatter about the class means), each entry the
    float64 nearest to its exact value; rows of absent classes are zero."""
    h = np.asarray(h, dtype=np.float64)
    if not np.isfinite(h).all():
        raise ValueError("exact.class_statistics: features must be finite")
    p = h.shape[1]
    ratios = [[float(v).as_integer_ratio() for v in row] for row in h]
    scale = max(den for row in ratios for _, den in row)  # a power of two
    rows = [[num * (scale // den) for num, den in row] for row in ratios]
    means = np.zeros((num_classes, p))
    scatter = [[Fraction(0)] * p for _ in range(p)]
    for k in range(num_classes):
        members = [rows[i] for i in np.flatnonzero(np.asarray(y) == k)]
        n = len(members)
        if n == 0:
            continue
        s = [sum(row[a] for row in members) for a in range(p)]
        for a in range(p):
            means[k, a] = float(Fraction(s[a], n * scale))
            for b in range(a, p):
                q = sum(row[a] * row[b] for row in members)
                scatter[a][b] += Fraction(n * q - s[a] * s[b], n * scale * scale)
    out = np.zeros((p, p))
    for a in range(p):
        for b in range(a, p):
            out[a, b] = out[b, a] = float(scatter[a][b])
    return means, out
