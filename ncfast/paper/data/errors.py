"""Exceptions and warnings of :mod:`ncfast.paper.data`."""

from __future__ import annotations

from ncfast.errors import NCFastError


class DatasetError(NCFastError):
    """A dataset is missing, incomplete, corrupt or unsafe; the message says what and where.

    Messages are meant for the user: they name the files expected under the data root and, where
    downloading would help, the ``--download`` flag (``download=True`` in Python).
    """


class DatasetArgumentError(DatasetError, ValueError):
    """An argument of :func:`ncfast.paper.data.load_dataset` is invalid (unknown name, bad
    per_class)."""


class DatasetChecksumWarning(UserWarning):
    """A dataset file has the right format but differs from the official release."""
