"""Conditional batch norm: BigGAN-PyTorch's ccbn in eager (F.batch_norm without affine, then a
multiply and an add), the same under torch.compile, and fastinv's fused op.

Bytes that must move: forward reads x and writes y (2 * numel * element size); forward+backward
adds reading x and dy and writing dx (5 * numel * element size in all). gain/bias/statistics
are O(N*C) and not counted.

``fwd+bwd relu``: the same followed by a ReLU, as in BigGAN's GBlock: eager and torch.compile
run ``torch.relu`` after the ccbn, fastinv ``relu=True`` (fused into the apply pass and the
backward kernels). The bytes that must move are the same 5 tensors (the fused backward
recomputes the ReLU mask from x); eager's separate ReLU moves 4 more (its forward reads and
writes y, its backward reads y and dy and writes the masked dy).

CUDA: the BigGAN-128 generator's shapes at N=256 in bf16 channels_last (the training
configuration: the rows that show the channels_last vector loads, the lane widths for
C = 96, 192, 384 and the finalize kernels) and in fp32 NCHW, plus bf16 NCHW at 128x128
(FASTINV_BENCH_FULL=1: every shape x {fp32, bf16} x {NCHW, channels_last}).
CPU (2 cores here): the issue's N=32, C=128, 32x32 shape and one scaled-down generator shape.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fastinv import ops

# (N, C, H, W) of the BigGAN-128 generator's batch norms at batch 256
BIGGAN128 = [(256, 1536, 4, 4), (256, 768, 16, 16), (256, 384, 32, 32), (256, 192, 64, 64),
             (256, 96, 128, 128)]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

CASES = []  # (device, shape, dtype, layout)
if torch.cuda.is_available():
    if os.environ.get("FASTINV_BENCH_FULL") == "1":  # every shape x dtype x layout (long)
        CASES += [("cuda", s, dt, lay) for s in BIGGAN128 for dt in (torch.float32, torch.bfloat16)
                  for lay in LAYOUTS]
    else:  # gpu_check.sh runs these without the torch.compile rows (FULL=1 adds them)
        CASES += [("cuda", s, torch.bfloat16, "nhwc") for s in BIGGAN128]
        CASES += [("cuda", s, torch.float32, "nchw") for s in BIGGAN128]
        CASES += [("cuda", BIGGAN128[4], torch.bfloat16, "nchw")]
CASES += [
    ("cpu", (32, 128, 32, 32), torch.float32, "nchw"),
    ("cpu", (32, 128, 32, 32), torch.float32, "nhwc"),
    ("cpu", (32, 128, 32, 32), torch.bfloat16, "nchw"),
    ("cpu", (8, 192, 64, 64), torch.float32, "nchw"),  # BigGAN-128's 64x64 stage at batch 8
]
# forward alone: one case per device (the table's point is forward+backward)
FWD_CASES = {("cuda", BIGGAN128[2], torch.float32, "nchw"), ("cpu", (32, 128, 32, 32), torch.float32, "nchw")}
# with the ReLU (BigGAN's GBlock): the training configuration's two largest tensors on CUDA
# (FASTINV_BENCH_FULL=1: every case), the shape in both layouts on the CPU
RELU_CASES = {("cuda", BIGGAN128[2], torch.bfloat16, "nhwc"), ("cuda", BIGGAN128[4], torch.bfloat16, "nhwc"),
              ("cpu", (32, 128, 32, 32), torch.float32, "nchw"), ("cpu", (32, 128, 32, 32), torch.float32, "nhwc")}


def ccbn_eager(x, gain, bias, running_mean, running_var):
    """BigGAN-PyTorch layers.ccbn: batch norm without affine, then the conditional affine."""
    out = F.batch_norm(x, running_mean, running_var, None, None, True, 0.1, 1e-5)
    return out * gain[:, :, None, None] + bias[:, :, None, None]


def ccbn_fastinv(x, gain, bias, running_mean, running_var):
    return ops.conditional_batch_norm(x, gain, bias, running_mean, running_var, True, 0.1, 1e-5)


def ccbn_relu_eager(x, gain, bias, running_mean, running_var):
    """BigGAN-PyTorch's GBlock: ccbn, then the activation."""
    return torch.relu(ccbn_eager(x, gain, bias, running_mean, running_var))


def ccbn_relu_fastinv(x, gain, bias, running_mean, running_var):
    return ops.conditional_batch_norm(x, gain, bias, running_mean, running_var, True, 0.1, 1e-5, relu=True)


IMPLS = {  # (relu?, impl) -> function
    (False, "reference-eager"): ccbn_eager, (False, "fastinv"): ccbn_fastinv,
    (True, "reference-eager"): ccbn_relu_eager, (True, "fastinv"): ccbn_relu_fastinv,
}


def _case_id(case):
    device, (n, c, h, w), dtype, layout = case
    short = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    return f"{device}-{n}x{c}x{h}x{w}-{short}-{layout}"


@pytest.mark.parametrize("impl", ["reference-eager", "torch.compile", "fastinv"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd", "fwd+bwd relu"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_cbn(measure, case, mode, impl):
    device, shape, dtype, layout = case
    if mode == "fwd" and (device, shape, dtype, layout) not in FWD_CASES:
        pytest.skip("forward alone is measured on one shape per device (keeps the run short)")
    relu = mode == "fwd+bwd relu"
    full = os.environ.get("FASTINV_BENCH_FULL") == "1" and device == "cuda"
    if relu and not full and (device, shape, dtype, layout) not in RELU_CASES:
        pytest.skip("the ReLU rows are measured on a few shapes (RELU_CASES; FASTINV_BENCH_FULL=1: all)")
    n, c = shape[:2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=LAYOUTS[layout])
    gain = (1 + 0.1 * torch.randn(n, c, generator=g)).to(device, dtype)
    bias = torch.randn(n, c, generator=g).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=LAYOUTS[layout])
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    if impl == "torch.compile":
        fn = torch.compile(IMPLS[relu, "reference-eager"], dynamic=False)
    else:
        fn = IMPLS[relu, impl]
    backward = mode != "fwd"
    x.requires_grad_(backward)
    gain.requires_grad_(backward)
    bias.requires_grad_(backward)

    def step():
        if not backward:
            with torch.no_grad():
                return fn(x, gain, bias, rm, rv)
        x.grad = gain.grad = bias.grad = None
        fn(x, gain, bias, rm, rv).backward(dy)

    nbytes = (5 if backward else 2) * x.numel() * x.element_size()
    measure(step, op="cbn", case=f"{_case_id(case)} {mode}", impl=impl, nbytes=nbytes, device=device)
