"""Assertions that two results of ncfast agree: statistics (``assert_same_stats``), metric
dicts (``assert_same_metrics``), a result against tests/helpers/oracle.py
(``assert_matches_oracle``), and an error's exact message (``raises_exactly``)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import ncfast
from ncfast.stats import ClassStats
from tests.helpers.tolerances import DIMENSIONLESS_ATOL, stream_tolerances


def assert_same_stats(a: ClassStats, b: ClassStats, features=None, labels=None):
    """Same counts; class means and Σ_W within :func:`stream_tolerances` of ``features`` (exactly
    equal when no features are given)."""
    assert torch.equal(a.counts, b.counts)
    present = a.present
    atol_means, atol_sigma = (0.0, 0.0) if features is None else stream_tolerances(features, labels)
    torch.testing.assert_close(
        a.class_means[present], b.class_means[present], rtol=0, atol=atol_means
    )
    torch.testing.assert_close(a.sigma_w, b.sigma_w, rtol=0, atol=atol_sigma)


def assert_same_metrics(got: dict, expected: dict, rtol: float = 0.0):
    """Every key equal, to ``rtol`` (0: bit for bit). Features from forward passes over other
    batch sizes differ by rounding (other GEMM blocking): such comparisons take the brute-force
    bound :func:`tests.tolerances.oracle_rtol` of the features, N·eps·κ."""
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, rtol=rtol, atol=0, msg=key)
        else:
            np.testing.assert_allclose(got[key], value, rtol=rtol, atol=1e-300, err_msg=key)


NON_SCALAR_KEYS = (
    "snr_singular_values",
    "sigma_b_rank",
    "sigma_w_rank",
    "classes_present",
    "weight_decay",
    "num_samples",
)
SCALAR_KEYS = [k for k in ncfast.metrics.SPEC_KEYS if k not in NON_SCALAR_KEYS]


def assert_matches_oracle(result, expected, rtol, keys=SCALAR_KEYS):
    for key in keys:
        if key not in expected:
            continue
        assert key in result, key
        atol = DIMENSIONLESS_ATOL if key.startswith(("nc2_", "nc3_", "nc4_")) else 0.0
        np.testing.assert_allclose(result[key], expected[key], rtol=rtol, atol=atol, err_msg=key)
    np.testing.assert_allclose(
        result["snr_singular_values"].numpy(), expected["snr_singular_values"], rtol=rtol
    )
    assert result["classes_present"] == expected["classes_present"]
    assert result["num_samples"] == expected["num_samples"]


def raises_exactly(kind: type[BaseException], message: str):
    """``pytest.raises`` of ``kind`` whose message is ``message``, whole (not a pattern)."""
    return pytest.raises(kind, match="^" + re.escape(message) + "$")
