"""The native backend: ops of the compiled extension ``ncfast._C`` behind the signatures of
:mod:`ncfast.reference` (``ncfast.ops`` switches between the two).

Compiled ops (``torch.ops.ncfast.*``, a CPU and a CUDA implementation each, ``csrc/``):

- ``update_stats_``: the per-batch hot path. Validation, upcast, per-class shift, centring and
  class sums fused in one pass over the batch, then one float64 Gram update (BLAS/cuBLAS; the
  upper triangle only, in panels, when that saves flops). On CUDA: two kernels, one memset and
  the GEMM, no host synchronisation.
- ``ncc_mismatch_count``: NC4 as GEMMs of the centred rows against the centred class means and
  the classifier, fused with the argmin/argmax/compare/count sweep.

The other functions are the reference's own (and say so by identity): each is one or two
LAPACK/cuSOLVER/BLAS calls on matrices of size P or min(C, P), run once per measurement, which
the reference already makes with tiled, in-place memory handling; a C++ wrapper would add
nothing but a copy of that logic, and several of them must stay differentiable for
ncfast.theory.

A class first seen in a batch takes as its shift that batch's class mean on the CPU (as the
reference), and its first valid sample of the batch on CUDA (no [C, P] accumulator per batch);
both lie within the class's spread, which is what keeps the statistics exact (SPEC §1), and the
class means and Σ_W agree to rounding.

Importing this module raises ImportError when the extension is missing (``ncfast.ops`` then
falls back to the reference) and RuntimeError when the extension was built for another torch or
CUDA version (rebuild it).
"""

from __future__ import annotations

import torch

from ncfast import reference
from ncfast._C import (  # ImportError when the extension was not built
    cuda_arch_list as CUDA_ARCH_LIST,  # noqa: F401 (re-exported: the GPU architectures built)
)
from ncfast._C import cuda_version_int as _CUDA_VERSION_INT
from ncfast._C import torch_version as COMPILED_TORCH_VERSION
from ncfast._C import with_cuda as _WITH_CUDA

WITH_CUDA = bool(_WITH_CUDA)
COMPILED_CUDA_VERSION = (
    f"{_CUDA_VERSION_INT // 1000}.{_CUDA_VERSION_INT % 1000 // 10}" if _CUDA_VERSION_INT else None
)

# Functions whose reference implementation is already the right one (see module docstring).
finalize_stats = reference.finalize_stats
psd_inv_sqrt = reference.psd_inv_sqrt
reshift = reference.reshift
nc1 = reference.nc1
snr_singular_values = reference.snr_singular_values
pairwise_cosine_stats = reference.pairwise_cosine_stats
least_squares = reference.least_squares
mse_decomposition = reference.mse_decomposition


def _major_minor(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def _check_build() -> None:
    """Refuse, loudly, an extension compiled against another torch or CUDA than the running
    one: its kernels could crash or compute garbage rather than fail cleanly."""
    if _major_minor(COMPILED_TORCH_VERSION) != _major_minor(torch.__version__):
        raise RuntimeError(
            f"ncfast._C was compiled against torch {COMPILED_TORCH_VERSION} but torch "
            f"{torch.__version__} is running. Rebuild the extension "
            '(pip install --no-build-isolation -e ".[dev]") or set NCFAST_BACKEND=reference.'
        )
    if WITH_CUDA and _major_minor(COMPILED_CUDA_VERSION) != _major_minor(torch.version.cuda):
        raise RuntimeError(
            f"ncfast._C was compiled with CUDA {COMPILED_CUDA_VERSION} but torch uses CUDA "
            f"{torch.version.cuda}. Rebuild the extension with the nvcc matching torch "
            '(pip install --no-build-isolation -e ".[dev]") or set NCFAST_BACKEND=reference.'
        )


_check_build()


# ----------------------------------------------------------------- fake (meta) kernels
# Shapes only, for FakeTensor tracing (torch.compile, opcheck).
@torch.library.register_fake("ncfast::update_stats_")
def _update_stats_fake(features, labels, counts, shift, sums, scatter, invalid):
    return None


@torch.library.register_fake("ncfast::ncc_mismatch_count")
def _ncc_mismatch_count_fake(features, valid, weight, bias, class_means, present):
    return features.new_empty((), dtype=torch.int64)


# ------------------------------------------------------------------------ dispatch
def _kernels_for(device: torch.device) -> bool:
    """Whether compiled kernels exist for tensors on ``device``."""
    return device.type == "cpu" or (device.type == "cuda" and WITH_CUDA)


def update_stats_(features, labels, counts, shift, sums, scatter, invalid) -> None:
    """Add one batch to the accumulator state in place (see reference.update_stats_)."""
    if not _kernels_for(features.device):
        reference.update_stats_(features, labels, counts, shift, sums, scatter, invalid)
        return
    state = (counts, shift, sums, scatter, invalid)
    if all(t.is_contiguous() for t in state):
        torch.ops.ncfast.update_stats_(features, labels, *state)
        return
    # The kernels need contiguous state; update contiguous copies and write them back.
    work = [t.contiguous() for t in state]
    torch.ops.ncfast.update_stats_(features, labels, *work)
    for target, result in zip(state, work, strict=True):
        target.copy_(result)


def ncc_mismatch_count(features, valid, weight, bias, class_means, present):
    """NC4 mismatches among the ``valid`` rows, int64 device scalar (see reference)."""
    if not _kernels_for(features.device):
        return reference.ncc_mismatch_count(features, valid, weight, bias, class_means, present)
    return torch.ops.ncfast.ncc_mismatch_count(
        features, valid.to(torch.bool), weight, bias, class_means, present.to(torch.bool)
    )
