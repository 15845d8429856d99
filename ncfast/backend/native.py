"""The native backend: ops of the compiled extension ``ncfast._C`` behind the signatures of
:mod:`ncfast.backend.reference` (``ncfast.backend.ops`` switches between the two).

Compiled ops (``torch.ops.ncfast.*``, a CPU and a CUDA implementation each, ``csrc/``):

- ``update_stats_``: the per-batch hot path. Validation, upcast, per-class shift, centering and
  class sums fused in one pass over the batch, then one float64 Gram update (BLAS/cuBLAS; the
  upper triangle only, in panels, when that saves flops; with ``fast``, an IEEE float32 product
  of the centred rows added into the float64 scatter: docs/precision.md). On CUDA: three
  kernels, one memset and the GEMM, no host synchronisation.
- ``ncc_mismatch_count``: NC4 as GEMMs of the centered rows against the centered class means and
  the classifier, fused with the argmin/argmax/compare/count sweep.

The linear algebra under them is not here: each is one or two LAPACK/cuSOLVER/BLAS calls on
matrices of size P or min(C, P), run once per measurement, which the reference already makes
with tiled, in-place memory handling (``ncfast.backend.ops`` calls it for both backends); a C++
wrapper would add nothing but a copy of that logic, and several of them must stay
differentiable for ncfast.theory.

A class first seen in a batch takes as its shift that batch's class mean on the CPU (as the
reference), and its first valid sample of the batch on CUDA (no [C, P] accumulator per batch);
both lie within the class's spread, which is what keeps the statistics exact (SPEC §1), and the
class means and Σ_W agree to rounding.

Importing this module raises ImportError when the extension is missing (``ncfast.backend.ops`` then
falls back to the reference) and RuntimeError when the extension was built for another torch or
CUDA major version (rebuild it).

CUDA tensors take the reference instead of the compiled kernels, per call, when

- the extension holds no kernel image that runs on the tensor's GPU (its compute capability
  outside the compiled architectures and below no compiled PTX): one warning per device names
  the capability (``kernel_image_for`` decides, ``ncfast info`` shows it); likewise when the
  driver fails to load the image it has (PTX newer than the driver can JIT-compile): the op
  stops before launching anything, and the device takes the reference from then on;
- ``torch.use_deterministic_algorithms(True)`` is on, for the update: its class sums are float64
  atomics in run order, while the reference's ``index_add_`` has a deterministic CUDA
  implementation in that mode. The op itself (``torch.ops.ncfast.update_stats_``) raises torch's
  own error there, as torch's nondeterministic ops do.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from typing import NamedTuple, ParamSpec, TypeVar

import torch

from ncfast._C import (  # ImportError when the extension was not built
    cuda_arch_list as CUDA_ARCH_LIST,  # the kernel images built, "sm_75;...;compute_90"
)
from ncfast._C import cuda_version_int as _CUDA_VERSION_INT
from ncfast._C import torch_version as COMPILED_TORCH_VERSION
from ncfast._C import with_cuda as _WITH_CUDA
from ncfast._version import cuda_version_string
from ncfast.backend import reference
from ncfast.errors import user_stacklevel

WITH_CUDA = bool(_WITH_CUDA)
COMPILED_CUDA_VERSION = cuda_version_string(_CUDA_VERSION_INT)


def _version_parts(version: str | None, parts: int) -> tuple[int, ...] | None:
    if not version:
        return None
    return tuple(int(part) for part in version.split("+")[0].split(".")[:parts])


def check_build() -> None:
    """Refuse, loudly, an extension compiled against another torch (major.minor: its C++ ABI)
    or another CUDA major version than the running one: its kernels could crash or compute
    garbage rather than fail cleanly. Within a CUDA major version the runtime is compatible,
    the rule torch applies to its own extensions."""
    if _version_parts(COMPILED_TORCH_VERSION, 2) != _version_parts(torch.__version__, 2):
        raise RuntimeError(
            f"ncfast._C was compiled against torch {COMPILED_TORCH_VERSION} but torch "
            f"{torch.__version__} is running. Rebuild the extension "
            '(pip install --no-build-isolation -e ".[dev]") or set NCFAST_BACKEND=reference.'
        )
    if WITH_CUDA and _version_parts(COMPILED_CUDA_VERSION, 1) != _version_parts(
        torch.version.cuda, 1
    ):
        raise RuntimeError(
            f"ncfast._C was compiled with CUDA {COMPILED_CUDA_VERSION} but torch uses CUDA "
            f"{torch.version.cuda} (the major versions must match). Rebuild the extension with "
            'an nvcc of torch\'s CUDA major version (pip install --no-build-isolation -e ".[dev]") '
            "or set NCFAST_BACKEND=reference."
        )


check_build()


# ----------------------------------------------------------- GPU architectures
class ArchTarget(NamedTuple):
    """One kernel image in the extension: machine code (SASS) for sm_XY, or PTX for compute_XY;
    suffix "a" (arch-specific: that capability only) or "f" (family: same major), else ""."""

    ptx: bool
    major: int
    minor: int
    suffix: str

    def __str__(self) -> str:
        return f"{'compute' if self.ptx else 'sm'}_{self.major}{self.minor}{self.suffix}"


_TARGET = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")
_TORCH_STYLE = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$", re.IGNORECASE)


def parse_arch_list(text: str) -> tuple[ArchTarget, ...]:
    """The kernel images of an arch list: the extension's own form ("sm_80;sm_90;compute_90")
    or TORCH_CUDA_ARCH_LIST's ("8.0;9.0+PTX"); separators ';', ',' or spaces. ValueError on
    an entry that is neither."""
    targets: list[ArchTarget] = []
    for entry in re.split(r"[;,\s]+", text.strip()):
        if not entry:
            continue
        if match := _TARGET.match(entry):
            kind, major, minor, suffix = match.groups()
            targets.append(ArchTarget(kind == "compute", int(major), int(minor), suffix))
        elif match := _TORCH_STYLE.match(entry):
            major, minor, suffix, with_ptx = match.groups()
            targets.append(ArchTarget(False, int(major), int(minor), suffix))
            if with_ptx:
                targets.append(ArchTarget(True, int(major), int(minor), suffix))
        else:
            raise ValueError(f"CUDA arch list entry {entry!r} is neither sm_XY, compute_XY nor X.Y")
    return tuple(targets)


def _runs_on(target: ArchTarget, major: int, minor: int) -> bool:
    """CUDA's compatibility rules: SASS for X.y runs on X.z with z >= y (an "a" image on X.y
    only); PTX for X.y is JIT-compiled for any capability >= X.y ("a": X.y only; "f": within
    major X)."""
    if target.suffix == "a":
        return (target.major, target.minor) == (major, minor)
    if not target.ptx or target.suffix == "f":
        return target.major == major and target.minor <= minor
    return (target.major, target.minor) <= (major, minor)


def kernel_image_for(
    capability: tuple[int, int], targets: tuple[ArchTarget, ...]
) -> ArchTarget | None:
    """The image the CUDA driver loads for a device of this compute capability: the newest
    compatible SASS, else the newest compatible PTX (JIT-compiled at first use); None when no
    image runs there (the driver would fail with "no kernel image is available")."""
    major, minor = capability
    usable = [t for t in targets if _runs_on(t, major, minor)]
    if not usable:
        return None
    return max(usable, key=lambda t: (not t.ptx, t.major, t.minor, t.suffix == "a"))


class NativeKernelFallbackWarning(UserWarning):
    """The extension has no kernel for a CUDA device; ncfast uses the reference there."""


COMPILED_TARGETS = parse_arch_list(CUDA_ARCH_LIST) if WITH_CUDA else ()
_DEVICE_KERNELS: dict[int, bool] = {}  # device index -> whether its kernels are compiled


def describe_image(image: ArchTarget | None) -> str:
    """How a device runs the kernels, for `ncfast info`."""
    if image is None:
        return "no kernel image: the reference backend"
    if image.ptx:
        return f"native kernels from PTX {image} (JIT-compiled by the driver at first use)"
    return f"native kernels, machine code {image}"


NO_IMAGE = "ncfast: no usable kernel image"  # csrc/cuda/kernels.h, kNoImage


def _warn_fallback(index: int, why: str) -> None:
    warnings.warn(
        f"ncfast: {why}; ncfast uses its reference backend for tensors on cuda:{index} "
        f"({torch.cuda.get_device_name(index)}) (correct, slower).",
        NativeKernelFallbackWarning,
        stacklevel=user_stacklevel(),
    )


def _cuda_device_kernels(index: int) -> bool:
    """Whether the compiled kernels run on CUDA device `index`; warns once per device when not."""
    known = _DEVICE_KERNELS.get(index)
    if known is not None:
        return known
    capability = torch.cuda.get_device_capability(index)
    ok = kernel_image_for(capability, COMPILED_TARGETS) is not None
    if not ok:
        arch = f"{capability[0]}.{capability[1]}"
        _warn_fallback(
            index,
            f"the CUDA kernels of ncfast._C are compiled for "
            f"{', '.join(map(str, COMPILED_TARGETS)) or 'no GPU'}, none of which runs on "
            f"compute capability {arch}. Rebuild with TORCH_CUDA_ARCH_LIST={arch} to use the "
            "kernels",
        )
    _DEVICE_KERNELS[index] = ok
    return ok


def _image_failed(device: torch.device, exc: RuntimeError) -> bool:
    """Whether `exc` says the driver could not load the kernels on `device` (PTX newer than the
    driver, say): the op failed before launching anything. Then the device takes the
    reference from now on, with one warning."""
    if device.type != "cuda" or NO_IMAGE not in str(exc):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    _DEVICE_KERNELS[index] = False
    _warn_fallback(index, f"the driver cannot load the CUDA kernels of ncfast._C ({exc})")
    return True


# ------------------------------------------------------------------------ dispatch
def kernels_for(device: torch.device) -> bool:
    """Whether compiled kernels run on tensors of ``device``."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not WITH_CUDA:
        return False
    return _cuda_device_kernels(device.index if device.index is not None else 0)


