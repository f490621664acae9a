"""Conditional batch norm: every backend against a float64 formula, PyTorch's batch norm
conventions (running stats, N=1 errors), autograd, opcheck, torch.compile, both layouts, the
module and the cross-replica split ops. The 2-process test is in
test_conditional_batch_norm_distributed.py."""

from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastinv import ops
from fastinv.nn import ConditionalBatchNorm2d, convert_sync_cbn
from tests.conftest import requires_cuda, requires_two_gpus, sum_tol

# fastinv.ops.conditional_batch_norm is the public function; the module of the same name:
cbn = importlib.import_module("fastinv.ops.conditional_batch_norm")

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
SPLIT_OPS = [
    "conditional_batch_norm",
    "conditional_batch_norm_backward",
    "conditional_batch_norm_stats",
    "conditional_batch_norm_apply",
    "conditional_batch_norm_backward_reduce",
    "conditional_batch_norm_backward_elemt",
]
# The output is rounded to x's dtype once; the statistics are fp32 on both sides.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=3e-3, atol=3e-3),
}
fbn = torch.ops.fastinv


def _inputs(shape, dtype=torch.float32, device="cpu", layout=torch.contiguous_format, offset=3.0):
    n, c = shape[:2]
    # An offset far from 0 catches E[x^2] - E[x]^2 cancellation.
    x = (torch.randn(shape, dtype=torch.float64) * 2 + offset).to(device, dtype)
    x = x.contiguous(memory_format=layout)
    gain = (1 + 0.5 * torch.randn(n, c, dtype=torch.float64)).to(device, dtype)
    bias = torch.randn(n, c, dtype=torch.float64).to(device, dtype)
    return x, gain, bias


def _expected(x, gain, bias, eps=1e-5, mean=None, var=None):
    """Float64 formula, written independently of fastinv's reference."""
    x64 = x.double()
    if mean is None:
        mean = x64.mean((0, 2, 3))
        var = x64.var((0, 2, 3), unbiased=False)
    inv = (var.double() + eps).rsqrt()
    xhat = (x64 - mean.double().view(1, -1, 1, 1)) * inv.view(1, -1, 1, 1)
    return xhat * gain.double()[:, :, None, None] + bias.double()[:, :, None, None]


def test_cpu_kernels_are_registered():
    info = ops.backend_info()
    for name in [*SPLIT_OPS, "conditional_batch_norm_update_running"]:
        assert info[name]["cpu"] == "cpp", name


# --- forward --------------------------------------------------------------------------------



def _assert_grads_match(leaves, leaves64, dtype, layout):
    """Gradients of the op's leaves against the float64 expectation's, in the leaves' dtype
    (and x's gradient in x's layout)."""
    for got, want in zip(leaves, leaves64):
        assert got.grad.dtype == dtype
        tol = TOL[dtype] if dtype in (torch.float64, torch.float32) else dict(rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)
    if layout == torch.channels_last:
        assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 19, 1, 1), (3, 33, 8, 8), (5, 8, 17, 3)])
def test_training_forward_matches_float64(device, dtype, layout, shape):
    x, gain, bias = _inputs(shape, dtype, device, layout)
    y = ops.conditional_batch_norm(x, gain, bias, training=True)
    assert y.dtype == dtype and y.shape == x.shape
    expected_layout = layout if shape[2] * shape[3] > 1 else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_layout)
    torch.testing.assert_close(y.double(), _expected(x, gain, bias), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_eval_forward_uses_running_stats(device, dtype, layout):
    x, gain, bias = _inputs((1, 6, 4, 4), dtype, device, layout)  # N=1 is fine in eval
    rm = torch.randn(6, device=device)
    rv = torch.rand(6, device=device) + 0.5
    y = ops.conditional_batch_norm(x, gain, bias, rm, rv, training=False, eps=1e-3)
    torch.testing.assert_close(
        y.double(), _expected(x, gain, bias, 1e-3, rm, rv), **TOL[dtype]
    )
    torch.testing.assert_close(rm, rm.clone())  # eval never moves the running stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_running_stats_follow_pytorch_batch_norm(device, layout):
    x, gain, bias = _inputs((4, 5, 3, 3), torch.float32, device, layout)
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    ops.conditional_batch_norm(x, gain, bias, rm, rv, training=True, momentum=0.3)
    F.batch_norm(x, rm_t, rv_t, training=True, momentum=0.3)  # unbiased var, as PyTorch
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 5),
    c=st.integers(1, 40),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    channels_last=st.booleans(),
    relu=st.booleans(),
)
def test_random_shapes_float64_agree_with_reference(n, c, h, w, channels_last, relu):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, gain, bias = _inputs((n, c, h, w), torch.float64, "cpu", layout)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y, mean, invstd, var = fbn.conditional_batch_norm(x, gain, bias, rm, rv, True, 1e-5, relu)
    ry, rmean, rinvstd, rvar = cbn.conditional_batch_norm_reference(x, gain, bias, rm, rv, True, 1e-5, relu)
    for a, b in [(y, ry), (mean, rmean), (invstd, rinvstd), (var, rvar)]:
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    expected = _expected(x, gain, bias)
    torch.testing.assert_close(y, expected.relu() if relu else expected, **TOL[torch.float64])
    dy = torch.randn_like(y)
    got = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True, relu, bias)
    ref = cbn.conditional_batch_norm_backward_reference(dy, x, gain, mean, invstd, True, relu, bias)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_statistics_are_stable_for_large_offsets():
    # var 1 around mean 1e4: E[x^2]-E[x]^2 in fp32 would lose every digit of the variance.
    x, gain, bias = _inputs((8, 4, 16, 16), torch.float32, offset=1e4)
    _, mean, invstd, var = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
    x64 = x.double()
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_forward_and_backward_are_deterministic_across_thread_counts(layout):
    x, gain, bias = _inputs((6, 10, 33, 31), torch.float32, layout=layout)
    dy = torch.randn_like(x)

    def run():
        y, mean, invstd, var = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
        return (y, mean, var, *fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True))

    first = run()
    torch.set_num_threads(1)
    try:
        single = run()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    for a, b, c in zip(first, single, run()):
        assert torch.equal(a, b) and torch.equal(a, c)


