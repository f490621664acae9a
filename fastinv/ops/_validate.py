"""Argument checks shared by the fake kernels and the references, so that every backend, eager
or traced, rejects bad input with the same message. The C++ kernels check the same things."""

from __future__ import annotations

import torch


def floating(t: torch.Tensor, op: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{op}: {name} must be a floating tensor (float32, float64, float16 or bfloat16), "
            f"got {t.dtype}"
        )


def nonempty(t: torch.Tensor, op: str, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty; the mean of an empty tensor is undefined")


def same_device(a: torch.Tensor, b: torch.Tensor, op: str, na: str, nb: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {na} is on {a.device} but {nb} is on {b.device}; move both to the same device")


def same_dtype(a: torch.Tensor, b: torch.Tensor, op: str, na: str, nb: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {na} is {a.dtype} but {nb} is {b.dtype}; cast them to one dtype")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """THE precision rule of every op (csrc/common.h ``acc_dtype`` is the C++ statement of it):
    float64 stays float64, float32 / bfloat16 / float16 accumulate in float32. Losses, batch
    statistics, u, v and σ come back in this dtype, never rounded to bf16/fp16."""
    return torch.float64 if dtype == torch.float64 else torch.float32
