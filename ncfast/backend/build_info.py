"""How this ncfast was built and which backend runs: the facts behind ``ncfast info``."""

from __future__ import annotations

import os

import torch


def cuda_version_string(version: int) -> str | None:
    """CUDA's version number as CUDA writes it (``CUDA_VERSION``, 12040) in the usual form
    ("12.4"); None for 0 (built without CUDA)."""
    return f"{version // 1000}.{version % 1000 // 10}" if version else None


def build_info() -> dict[str, object]:
    """A JSON-serialisable description of the installation.

    Keys: ncfast, torch, torch_cuda, cuda_available, devices, device_kernels, backend,
    backend_requested, native_unavailable_reason, extension (bool), extension_path,
    extension_error, and for a present extension: extension_cuda (bool), extension_cuda_version,
    extension_arch_list (the kernel images, "sm_75;...;compute_90"), extension_torch,
    extension_compiler. device_kernels has one entry per visible GPU: device, name, capability
    ("8.6"), kernel_image ("sm_86", "compute_90" or None) and uses (what runs its tensors).
    """
    # Imported here: the native module imports this one while ncfast itself is importing.
    from ncfast._version import __version__
    from ncfast.backend import ops

    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    info: dict[str, object] = {
        "ncfast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": devices,
        "backend": ops.BACKEND,
        "backend_requested": os.environ.get("NCFAST_BACKEND", "") or None,
        "native_unavailable_reason": ops.NATIVE_UNAVAILABLE_REASON or None,
    }
    info["device_kernels"] = [_device_kernels(i) for i in range(len(devices))]
    try:
        from ncfast import _C
    except ImportError as exc:
        info.update(extension=False, extension_path=None, extension_error=str(exc))
        return info
    info.update(
        extension=True,
        extension_path=_C.__file__,
        extension_error=None,
        extension_cuda=bool(_C.with_cuda),
        extension_cuda_version=cuda_version_string(_C.cuda_version_int),
        extension_arch_list=_C.cuda_arch_list or None,
        extension_torch=_C.torch_version,
        extension_compiler=_C.compiler,
    )
    return info


def _device_kernels(index: int) -> dict[str, str | None]:
    """Which code runs ncfast's ops on tensors of CUDA device `index`."""
    from ncfast.backend import ops

    major, minor = torch.cuda.get_device_capability(index)
    entry: dict[str, str | None] = {
        "device": f"cuda:{index}",
        "name": torch.cuda.get_device_name(index),
        "capability": f"{major}.{minor}",
        "kernel_image": None,
    }
    if ops.BACKEND != "native":
        entry["uses"] = "the reference backend (native not in use)"
        return entry
    from ncfast.backend import native as _native

    if not _native.WITH_CUDA:
        entry["uses"] = "the reference backend (the extension has no CUDA kernels)"
        return entry
    image = _native.kernel_image_for((major, minor), _native.COMPILED_TARGETS)
    entry["kernel_image"] = str(image) if image is not None else None
    entry["uses"] = _native.describe_image(image)
    return entry
