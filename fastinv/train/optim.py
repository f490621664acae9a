"""Which implementation of torch.optim's Adam / AdamW / SGD fastinv's trainings ask for."""

from __future__ import annotations

import torch


def fused(device: str | torch.device) -> bool | None:
    """``fused=`` for torch.optim's Adam, AdamW and SGD on ``device``: True where torch has the
    one-kernel implementation (CUDA and CPU), else None (torch's default). On CPU torch's
    default is a loop of ~8 ops per parameter: 0.51 ms a step for demo-cpu's G and D fused
    against 2.08 ms (issue 11 round 13); the demo's classifier (20 tensors) 0.19-0.28 ms
    against 0.79-1.17 (2 threads, benchmarks/RESULTS.md Demo round 27)."""
    return True if torch.device(device).type in ("cuda", "cpu") else None
