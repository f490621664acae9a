"""The multi-tensor spectral norm op against torch's parametrization and its own float64
reference, on every backend that is built. (Modules, groups, checkpoints, DDP:
test_spectral_norm_modules.py.)"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from fastinv import ops
from fastinv.ops.spectral_norm import spectral_norm_backward_reference
from tests.conftest import TOL, requires_cuda, requires_two_gpus, sum_tol

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
SN = torch.ops.fastinv.spectral_norm.default
SN_BWD = torch.ops.fastinv.spectral_norm_backward.default
# (rows, ...) shapes: square, conv (dim 0), wide, tall, a single row, wide enough for several
# column blocks and tall enough for several row items in the kernels
# outputs are rounded to the weight dtype; the float64 reference is not
OUT_TOL = {**TOL, torch.bfloat16: dict(rtol=8e-3, atol=1e-3), torch.float16: dict(rtol=1e-3, atol=1e-3)}
SHAPES = [(8, 8), (16, 3, 3, 3), (3, 700), (1200, 5), (1, 9), (40, 2100)]


def _vectors(weights, dtype=None, device=None):
    us, vs = [], []
    for w in weights:
        acc = ops.spectral_norm.acc_dtype(w.dtype) if dtype is None else dtype
        rows, cols = w.shape[0], w.numel() // w.shape[0]
        us.append(F.normalize(torch.randn(rows, dtype=torch.float64), dim=0).to(w.device if device is None else device, acc))
        vs.append(F.normalize(torch.randn(cols, dtype=torch.float64), dim=0).to(w.device if device is None else device, acc))
    return us, vs


def _weights(shapes, dtype, device):
    return [torch.randn(s, dtype=torch.float64).to(device, dtype) for s in shapes]


def test_cpu_kernel_is_registered():
    info = ops.backend_info()
    assert info["spectral_norm"]["cpu"] == "cpp"
    assert info["spectral_norm_backward"]["cpu"] == "cpp"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_iter", [0, 1, 3])
def test_equals_torch_parametrization_in_float64(device, n_iter):
    """Forward values, updated u/v and weight gradients equal torch's spectral norm, layer by
    layer, for all layers in one call (n_iter = 0 is eval mode)."""
    shapes = [(6, 5), (8, 3, 3, 3), (4, 2, 3, 3)]
    mods = [nn.Linear(5, 6), nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(4, 2, 3)]
    ours_w, ours_u, ours_v, grads = [], [], [], []
    for m, shape in zip(mods, shapes):
        m.double().to(device)
        dim = 1 if isinstance(m, nn.ConvTranspose2d) else 0
        torch_spectral_norm(m, n_power_iterations=max(n_iter, 1), dim=dim)
        m.train(n_iter > 0)
        p = m.parametrizations.weight
        w = p.original.detach().clone().requires_grad_()
        ours_w.append(w)
        ours_u.append(p[0]._u.clone())
        ours_v.append(p[0]._v.clone())
        grads.append(torch.randn(shape, dtype=torch.float64, device=device))
    mats = [w if i < 2 else w.movedim(1, 0) for i, w in enumerate(ours_w)]
    outs = ops.spectral_norm_(mats, ours_u, ours_v, n_iter, 1e-12, training=n_iter > 0)
    outs[2] = outs[2].movedim(0, 1)
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    for i, m in enumerate(mods):
        expected = m.weight  # runs torch's power iteration in training
        (expected * grads[i]).sum().backward()
        p = m.parametrizations.weight
        torch.testing.assert_close(outs[i], expected, **TOL[torch.float64])
        torch.testing.assert_close(ours_u[i], p[0]._u, **TOL[torch.float64])
        torch.testing.assert_close(ours_v[i], p[0]._v, **TOL[torch.float64])
        torch.testing.assert_close(ours_w[i].grad, p.original.grad, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_iter", [0, 2])
def test_kernel_matches_float64_reference(device, dtype, n_iter):
    ws = _weights(SHAPES, dtype, device)
    us, vs = _vectors(ws)
    if n_iter == 0:  # eval uses trained u, v (random ones can make σ ~ 0 and W/σ ill-conditioned)
        _, us, vs, _ = SN(ws, us, vs, 3, 1e-12)
    out, u, v, sigma = SN(ws, us, vs, n_iter, 1e-12)
    w64 = [w.double() for w in ws]
    r_out, r_u, r_v, r_sigma = ops.spectral_norm_reference(w64, [x.double() for x in us], [x.double() for x in vs], n_iter, 1e-12)
    acc = ops.spectral_norm.acc_dtype(dtype)
    assert sigma.dtype == acc and all(x.dtype == acc for x in u + v)
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    # σ, u and v come out of dot products over a row or a column of each weight: their
    # rounding error grows like sqrt(that length) (sum_tol)
    length = max(max(w.shape[0], w.numel() // w.shape[0]) for w in ws)
    tol = sum_tol(tol, length)
    torch.testing.assert_close(sigma.double(), r_sigma, **tol)
    for a, b in zip(u + v, r_u + r_v):
        torch.testing.assert_close(a.double(), b, **tol)
    for a, b, w in zip(out, r_out, ws):
        assert a.dtype == dtype and a.shape == w.shape and a.is_contiguous()
        torch.testing.assert_close(a.double(), b, **OUT_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_backward_kernel_matches_float64_reference(device, dtype):
    ws = _weights(SHAPES, dtype, device)
    us, vs = _vectors(ws)
    grads = _weights(SHAPES, dtype, device)
    sigma = torch.rand(len(ws), dtype=torch.float64).to(device, us[0].dtype) + 0.5
    got = SN_BWD(grads, ws, us, vs, sigma)
    expected = spectral_norm_backward_reference(
        [g.double() for g in grads], [w.double() for w in ws], [x.double() for x in us],
        [x.double() for x in vs], sigma.double(),
    )
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **OUT_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_sigma_converges_to_the_spectral_norm(device):
    ws = _weights([(12, 7), (5, 2, 3, 3), (30, 30)], torch.float64, device)
    us, vs = _vectors(ws)
    _, us, vs, sigma = SN(ws, us, vs, 200, 1e-12)
    expected = torch.stack([torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2) for w in ws])
    torch.testing.assert_close(sigma, expected, rtol=1e-6, atol=0)
    outs = ops.spectral_norm_(ws, us, vs, n_power_iterations=1)
    for o in outs:
        torch.testing.assert_close(torch.linalg.matrix_norm(o.reshape(o.shape[0], -1), 2),
                                   torch.tensor(1.0, dtype=torch.float64, device=device), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    # eval mode: u, v are constants, so W/σ is a smooth function of W alone
    ws = [w.requires_grad_() for w in _weights([(4, 3), (3, 2, 2)], torch.float64, device)]
    us, vs = _vectors(ws)
    assert torch.autograd.gradcheck(lambda a, b: tuple(SN([a, b], us, vs, 0, 1e-12)[0]), tuple(ws))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    ws = [w.requires_grad_() for w in _weights([(6, 4), (3, 2, 3, 3)], dtype, device)]
    us, vs = _vectors(ws)
    torch.library.opcheck(SN, (ws, us, vs, 1, 1e-12))
    torch.library.opcheck(SN, (ws, us, vs, 0, 1e-12))
    grads = _weights([(6, 4), (3, 2, 3, 3)], dtype, device)
    sigma = torch.tensor([1.5, 2.0], dtype=us[0].dtype, device=device)
    torch.library.opcheck(SN_BWD, ([g for g in grads], [w.detach() for w in ws], us, vs, sigma))


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_fullgraph(device):
    ws = [w.requires_grad_() for w in _weights([(6, 4), (5, 3, 3)], torch.float32, device)]
    us, vs = _vectors(ws)
    us2, vs2 = [u.clone() for u in us], [v.clone() for v in vs]

    @torch.compile(fullgraph=True)
    def loss(ws, us, vs):
        outs = ops.spectral_norm_(ws, us, vs, 1, 1e-12, training=True)
        return sum((o * o).sum() for o in outs)

    got = loss(ws, us, vs)
    got.backward()
    grads = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    expected = sum((o * o).sum() for o in ops.spectral_norm_(ws, us2, vs2, 1, 1e-12, training=True))
    expected.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip(us + vs, us2 + vs2):
        torch.testing.assert_close(a, b)  # the compiled call updated the buffers in place too
    for g, w in zip(grads, ws):
        torch.testing.assert_close(g, w.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_weight_gives_zero_not_nan(device, dtype):
    ws = [torch.zeros(4, 3, dtype=dtype, device=device).requires_grad_(), torch.randn(2, 2, device=device, dtype=dtype)]
    us, vs = _vectors(ws)
    outs = ops.spectral_norm_(ws, us, vs, 1, 1e-12)
    assert not any(torch.isnan(o).any() for o in outs)
    assert torch.equal(outs[0], torch.zeros_like(outs[0]))
    outs[0].sum().backward()
    assert not torch.isnan(ws[0].grad).any()
    assert not any(torch.isnan(x).any() for x in us + vs)


def test_empty_list():
    assert ops.spectral_norm_([], [], [], 1, 1e-12) == []
    out, u, v, sigma = SN([], [], [], 1, 1e-12)
    assert out == [] and u == [] and v == [] and sigma.numel() == 0


def test_training_updates_buffers_in_place_and_eval_does_not():
    ws = _weights([(5, 4)], torch.float32, "cpu")
    us, vs = _vectors(ws)
    u_ptr, u0 = us[0].data_ptr(), us[0].clone()
    ops.spectral_norm_(ws, us, vs, 1, 1e-12, training=False)
    assert torch.equal(us[0], u0)
    ops.spectral_norm_(ws, us, vs, 1, 1e-12, training=True)
    assert us[0].data_ptr() == u_ptr and not torch.equal(us[0], u0)


def test_backward_after_a_second_forward_uses_its_own_u_v():
    """GAN pattern: D(real), D(fake), then one backward: the first forward's gradient must use
    the u, v of the first forward, though the second one updated the buffers."""
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    (u,), (v,) = _vectors([w])
    u_first, v_first = u.clone(), v.clone()
    a = ops.spectral_norm_([w], [u], [v], 1, 1e-12)[0]
    u_after, v_after = u.clone(), v.clone()
    b = ops.spectral_norm_([w], [u], [v], 1, 1e-12)[0]
    (a.sum() + 2 * b.sum()).backward()
    w2 = w.detach().clone().requires_grad_()
    a2 = ops.spectral_norm_reference([w2], [u_first], [v_first], 1, 1e-12)[0][0]
    b2 = ops.spectral_norm_reference([w2], [u_after], [v_after], 1, 1e-12)[0][0]
    # the reference through autograd would differentiate the power iteration: use the op's
    # formula with each forward's own u, v instead
    _, ua, va, sa = ops.spectral_norm_reference([w2], [u_first], [v_first], 1, 1e-12)
    _, ub, vb, sb = ops.spectral_norm_reference([w2], [u_after], [v_after], 1, 1e-12)
    ones = torch.ones_like(w)
    expected = spectral_norm_backward_reference([ones], [w2.detach()], ua, va, sa)[0] + \
        spectral_norm_backward_reference([2 * ones], [w2.detach()], ub, vb, sb)[0]
    torch.testing.assert_close(w.grad, expected)
    torch.testing.assert_close(a, a2.detach())
    torch.testing.assert_close(b, b2.detach())


def test_result_does_not_depend_on_the_thread_count():
    ws = _weights([(300, 700), (64, 32, 3, 3)], torch.float32, "cpu")
    us, vs = _vectors(ws)
    first = SN(ws, us, vs, 2, 1e-12)
    torch.set_num_threads(1)
    try:
        single = SN(ws, us, vs, 2, 1e-12)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    for a, b in zip(first[0] + first[1] + first[2] + [first[3]], single[0] + single[1] + single[2] + [single[3]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [SN, ops.spectral_norm_reference], ids=["kernel", "reference"])
def test_bad_inputs_raise_clear_errors(fn):
    w = torch.randn(4, 3)
    u, v = torch.randn(4), torch.randn(3)
    with pytest.raises((RuntimeError, ValueError), match="pass a 1-d vector of 4 elements|pass a 1-d u of 4 elements"):
        fn([w], [torch.randn(5)], [v], 1, 1e-12)
    with pytest.raises((RuntimeError, ValueError), match="of 3 elements"):
        fn([w], [u], [torch.randn(4)], 1, 1e-12)
    with pytest.raises((RuntimeError, ValueError), match="pass one u and one v per weight"):
        fn([w, w], [u], [v], 1, 1e-12)
    with pytest.raises((RuntimeError, TypeError), match=r"must be (torch\.float32|Float)"):
        fn([w], [u.double()], [v], 1, 1e-12)
    with pytest.raises((RuntimeError, TypeError), match="one dtype and device"):
        fn([w, w.double()], [u, u.double()], [v, v.double()], 1, 1e-12)
    with pytest.raises((RuntimeError, ValueError), match="at least 2 dims"):
        fn([torch.randn(4)], [u], [torch.randn(1)], 1, 1e-12)
    with pytest.raises((RuntimeError, ValueError), match="n_power_iterations must be >= 0"):
        fn([w], [u], [v], -1, 1e-12)
    with pytest.raises((RuntimeError, TypeError), match="must be a floating tensor"):
        fn([torch.ones(4, 3, dtype=torch.int64)], [u], [v], 1, 1e-12)


def _bad_backward_calls():
    w = torch.randn(4, 3)
    u, v, g = torch.randn(4), torch.randn(3), torch.randn(4, 3)
    s = torch.tensor([1.5])
    return [
        ("empty weight", ([torch.empty(0, 3)], [torch.empty(0, 3)], [torch.empty(0)], [v], s), "non-empty"),
        ("1-d weight", ([torch.randn(4)], [torch.randn(4)], [u], [torch.randn(1)], s), "at least 2 dims"),
        ("u length", ([g], [w], [torch.randn(5)], [v], s), "of 4 elements"),
        ("v length", ([g], [w], [u], [torch.randn(4)], s), "of 3 elements"),
        ("u dtype", ([g], [w], [u.double()], [v], s), "must be torch.float32|must be Float"),
        ("grads count", ([g, g], [w], [u], [v], s), "pass one gradient per weight"),
        ("grad numel", ([g[:2]], [w], [u], [v], s), r"grads\[0\] has shape"),
        ("integer grad", ([g.long()], [w], [u], [v], s), "must be a floating tensor"),
        ("sigma length", ([g], [w], [u], [v], torch.tensor([1.0, 2.0])), "one value per weight"),
        ("sigma dtype", ([g], [w], [u], [v], s.double()), "sigma is"),
        ("2-d sigma", ([g], [w], [u], [v], s[None]), "sigma has shape"),
    ]


_BAD_BWD = _bad_backward_calls()


@pytest.mark.parametrize("what,args,message", _BAD_BWD, ids=[b[0] for b in _BAD_BWD])
def test_backward_rejects_bad_input_like_the_reference(what, args, message):
    """Checked before anything runs (an empty weight divided by zero on the host on CUDA),
    with the reference's exception type."""
    with pytest.raises((ValueError, TypeError), match=message) as from_kernel:
        SN_BWD(*args)
    with pytest.raises((ValueError, TypeError), match=message) as from_reference:
        spectral_norm_backward_reference(*args)
    assert from_kernel.type is from_reference.type, (from_kernel.value, from_reference.value)


