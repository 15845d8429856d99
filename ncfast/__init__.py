"""ncfast: exact, streaming Neural Collapse measurement (Han, Papyan & Donoho, ICLR 2022)."""

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

__version__ = "0.1.0"

__all__ = [
    "ClassStats",
    "DegenerateFeaturesError",
    "InvalidInputError",
    "Measurement",
    "NCCMismatch",
    "__version__",
    "least_squares_classifier",
    "mse_lambda",
    "nc_metrics",
    "snr",
    "whiten",
]