# --- backward -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_matches_float64_autograd(device, dtype, layout, training):
    x, gain, bias = _inputs((3, 7, 5, 4), dtype, device, layout)
    rm, rv = torch.randn(7, device=device), torch.rand(7, device=device) + 0.5
    dy = torch.randn(x.shape, dtype=torch.float64).to(device, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, gain, bias)]
    y = ops.conditional_batch_norm(*leaves, rm, rv, training=training)
    y.backward(dy)
    leaves64 = [t.double().requires_grad_() for t in (x, gain, bias)]
    stats = {} if training else dict(mean=rm, var=rv)
    _expected(*leaves64, **stats).backward(dy.double())
    _assert_grads_match(leaves, leaves64, dtype, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(device, training):
    x, gain, bias = _inputs((3, 4, 3, 2), torch.float64, device)
    rm = torch.randn(4, dtype=torch.float64, device=device)
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    args = [t.requires_grad_() for t in (x, gain, bias)]

    def fn(x, gain, bias):
        return ops.conditional_batch_norm(x, gain, bias, rm.clone(), rv.clone(), training=training)

    assert torch.autograd.gradcheck(fn, args)


# --- op contract: opcheck, compile, split ops -----------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck(device, dtype, layout):
    x, gain, bias = _inputs((3, 5, 4, 3), dtype, device, layout)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    xg, gg, bg = (t.clone().requires_grad_() for t in (x, gain, bias))
    torch.library.opcheck(fbn.conditional_batch_norm.default, (xg, gg, bg, rm, rv, True, 1e-5))
    torch.library.opcheck(fbn.conditional_batch_norm.default, (xg, gg, bg, rm, rv, False, 1e-5))
    y, mean, invstd, var = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
    dy = torch.randn_like(y)
    torch.library.opcheck(fbn.conditional_batch_norm_update_running.default, (rm, rv, mean, var, 60, 0.1))
    torch.library.opcheck(fbn.conditional_batch_norm_backward.default, (dy, x, gain, mean, invstd, True))
    torch.library.opcheck(fbn.conditional_batch_norm_stats.default, (x,))
    torch.library.opcheck(fbn.conditional_batch_norm_apply.default, (x, gain, bias, mean, invstd))
    torch.library.opcheck(fbn.conditional_batch_norm_backward_reduce.default, (dy, x, mean, invstd))
    gg_, gb_ = fbn.conditional_batch_norm_backward_reduce(dy, x, mean, invstd)
    s1, s2 = (gain.float() * gb_).sum(0), (gain.float() * gg_).sum(0)
    torch.library.opcheck(
        fbn.conditional_batch_norm_backward_elemt.default, (dy, x, gain, mean, invstd, s1, s2, 36)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_split_ops_compose_to_the_fused_op(device, layout):
    x, gain, bias = _inputs((4, 9, 5, 3), torch.float64, device, layout)
    y, mean, invstd, var = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
    m2, v2 = fbn.conditional_batch_norm_stats(x)
    torch.testing.assert_close(m2, mean, **TOL[torch.float64])
    torch.testing.assert_close(v2, var, **TOL[torch.float64])
    torch.testing.assert_close(fbn.conditional_batch_norm_apply(x, gain, bias, mean, invstd), y)
    dy = torch.randn_like(y)
    gx, ggain, gbias = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True)
    rg, rb = fbn.conditional_batch_norm_backward_reduce(dy, x, mean, invstd)
    torch.testing.assert_close(rg, ggain, **TOL[torch.float64])
    torch.testing.assert_close(rb, gbias, **TOL[torch.float64])
    gx2 = fbn.conditional_batch_norm_backward_elemt(
        dy, x, gain, mean, invstd, (gain * rb).sum(0), (gain * rg).sum(0), x.numel() // x.shape[1]
    )
    torch.testing.assert_close(gx2, gx, **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph_with_running_stat_update(backend):
    x, gain, bias = _inputs((4, 6, 5, 5), torch.float32)
    rm, rv = torch.zeros(6), torch.ones(6)
    rm_e, rv_e = rm.clone(), rv.clone()

    def step(x, gain, bias, rm, rv):
        return ops.conditional_batch_norm(x, gain, bias, rm, rv, training=True, momentum=0.2) * 2

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    xc, gc = x.clone().requires_grad_(), gain.clone().requires_grad_()
    xe, ge = x.clone().requires_grad_(), gain.clone().requires_grad_()
    yc = compiled(xc, gc, bias, rm, rv)
    ye = step(xe, ge, bias, rm_e, rv_e)
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(rm, rm_e)
    torch.testing.assert_close(rv, rv_e)
    yc.square().sum().backward()
    ye.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(gc.grad, ge.grad)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [fbn.conditional_batch_norm, cbn.conditional_batch_norm_reference])
def test_bad_inputs_raise_clear_errors(fn):
    x, gain, bias = _inputs((4, 3, 2, 2))
    rm, rv = torch.zeros(3), torch.ones(3)
    err = (RuntimeError, ValueError, TypeError)
    with pytest.raises(err, match="Expected more than 1 value per channel when training"):
        fn(x[:1, :, :1, :1], gain[:1], bias[:1], rm, rv, True, 1e-5)
    with pytest.raises(err, match=r"gain must have shape \(N, C\)"):
        fn(x, gain[:, :2], bias, rm, rv, True, 1e-5)
    with pytest.raises(err, match=r"bias must have shape \(N, C\)"):
        fn(x, gain, bias[:3], rm, rv, True, 1e-5)
    with pytest.raises(err, match=r"running_var must have shape \(C,\)"):
        fn(x, gain, bias, rm, torch.ones(4), True, 1e-5)
    with pytest.raises(err, match="must be 4-D"):
        fn(x[0], gain, bias, rm, rv, True, 1e-5)
    with pytest.raises(err, match="cast them to one dtype"):
        fn(x, gain.double(), bias, rm, rv, True, 1e-5)
    with pytest.raises(err, match="must be a floating tensor"):
        fn(x.long(), gain, bias, rm, rv, True, 1e-5)
    with pytest.raises(err, match="eval mode"):
        fn(x, gain, bias, None, None, False, 1e-5)


def _bad_backward_calls(x, gain, bias):
    """(what is wrong, op, args, expected message) for the backward and split ops."""
    dy = torch.randn_like(x)
    c = x.shape[1]
    mean, invstd = torch.zeros(c), torch.ones(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    return [
        ("mean of N values", "conditional_batch_norm_backward", (dy, x, gain, torch.zeros(x.shape[0]), invstd, True),
         r"mean must have shape \(C,\)"),
        ("2-d invstd", "conditional_batch_norm_backward", (dy, x, gain, mean, invstd[None], True),
         r"invstd must have shape \(C,\)"),
        ("integer mean", "conditional_batch_norm_backward", (dy, x, gain, mean.long(), invstd, True),
         "mean must be a floating tensor"),
        ("integer grad_y", "conditional_batch_norm_backward", (dy.long(), x, gain, mean, invstd, True),
         "grad_y must be a floating tensor"),
        ("grad_y shape", "conditional_batch_norm_backward", (dy[:1], x, gain, mean, invstd, True),
         "grad_y has shape"),
        ("empty x", "conditional_batch_norm_backward", (dy[:0], x[:0], gain[:0], mean, invstd, True),
         "x is empty"),
        ("reduce: mean shape", "conditional_batch_norm_backward_reduce", (dy, x, mean[:1], invstd),
         r"mean must have shape \(C,\)"),
        ("elemt: invstd shape", "conditional_batch_norm_backward_elemt",
         (dy, x, gain, mean, invstd[:1], mean, mean, 10), r"invstd must have shape \(C,\)"),
        ("elemt: count", "conditional_batch_norm_backward_elemt", (dy, x, gain, mean, invstd, mean, mean, 0),
         "count must be positive"),
        ("apply: mean shape", "conditional_batch_norm_apply", (x, gain, bias, mean[:1], invstd),
         r"mean must have shape \(C,\)"),
        ("apply: gain dtype", "conditional_batch_norm_apply", (x, gain.double(), bias, mean, invstd),
         "cast them to one dtype"),
        ("update: count", "conditional_batch_norm_update_running", (rm, rv, mean, invstd, 1, 0.1),
         "needs count > 1"),
        ("update: length", "conditional_batch_norm_update_running", (rm[:1], rv, mean, invstd, 8, 0.1),
         "running_mean has shape"),
        ("update: integer buffer", "conditional_batch_norm_update_running", (rm.long(), rv, mean, invstd, 8, 0.1),
         "running_mean must be a floating tensor"),
    ]


_BAD = _bad_backward_calls(*_inputs((4, 3, 2, 2)))


@pytest.mark.parametrize("what,name,args,message", _BAD, ids=[b[0] for b in _BAD])
def test_backward_and_split_ops_reject_bad_input_like_the_reference(what, name, args, message):
    """The C++ kernel and the Python reference reject the same input with the same exception
    type (ValueError for values and shapes, TypeError for dtypes) and message."""
    reference = getattr(cbn, f"{name}_reference")
    with pytest.raises((ValueError, TypeError), match=message) as from_kernel:
        getattr(fbn, name)(*args)
    with pytest.raises((ValueError, TypeError), match=message) as from_reference:
        reference(*args)
    assert from_kernel.type is from_reference.type, (from_kernel.value, from_reference.value)


_BAD_FORWARD = [
    ("N=1", lambda x, g, b, rm, rv: (x[:1, :, :1, :1], g[:1], b[:1], rm, rv, True, 1e-5)),
    ("gain shape", lambda x, g, b, rm, rv: (x, g[:, :2], b, rm, rv, True, 1e-5)),
    ("running_var shape", lambda x, g, b, rm, rv: (x, g, b, rm, torch.ones(4), True, 1e-5)),
    ("3-d x", lambda x, g, b, rm, rv: (x[0], g, b, rm, rv, True, 1e-5)),
    ("gain dtype", lambda x, g, b, rm, rv: (x, g.double(), b, rm, rv, True, 1e-5)),
    ("integer x", lambda x, g, b, rm, rv: (x.long(), g, b, rm, rv, True, 1e-5)),
    ("eval without stats", lambda x, g, b, rm, rv: (x, g, b, None, None, False, 1e-5)),
    ("empty x", lambda x, g, b, rm, rv: (x[:0], g[:0], b[:0], rm, rv, True, 1e-5)),
    ("one running stat", lambda x, g, b, rm, rv: (x, g, b, rm, None, True, 1e-5)),
]


@pytest.mark.parametrize("what,make", _BAD_FORWARD, ids=[b[0] for b in _BAD_FORWARD])
def test_forward_rejects_bad_input_with_the_reference_exception_type(what, make):
    x, gain, bias = _inputs((4, 3, 2, 2))
    args = make(x, gain, bias, torch.zeros(3), torch.ones(3))
    with pytest.raises(Exception) as from_kernel:
        fbn.conditional_batch_norm(*args)
    with pytest.raises(Exception) as from_reference:
        cbn.conditional_batch_norm_reference(*args)
    assert from_kernel.type is from_reference.type, (from_kernel.value, from_reference.value)
    assert from_kernel.type in (ValueError, TypeError)


@pytest.mark.parametrize("device", DEVICES)
def test_running_stat_update_accepts_strided_and_mixed_dtype_buffers(device):
    """Both devices write through any 1-d floating buffers (the CUDA kernel handles the
    contiguous one-dtype case itself and falls back to the CPU's ops otherwise)."""
    mean = torch.randn(6, device=device)
    var = torch.rand(6, device=device) + 0.5
    cases = {
        "strided": (torch.zeros(12, device=device)[::2], torch.ones(12, device=device)[::2]),
        "mixed dtypes": (torch.zeros(6, device=device, dtype=torch.float64),
                         torch.ones(6, device=device, dtype=torch.bfloat16)),
    }
    for rm, rv in cases.values():
        want_m, want_v = rm.clone(), rv.clone()
        cbn.conditional_batch_norm_update_running_reference(want_m, want_v, mean, var, 20, 0.3)
        fbn.conditional_batch_norm_update_running(rm, rv, mean, var, 20, 0.3)
        torch.testing.assert_close(rm, want_m)
        torch.testing.assert_close(rv, want_v)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_channel_running_stat_update_returns_normally(device):
    empty = torch.empty(0, device=device)
    fbn.conditional_batch_norm_update_running(empty, empty.clone(), empty, empty, 4, 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_x_raises_the_same_error_on_every_device(device):
    x = torch.empty(0, 3, 4, 4, device=device)
    g = torch.empty(0, 3, device=device)
    for fn in (lambda: fbn.conditional_batch_norm(x, g, g, None, None, True, 1e-5),
               lambda: fbn.conditional_batch_norm_stats(x),
               lambda: fbn.conditional_batch_norm_backward(x, x, g, torch.zeros(3, device=device),
                                                           torch.ones(3, device=device), True)):
        with pytest.raises(ValueError, match="x is empty"):
            fn()


@requires_cuda
def test_cuda_backward_rejects_statistics_on_the_cpu():
    x, gain, bias = _inputs((4, 3, 2, 2), torch.float32, "cuda")
    dy = torch.randn_like(x)
    with pytest.raises(ValueError, match="same device"):
        fbn.conditional_batch_norm_backward(dy, x, gain, torch.zeros(3), torch.ones(3, device="cuda"), True)
    with pytest.raises(ValueError, match="same device"):
        fbn.conditional_batch_norm_backward_reduce(dy, x, torch.zeros(3, device="cuda"), torch.ones(3))
    with pytest.raises(ValueError, match="same device"):
        fbn.conditional_batch_norm_update_running(torch.zeros(3, device="cuda"), torch.ones(3, device="cuda"),
                                                  torch.zeros(3), torch.ones(3), 8, 0.1)


def test_n1_training_error_matches_pytorch_wording():
    x, gain, bias = _inputs((1, 3, 1, 1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(x, None, None, training=True)
    with pytest.raises((RuntimeError, ValueError), match="Expected more than 1 value per channel"):
        ops.conditional_batch_norm(x, gain, bias, training=True)
    # N=1 with H*W > 1 is fine, as in PyTorch
    x, gain, bias = _inputs((1, 3, 2, 2))
    torch.testing.assert_close(
        ops.conditional_batch_norm(x, gain, bias).double(), _expected(x, gain, bias), **TOL[torch.float32]
    )


def test_momentum_none_needs_the_module():
    x, gain, bias = _inputs((2, 3, 2, 2))
    with pytest.raises(ValueError, match="momentum=None"):
        ops.conditional_batch_norm(x, gain, bias, torch.zeros(3), torch.ones(3), momentum=None)


# --- module ---------------------------------------------------------------------------------


def _module_expected(m: ConditionalBatchNorm2d, bn: torch.nn.BatchNorm2d, x, cond):
    return bn(x) * (1 + m.gain(cond))[:, :, None, None] + m.bias(cond)[:, :, None, None]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_module_matches_batch_norm_then_conditional_affine(momentum, spectral_norm):
    m = ConditionalBatchNorm2d(6, 10, momentum=momentum, spectral_norm=spectral_norm)
    bn = torch.nn.BatchNorm2d(6, affine=False, momentum=momentum)
    for step in range(3):
        x, cond = torch.randn(4, 6, 3, 3) * (step + 1), torch.randn(4, 10)
        m.train(), bn.train()
        y = m(x, cond)
        if spectral_norm:  # the spectral norm's power iteration ran in m's forward: evaluate as is
            m.eval()
        torch.testing.assert_close(y, _module_expected(m, bn, x, cond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert int(m.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    m.eval(), bn.eval()
    x, cond = torch.randn(1, 6, 3, 3), torch.randn(1, 10)
    torch.testing.assert_close(m(x, cond), _module_expected(m, bn, x, cond), rtol=1e-5, atol=1e-5)


def test_module_state_dict_has_batch_norm_buffer_names():
    keys = set(ConditionalBatchNorm2d(4, 3, spectral_norm=False).state_dict())
    assert {"running_mean", "running_var", "num_batches_tracked"} <= keys
    assert {"gain.weight", "gain.bias", "bias.weight", "bias.bias"} <= keys


def test_module_backward_reaches_the_linear_maps():
    m = ConditionalBatchNorm2d(5, 7)
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    cond = torch.randn(3, 7, requires_grad=True)
    m(x, cond).square().sum().backward()
    assert x.grad is not None and cond.grad is not None
    assert all(p.grad is not None for p in m.parameters())


def test_module_rejects_a_wrong_cond_shape():
    m = ConditionalBatchNorm2d(5, 7, spectral_norm=False)
    with pytest.raises(ValueError, match=r"cond must have shape \(N, cond_dim\)"):
        m(torch.randn(3, 5, 2, 2), torch.randn(3, 6))


def test_convert_sync_cbn_sets_the_group_on_every_layer():
    model = torch.nn.ModuleDict(
        {"a": ConditionalBatchNorm2d(4, 3), "b": torch.nn.Sequential(ConditionalBatchNorm2d(2, 3))}
    )
    sentinel = object()  # any process group object; no collective runs in this test
    assert convert_sync_cbn(model, sentinel) is model
    assert model["a"].process_group is sentinel and model["b"][0].process_group is sentinel
    with pytest.raises(RuntimeError, match="not initialized"):
        convert_sync_cbn(model)


# --- CUDA kernel paths (vectorised / scalar, split reductions, run groups) ------------------


@requires_cuda
def test_cuda_kernels_are_registered():
    info = ops.backend_info()
    for name in [*SPLIT_OPS, "conditional_batch_norm_update_running"]:
        assert info[name]["cuda"] == "cuda", name


def _misaligned(shape, dtype, device):
    # A view one element into its storage: not 16-byte aligned, so the scalar paths run.
    n = torch.Size(shape).numel()
    return torch.randn(n + 1, dtype=torch.float64).to(device, dtype)[1:].view(shape)


KERNEL_PATH_SHAPES = [
    (64, 96, 32, 32), (256, 24, 4, 4), (8, 1536, 4, 4), (3, 5, 7, 9), (2, 3, 1, 1), (4, 16, 128, 128),
    (2, 40, 64, 64),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", KERNEL_PATH_SHAPES)
def test_cuda_matches_float64_on_kernel_paths(dtype, layout, shape):
    """Shapes that take every branch: many blocks per channel, short runs grouped per warp,
    long runs split over warps (small N at high resolution), odd sizes (scalar loads), C not
    a multiple of the vector width or of 32 vectors (channels_last lanes), H = W = 1."""
    x, gain, bias = _inputs(shape, dtype, "cuda", layout)
    dy = torch.randn(shape, dtype=torch.float64).to("cuda", dtype).contiguous(memory_format=layout)
    y, mean, invstd, var = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.double(), _expected(x, gain, bias), **TOL[dtype])
    got = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True)
    ref = cbn.conditional_batch_norm_backward_reference(dy.double(), x64, gain.double(), mean.double(), invstd.double(), True)
    _assert_backward_close(got, ref, dtype, shape)


def _assert_backward_close(got, ref, dtype, shape):
    """grad_x elementwise; grad_gain and grad_bias are sums over H*W values, whose fp32 error
    grows like sqrt(H*W) (sum_tol)."""
    tol = TOL[dtype] if dtype != torch.bfloat16 else dict(rtol=5e-2, atol=5e-2)
    (gx, gg, gb), (rx, rg, rb) = got, ref
    torch.testing.assert_close(gx.double(), rx, **tol)
    reduced = sum_tol(tol, shape[2] * shape[3])
    torch.testing.assert_close(gg.double(), rg, **reduced)
    torch.testing.assert_close(gb.double(), rb, **reduced)


@requires_cuda
def test_cuda_misaligned_views_take_the_scalar_path():
    x = _misaligned((4, 8, 6, 6), torch.float32, "cuda")
    gain = torch.randn(4, 8, device="cuda")
    bias = torch.randn(4, 8, device="cuda")
    torch.testing.assert_close(
        ops.conditional_batch_norm(x, gain, bias).double(), _expected(x, gain, bias), **TOL[torch.float32]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_misaligned_views_forward_and_backward(device, dtype, layout, relu):
    """x, dy, gain and bias one element into their storage (not 16-byte aligned): the scalar
    paths, in both layouts, forward and backward (with the fused ReLU: bias read in backward
    too)."""
    shape = (4, 16, 6, 6)
    n = torch.Size(shape).numel()
    base = torch.randn(n + 1, dtype=torch.float64).to(device, dtype)
    if layout == torch.channels_last:  # a channels_last view at offset 1
        x = base[1:].view(4, 6, 6, 16).permute(0, 3, 1, 2)
        dy = torch.randn(n + 1, dtype=torch.float64).to(device, dtype)[1:].view(4, 6, 6, 16).permute(0, 3, 1, 2)
        assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    else:
        x = base[1:].view(shape)
        dy = _misaligned(shape, dtype, device)
    gain = torch.randn(4 * 16 + 1, dtype=torch.float64).to(device, dtype)[1:].view(4, 16)
    bias = torch.randn(4 * 16 + 1, dtype=torch.float64).to(device, dtype)[1:].view(4, 16)

    def expected(x):
        e = _expected(x, gain, bias)
        return e.relu() if relu else e

    y, mean, invstd, _ = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5, relu)
    torch.testing.assert_close(y.double(), expected(x), **TOL[dtype])
    got = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True, relu, bias)
    ref = cbn.conditional_batch_norm_backward_reference(dy.double(), x.double(), gain.double(), mean.double(),
                                                        invstd.double(), True, relu, bias.double())
    _assert_backward_close(got, ref, dtype, shape)
    # aligned x with misaligned per-channel operands: the channels_last vector path must not
    # take 16-byte loads of gain/bias
    xa, _, _ = _inputs(shape, dtype, device, layout)
    torch.testing.assert_close(fbn.conditional_batch_norm(xa, gain, bias, None, None, True, 1e-5, relu)[0].double(),
                               expected(xa), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["permuted", "sliced", "channel_slice"])
def test_non_contiguous_x_is_normalised_like_its_copy(device, view):
    """x neither contiguous nor channels_last (a permutation, a strided slice, a slice of
    channels): the op works on a copy in x's layout rule and gives the same numbers."""
    big = torch.randn(6, 10, 8, 9, dtype=torch.float64).to(device, torch.float32) + 2
    x = {"permuted": big.permute(0, 1, 3, 2), "sliced": big[::2, :, 1::2, :],
         "channel_slice": big[:, 2:7]}[view]
    n, c = x.shape[:2]
    gain = torch.randn(n, c, device=device)
    bias = torch.randn(n, c, device=device)
    dy = torch.randn(x.shape, device=device).transpose(2, 3).contiguous().transpose(2, 3)  # yet another layout
    y, mean, invstd, _ = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
    yc, meanc, invstdc, _ = fbn.conditional_batch_norm(x.contiguous(), gain, bias, None, None, True, 1e-5)
    torch.testing.assert_close(y, yc)
    torch.testing.assert_close(y.double(), _expected(x, gain, bias), **TOL[torch.float32])
    got = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True)
    want = fbn.conditional_batch_norm_backward(dy.contiguous(), x.contiguous(), gain, meanc, invstdc, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_layout", LAYOUTS, ids=["x_nchw", "x_nhwc"])
def test_grad_y_in_another_layout_than_x(device, x_layout):
    other = torch.channels_last if x_layout == torch.contiguous_format else torch.contiguous_format
    x, gain, bias = _inputs((4, 24, 6, 5), torch.float32, device, x_layout)
    dy = torch.randn(x.shape, device=device).contiguous(memory_format=other)
    y, mean, invstd, _ = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
    got = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True)
    want = fbn.conditional_batch_norm_backward(dy.contiguous(memory_format=x_layout), x, gain, mean, invstd, True)
    assert got[0].is_contiguous(memory_format=x_layout)  # grad_x follows x, not grad_y
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    ref = cbn.conditional_batch_norm_backward_reference(dy.double(), x.double(), gain.double(), mean.double(),
                                                        invstd.double(), True)
    _assert_backward_close(got, ref, torch.float32, x.shape)


@requires_cuda
def test_cuda_channels_last_backward_takes_more_than_65535_samples():
    # grid.y walks the samples: N above the grid's y limit is served, as on the CPU
    x, gain, bias = _inputs((65537, 8, 1, 2), torch.float32, "cuda", torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    dy = torch.randn_like(x)
    y, mean, invstd, _ = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
    got = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True)
    cpu = fbn.conditional_batch_norm_backward(dy.cpu(), x.cpu(), gain.cpu(), mean.cpu(), invstd.cpu(), True)
    for a, b in zip(got, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


@requires_two_gpus
def test_cuda_runs_on_the_tensors_device_not_the_current_one():
    x, gain, bias = _inputs((4, 8, 6, 6), torch.float32, "cuda:1", torch.channels_last)
    rm, rv = torch.zeros(8, device="cuda:1"), torch.ones(8, device="cuda:1")
    dy = torch.randn_like(x)
    with torch.cuda.device(0):
        xg = x.clone().requires_grad_()
        y = ops.conditional_batch_norm(xg, gain, bias, rm, rv, training=True)
        y.backward(dy)
    assert y.device == x.device and xg.grad.device == x.device
    torch.testing.assert_close(y.double(), _expected(x, gain, bias), **TOL[torch.float32])
    rm_c, rv_c = torch.zeros(8), torch.ones(8)
    ops.conditional_batch_norm(x.cpu(), gain.cpu(), bias.cpu(), rm_c, rv_c, training=True)
    torch.testing.assert_close(rm.cpu(), rm_c)


@requires_cuda
def test_cuda_is_deterministic():
    x, gain, bias = _inputs((32, 64, 16, 16), torch.float32, "cuda")
    dy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        y, mean, invstd, var = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
        runs.append((y, mean, var, *fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cuda_running_stat_update_matches_cpu(running_dtype):
    x, gain, bias = _inputs((4, 6, 3, 3), torch.float32, "cpu")
    rm = torch.randn(6).to(running_dtype)
    rv = (torch.rand(6) + 0.5).to(running_dtype)
    rm_c, rv_c = rm.cuda(), rv.cuda()
    ops.conditional_batch_norm(x, gain, bias, rm, rv, momentum=0.25)
    ops.conditional_batch_norm(x.cuda(), gain.cuda(), bias.cuda(), rm_c, rv_c, momentum=0.25)
    torch.testing.assert_close(rm_c.cpu(), rm)
    torch.testing.assert_close(rv_c.cpu(), rv)


def test_module_spectral_norm_uses_fastinv_sn_linear():
    from fastinv.nn import SNLinear

    m = ConditionalBatchNorm2d(4, 3, spectral_norm=True)
    assert isinstance(m.gain, SNLinear) and isinstance(m.bias, SNLinear)
    plain = ConditionalBatchNorm2d(4, 3, spectral_norm=False)
    assert type(plain.gain) is torch.nn.Linear


def test_module_compiles_fullgraph():
    m = ConditionalBatchNorm2d(6, 5, spectral_norm=False)
    ref = ConditionalBatchNorm2d(6, 5, spectral_norm=False)
    ref.load_state_dict(m.state_dict())
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x, cond = torch.randn(4, 6, 3, 3), torch.randn(4, 5)
    torch.testing.assert_close(compiled(x, cond), ref(x, cond))
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert int(m.num_batches_tracked) == 1


# --- fused ReLU (relu=True) -------------------------------------------------------------------


def _expected_relu(x, gain, bias, eps=1e-5, mean=None, var=None):
    return _expected(x, gain, bias, eps, mean, var).relu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 19, 1, 1), (3, 33, 8, 8), (5, 8, 17, 3)])
def test_relu_forward_matches_float64(device, dtype, layout, shape):
    x, gain, bias = _inputs(shape, dtype, device, layout, offset=0.0)
    y = ops.conditional_batch_norm(x, gain, bias, training=True, relu=True)
    expected_layout = layout if shape[2] * shape[3] > 1 else torch.contiguous_format
    assert y.dtype == dtype and y.is_contiguous(memory_format=expected_layout)
    assert (y >= 0).all()
    torch.testing.assert_close(y.double(), _expected_relu(x, gain, bias), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_backward_matches_float64_autograd(device, dtype, layout, training):
    x, gain, bias = _inputs((3, 7, 5, 4), dtype, device, layout)
    rm, rv = torch.randn(7, device=device) + 3, torch.rand(7, device=device) + 3
    dy = torch.randn(x.shape, dtype=torch.float64).to(device, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, gain, bias)]
    y = ops.conditional_batch_norm(*leaves, rm, rv, training=training, relu=True)
    y.backward(dy)
    leaves64 = [t.double().requires_grad_() for t in (x, gain, bias)]
    stats = {} if training else dict(mean=rm, var=rv)
    out64 = _expected_relu(*leaves64, **stats)
    assert 0.2 < (out64 == 0).double().mean() < 0.8  # the mask matters
    out64.backward(dy.double())
    _assert_grads_match(leaves, leaves64, dtype, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 19, 1, 1), (3, 33, 8, 8)])
def test_relu_kernels_agree_with_the_reference_in_float64(device, layout, training, shape):
    x, gain, bias = _inputs(shape, torch.float64, device, layout, offset=0.0)
    c = shape[1]
    rm = torch.randn(c, dtype=torch.float64, device=device)
    rv = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    got = fbn.conditional_batch_norm(x, gain, bias, rm, rv, training, 1e-5, True)
    ref = cbn.conditional_batch_norm_reference(x, gain, bias, rm, rv, training, 1e-5, True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    dy = torch.randn_like(x)
    _, mean, invstd, _ = got
    got_b = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, training, True, bias)
    ref_b = cbn.conditional_batch_norm_backward_reference(dy, x, gain, mean, invstd, training, True, bias)
    for a, b in zip(got_b, ref_b):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    # the mask is the only difference from the plain backward
    passes = got[0] > 0
    plain = fbn.conditional_batch_norm_backward(dy * passes, x, gain, mean, invstd, training)
    for a, b in zip(got_b, plain):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fn", ["kernel", "reference"])
def test_relu_backward_masks_by_the_stored_output(device, dtype, fn):
    """A positive value too small for fp16/bf16 is stored as 0, and the ReLU's gradient there
    is 0 (as torch.relu's backward on the stored output), though its fp32 value is > 0."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # smallest subnormal
    # eval, mean 0, invstd 1 (eps 0): y = x * gain; x = 1/4 gives tiny/4 (stored as 0), x = 1 tiny
    x = torch.tensor([0.25, 1.0, -1.0, 0.5], device=device).view(1, 1, 2, 2).to(dtype)
    gain = torch.full((1, 1), tiny, device=device).to(dtype)
    bias = torch.zeros(1, 1, device=device, dtype=dtype)
    rm, rv = torch.zeros(1, device=device), torch.ones(1, device=device)
    forward = fbn.conditional_batch_norm if fn == "kernel" else cbn.conditional_batch_norm_reference
    backward = (fbn.conditional_batch_norm_backward if fn == "kernel"
                else cbn.conditional_batch_norm_backward_reference)
    y, mean, invstd, _ = forward(x, gain, bias, rm, rv, False, 0.0, True)
    assert y.flatten().tolist() == [0.0, tiny, 0.0, 0.0]  # 0.5 * tiny rounds to even: 0
    gx, _, _ = backward(torch.ones_like(x), x, gain, mean, invstd, False, True, bias)
    assert (gx.flatten() != 0).tolist() == [False, True, False, False]
    # the torch layers' ReLU on the stored output agrees
    xt = x.clone().requires_grad_()
    torch.relu(xt * gain[:, :, None, None]).sum().backward()
    assert (xt.grad.flatten() != 0).tolist() == [False, True, False, False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_gradcheck(device, training):
    x, gain, bias = _inputs((3, 4, 3, 2), torch.float64, device, offset=0.0)
    rm = torch.randn(4, dtype=torch.float64, device=device)
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    args = [t.requires_grad_() for t in (x, gain, bias)]

    def fn(x, gain, bias):
        return ops.conditional_batch_norm(x, gain, bias, rm.clone(), rv.clone(), training=training, relu=True)

    y = fn(*args)
    assert 0 < (y == 0).sum() < y.numel() and y[y != 0].abs().min() > 1e-4  # away from the kink
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_relu_opcheck(device, dtype, layout):
    x, gain, bias = _inputs((3, 5, 4, 3), dtype, device, layout, offset=0.0)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    xg, gg, bg = (t.clone().requires_grad_() for t in (x, gain, bias))
    for training in (True, False):
        torch.library.opcheck(fbn.conditional_batch_norm.default, (xg, gg, bg, rm, rv, training, 1e-5, True))
    y, mean, invstd, _ = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5, True)
    dy = torch.randn_like(y)
    torch.library.opcheck(fbn.conditional_batch_norm_backward.default,
                          (dy, x, gain, mean, invstd, True, True, bias))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_relu_compiles_fullgraph(backend, layout):
    x, gain, bias = _inputs((4, 6, 5, 5), torch.float32, layout=layout, offset=0.0)
    rm, rv = torch.zeros(6), torch.ones(6)
    rm_e, rv_e = rm.clone(), rv.clone()

    def step(x, gain, bias, rm, rv):
        return ops.conditional_batch_norm(x, gain, bias, rm, rv, training=True, momentum=0.2, relu=True) * 2

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    leaves_c = [t.clone().requires_grad_() for t in (x, gain, bias)]
    leaves_e = [t.clone().requires_grad_() for t in (x, gain, bias)]
    yc = compiled(*leaves_c, rm, rv)
    ye = step(*leaves_e, rm_e, rv_e)
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(rm, rm_e)
    torch.testing.assert_close(rv, rv_e)
    yc.square().sum().backward()
    ye.square().sum().backward()
    for a, b in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("fn", [fbn.conditional_batch_norm_backward, cbn.conditional_batch_norm_backward_reference])
def test_relu_backward_without_bias_raises_a_clear_error(fn):
    x, gain, bias = _inputs((4, 3, 2, 2))
    dy, mean, invstd = torch.randn_like(x), torch.zeros(3), torch.ones(3)
    with pytest.raises((RuntimeError, ValueError), match="relu=True .* needs the forward's bias; pass bias"):
        fn(dy, x, gain, mean, invstd, True, True, None)
    with pytest.raises((RuntimeError, ValueError), match=r"bias must have shape \(N, C\)"):
        fn(dy, x, gain, mean, invstd, True, True, bias[:2])


def test_relu_autograd_matches_autograd_of_the_reference():
    """The op's registered backward (fused mask) against torch's autograd through the reference
    forward, whose ReLU is torch.relu."""
    x, gain, bias = _inputs((4, 5, 3, 3), torch.float64, offset=0.0)
    dy = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, gain, bias)]
    fused = torch.autograd.grad(ops.conditional_batch_norm(*leaves, relu=True), leaves, dy)
    y_ref = cbn.conditional_batch_norm_reference(*leaves, None, None, True, 1e-5, True)[0]
    for a, b in zip(fused, torch.autograd.grad(y_ref, leaves, dy)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_module_relu_flag_is_relu_after_the_layer(layout):
    m = ConditionalBatchNorm2d(6, 5, spectral_norm=False, relu=True)
    plain = ConditionalBatchNorm2d(6, 5, spectral_norm=False)
    plain.load_state_dict(m.state_dict())
    assert "relu" in repr(m) and "relu" not in repr(plain)
    x = torch.randn(4, 6, 3, 3).contiguous(memory_format=layout)
    cond = torch.randn(4, 5)
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yp = m(xr, cond), torch.relu(plain(xp, cond))
    torch.testing.assert_close(y, yp)
    torch.testing.assert_close(m.running_var, plain.running_var)
    dy = torch.randn_like(y)
    y.backward(dy)
    yp.backward(dy)
    torch.testing.assert_close(xr.grad, xp.grad)
    assert all(p.grad is not None for p in m.parameters())


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", KERNEL_PATH_SHAPES)
def test_cuda_relu_matches_float64_on_kernel_paths(dtype, layout, training, shape):
    """The fused ReLU on every CUDA kernel path (held slab, stats + apply, vector / scalar,
    NCHW run groups / split runs, channels_last lanes), forward and masked backward."""
    x, gain, bias = _inputs(shape, dtype, "cuda", layout, offset=0.0)
    dy = torch.randn(shape, dtype=torch.float64).to("cuda", dtype).contiguous(memory_format=layout)
    c = shape[1]
    rm, rv = 0.1 * torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 3.5
    y, mean, invstd, _ = fbn.conditional_batch_norm(x, gain, bias, rm, rv, training, 1e-5, True)
    stats = {} if training else dict(mean=rm, var=rv)
    torch.testing.assert_close(y.double(), _expected_relu(x, gain, bias, **stats), **TOL[dtype])
    got = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, training, True, bias)
    ref = cbn.conditional_batch_norm_backward_reference(dy.double(), x.double(), gain.double(), mean.double(),
                                                        invstd.double(), training, True, bias.double())
    _assert_backward_close(got, ref, dtype, shape)


@pytest.mark.parametrize("affine", [True, False])
def test_sync_batch_norm_module_equals_torch_batch_norm_in_float64(affine):
    # one process (no group): SyncBatchNorm2d is nn.BatchNorm2d on the fused op, same keys
    from fastinv.nn import SyncBatchNorm2d, convert_sync_batchnorm

    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(6, affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    model = torch.nn.Sequential(copy.deepcopy(ref))
    convert_sync_batchnorm(model, process_group=object())  # any group object: not used below
    ours = model[0]
    assert isinstance(ours, SyncBatchNorm2d) and ours.state_dict().keys() == ref.state_dict().keys()
    ours.process_group = None
    x = torch.randn(5, 6, 4, 3, dtype=torch.float64) * 2 + 1
    w = torch.randn_like(x)
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ours(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert ours.num_batches_tracked == ref.num_batches_tracked
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-9, atol=1e-9)
