"""The child process of tests/test_cpu_capability.py: runs every CPU kernel with the
FASTINV_CPU_CAPABILITY it was started with (read once, at import of fastinv._C) against the
pure-PyTorch reference, and reports what it found as one JSON line on stdout.

    FASTINV_CPU_CAPABILITY=avx2 python -m tests.cpu_capability_check OUT.pt

OUT.pt gets the outputs, so the parent can compare capabilities with one another as well.
Shapes are odd (9x11, 37 channels, 129 columns...) so that every vector loop has a tail, at
4, 8 and 16 lanes alike.
"""

from __future__ import annotations

import json
import sys

import torch

import fastinv
from fastinv import ops
from fastinv.ops.conditional_batch_norm import conditional_batch_norm_backward_reference
from fastinv.ops.hinge_loss import hinge_loss_d_backward_reference
from fastinv.ops.spectral_norm import spectral_norm_backward_reference

f = torch.ops.fastinv
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# kernel vs reference, both accumulating in fp32 from the same inputs: what is left is the
# order of the sums, FMA contraction and one rounding of the output to its dtype.
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
CBN_SHAPES = [(2, 3, 5, 7), (3, 37, 9, 11), (2, 16, 33, 1)]
SN_SHAPES = [(3, 5), (33, 7), (16, 3, 3, 3), (257, 129), (130, 600)]  # the last two: multi-item


def _close(got, want, dtype, what, failures):
    try:
        torch.testing.assert_close(got.double(), want.double(), **TOL[dtype])
    except AssertionError as exc:
        failures.append(f"{what}: {str(exc).splitlines()[0:3]}")


def _rand(*shape, dtype, offset=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * 2 + offset).to(dtype)


def check_cbn(out, failures):
    for dtype in DTYPES:
        for shape in CBN_SHAPES:
            for layout in (torch.contiguous_format, torch.channels_last):
                n, c = shape[:2]
                x = _rand(*shape, dtype=dtype, offset=3.0).contiguous(memory_format=layout)
                gain = (1 + 0.5 * torch.randn(n, c, dtype=torch.float64)).to(dtype)
                bias = _rand(n, c, dtype=dtype)
                dy = _rand(*shape, dtype=dtype).contiguous(memory_format=layout)
                rm, rv = torch.randn(c), torch.rand(c) + 0.5
                for relu in (False, True):
                    for training in (True, False):
                        what = f"cbn {dtype} {shape} {layout} relu={relu} training={training}"
                        got = f.conditional_batch_norm(x, gain, bias, rm, rv, training, 1e-5, relu)
                        want = ops.conditional_batch_norm_reference(x, gain, bias, rm, rv, training, 1e-5, relu)
                        for name, a, b in zip(("y", "mean", "invstd", "var"), got, want):
                            _close(a, b, dtype, f"{what} {name}", failures)
                        # the backward of the kernel's own statistics, against the reference's
                        # backward from the same statistics
                        y, mean, invstd, _ = got
                        grads = f.conditional_batch_norm_backward(dy, x, gain, mean, invstd, training, relu, bias)
                        ref = conditional_batch_norm_backward_reference(dy, x, gain, mean, invstd, training, relu, bias)
                        for name, a, b in zip(("grad_x", "grad_gain", "grad_bias"), grads, ref):
                            _close(a, b, dtype, f"{what} {name}", failures)
                        out[what] = [*got, *grads]


def check_hinge(out, failures):
    for dtype in DTYPES:
        for n in (1, 15, 17, 1000, 70001):  # 70001: three chunks of the parallel split
            d_real, d_fake = _rand(n, dtype=dtype), _rand(n + 3, dtype=dtype)
            what = f"hinge {dtype} {n}"
            got = [f.hinge_loss_d(d_real, d_fake), f.hinge_loss_g(d_fake)]
            want = [ops.hinge_loss_d_reference(d_real, d_fake), ops.hinge_loss_g_reference(d_fake)]
            grad = torch.tensor(1.7)
            got += list(f.hinge_loss_d_backward(grad, d_real, d_fake))
            want += list(hinge_loss_d_backward_reference(grad, d_real, d_fake))
            for name, a, b in zip(("loss_d", "loss_g", "grad_real", "grad_fake"), got, want):
                _close(a, b, dtype, f"{what} {name}", failures)
            out[what] = got


def check_spectral_norm(out, failures):
    for dtype in DTYPES:
        weights = [_rand(*s, dtype=dtype) for s in SN_SHAPES]
        us = [torch.randn(s[0]) for s in SN_SHAPES]
        vs = [torch.randn(w[0].numel()) for w in weights]
        for n_iter in (0, 2):
            what = f"sn {dtype} n_iter={n_iter}"
            got = f.spectral_norm(weights, us, vs, n_iter, 1e-12)
            want = ops.spectral_norm_reference(weights, us, vs, n_iter, 1e-12)
            for name, a_list, b_list in zip(("W/sigma", "u", "v"), got[:3], want[:3]):
                for k, (a, b) in enumerate(zip(a_list, b_list)):
                    _close(a, b, dtype, f"{what} {name}[{k}]", failures)
            _close(got[3], want[3], dtype, f"{what} sigma", failures)
            grads = [_rand(*s, dtype=dtype) for s in SN_SHAPES]
            dw = f.spectral_norm_backward(grads, weights, got[1], got[2], got[3])
            dw_ref = spectral_norm_backward_reference(grads, weights, got[1], got[2], got[3])
            for k, (a, b) in enumerate(zip(dw, dw_ref)):
                _close(a, b, dtype, f"{what} grad[{k}]", failures)
            out[what] = [*got[0], got[3], *dw]


def main() -> None:
    status = ops.extension_status()
    report = {
        "fastinv": fastinv.__file__,
        "loaded": status["loaded"],
        "cpu_capability": status["cpu_capability"],
        "cpu_capability_max": status["cpu_capability_max"],
        "serves": {name: where["cpu"] for name, where in ops.backend_info().items()},
        "failures": [],
    }
    if status["loaded"]:
        torch.manual_seed(0)
        out: dict[str, list[torch.Tensor]] = {}
        check_cbn(out, report["failures"])
        check_hinge(out, report["failures"])
        check_spectral_norm(out, report["failures"])
        torch.save(out, sys.argv[1])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
