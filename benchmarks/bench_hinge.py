"""Hinge loss forward+backward: reference eager vs torch.compile of the reference vs fastinv.

Bytes that must move for forward+backward: read d_real and d_fake twice (forward, backward)
and write both gradients: 3 * (n_real + n_fake) * element size.
"""

from __future__ import annotations

import pytest
import torch

from fastinv import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [10_000_000, 256]  # 10M elements: bandwidth; 256: a real D batch (latency)
DTYPES = [torch.float32, torch.bfloat16]


CASES = {
    # name: (reference, fastinv, uses d_real)
    "loss_d": (ops.hinge_loss_d_reference, ops.hinge_loss_d, True),
    "loss_g": (lambda r, f: ops.hinge_loss_g_reference(f), lambda r, f: ops.hinge_loss_g(f), False),
}


@pytest.mark.parametrize("impl", ["reference-eager", "torch.compile", "fastinv"])
@pytest.mark.parametrize("loss", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_hinge_fwd_bwd(measure, device, n, dtype, loss, impl):
    """d_real and d_fake of n elements each (as the issue measured eager at ~107 ms)."""
    if device == "cpu" and n < 1000 and dtype != torch.float32:
        pytest.skip("latency case measured in fp32 only")
    reference, fused, uses_real = CASES[loss]
    g = torch.Generator().manual_seed(0)
    r = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
    f = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
    fn = {"reference-eager": reference, "torch.compile": torch.compile(reference, dynamic=False),
          "fastinv": fused}[impl]

    def step():
        r.grad = f.grad = None
        fn(r, f).backward()

    # forward reads the inputs, backward reads them again and writes the gradients
    nbytes = 3 * n * r.element_size() * (2 if uses_real else 1)
    measure(step, op=f"hinge {loss}", case=f"n={n} {str(dtype)[6:]} fwd+bwd", impl=impl,
            nbytes=nbytes, device=device)
