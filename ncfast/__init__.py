"""ncfast: exact, streaming Neural Collapse measurement (Han, Papyan & Donoho, ICLR 2022)."""

from ncfast._version import __version__
from ncfast.errors import NCFastError
from ncfast.measure import Measurement
from ncfast.metrics import (
    DegenerateFeaturesError,
    least_squares_classifier,
    mse_lambda,
    nc_metrics,
    snr,
    whiten,
)
from ncfast.nc4 import NCCMismatch
from ncfast.stats import ClassStats, InvalidInputError

__all__ = [
    "ClassStats",
    "DegenerateFeaturesError",
    "InvalidInputError",
    "Measurement",
    "NCCMismatch",
    "NCFastError",
    "__version__",
    "least_squares_classifier",
    "mse_lambda",
    "nc_metrics",
    "snr",
    "whiten",
]
