"""Conditional batch norm: every backend against a float64 formula, PyTorch's batch norm
conventions (running stats, N=1 errors), autograd, opcheck, torch.compile, both layouts, the
module and the cross-replica split ops. The 2-process test is in
test_conditional_batch_norm_distributed.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastinv import ops
from fastinv.nn import ConditionalBatchNorm2d, convert_sync_cbn
from tests.conftest import requires_cuda

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
)
def test_random_shapes_float64_agree_with_reference(n, c, h, w, channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, gain, bias = _inputs((n, c, h, w), torch.float64, "cpu", layout)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y, mean, invstd, var = fbn.conditional_batch_norm(x, gain, bias, rm, rv, True, 1e-5)
    ry, rmean, rinvstd, rvar = cbn.conditional_batch_norm_reference(x, gain, bias, rm, rv, True, 1e-5)
    for a, b in [(y, ry), (mean, rmean), (invstd, rinvstd), (var, rvar)]:
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    torch.testing.assert_close(y, _expected(x, gain, bias), **TOL[torch.float64])
    dy = torch.randn_like(y)
    got = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True)
    ref = cbn.conditional_batch_norm_backward_reference(dy, x, gain, mean, invstd, True)
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
    for got, want in zip(leaves, leaves64):
        assert got.grad.dtype == dtype
        tol = TOL[dtype] if dtype in (torch.float64, torch.float32) else dict(rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)
    if layout == torch.channels_last:
        assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last)


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


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "shape",
    [(64, 96, 32, 32), (256, 24, 4, 4), (8, 1536, 4, 4), (3, 5, 7, 9), (2, 3, 1, 1), (4, 16, 128, 128)],
)
def test_cuda_matches_float64_on_kernel_paths(dtype, layout, shape):
    """Shapes that take every branch: many blocks per channel, short runs grouped per warp,
    odd sizes (scalar loads), C not a multiple of the vector width, H = W = 1."""
    x, gain, bias = _inputs(shape, dtype, "cuda", layout)
    dy = torch.randn(shape, dtype=torch.float64).to("cuda", dtype).contiguous(memory_format=layout)
    y, mean, invstd, var = fbn.conditional_batch_norm(x, gain, bias, None, None, True, 1e-5)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.double(), _expected(x, gain, bias), **TOL[dtype])
    got = fbn.conditional_batch_norm_backward(dy, x, gain, mean, invstd, True)
    ref = cbn.conditional_batch_norm_backward_reference(dy.double(), x64, gain.double(), mean.double(), invstd.double(), True)
    tol = TOL[dtype] if dtype != torch.bfloat16 else dict(rtol=5e-2, atol=5e-2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, **tol)


@requires_cuda
def test_cuda_misaligned_views_take_the_scalar_path():
    x = _misaligned((4, 8, 6, 6), torch.float32, "cuda")
    gain = torch.randn(4, 8, device="cuda")
    bias = torch.randn(4, 8, device="cuda")
    torch.testing.assert_close(
        ops.conditional_batch_norm(x, gain, bias).double(), _expected(x, gain, bias), **TOL[torch.float32]
    )


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
