"""ncfast: exact, streaming Neural Collapse measurement (Han, Papyan & Donoho, ICLR 2022)."""

from ncfast._version import __version__
from ncfast.errors import NCFastError
from ncfast.measure import Measurement, scalars
from ncfast.metrics import (
    DegenerateFeaturesError,
    least_squares_classifier,
    mse_lambda,
    nc_metrics,
    nc_metrics_or_nan,
    snr,
    whiten,
)
from ncfast.monitor import NCMonitor
from ncfast.nc4 import NCCMismatch
from ncfast.stats import ClassStats, InvalidInputError, InvalidStateError

# MonitorPass and TrainingWatch (made by NCMonitor) and NCMetrics stay in their modules: the
# API reference then has one target per name.

__all__ = [
    "ClassStats",
    "DegenerateFeaturesError",
    "InvalidInputError",
    "InvalidStateError",
    "Measurement",
    "NCCMismatch",
    "NCFastError",
    "NCMonitor",
    "__version__",
    "least_squares_classifier",
    "mse_lambda",
    "nc_metrics",
    "nc_metrics_or_nan",
    "scalars",
    "snr",
    "whiten",
]
