"""Which autocast a run trains under: ``amp`` = ``none`` (float32), ``bf16`` (bfloat16 autocast)
or ``auto`` (bf16 where the device computes it natively, float32 elsewhere).

On a CPU, bf16 autocast is only a win where the instructions exist (AVX512-BF16 or AMX): there
oneDNN runs the demo's convolutions about 2x faster than in float32 (32x32x32 maps, batch 48,
forward + backward: 14 vs 30 ms) and a ``fastinv train demo-cpu`` step takes 84 against 118 ms
at the same judge agreement (benchmarks/RESULTS.md, round 11). Without them bf16 is emulated
and slower than float32, so ``auto`` keeps float32 there. Every fused op accumulates in float32
under autocast (``fastinv.ops``), and the losses are computed in float32.
"""

from __future__ import annotations

import contextlib
import functools

import torch

AMP_MODES = ("none", "bf16", "auto")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively (not by emulation)."""
    return _native_bf16(torch.device(device).type)


@functools.cache
def _native_bf16(device_type: str) -> bool:
    # asked once per device type: the training loops enter autocast every micro-batch
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        # private but stable helpers (torch.cpu); absent on an old torch: no bf16 then
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def autocast_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (None: float32, no autocast)."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "bf16" or (amp == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def autocast(amp: str, device: torch.device | str):
    """A context that runs its body under ``amp``'s autocast on ``device`` (a no-op for float32)."""
    dtype = autocast_dtype(amp, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
