"""``fastinv info``: what is installed and which implementation serves each op."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch

import fastinv
from fastinv import ops


def kernel_image_for(capability: tuple[int, int], archs: list[str]) -> str | None:
    """Which of the extension's GPU targets a GPU of ``capability`` runs: machine code of the
    same major version and a minor version not above its own (sm_80 runs on 8.6), else PTX of
    a version not above it (compiled by the driver at first use), else None (no kernel image:
    every CUDA op fails on that GPU)."""
    major, minor = capability
    best_sass, best_ptx = None, None
    for name in archs:
        kind, _, digits = name.partition("_")
        digits = "".join(ch for ch in digits if ch.isdigit())
        if not digits:
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor and name[-1].isdigit():
            best_sass = name if best_sass is None or name > best_sass else best_sass
        elif kind == "compute" and (a_major, a_minor) <= (major, minor):
            best_ptx = name if best_ptx is None or name > best_ptx else best_ptx
    if best_sass is not None:
        return best_sass
    return f"{best_ptx} (PTX, compiled by the driver)" if best_ptx is not None else None


def cpu_capability_line(ext: dict) -> str:
    """Which instruction set the CPU loops use, and why (the widest the CPU runs, or a cap)."""
    used, best = ext.get("cpu_capability"), ext.get("cpu_capability_max")
    if used is None:
        return "instruction set not reported (an older build of fastinv._C)"
    cap = os.environ.get("FASTINV_CPU_CAPABILITY", "").strip()
    why = f"FASTINV_CPU_CAPABILITY={cap}" if cap else "the widest this CPU runs"
    more = f"; this CPU runs up to {best}" if best != used else ""
    return f"{used} ({why}{more}; FASTINV_CPU_CAPABILITY=default|avx2|avx512 caps it)"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_facts() -> dict:
    """What a CPU run's seconds depend on: the CPU's model, the vector instructions torch's CPU
    kernels use, whether it computes bf16 natively and so the precision ``amp=auto`` trains in
    (``fastinv demo`` records these in its summary: RESULTS.md)."""
    from fastinv.train.precision import native_bf16

    bf16 = native_bf16("cpu")
    return {"cpu": cpu_model(), "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": bf16, "precision": "bf16 autocast" if bf16 else "float32"}


def cpu_line() -> str:
    """``cpu_facts`` in one line, as ``fastinv info`` prints it."""
    f = cpu_facts()
    precision = ("bf16 native (AVX512-BF16 / AMX): amp=auto trains in bf16"
                 if f["cpu_native_bf16"] else "no native bf16: amp=auto trains in float32")
    return f"{f['cpu']}, {f['cpu_isa']}, {precision}"


def collect() -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    dali = None
    try:
        import nvidia.dali as dali_mod

        dali = dali_mod.__version__
    except Exception:
        dali = version("nvidia-dali-cuda130")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(n_gpus)]
    archs = ops.extension_status()["cuda_archs"]
    gpu_kernels = [kernel_image_for(torch.cuda.get_device_capability(i), archs) for i in range(n_gpus)]
    return {
        "fastinv": fastinv.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "dali": dali,
        "extension": ops.extension_status(),
        "gpus": gpus,
        "gpu_kernels": gpu_kernels,
        "cpu_threads": torch.get_num_threads(),
        "cpu": cpu_line(),
        "ops": ops.backend_info(),
    }


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ext = info["extension"]
    print(f"fastinv {info['fastinv']}  python {info['python']}  torch {info['torch']} "
          f"(CUDA {info['torch_cuda'] or 'none'})  DALI {info['dali'] or 'not installed'}")
    state = "loaded" if ext["loaded"] else f"not loaded ({ext['reason']})"
    print(f"extension fastinv._C: {state}; CUDA kernels compiled: {'yes' if ext['with_cuda'] else 'no'}")
    if ext["with_cuda"]:
        archs = " ".join(ext["cuda_archs"]) or "not recorded (built without setup.py)"
        print(f"CUDA targets in fastinv._C: {archs} (sm_XY: machine code, compute_XY: PTX)")
    gpus = [f"{name} [{image or 'NO KERNEL IMAGE: rebuild with TORCH_CUDA_ARCH_LIST'}]"
            if ext["with_cuda"] and ext["cuda_archs"] else name
            for name, image in zip(info["gpus"], info["gpu_kernels"])]
    print(f"GPUs: {', '.join(gpus) if gpus else 'none visible'}; CPU threads: {info['cpu_threads']}")
    print(f"CPU: {info['cpu']}")
    if ext["loaded"]:
        print(f"CPU kernels: {cpu_capability_line(ext)}")
    width = max(len(name) for name in info["ops"]) + 2
    print(f"{'op':<{width}}{'cpu':<12}{'cuda':<12}")
    for name, where in info["ops"].items():
        print(f"{name:<{width}}{where['cpu']:<12}{where['cuda']:<12}")
    return 0