def update_kernels_for(device: torch.device) -> bool:
    """As kernels_for, and on CUDA not while deterministic algorithms are required (the
    module docstring says why)."""
    if device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
        return False
    return kernels_for(device)


# ------------------------------------------------------------------- the compiled ops
# Each op's signature is written twice, where the tools need it: the schema in csrc/ops.cpp
# (C++) and the reference function (Python, the oracle, with the types mypy checks callers
# against). Everything else is derived: the wrappers below take the reference's signature, the
# fake kernels and the in-place arguments come from the schema, and
# tests/backend/test_native.py checks that torch.library.infer_schema of each reference
# function is the registered schema.
_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def _schema(name: str) -> torch.FunctionSchema:
    schema: torch.FunctionSchema = getattr(torch.ops.ncfast, name).default._schema
    return schema


def _fake(name: str) -> Callable[..., torch.Tensor | None]:
    """The shape-only kernel (FakeTensor tracing: torch.compile, opcheck) of op ``name``,
    from its schema: an in-place op returns nothing; an op that returns a Tensor returns a
    count, an int64 scalar on the device of its first argument (the features)."""
    returns = [str(r.type) for r in _schema(name).returns]
    if not returns:
        return lambda *args, **kwargs: None
    if returns != ["Tensor"]:  # a new kind of op: say here what it returns
        raise RuntimeError(f"ncfast::{name} returns {returns}: native._fake knows no such op")
    return lambda features, *args, **kwargs: features.new_empty((), dtype=torch.int64)


