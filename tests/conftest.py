"""Shared test fixtures and markers."""

from __future__ import annotations

import math

import pytest
import torch

CUDA = torch.cuda.is_available()
# Every test that needs a GPU carries the `cuda` marker (registered in pyproject.toml), as a
# decorator or in pytest.param(..., marks=requires_cuda): gpu_check.sh selects them with
# `-m cuda`, and without a GPU they are skipped (pytest_collection_modifyitems below).
requires_cuda = pytest.mark.cuda
_ONE_GPU = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def requires_two_gpus(test):
    """A CUDA test (marked `cuda`) that needs a second GPU, as for a current device other
    than the tensors': skipped on a machine with one."""
    return requires_cuda(_ONE_GPU(test))

# Tolerances against a float64 reference, by input dtype (accumulation is fp32 in all kernels;
# the rest is the rounding of the input itself, which both sides see identically).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-3, atol=1e-4),
    torch.float16: dict(rtol=1e-3, atol=1e-4),
}


def sum_tol(tol: dict, length: int) -> dict:
    """The tolerance of an output that is a sum over ``length`` values (grad_gain over H*W, a
    dot product over a weight's row...). Its rounding error does not shrink with the sum's
    value: a sum near 0 of 16384 unit values carries ~1e-4 of fp32 error. The error grows like
    sqrt(length), so atol does too, from ``tol`` (set on sums of up to 64 values) upward;
    rtol stays (it covers the output's own rounding)."""
    return dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, math.sqrt(length / 64)))


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
