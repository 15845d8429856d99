"""The one place ncfast's version is written (pyproject.toml and every module read it here)."""

__version__ = "0.2.0"