def _contiguous_call(name: str) -> Callable[[tuple[object, ...], dict[str, object]], object]:
    """Op ``name`` called with its arguments as the schema orders them (keywords and defaults
    made positional), the arguments it writes in place as contiguous copies (the kernels'
    layout) copied back into the caller's tensors afterwards; no copy of a contiguous one."""
    arguments = _schema(name).arguments
    names = {a.name for a in arguments}
    written = [i for i, a in enumerate(arguments) if a.alias_info and a.alias_info.is_write]

    def call(args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        if unknown := set(kwargs) - names:
            raise TypeError(f"ncfast::{name} got unexpected arguments {sorted(unknown)}")
        values = list(args) + [kwargs.get(a.name, a.default_value) for a in arguments[len(args) :]]
        copies = []
        for i in written:
            tensor = values[i]
            if isinstance(tensor, torch.Tensor) and not tensor.is_contiguous():
                values[i] = copy = tensor.contiguous()
                copies.append((tensor, copy))
        result = getattr(torch.ops.ncfast, name)(*values)  # looked up per call (tests patch it)
        for tensor, copy in copies:
            tensor.copy_(copy)
        return result

    return call


def _compiled(
    reference_op: Callable[_Params, _Result], runs_on: Callable[[torch.device], bool]
) -> Callable[_Params, _Result]:
    """The compiled op of ``reference_op``'s name with ``reference_op``'s signature: the
    reference instead where ``runs_on(device of the first argument)`` is False, or where the
    driver cannot load the kernels (then from there on, with one warning)."""
    name = reference_op.__name__
    torch.library.register_fake(f"ncfast::{name}", _fake(name))
    call = _contiguous_call(name)

    @functools.wraps(reference_op)  # its signature, for help() and inspect
    def run(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        features = args[0] if args else kwargs["features"]  # the first argument of every op
        device = features.device  # type: ignore[attr-defined]
        fallback: Callable[_Params, _Result] = getattr(reference, name)  # looked up per call
        if not runs_on(device):
            return fallback(*args, **kwargs)
        try:
            return call(args, dict(kwargs))  # type: ignore[return-value]  # the schema's
        except RuntimeError as exc:
            if not _image_failed(device, exc):
                raise
            return fallback(*args, **kwargs)

    run.__doc__ = f"The compiled ``ncfast::{name}`` (see :func:`.reference.{name}`)."
    return run


update_stats_ = _compiled(reference.update_stats_, update_kernels_for)
ncc_mismatch_count = _compiled(reference.ncc_mismatch_count, kernels_for)
