"""Shared test fixtures and markers."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Tolerances against a float64 reference, by input dtype (accumulation is fp32 in all kernels;
# the rest is the rounding of the input itself, which both sides see identically).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-3, atol=1e-4),
    torch.float16: dict(rtol=1e-3, atol=1e-4),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
