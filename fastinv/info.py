"""``fastinv info``: what is installed and which implementation serves each op."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform

import torch

import fastinv
from fastinv import ops


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
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "fastinv": fastinv.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "dali": dali,
        "extension": ops.extension_status(),
        "gpus": gpus,
        "cpu_threads": torch.get_num_threads(),
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
    print(f"GPUs: {', '.join(info['gpus']) if info['gpus'] else 'none visible'}; CPU threads: {info['cpu_threads']}")
    width = max(len(name) for name in info["ops"]) + 2
    print(f"{'op':<{width}}{'cpu':<12}{'cuda':<12}")
    for name, where in info["ops"].items():
        print(f"{name:<{width}}{where['cpu']:<12}{where['cuda']:<12}")
    return 0