_BAD_FWD = [
    ("u length", lambda w, u, v: ([w], [torch.randn(5)], [v], 1, 1e-12)),
    ("counts", lambda w, u, v: ([w, w], [u], [v], 1, 1e-12)),
    ("u dtype", lambda w, u, v: ([w], [u.double()], [v], 1, 1e-12)),
    ("two dtypes", lambda w, u, v: ([w, w.double()], [u, u.double()], [v, v.double()], 1, 1e-12)),
    ("1-d weight", lambda w, u, v: ([torch.randn(4)], [u], [torch.randn(1)], 1, 1e-12)),
    ("empty weight", lambda w, u, v: ([torch.empty(0, 3)], [torch.empty(0)], [v], 1, 1e-12)),
    ("n_iter", lambda w, u, v: ([w], [u], [v], -1, 1e-12)),
    ("eps", lambda w, u, v: ([w], [u], [v], 1, 0.0)),
    ("integer weight", lambda w, u, v: ([w.long()], [u], [v], 1, 1e-12)),
]


@pytest.mark.parametrize("what,make", _BAD_FWD, ids=[b[0] for b in _BAD_FWD])
def test_forward_raises_the_reference_exception_type(what, make):
    args = make(torch.randn(4, 3), torch.randn(4), torch.randn(3))
    with pytest.raises(Exception) as from_kernel:
        SN(*args)
    with pytest.raises(Exception) as from_reference:
        ops.spectral_norm_reference(*args)
    assert from_kernel.type is from_reference.type, (from_kernel.value, from_reference.value)
    assert from_kernel.type in (ValueError, TypeError)


