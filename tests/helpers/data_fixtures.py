"""Writers of tiny dataset files in the real on-disk formats (for tests/paper/test_data.py).

Each ``write_<dataset>(root, rng)`` writes a small random dataset under ``root`` in torchvision's
layout and returns the decoded truth: ``{"train": (images, labels), "test": (images, labels)}``
with images uint8 ``[N, C, H, W]`` before any padding and labels 0..9.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

NUM_CLASSES = 10


def class_labels(counts, rng) -> np.ndarray:
    """Labels with ``counts[c]`` samples of class c, shuffled."""
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])
    return rng.permutation(labels)


def train_counts() -> list[int]:
    """Unbalanced per-class training counts; the rarest class (several) has 3 images."""
    return [3 + (c % 4) for c in range(NUM_CLASSES)]


def random_images(n, channels, side, rng) -> np.ndarray:
    # uniform bytes: images are distinct with overwhelming probability, so tests can match them
    return rng.integers(0, 256, size=(n, channels, side, side), dtype=np.uint8)


# --- IDX (MNIST, FashionMNIST) ---------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.tobytes()


def write_idx_dataset(root: Path, folder: str, rng, gz: bool) -> dict:
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, prefix, counts in (
        ("train", "train", train_counts()),
        ("test", "t10k", [2] * NUM_CLASSES),
    ):
        labels = class_labels(counts, rng)
        images = random_images(labels.size, 1, 28, rng)
        for kind, payload in (
            ("images-idx3", idx_bytes(images[:, 0])),
            ("labels-idx1", idx_bytes(labels)),
        ):
            name = raw / f"{prefix}-{kind}-ubyte"
            if gz:
                Path(f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                name.write_bytes(payload)
        truth[split] = (images, labels)
    return truth


def write_mnist(root, rng, gz=False):
    return write_idx_dataset(root, "MNIST", rng, gz)


def write_fashionmnist(root, rng, gz=True):
    return write_idx_dataset(root, "FashionMNIST", rng, gz)


# --- CIFAR-10 pickles ------------------------------------------------------------------------


def _py2_str(b: bytes) -> bytes:
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING
    return b"T" + struct.pack("<I", len(b)) + b  # BINSTRING


def _py2_int(i: int) -> bytes:
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if 0 <= i < 65536:
        return b"M" + struct.pack("<H", i)
    return b"J" + struct.pack("<i", i)


def _py2_uint8_array(a: np.ndarray) -> bytes:
    """A uint8 ndarray exactly as Python 2's cPickle + numpy 1.x wrote it in the CIFAR release."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    assert a.ndim == 2
    dtype = (
        b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
        b"("
        + _py2_int(3)
        + _py2_str(b"|")
        + b"NNN"
        + struct.pack("<ci", b"J", -1) * 2
        + _py2_int(0)
        + b"tb"
    )
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + _py2_int(0)
        + b"\x85"
        + _py2_str(b"b")
        + b"\x87R"
        + b"("
        + _py2_int(1)
        + _py2_int(a.shape[0])
        + _py2_int(a.shape[1])
        + b"\x86"
        + dtype
        + b"\x89"  # NEWFALSE: C order
        + _py2_str(a.tobytes())
        + b"tb"
    )


def _py2_list(items: list[bytes]) -> bytes:
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


def cifar_batch_py2(data: np.ndarray, labels, batch_label: str) -> bytes:
    """A CIFAR-10 batch in the official release's format: a protocol-2 pickle from Python 2."""
    items = [
        (b"batch_label", _py2_str(batch_label.encode())),
        (b"labels", _py2_list([_py2_int(int(x)) for x in labels])),
        (b"data", _py2_uint8_array(data)),
        (b"filenames", _py2_list([_py2_str(f"img_{i}.png".encode()) for i in range(len(labels))])),
    ]
    body = b"".join(_py2_str(k) + v for k, v in items)
    return b"\x80\x02}(" + body + b"u."


def cifar_batch_py3(data: np.ndarray, labels, batch_label: str) -> bytes:
    """The same content re-pickled by Python 3 + numpy 2 (bytes keys, numpy._core globals)."""
    batch = {b"batch_label": batch_label.encode(), b"labels": list(map(int, labels)), b"data": data}
    return pickle.dumps(batch, protocol=2)


def write_cifar10(root, rng, writer=cifar_batch_py2) -> dict:
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    labels = class_labels(train_counts(), rng)
    images = random_images(labels.size, 3, 32, rng)
    for b, part in enumerate(np.array_split(np.arange(labels.size), 5)):
        flat = images[part].reshape(len(part), -1)
        payload = writer(flat, labels[part], f"training batch {b + 1} of 5")
        (folder / f"data_batch_{b + 1}").write_bytes(payload)
    test_labels = class_labels([2] * NUM_CLASSES, rng)
    test_images = random_images(test_labels.size, 3, 32, rng)
    (folder / "test_batch").write_bytes(
        writer(test_images.reshape(test_labels.size, -1), test_labels, "testing batch 1 of 1")
    )
    return {"train": (images, labels), "test": (test_images, test_labels)}


# --- SVHN .mat -------------------------------------------------------------------------------


def svhn_file_labels(labels: np.ndarray) -> np.ndarray:
    """SVHN's file labels: digits 1..9 as themselves, digit 0 as 10, shape [N, 1]."""
    return np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]


def write_svhn(root, rng) -> dict:
    import scipy.io

    Path(root).mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, counts in (("train", train_counts()), ("test", [2] * NUM_CLASSES)):
        labels = class_labels(counts, rng)
        images = random_images(labels.size, 3, 32, rng)
        # the file stores X as [H, W, C, N]
        scipy.io.savemat(
            Path(root) / f"{split}_32x32.mat",
            {"X": images.transpose(2, 3, 1, 0), "y": svhn_file_labels(labels)},
        )
        truth[split] = (images, labels)
    return truth


# --- STL-10 binary ---------------------------------------------------------------------------


def write_stl10(root, rng) -> dict:
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, counts in (("train", train_counts()), ("test", [1] * NUM_CLASSES)):
        labels = class_labels(counts, rng)
        images = random_images(labels.size, 3, 96, rng)
        # each image column-major: bytes of images transposed to [N, C, W, H]
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        truth[split] = (images, labels)
    return truth


WRITERS = {
    "mnist": write_mnist,
    "fashionmnist": write_fashionmnist,
    "cifar10": write_cifar10,
    "svhn": write_svhn,
    "stl10": write_stl10,
}
