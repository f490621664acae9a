"""Higher-order gradients through the fused ops (gradient penalties: R1, WGAN-GP, path length).

Every op either differentiates twice correctly (gradgradcheck, and the same second-order
result as the pure-PyTorch reference) or raises a clear error; never silently wrong."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.distributed as dist
from torch.autograd import gradgradcheck

from fastinv import ops
from tests.conftest import requires_cuda

cbn = importlib.import_module("fastinv.ops.conditional_batch_norm")
sn = importlib.import_module("fastinv.ops.spectral_norm")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
F64 = dict(rtol=1e-9, atol=1e-9)


def _cbn_inputs(device, layout=torch.contiguous_format, shape=(3, 2, 3, 3)):
    n, c = shape[:2]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(device).contiguous(memory_format=layout)
    gain = (1 + 0.5 * torch.randn(n, c, dtype=torch.float64)).to(device)
    bias = torch.randn(n, c, dtype=torch.float64, device=device)
    return [t.requires_grad_() for t in (x, gain, bias)]


def _r1_style_penalty_grads(fn, x, gain, bias, weight):
    """d(penalty)/d(gain, bias, x) for penalty = ||d<fn(x), weight>/dx||²: the shape of R1."""
    y = fn(x, gain, bias)
    (gx,) = torch.autograd.grad((y * weight).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum(), (x, gain, bias), allow_unused=True)


# --- conditional batch norm ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cbn_r1_style_penalty_gradient_matches_the_reference(device, layout):
    x, gain, bias = _cbn_inputs(device, layout, shape=(4, 3, 5, 5))
    weight = torch.randn(x.shape, dtype=torch.float64, device=device)
    fused = _r1_style_penalty_grads(lambda *a: ops.conditional_batch_norm(*a), x, gain, bias, weight)
    ref = _r1_style_penalty_grads(
        lambda x, g, b: cbn.conditional_batch_norm_reference(x, g, b, None, None, True, 1e-5)[0],
        x, gain, bias, weight,
    )
    assert fused[1] is not None, "d(penalty)/d(gain) was dropped"
    for name, a, b in zip(("x", "gain"), fused[:2], ref[:2]):
        torch.testing.assert_close(a, b, **F64, msg=f"d(penalty)/d({name})")
    # The input gradient does not depend on bias: both sides agree it gets nothing.
    assert fused[2] is None or torch.count_nonzero(fused[2]) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cbn_training_passes_gradgradcheck(device, layout):
    x, gain, bias = _cbn_inputs(device, layout)
    assert gradgradcheck(lambda x, g, b: ops.conditional_batch_norm(x, g, b), (x, gain, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_cbn_eval_passes_gradgradcheck(device):
    x, gain, bias = _cbn_inputs(device)
    rm = torch.randn(x.shape[1], dtype=torch.float64, device=device)
    rv = torch.rand(x.shape[1], dtype=torch.float64, device=device) + 0.5

    def f(x, g, b):
        return ops.conditional_batch_norm(x, g, b, rm, rv, training=False)

    assert gradgradcheck(f, (x, gain, bias))


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_cbn_module_penalty_gradients_match_the_module_on_the_reference(monkeypatch, relu):
    from fastinv.nn import ConditionalBatchNorm2d

    torch.manual_seed(1)
    m = ConditionalBatchNorm2d(3, 4, spectral_norm=False, relu=relu).double()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(4, 4, dtype=torch.float64)

    def penalty_grads():
        (gx,) = torch.autograd.grad(m(x, cond).pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), list(m.parameters()))

    fused = penalty_grads()

    def reference(x, gain, bias, running_mean, running_var, training, momentum, eps, process_group, relu):
        return cbn.conditional_batch_norm_reference(x, gain, bias, None, None, training, eps, relu)[0]

    monkeypatch.setattr("fastinv.nn.conditional_batch_norm.conditional_batch_norm", reference)
    for a, b in zip(fused, penalty_grads()):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cbn_relu_r1_style_penalty_gradient_matches_the_reference(device, layout):
    """relu=True: the first backward masks by the output's sign; differentiating it again
    treats the mask as a constant, as autograd through torch.relu does."""
    x, gain, bias = _cbn_inputs(device, layout, shape=(4, 3, 5, 5))
    weight = torch.randn(x.shape, dtype=torch.float64, device=device)
    fused = _r1_style_penalty_grads(lambda *a: ops.conditional_batch_norm(*a, relu=True), x, gain, bias, weight)
    ref = _r1_style_penalty_grads(
        lambda x, g, b: cbn.conditional_batch_norm_reference(x, g, b, None, None, True, 1e-5, True)[0],
        x, gain, bias, weight,
    )
    assert fused[1] is not None, "d(penalty)/d(gain) was dropped"
    for name, a, b in zip(("x", "gain"), fused[:2], ref[:2]):
        torch.testing.assert_close(a, b, **F64, msg=f"d(penalty)/d({name})")
    # bias reaches the input gradient only through the mask, piecewise constant: 0 on both sides
    for g in (fused[2], ref[2]):
        assert g is None or torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cbn_relu_passes_gradgradcheck(device, training):
    x, gain, bias = _cbn_inputs(device)
    rm = torch.randn(x.shape[1], dtype=torch.float64, device=device)
    rv = torch.rand(x.shape[1], dtype=torch.float64, device=device) + 0.5

    def f(x, g, b):
        return ops.conditional_batch_norm(x, g, b, rm, rv, training=training, relu=True)

    y = f(x, gain, bias)
    assert 0 < (y == 0).sum() < y.numel() and y[y != 0].abs().min() > 1e-4  # away from the kink
    assert gradgradcheck(f, (x, gain, bias))


def test_cross_replica_cbn_raises_a_clear_error_when_differentiated_twice(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        x, gain, bias = _cbn_inputs("cpu")
        # world_size 1 would take the fused path: call the cross-replica function itself
        y = cbn._SyncConditionalBatchNorm.apply(x, gain, bias, None, None, 0.1, 1e-5, dist.group.WORLD)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="cross-replica batch norm .* no double backward"):
            torch.autograd.grad(gx.sum(), gain)
        # first order stays exact
        ref = cbn.conditional_batch_norm_reference(x, gain, bias, None, None, True, 1e-5)[0]
        (gx_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
        torch.testing.assert_close(gx.detach(), gx_ref, **F64)
    finally:
        dist.destroy_process_group()


# --- spectral norm ------------------------------------------------------------------------------


def _sn_inputs(device, shapes=((4, 3), (5, 2, 2))):
    ws = [torch.randn(s, dtype=torch.float64, device=device, requires_grad=True) for s in shapes]
    us = [torch.nn.functional.normalize(torch.randn(s[0], dtype=torch.float64, device=device), dim=0)
          for s in shapes]
    vs = [torch.nn.functional.normalize(torch.randn(w[0].numel(), dtype=torch.float64, device=device),
                                        dim=0) for w in ws]
    return ws, us, vs


def _sn_reference(ws, us, vs, n=1):
    """torch.nn.utils.parametrizations.spectral_norm's autograd: the power iteration under
    no_grad (u, v constants), σ = uᵀ W v differentiable."""
    with torch.no_grad():
        _, us, vs, _ = sn.spectral_norm_reference(ws, us, vs, n, 1e-12)
    return [w / torch.dot(u, torch.mv(w.reshape(w.shape[0], -1), v)) for w, u, v in zip(ws, us, vs)]


@pytest.mark.parametrize("device", DEVICES)
def test_sn_first_order_gradient_requires_grad_under_create_graph(device):
    ws, us, vs = _sn_inputs(device)
    outs = ops.spectral_norm_(ws, us, vs)
    grads = torch.autograd.grad(sum((o * o).sum() for o in outs), ws, create_graph=True)
    assert all(g.requires_grad for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["eager", "registered"])
def test_sn_penalty_gradient_matches_the_reference(device, path):
    ws, us, vs = _sn_inputs(device)
    targets = [torch.randn(w.shape, dtype=torch.float64, device=device) for w in ws]

    def fused(ws):
        if path == "eager":  # the autograd.Function behind spectral_norm_ in eager mode
            return ops.spectral_norm_(ws, [u.clone() for u in us], [v.clone() for v in vs])
        # the op's registered autograd (what torch.compile traces)
        return ops.spectral_norm_with_sigma(ws, us, vs, 1)[0]

    def penalty_grads(fn):
        outs = fn(ws)
        loss = sum((o * t).sum() + (o * o * o).sum() for o, t in zip(outs, targets))
        grads = torch.autograd.grad(loss, ws, create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), ws)

    for a, b in zip(penalty_grads(fused), penalty_grads(lambda ws: _sn_reference(ws, us, vs))):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_sn_eval_passes_gradgradcheck(device):
    # Eval only: in training the power iteration moves u, v with W numerically while autograd
    # holds them constant (torch's convention), so even first-order gradcheck would disagree;
    # the training case is checked against torch's autograd convention above.
    ws, us, vs = _sn_inputs(device)

    def f(*ws):
        return tuple(ops.spectral_norm_(list(ws), us, vs, training=False))

    assert gradgradcheck(f, tuple(ws))


# --- hinge loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_hinge_losses_pass_gradgradcheck(device):
    # values away from the kinks at ±1, where the numerical derivative is not defined
    d_real = torch.tensor([[-2.0], [0.3], [1.7], [0.5]], dtype=torch.float64, device=device)
    d_fake = torch.tensor([[-1.6], [0.2], [2.5]], dtype=torch.float64, device=device)
    d_real.requires_grad_()
    d_fake.requires_grad_()
    assert gradgradcheck(ops.hinge_loss_d, (d_real, d_fake))
    assert gradgradcheck(ops.hinge_loss_g, (d_fake,))


@pytest.mark.parametrize("device", DEVICES)
def test_hinge_loss_d_gradient_is_differentiable_in_a_loss_weight(device):
    # loss = lam * L_D: d/d(lam) of ||dloss/d(d_real)||² needs the graph through the backward.
    d_real = torch.tensor([-2.0, 0.3, 0.5], dtype=torch.float64, device=device, requires_grad=True)
    d_fake = torch.tensor([0.2, -2.5], dtype=torch.float64, device=device, requires_grad=True)
    lam = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)

    def grad_of_lam(fn):
        g = torch.autograd.grad(lam * fn(d_real, d_fake), (d_real, d_fake), create_graph=True)
        return torch.autograd.grad(sum(t.pow(2).sum() for t in g), lam)[0]

    torch.testing.assert_close(grad_of_lam(ops.hinge_loss_d), grad_of_lam(ops.hinge_loss_d_reference))