@requires_cuda
def test_cuda_backward_rejects_vectors_on_another_device():
    w = torch.randn(4, 3, device="cuda")
    u, v = torch.randn(4, device="cuda"), torch.randn(3, device="cuda")
    s = torch.tensor([1.5], device="cuda")
    with pytest.raises(TypeError, match="it must be torch.float32 on cuda|it must be Float on cuda"):
        SN_BWD([w], [w], [u.cpu()], [v], s)
    with pytest.raises(TypeError, match="sigma is"):
        SN_BWD([w], [w], [u], [v], s.cpu())
    with pytest.raises(ValueError, match="same device"):
        SN_BWD([w.cpu()], [w], [u], [v], s)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_backward_matches_cpu_on_kernel_shapes(dtype):
    """BigGAN-like weights (conv 3x3 1024->1024, wide and tall ones, one of 5 columns): many
    blocks per weight in gw_dot and rows per block in grad."""
    shapes = [(1024, 1024, 3, 3), (3, 70000), (5000, 5), (96, 96, 1, 1)]
    ws = _weights(shapes, dtype, "cpu")
    us, vs = _vectors(ws)
    grads = _weights(shapes, dtype, "cpu")
    sigma = torch.rand(len(ws)) + 0.5
    want = SN_BWD(grads, ws, us, vs, sigma)
    got = SN_BWD(*[[t.cuda() for t in x] for x in (grads, ws, us, vs)], sigma.cuda())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b.double(), **OUT_TOL[dtype])


