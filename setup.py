"""Build script: the package, plus the native extension ncfast._C (csrc/) when it can be built.

- The C++ (CPU) extension is always attempted.
- CUDA sources are added when nvcc and a CUDA build of torch are present, or FORCE_CUDA=1 (no
  GPU needed to compile); never with NCFAST_CPU_ONLY=1.
- TORCH_CUDA_ARCH_LIST is respected. The default covers the GPUs researchers have: 7.0 (V100),
  7.5 (T4), 8.0 (A100), 8.6 (A10, RTX 30xx), 8.9 (L4, RTX 40xx), 9.0 (H100/H200) and every
  architecture the installed torch was built for (10.0, 12.0 with CUDA 13), less those this nvcc
  cannot target (CUDA 13 dropped sm_70), with PTX of 9.0 so that the driver JIT-compiles the
  kernels for any newer GPU. The extension records the architectures it holds (`ncfast info`).
- ninja builds in parallel; MAX_JOBS limits the jobs.
- Without a working compiler the package still installs, on the pure-torch reference backend
  (`ncfast info` says why); NCFAST_REQUIRE_EXTENSION=1 turns that into a build failure (CI).

Install (README): pip install --no-build-isolation -e ".[dev]"  (builds against the installed
torch; the editable install puts ncfast/_C*.so next to the sources).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BASELINE_ARCHES = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0")
PTX_ARCH = "9.0"  # the PTX kept for newer GPUs (JIT-compiled by the driver)
MIN_ARCH = (6, 0)  # the kernels' float64 atomicAdd needs sm_60
CXX_FLAGS = ["-O3", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH, else the toolkit that holds nvcc (following wrapper scripts)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _arch_key(arch: str) -> tuple[int, int]:
    major, minor = arch.split(".")
    return int(major), int(minor)


def _nvcc_gpu_codes(cuda_home: str | None) -> set[str] | None:
    """The real architectures this nvcc can target ({"sm_75", ...}); None if it cannot say."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run(
            [nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {code.strip() for code in out.split() if code.strip().startswith("sm_")} or None


def default_arch_list(torch_arches: list[str], nvcc_codes: set[str] | None) -> str:
    """TORCH_CUDA_ARCH_LIST when none is set: BASELINE_ARCHES and the plain sm_XY of torch's
    own build from MIN_ARCH on, less what nvcc cannot target, with +PTX on PTX_ARCH (else on
    the highest)."""
    wanted = set(BASELINE_ARCHES)
    for arch in torch_arches:
        digits = arch[3:] if arch.startswith("sm_") else ""
        if digits.isdigit() and len(digits) >= 2:
            wanted.add(f"{digits[:-1]}.{digits[-1]}")
    arches = sorted((a for a in wanted if _arch_key(a) >= MIN_ARCH), key=_arch_key)
    if nvcc_codes is not None:
        arches = [a for a in arches if "sm_" + a.replace(".", "") in nvcc_codes]
    if not arches:
        raise RuntimeError(f"ncfast: nvcc targets none of the GPU architectures {sorted(wanted)}")
    ptx = PTX_ARCH if PTX_ARCH in arches else arches[-1]
    return ";".join(a + "+PTX" if a == ptx else a for a in arches)


def compiled_targets(arch_list: str) -> str:
    """What nvcc will embed for an arch list, as "sm_75;...;compute_90" (SASS, then PTX): the
    -gencode flags torch derives from TORCH_CUDA_ARCH_LIST (named architectures included)."""
    from torch.utils import cpp_extension

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    codes = {flag.split("code=")[-1] for flag in flags if "code=" in flag}
    order = sorted(codes, key=lambda c: (c.startswith("compute_"), int(re.sub(r"\D", "", c))))
    return ";".join(order)


def _extensions():
    """The extension ncfast._C (with CUDA kernels where CUDA is there or FORCE_CUDA asks for
    them) and the build command that builds it; none where NCFAST_NO_EXTENSION is set or torch
    is not importable."""
    if _env_flag("NCFAST_NO_EXTENSION"):
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension
    except ImportError as exc:
        print(
            f"ncfast: torch is not importable ({exc}); installing without the native extension. "
            "Install torch first and use --no-build-isolation to build it.",
            file=sys.stderr,
        )
        return [], {}

    with_cuda = not _env_flag("NCFAST_CPU_ONLY") and (
        _env_flag("FORCE_CUDA") or (cuda_home is not None and torch.version.cuda is not None)
    )
    ext = _cuda_extension(cuda_home) if with_cuda else _cpu_extension()
    build_ext = _optional_build(BuildExtension)
    return [ext], {"build_ext": build_ext.with_options(use_ninja=True)}


def _cpu_sources() -> list[str]:
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    return sources + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))


def _cpu_extension():
    from torch.utils.cpp_extension import CppExtension

    return CppExtension("ncfast._C", _cpu_sources(), extra_compile_args={"cxx": CXX_FLAGS})


def _cuda_extension(cuda_home: str | None):
    """The extension with the CUDA kernels, for TORCH_CUDA_ARCH_LIST (default: the
    architectures of both torch and this nvcc, see :func:`default_arch_list`)."""
    import torch
    from torch.utils.cpp_extension import CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(
            torch.cuda.get_arch_list(), _nvcc_gpu_codes(cuda_home)
        )
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    targets = compiled_targets(arch_list)
    print(f"ncfast: CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list} ({targets})")
    sources = _cpu_sources()
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return CUDAExtension(
        "ncfast._C",
        sources,
        define_macros=[("NCFAST_WITH_CUDA", "1"), ("NCFAST_CUDA_ARCH_LIST", f'"{targets}"')],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )


def _optional_build(build_extension):
    """``build_extension`` made optional: a failure leaves a working pure-torch install (the
    reference backend), unless NCFAST_REQUIRE_EXTENSION is set."""

    class OptionalBuildExtension(build_extension):
        """Builds ncfast._C; a failure leaves a working pure-torch install unless required."""

        failed = False

        def run(self):
            try:
                super().run()
            except Exception as exc:
                self._skip(exc)

        def build_extension(self, ext_):
            try:
                super().build_extension(ext_)
            except Exception as exc:
                self._skip(exc)

        @classmethod
        def _skip(cls, exc: Exception) -> None:
            if _env_flag("NCFAST_REQUIRE_EXTENSION"):
                raise exc
            if cls.failed:  # the follow-up failure (nothing to copy) of a failed build
                return
            cls.failed = True
            bar = "=" * 78
            print(
                f"\n{bar}\nncfast: the native extension ncfast._C could not be built:\n  "
                f"{type(exc).__name__}: {exc}\nncfast will run on the pure-torch reference "
                "backend (correct, slower). `ncfast info` shows the backend.\n"
                f"{bar}\n",
                file=sys.stderr,
            )

    return OptionalBuildExtension


if __name__ == "__main__":  # pip's build backend and `python setup.py` both run it as __main__
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
