"""Build script: the package, plus the native extension ncfast._C (csrc/) when it can be built.

- The C++ (CPU) extension is always attempted.
- CUDA sources are added when nvcc and a CUDA build of torch are present, or FORCE_CUDA=1 (no
  GPU needed to compile); never with NCFAST_CPU_ONLY=1.
- TORCH_CUDA_ARCH_LIST is respected; default "8.0;9.0+PTX" (sm_80, sm_90 and PTX for newer).
- ninja builds in parallel; MAX_JOBS limits the jobs.
- Without a working compiler the package still installs, on the pure-torch reference backend
  (`ncfast info` says why); NCFAST_REQUIRE_EXTENSION=1 turns that into a build failure (CI).

Install (README): pip install --no-build-isolation -e ".[dev]"  (builds against the installed
torch; the editable install puts ncfast/_C*.so next to the sources).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


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


def _extensions():
    if _env_flag("NCFAST_NO_EXTENSION"):
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
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
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    nvcc_flags = ["-O3", "-lineinfo"]
    define_macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros += [
            ("NCFAST_WITH_CUDA", "1"),
            ("NCFAST_CUDA_ARCH_LIST", '"' + arch_list.replace('"', "") + '"'),
        ]
        ext = CUDAExtension(
            "ncfast._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        ext = CppExtension(
            "ncfast._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )

    class OptionalBuildExtension(BuildExtension):
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

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
