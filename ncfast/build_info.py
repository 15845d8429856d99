"""How this ncfast was built and which backend runs: the facts behind ``ncfast info``."""

from __future__ import annotations

import os

import torch

from ncfast import __version__, ops


def build_info() -> dict:
    """A JSON-serialisable description of the installation.

    Keys: ncfast, torch, torch_cuda, cuda_available, devices, backend, backend_requested,
    native_unavailable_reason, extension (bool), extension_path, extension_error, and for a
    present extension: extension_cuda (bool), extension_cuda_version, extension_arch_list,
    extension_torch, extension_compiler.
    """
    info: dict = {
        "ncfast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "backend": ops.BACKEND,
        "backend_requested": os.environ.get("NCFAST_BACKEND", "") or None,
        "native_unavailable_reason": ops.NATIVE_UNAVAILABLE_REASON or None,
    }
    try:
        from ncfast import _C
    except ImportError as exc:
        info.update(extension=False, extension_path=None, extension_error=str(exc))
        return info
    cuda = _C.cuda_version_int
    info.update(
        extension=True,
        extension_path=_C.__file__,
        extension_error=None,
        extension_cuda=bool(_C.with_cuda),
        extension_cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
        extension_arch_list=_C.cuda_arch_list or None,
        extension_torch=_C.torch_version,
        extension_compiler=_C.compiler,
    )
    return info