@requires_two_gpus
def test_cuda_runs_on_the_tensors_device_not_the_current_one():
    ws = [w.requires_grad_() for w in _weights([(64, 32, 3, 3), (10, 7)], torch.float32, "cuda:1")]
    us, vs = _vectors(ws)
    cpu = SN([w.detach().cpu() for w in ws], [u.cpu() for u in us], [v.cpu() for v in vs], 1, 1e-12)
    with torch.cuda.device(0):
        outs = ops.spectral_norm_(ws, us, vs, 1, 1e-12)
        sum(o.sum() for o in outs).backward()
    assert all(o.device == ws[0].device for o in outs) and ws[0].grad.device == ws[0].device
    for a, b in zip(outs, cpu[0]):
        torch.testing.assert_close(a.detach().cpu(), b, rtol=1e-4, atol=1e-5)


@requires_cuda
def test_cuda_matches_cpu_kernel_and_is_deterministic():
    ws = _weights([(300, 700), (64, 32, 3, 3), (1000, 128), (3, 5)], torch.float32, "cpu")
    us, vs = _vectors(ws)
    cpu = SN(ws, us, vs, 1, 1e-12)
    dev = [[t.cuda() for t in x] for x in (ws, us, vs)]
    first = SN(*dev, 1, 1e-12)
    second = SN(*dev, 1, 1e-12)
    for a, b, c in zip(first[0] + first[1] + first[2], second[0] + second[1] + second[2], cpu[0] + cpu[1] + cpu[2]):
        assert torch.equal(a, b), "CUDA results must be bitwise reproducible"
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-5)
    assert ops.backend_info()["spectral_norm"]["cuda"] == "cuda"
