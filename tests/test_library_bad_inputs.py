"""Bad inputs to the library and its integrations (issue 19, items 14, 17, 18, 20): one clear
NCFastError (or a NaN row with its reason) instead of a traceback from deep inside."""

from __future__ import annotations

import pytest
import torch

import ncfast
from ncfast import theory
from ncfast.errors import NCFastError
from tests.feeding import stream
from tests.synthetic_features import make_data


@pytest.mark.parametrize("with_classifier", [False, True])
def test_features_whose_squares_overflow_float64_are_named(seed, with_classifier):
    """Features of 1e200: Σ_W overflows to inf; the error says so (not torch's _LinAlgError)."""
    features, labels, weight, bias = make_data([10, 12, 9], 4, seed)
    classifier = (weight, bias) if with_classifier else (None, None)
    measurement = stream(features * 1e200, labels, 3, 8, *classifier)
    with pytest.raises(ncfast.DegenerateFeaturesError, match="too large for float64.*rescale"):
        measurement.compute()
    with pytest.raises(ncfast.DegenerateFeaturesError, match="whiten: the features are too large"):
        ncfast.whiten(measurement.stats)


def test_simulation_step_that_overflows_names_dt_not_a_singular_sigma_w(seed):
    x = theory.initial_features(3, 5, 4, generator=torch.Generator().manual_seed(seed))
    with pytest.raises(theory.SimulationOverflowError, match=r"dt=1e\+300 .* overflow float64"):
        theory.simulate_central_path(x, 3, 2, dt=1e300)
    assert issubclass(theory.SimulationOverflowError, NCFastError)
    # A sane step still runs.
    assert theory.simulate_central_path(x, 3, 1, dt=1.0).omega.isfinite().all()
