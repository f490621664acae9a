"""The one definition of the ``fastinv`` op namespace, and loading of the compiled kernels.

Every op's schema is defined here once (``torch.library.Library("fastinv", "DEF")``). The
pure-PyTorch reference is registered for every device; ``fastinv._C`` (csrc/) adds CPU and CUDA
kernels with ``TORCH_LIBRARY_IMPL``, which the dispatcher prefers over the reference. C++ must
never ``TORCH_LIBRARY(fastinv, ...)`` as well: two DEFs of one namespace abort the process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

LIB = torch.library.Library("fastinv", "DEF")  # noqa: TOR901 - the single DEF of the namespace
OP_NAMES: list[str] = []  # in definition order; backend_info reports each

_extension_state: dict[str, object] = {"loaded": False, "error": None, "module": None}


def define(schema: str, reference: Callable) -> torch._ops.OpOverloadPacket:
    """Define ``fastinv::<schema>`` and register ``reference`` for every device."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    op = getattr(torch.ops.fastinv, name)
    torch.library.register_kernel(f"fastinv::{name}", None, reference, lib=LIB)
    OP_NAMES.append(name)
    return op


def forced_reference() -> bool:
    return os.environ.get("FASTINV_BACKEND", "").strip().lower() == "reference"


def load_extension() -> bool:
    """Import fastinv._C once. Never raises: a missing or broken build warns once and leaves
    the reference kernels in charge."""
    if _extension_state["loaded"] or _extension_state["error"] is not None:
        return bool(_extension_state["loaded"])
    if forced_reference():
        _extension_state["error"] = "FASTINV_BACKEND=reference"
        return False
    try:
        from fastinv import _C  # noqa: F401  (import registers the kernels)
    except ValueError:
        # A bad setting, not a broken build (an unknown FASTINV_CPU_CAPABILITY, say): the user
        # asked for something specific, so running the reference instead would hide the typo.
        raise
    except Exception as exc:  # ImportError, undefined symbols, a torch ABI mismatch ...
        _extension_state["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "fastinv: the compiled kernels (fastinv._C) could not be loaded "
            f"({_extension_state['error']}); using the pure-PyTorch reference ops. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _extension_state["loaded"] = True
    _extension_state["module"] = _C
    return True


def extension_status() -> dict[str, object]:
    module = _extension_state["module"]
    return {
        "loaded": bool(_extension_state["loaded"]),
        "with_cuda": bool(getattr(module, "with_cuda", 0)) if module is not None else False,
        # GPU targets compiled in: "sm_90" machine code, "compute_120" PTX (setup.py records them)
        "cuda_archs": str(getattr(module, "cuda_archs", "")).split() if module is not None else [],
        # the instruction set of the CPU loops (csrc/cpu/capability.cpp): "default", "avx2" or
        # "avx512"; FASTINV_CPU_CAPABILITY caps it. cpu_capability_max: the widest this CPU runs.
        "cpu_capability": getattr(module, "cpu_capability", None) if module is not None else None,
        "cpu_capability_max": getattr(module, "cpu_capability_max", None) if module is not None else None,
        "reason": _extension_state["error"],
    }


def backend_info() -> dict[str, dict[str, str]]:
    """Which implementation serves each op on each device: ``cpp``/``cuda`` for the compiled
    kernels, ``reference`` for the pure-PyTorch one."""
    info: dict[str, dict[str, str]] = {}
    for name in OP_NAMES:
        qual = f"fastinv::{name}"
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        info[name] = {
            "cpu": "cpp" if has(qual, "CPU") else "reference",
            "cuda": "cuda" if has(qual, "CUDA") else "reference",
        }
    return info
