"""The CUDA kernels' own source (csrc/cuda/kernels.cuh), compiled for the CPU against an
emulation of the CUDA execution model (csrc/emulation/), against the reference.

Runs everywhere a C++20 compiler is (no GPU needed), so the logic of the CUDA update and NC4
kernels — per-row validation, the last-block hand-over, class ranking within a tile, run sums,
first-seen shifts, the Gram mirror, argmin/argmax reductions with ties — is tested in CI. Blocks
run one at a time in a shuffled order; races between concurrently running blocks are outside
what this can show (the CUDA tests in tests/test_native.py cover the real thing on a GPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.cpp_extension import include_paths

from ncfast import reference

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    ROOT / "csrc" / "emulation" / "cuda_emulator.cpp",
    ROOT / "csrc" / "emulation" / "cuda_emulation.h",
    ROOT / "csrc" / "cuda" / "kernels.cuh",
    ROOT / "csrc" / "cuda" / "kernels.h",
    ROOT / "csrc" / "common.h",
]
FEATURE_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
LABEL_KIND = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}
I64, PTR, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


def _build() -> ctypes.CDLL:
    if not all(p.exists() for p in SOURCES):
        pytest.skip("csrc/ is not next to the tests (installed package without sources)")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"ncfast_cuda_emulator_{digest}.so"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread"]
        cmd += [f"-I{p}" for p in include_paths()]
        cmd += [str(SOURCES[0]), "-o", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.fail(f"building the CUDA emulation failed:\n{result.stderr[-4000:]}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    lib.ncfast_emu_last_error.restype = ctypes.c_char_p
    lib.ncfast_emu_update_scratch_bytes.restype = I64
    lib.ncfast_emu_update_scratch_bytes.argtypes = [I64, I64, I64, ctypes.POINTER(I64)]
    lib.ncfast_emu_update_stats.argtypes = [PTR, INT, I64, I64, PTR, INT, I64, I64, I64, I64]
    lib.ncfast_emu_update_stats.argtypes += [PTR] * 6
    lib.ncfast_emu_mirror.argtypes = [PTR, I64]
    lib.ncfast_emu_ncc_centre.argtypes = [PTR, INT, I64, I64, PTR, I64, PTR, I64, I64, PTR]
    lib.ncfast_emu_ncc_count.argtypes = [PTR, PTR, PTR, PTR, PTR, PTR, I64, I64, I64, PTR]
    lib.ncfast_emu_seed.argtypes = [ctypes.c_uint]
    return lib


@pytest.fixture(scope="module")
def emu() -> ctypes.CDLL:
    return _build()


def _check(lib, rc):
    assert rc == 0, lib.ncfast_emu_last_error().decode()


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def emulated_update(lib, features, labels, counts, shift, sums, scatter, invalid):
    """update_stats_cuda (csrc/cuda/ops_cuda.cpp) with the kernels emulated: the same scratch
    layout and zeroing, then scatter += zᵀz. Returns the centred rows z."""
    b, p = features.shape
    c = counts.shape[0]
    if b == 0:
        return None
    zeroed = I64()
    total = lib.ncfast_emu_update_scratch_bytes(b, p, c, ctypes.byref(zeroed))
    scratch = torch.full((total,), 0xAB, dtype=torch.uint8)  # poison what is not zeroed
    scratch[: zeroed.value] = 0
    centred = torch.full((b, p), float("nan"), dtype=torch.float64)  # every element is written
    rc = lib.ncfast_emu_update_stats(
        features.data_ptr(), FEATURE_KIND[features.dtype], features.stride(0), features.stride(1),
        labels.data_ptr(), LABEL_KIND[labels.dtype], labels.stride(0), b, p, c,
        counts.data_ptr(), shift.data_ptr(), sums.data_ptr(), invalid.data_ptr(),
        scratch.data_ptr(), centred.data_ptr(),
    )  # fmt: skip
    _check(lib, rc)
    scatter.addmm_(centred.T, centred)
    return centred


def new_state(num_classes, dim):
    f64 = {"dtype": torch.float64}
    return [
        torch.zeros(num_classes, dtype=torch.int64),
        torch.zeros(num_classes, dim, **f64),
        torch.zeros(num_classes, dim, **f64),
        torch.zeros(dim, dim, **f64),
        torch.zeros(2, dtype=torch.int64),
    ]


def make_batch(g, batch, dim, num_classes, dtype, label_dtype, layout, classes=None):
    classes = num_classes if classes is None else classes
    labels = torch.randint(0, classes, (batch,), generator=g)
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * 3 + 5
    features = means[labels] + torch.randn(batch, dim, generator=g, dtype=torch.float64)
    if batch > 4:
        labels[1] = num_classes + 2
        if label_dtype.is_signed:
            labels[2] = -3
        features[4, dim - 1] = float("nan")
    features = features.to(dtype)
    if layout == 1:
        features = features.t().contiguous().t()
    elif layout == 2:
        features = torch.cat([features, features], dim=1)[:, ::2]
    return features, labels.to(label_dtype)


@pytest.mark.parametrize("dtype", list(FEATURE_KIND))
def test_emulated_update_kernels_match_reference(emu, dtype):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    emu.ncfast_emu_seed(seed % 1000)
    label_dtype = list(LABEL_KIND)[seed % len(LABEL_KIND)]
    num_classes, dim = 9, 45  # two column tiles, the second partial
    native, ref = new_state(num_classes, dim), new_state(num_classes, dim)
    # Classes 0-1, then 0-3, then all: first-seen classes in one-tile and in several-tile
    # batches (300 rows span several row tiles of both kernels).
    for batch, classes, layout in ((7, 2, 2), (130, 4, 0), (300, None, 1), (64, None, 0)):
        x, y = make_batch(g, batch, dim, num_classes, dtype, label_dtype, layout, classes)
        counts_before = native[0].clone()
        z = emulated_update(emu, x, y, *native)
        reference.update_stats_(x, y, *ref)
        label_ok = (y.long() >= 0) & (y.long() < num_classes)
        valid = label_ok & torch.isfinite(x.double()).all(dim=1)
        assert not z[~valid].any(), "invalid rows must be zero in the centred buffer"
        for k in range(num_classes):  # first seen: the shift is the first valid sample
            rows = torch.nonzero(valid & (y.long() == k)).flatten()
            if counts_before[k] == 0 and rows.numel():
                assert torch.equal(native[1][k], x[rows[0]].double()), (seed, k)
    assert torch.equal(native[0], ref[0]) and torch.equal(native[4], ref[4])
    means, sigma_w = reference.finalize_stats(*native[:4])
    ref_means, ref_sigma_w = reference.finalize_stats(*ref[:4])
    torch.testing.assert_close(means, ref_means, rtol=1e-12, atol=1e-12)
    scale = float(ref_sigma_w.abs().max())
    torch.testing.assert_close(sigma_w, ref_sigma_w, rtol=0, atol=1e-12 * scale)


def test_emulated_update_many_classes_and_single_class(emu):
    """More classes than the threads of a block (the last block's loop) and C = 1."""
    g = torch.Generator().manual_seed(_seed())
    for num_classes, dim, batch in ((300, 3, 200), (1, 33, 150)):
        native, ref = new_state(num_classes, dim), new_state(num_classes, dim)
        for _ in range(2):
            x, y = make_batch(g, batch, dim, num_classes, torch.float32, torch.int64, 0)
            emulated_update(emu, x, y, *native)
            reference.update_stats_(x, y, *ref)
        assert torch.equal(native[0], ref[0]) and torch.equal(native[4], ref[4])
        got, expected = reference.finalize_stats(*native[:4]), reference.finalize_stats(*ref[:4])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_emulated_update_near_collapse_is_exact(emu):
    g = torch.Generator().manual_seed(_seed())
    common = torch.randn(6, generator=g, dtype=torch.float64)
    means = torch.randn(3, 6, generator=g, dtype=torch.float64)
    means = means / means.norm(dim=1, keepdim=True) * 1e4 + common / common.norm() * 1e6
    labels = torch.randint(0, 3, (400,), generator=g)
    features = means[labels] + 1e-2 * torch.randn(400, 6, generator=g, dtype=torch.float64)
    native = new_state(3, 6)
    for chunk in torch.split(torch.arange(400), 150):
        emulated_update(emu, features[chunk], labels[chunk], *native)
    _, sigma_w = reference.finalize_stats(*native[:4])
    h, y = features.numpy().astype(np.longdouble), labels.numpy()
    dev = h - np.stack([h[y == k].mean(axis=0) for k in range(3)])[y]  # extended precision
    exact = (dev.T @ dev / 400).astype(np.float64)
    err = np.abs(sigma_w.numpy() - exact).max() / np.abs(exact).max()
    assert err < 1e-11, err


@pytest.mark.parametrize("p", [1, 31, 33, 70])
def test_emulated_mirror_copies_upper_onto_lower(emu, p):
    m = torch.randn(p, p, dtype=torch.float64)
    upper = m.triu().clone()
    _check(emu, emu.ncfast_emu_mirror(m.data_ptr(), p))
    assert torch.equal(m.triu(), upper)
    assert torch.equal(m, m.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_emulated_ncc_kernels_match_reference(emu, dtype):
    """ncc_mismatch_count_cuda's plan and GEMMs in torch, its two kernels emulated; ties in
    the logits (duplicated classifier rows) must go to the lowest index as torch's argmax."""
    g = torch.Generator().manual_seed(_seed())
    batch, dim, num_classes = 150, 7, 40  # more classes than lanes
    x, y = make_batch(g, batch, dim, num_classes, dtype, torch.int64, 2)
    valid = (y >= 0) & (y < num_classes) & torch.isfinite(x.double()).all(dim=1)
    valid[::7] = False
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * 3 + 5
    present = torch.rand(num_classes, generator=g) > 0.3
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    weight[5] = weight[2]  # exact ties between logits 2 and 5
    bias = torch.randn(num_classes, generator=g, dtype=torch.float64)
    bias[5] = bias[2]

    mask = present.double()
    centre = (means * mask[:, None]).sum(0) / mask.sum()
    mu = means - centre
    centred = torch.full((batch, dim), float("nan"), dtype=torch.float64)
    _check(
        emu,
        emu.ncfast_emu_ncc_centre(
            x.data_ptr(), FEATURE_KIND[dtype], x.stride(0), x.stride(1), valid.data_ptr(),
            valid.stride(0), centre.data_ptr(), batch, dim, centred.data_ptr(),
        ),
    )  # fmt: skip
    expected_centred = torch.where(valid[:, None], x.double() - centre, 0.0)
    assert torch.equal(centred, expected_centred)
    near = (centred @ mu.T).contiguous()
    logits = (centred @ weight.T).contiguous()
    sq_norms = mu.square().sum(1)
    folded_bias = bias + weight @ centre
    count = torch.zeros((), dtype=torch.int64)
    _check(
        emu,
        emu.ncfast_emu_ncc_count(
            near.data_ptr(), logits.data_ptr(), sq_norms.data_ptr(), folded_bias.data_ptr(),
            present.data_ptr(), valid.data_ptr(), valid.stride(0), batch, num_classes,
            count.data_ptr(),
        ),
    )  # fmt: skip
    expected = reference.ncc_mismatch_count(x, valid, weight, bias, means, present)
    assert int(count) == int(expected)
