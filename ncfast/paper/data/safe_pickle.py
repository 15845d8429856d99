"""Unpickling CIFAR-10 batches without ever running code from the file.

A pickle can call any importable function while it loads. The CIFAR-10 batches only need numpy's
array reconstruction, so the unpickler below resolves exactly those globals and refuses every
other one (``os.system``, ``builtins.eval``, ...) before anything is called.
"""

from __future__ import annotations

import codecs
import io
import pickle

import numpy as np

try:  # numpy >= 2 moved the implementation to numpy._core; both names appear in pickles
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar

_ALLOWED_GLOBALS = {
    # Pickles written by Python 2 (the official release) and numpy 1.x name numpy.core;
    # numpy 2 writes numpy._core.
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Protocol-2 pickles written by Python 3 encode bytes objects through _codecs.encode.
    ("_codecs", "encode"): codecs.encode,
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle refers to a global outside the allow-list; nothing of it was called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_loads(data: bytes):
    """Unpickle ``data`` allowing only dicts, lists, strings, numbers and numpy arrays.

    Strings of Python-2 pickles decode as latin-1 (as torchvision does), so array buffers load.
    Raises :class:`ForbiddenGlobalError` for any other global, ``pickle.UnpicklingError`` (or
    ``EOFError``, ``ValueError``...) for malformed data.
    """
    return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
