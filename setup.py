"""Builds fastinv and its C++/CUDA extension ``fastinv._C``.

One command for users: ``pip install --no-build-isolation -e .``. Everything a machine needs
to compile is found here, so nobody has to export variables:

* CPU kernels (``csrc/cpu``) are always built, with ``-O3 -fopenmp`` (torch's helper does not
  add OpenMP; without it ``at::parallel_for`` runs on one thread).
* CUDA kernels (``csrc/cuda``) when torch is a CUDA build and a CUDA toolkit is found.
  ``FASTINV_CUDA=1`` insists (a clear error if impossible), ``FASTINV_CUDA=0`` skips them.
* ``FASTINV_NO_EXT=1`` installs the pure-Python package; the reference ops serve everything.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value == "" else value.strip().lower()


def _fail(message: str) -> None:
    sys.stderr.write(f"\nfastinv setup: {message}\n\n")
    raise SystemExit(1)


def _find_cuda_home() -> str | None:
    """The real toolkit root. On these machines the ``nvcc`` on PATH is a shell wrapper in
    /usr/local/bin, so torch's guess (the parent of nvcc's folder) is /usr/local, which has no
    CUDA headers; we look for a folder that really holds bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return str(Path(c).resolve())
    return None


def _nvidia_wheel_includes() -> list[str]:
    """Headers shipped in the nvidia-* wheels torch depends on (cuBLAS, cuSPARSE, ...). torch's
    own headers include them, and a bare toolkit may not have them."""
    dirs: list[str] = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if base.is_dir():
            dirs += sorted(str(p) for p in base.glob("*/include") if p.is_dir())
    return dirs


def _extensions():
    if _flag("FASTINV_NO_EXT") in ("1", "true", "yes"):
        print("fastinv setup: FASTINV_NO_EXT=1, installing without the extension (reference ops).")
        return [], {}

    want_cuda = _flag("FASTINV_CUDA")  # None = auto, "1" = insist, "0" = skip
    cuda_home = _find_cuda_home()
    if cuda_home and "CUDA_HOME" not in os.environ:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home

    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _fail(
            "torch is not importable. Install torch first, then build with "
            "`pip install --no-build-isolation -e .` (an isolated build cannot see your torch)."
        )

    torch_cuda = torch.version.cuda is not None
    if want_cuda in ("0", "false", "no"):
        use_cuda = False
    elif want_cuda in ("1", "true", "yes"):
        if not torch_cuda:
            _fail(
                f"FASTINV_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build; "
                "install a CUDA build of torch, or unset FASTINV_CUDA to build the CPU kernels only."
            )
        if cuda_home is None:
            _fail(
                "FASTINV_CUDA=1 but no CUDA toolkit was found (looked for bin/nvcc and "
                "include/cuda_runtime.h in $CUDA_HOME, next to nvcc on PATH and in /usr/local/cuda*). "
                "Set CUDA_HOME to the toolkit, or unset FASTINV_CUDA."
            )
        use_cuda = True
    else:
        use_cuda = torch_cuda and cuda_home is not None
        if torch_cuda and cuda_home is None:
            print("fastinv setup: torch is a CUDA build but no CUDA toolkit was found; "
                  "building CPU kernels only.")

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [str(ROOT / "csrc")]
    define_macros = []
    cxx_flags = ["-O3", "-fopenmp"]
    extra_link = ["-fopenmp"]
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: build for A100 (8.0) and H100/H200 (9.0).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        include_dirs += _nvidia_wheel_includes()
        define_macros.append(("FASTINV_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "fastinv._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=extra_link,
        )
        print(f"fastinv setup: building CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')}).")
    else:
        ext = CppExtension(
            "fastinv._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
        print("fastinv setup: building CPU kernels only.")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
