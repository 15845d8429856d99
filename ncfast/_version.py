"""Version facts, importable from every layer without importing the package root: ncfast's
version (the one place it is written; pyproject.toml reads it from here) and the form CUDA's
version numbers are written in."""

from __future__ import annotations

__version__ = "0.2.0"


def cuda_version_string(version: int) -> str | None:
    """CUDA's version number as CUDA writes it (``CUDA_VERSION``, 12040) in the usual form
    ("12.4"); None for 0 (built without CUDA)."""
    return f"{version // 1000}.{version % 1000 // 10}" if version else None
