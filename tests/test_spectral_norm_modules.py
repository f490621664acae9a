"""Spectral-normed layers, SpectralNormGroup, checkpoint layouts and DDP, against torch's
``parametrizations.spectral_norm``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import fastinv.nn as fnn
from fastinv import ops
from fastinv.nn.spectral_norm import is_spectral_norm
from fastinv.nn.spectral_norm_state import state_dict_as_biggan, state_dict_as_torch
from tests.conftest import TOL, requires_cuda

F64 = TOL[torch.float64]


def _pairs():
    """(fastinv layer, torch layer with torch's spectral norm, input) with equal weights, u, v."""
    specs = [
        (fnn.SNLinear(7, 5), nn.Linear(7, 5), torch.randn(3, 7)),
        (fnn.SNConv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)),
        (fnn.SNEmbedding(10, 6), nn.Embedding(10, 6), torch.tensor([1, 4, 9])),
        (fnn.spectral_norm(nn.ConvTranspose2d(4, 3, 4, 2, 1)), nn.ConvTranspose2d(4, 3, 4, 2, 1), torch.randn(2, 4, 3, 3)),
    ]
    out = []
    for ours, theirs, x in specs:
        ours.double()
        theirs.double()
        dim = 1 if isinstance(theirs, nn.ConvTranspose2d) else 0
        torch_spectral_norm(theirs, dim=dim)
        theirs.load_state_dict(state_dict_as_torch(ours))
        out.append((ours, theirs, x.double() if x.is_floating_point() else x))
    return out


@pytest.mark.parametrize("train", [True, False])
def test_layers_equal_torch_parametrization(train):
    for ours, theirs, x in _pairs():
        ours.train(train), theirs.train(train)
        for _ in range(2):  # two steps: buffers carry over
            y1, y2 = ours(x), theirs(x)
            torch.testing.assert_close(y1, y2, **F64)
            g = torch.randn_like(y1)
            (y1 * g).sum().backward()
            (y2 * g).sum().backward()
        p = theirs.parametrizations.weight
        torch.testing.assert_close(ours.weight_orig.grad, p.original.grad, **F64)
        torch.testing.assert_close(ours.weight_u, p[0]._u, **F64)
        torch.testing.assert_close(ours.weight_v, p[0]._v, **F64)


def _model():
    return nn.Sequential(
        fnn.SNConv2d(3, 6, 3, padding=1), nn.ReLU(),
        fnn.spectral_norm(nn.ConvTranspose2d(6, 4, 4, 2, 1)), nn.ReLU(),
        nn.Flatten(), fnn.SNLinear(4 * 8 * 8, 5),
    )


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_group_equals_layers_on_their_own():
    solo = _model().double()
    grouped = copy.deepcopy(solo)
    group = fnn.SpectralNormGroup(grouped)
    assert len(group) == 3
    x_real, x_fake = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for _ in range(2):
        for m in (solo, grouped):
            m.zero_grad()
            # two forwards before one backward, as in a discriminator step
            (m(x_real).square().sum() - m(x_fake).sum()).backward()
        for (k, a), b in zip(solo.state_dict().items(), grouped.state_dict().values()):
            torch.testing.assert_close(a, b, **F64, msg=k)
        for a, b in zip(solo.parameters(), grouped.parameters()):
            torch.testing.assert_close(a.grad, b.grad, **F64)
    solo.eval(), grouped.eval()
    before = _snapshot(grouped)
    torch.testing.assert_close(solo(x_real), grouped(x_real), **F64)
    assert all(torch.equal(before[k], v) for k, v in grouped.state_dict().items()), "eval must not update u, v"


def _count_op_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "fastinv::spectral_norm")


def test_group_makes_one_op_call_per_forward():
    model = _model()
    x = torch.randn(2, 3, 4, 4)
    assert _count_op_calls(lambda: model(x)) == 3
    group = fnn.SpectralNormGroup(model)
    assert _count_op_calls(lambda: model(x).sum().backward()) == 1
    group.remove()
    assert _count_op_calls(lambda: model(x)) == 3


def test_explicit_refresh_is_used_by_the_next_forward_and_by_calls_outside_it():
    model = _model()
    group = fnn.SpectralNormGroup(model)
    x = torch.randn(2, 3, 4, 4)
    u0 = model[0].weight_u.clone()
    group.refresh()
    u1 = model[0].weight_u.clone()
    assert not torch.equal(u0, u1)
    outside = model[0](x)  # a layer called outside the model's forward uses the refreshed weight
    assert torch.equal(model[0].weight_u, u1)
    model(x)  # uses the refreshed weights: no second power iteration
    assert torch.equal(model[0].weight_u, u1)
    assert outside.shape == (2, 6, 4, 4)
    model(x)
    assert not torch.equal(model[0].weight_u, u1)
    # after the forward the group's weights are dropped: a layer alone does its own iteration
    u2 = model[0].weight_u.clone()
    model[0](x)
    assert not torch.equal(model[0].weight_u, u2)


def test_group_compiles_fullgraph():
    model = _model()
    ref = copy.deepcopy(model)
    fnn.SpectralNormGroup(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 4, 4)
    for _ in range(2):
        y, y_ref = compiled(x), ref(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        y_ref.sum().backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[0].weight_u, ref[0].weight_u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_small_linear_runs_in_float32_under_cpu_autocast(compiled):
    # oneDNN's bf16 GEMM costs several times float32's at BigGAN's CBN-projection sizes
    # (fastinv/nn/spectral_norm.py): a small SNLinear leaves autocast, a large one stays in it
    from fastinv.nn.spectral_norm import SMALL_CPU_LINEAR_MACS

    small, large = fnn.SNLinear(80, 32), fnn.SNLinear(256, 1024)
    for layer in (small, large):
        layer.eval()  # no power iteration: every call sees the same W/σ
    x_small = torch.randn(24, 80, requires_grad=True)
    x_large = torch.randn(64, 256)
    assert x_small.numel() * 32 <= SMALL_CPU_LINEAR_MACS < x_large.numel() * 1024
    run_small = torch.compile(small, fullgraph=True) if compiled else small
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_small, y_large = run_small(x_small), large(x_large)
    assert y_small.dtype == torch.float32 and y_large.dtype == torch.bfloat16
    ref = x_small.detach().requires_grad_() @ small.weight.detach().T + small.bias.detach()
    torch.testing.assert_close(y_small, ref, rtol=1e-5, atol=1e-5)  # float32, not bf16's 1e-2
    y_small.sum().backward()
    ref.sum().backward()
    assert small.weight_orig.grad is not None and small.weight_orig.grad.dtype == torch.float32
    # compiled, AOTAutograd traces the backward under the caller's autocast: its products run
    # in bf16 there (as they all did before), eager ones in float32
    tol = 2e-2 if compiled else 1e-5
    torch.testing.assert_close(x_small.grad, torch.ones(24, 32) @ small.weight.detach(),
                               rtol=tol, atol=tol)
    # outside autocast, or with weights other than float32, a layer is plain nn.Linear
    assert small(x_small).dtype == torch.float32
    small.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert small(x_small.detach().double()).dtype == torch.float64  # autocast's own rule


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_weights_keep_fp32_u_v(dtype):
    model = _model()
    u = model[0].weight_u.clone()
    model.to(dtype)
    assert model[0].weight_orig.dtype == dtype
    assert model[0].weight_u.dtype == torch.float32 and torch.equal(model[0].weight_u, u)
    fnn.SpectralNormGroup(model)
    y = model(torch.randn(2, 3, 4, 4, dtype=dtype))
    y.float().sum().backward()
    assert y.dtype == dtype and model[0].weight_orig.grad.dtype == dtype
    assert model[0].weight_u.dtype == torch.float32


def test_deepcopy_after_forward_works():
    model = _model()
    fnn.SpectralNormGroup(model)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    ema = copy.deepcopy(model)  # BigGAN's EMA copy of G
    assert is_spectral_norm(ema[0]) and torch.equal(ema[0].weight_u, model[0].weight_u)


def test_spectral_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="has no parameter 'bias'"):
        fnn.spectral_norm(nn.Linear(2, 2, bias=False), name="bias")
    with pytest.raises(ValueError, match="needs >= 2 dims"):
        fnn.spectral_norm(nn.Linear(2, 2), name="bias")
    with pytest.raises(RuntimeError, match="already spectral-normed"):
        fnn.spectral_norm(fnn.SNLinear(2, 2))
    with pytest.raises(ValueError, match="n_power_iterations must be positive"):
        fnn.SNLinear(2, 2, n_power_iterations=0)


def test_torch_checkpoint_loads_and_ours_saves_for_torch():
    for ours, theirs, x in _pairs():
        ours.eval(), theirs.eval()
        with torch.no_grad():
            theirs.parametrizations.weight.original.mul_(1.5)
        fresh = copy.deepcopy(ours)
        fresh.load_state_dict(theirs.state_dict())  # torch's parametrization keys
        torch.testing.assert_close(fresh(x), theirs(x), **F64)
        back = copy.deepcopy(theirs)
        back.load_state_dict(state_dict_as_torch(fresh))
        torch.testing.assert_close(back(x), theirs(x), **F64)


def _biggan_linear_forward(sd, x):
    """BigGAN-PyTorch's SNLinear in eval: one power iteration from u0 without update."""
    w, u = sd["weight"], sd["u0"]
    v = nn.functional.normalize(u @ w, eps=1e-12)
    u = nn.functional.normalize(v @ w.t(), eps=1e-12)
    sv = (v @ w.t() @ u.t()).squeeze()
    return nn.functional.linear(x, w / sv, sd["bias"])


def test_biggan_checkpoint_round_trip():
    lin = fnn.SNLinear(6, 4).double()
    for _ in range(30):  # converge u, v so BigGAN's extra half-iteration changes nothing visible
        lin.train()
        _ = lin.weight
    lin.eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    sd = state_dict_as_biggan(lin)
    assert set(sd) == {"weight", "bias", "u0", "sv0"} and sd["u0"].shape == (1, 4)
    torch.testing.assert_close(sd["sv0"], torch.linalg.matrix_norm(lin.weight_orig.detach(), 2).reshape(1), rtol=1e-8, atol=0)
    torch.testing.assert_close(_biggan_linear_forward(sd, x), lin(x), rtol=1e-8, atol=1e-10)
    other = fnn.SNLinear(6, 4).double().eval()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), lin(x), rtol=1e-8, atol=1e-10)


def _ddp_worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical initial weights and u, v on both ranks
        model = nn.Sequential(fnn.SNLinear(4, 8), nn.ReLU(), fnn.SNLinear(8, 1))
        fnn.SpectralNormGroup(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)  # different data per rank
        for _ in range(3):
            opt.zero_grad()
            ddp(torch.randn(5, 4)).square().mean().backward()
            opt.step()
        results[rank] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()


def test_ddp_keeps_u_v_identical_on_all_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True,
                           start_method="spawn")
        r0, r1 = results[0], results[1]
    assert set(r0) == set(r1) and any(k.endswith("_u") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


@requires_cuda
def test_cuda_group_equals_cpu_and_uses_few_kernels():
    model = _model()
    x = torch.randn(2, 3, 4, 4)
    gpu = copy.deepcopy(model).cuda()
    fnn.SpectralNormGroup(gpu)
    fnn.SpectralNormGroup(model)
    model(x).sum().backward()
    gpu(x.cuda()).sum().backward()
    for a, b in zip(model.parameters(), gpu.parameters()):
        torch.testing.assert_close(a.grad, b.grad.cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[0].weight_u, gpu[0].weight_u.cpu(), rtol=1e-4, atol=1e-6)
    # the op's own kernels for all 3 weights: 3 forward (row dot, column dot, scale), 2 backward
    w = [m.weight_orig for m in (gpu[0], gpu[5])]
    us, vs = [m.weight_u for m in (gpu[0], gpu[5])], [m.weight_v for m in (gpu[0], gpu[5])]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        outs = ops.spectral_norm_(w, us, vs)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("spectral_norm" in k or "row_dot" in k or "col_dot" in k or "scale_kernel" in k
               or "gw_dot" in k or "grad_kernel" in k for k in kernels) == 5, kernels


def test_whole_model_checkpoints_convert_with_nested_names():
    ours = _model().double().eval()
    theirs = nn.Sequential(
        torch_spectral_norm(nn.Conv2d(3, 6, 3, padding=1)), nn.ReLU(),
        torch_spectral_norm(nn.ConvTranspose2d(6, 4, 4, 2, 1), dim=1), nn.ReLU(),
        nn.Flatten(), torch_spectral_norm(nn.Linear(4 * 8 * 8, 5)),
    ).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    theirs.load_state_dict(state_dict_as_torch(ours))
    torch.testing.assert_close(theirs(x), ours(x), **F64)
    with torch.no_grad():
        theirs[5].parametrizations.weight.original.mul_(0.5)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), **F64)
    again = _model().double().eval()
    again.load_state_dict(state_dict_as_biggan(ours))
    assert set(state_dict_as_biggan(ours)) >= {"0.weight", "0.u0", "0.sv0", "2.u0", "5.sv0"}
    # BigGAN keeps no v and u is renormalised on load: equal up to the fp32 init of u
    torch.testing.assert_close(again[0].weight_u, ours[0].weight_u, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(again[2].weight_orig, ours[2].weight_orig, **F64)


def test_reset_power_iteration_finds_sigma_after_reinit_and_state_is_the_matrix_view():
    # what BigGAN's orthogonal re-init needs: stale (u, v) give σ = uᵀWv far below the true
    # largest singular value; 15 iterations from the new weight recover it
    torch.manual_seed(0)
    conv = fnn.SNConv2d(6, 8, 3, padding=1)
    assert conv.spectral_norm_names == ("weight",)
    with torch.no_grad():
        conv.weight_orig.copy_(torch.randn_like(conv.weight_orig) * 3)
    w, u, v = conv.spectral_norm_state()
    assert w.shape == (8, 6 * 9) and w.data_ptr() == conv.weight_orig.data_ptr()
    true_sigma = torch.linalg.matrix_norm(w.detach(), ord=2)
    assert torch.dot(u, w.detach() @ v) < 0.9 * true_sigma
    conv.reset_power_iteration(100)
    torch.testing.assert_close(torch.dot(u, w.detach() @ v), true_sigma, rtol=1e-4, atol=0)


@pytest.mark.parametrize("grouped", [False, True])
def test_channels_last_convolution_gets_a_channels_last_weight(grouped):
    """A model moved to channels_last convolves in channels_last: the op writes contiguous
    outputs, so W/σ is handed back in its raw weight's layout (an NCHW W/σ would make the
    convolution run, and copy its activations, in NCHW). Same values and gradients as NCHW."""
    nchw = nn.Sequential(fnn.SNConv2d(3, 6, 3, padding=1), nn.ReLU(), fnn.SNConv2d(6, 5, 3)).double()
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    if grouped:
        fnn.SpectralNormGroup(nchw), fnn.SpectralNormGroup(cl)
    seen = []
    for m in cl:
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, a, y: seen.append(y))
    # an NCHW input, as an augmentation or a view hands it over: the layout comes from W/σ
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    y_ref, y = nchw(x), cl(x)
    assert len(seen) == 2
    for out in seen:  # a convolution writes channels_last only when it ran in it
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(y, y_ref, **F64)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    for a, b in zip(nchw.parameters(), cl.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **F64)
    # an NCHW model keeps NCHW weights and outputs
    assert nchw[0].weight.is_contiguous() and y_ref.is_contiguous()


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("kernel", [1, 3])
def test_channels_last_weight_gets_its_gradient_in_its_own_strides(kernel, grouped):
    """DDP copies each gradient into a bucket laid out like its parameter and warns when the
    strides differ; autograd re-lays a 3x3 gradient itself, but a 1x1 kernel's NCHW gradient
    passes as "matching" a channels_last weight unless the op's backward writes it alike.
    The values are the NCHW model's (test above)."""
    model = nn.Sequential(fnn.SNConv2d(3, 8, kernel), fnn.SNConv2d(8, 8, kernel))
    model.to(memory_format=torch.channels_last)
    if grouped:
        fnn.SpectralNormGroup(model)
    model(torch.randn(2, 3, 6, 6)).square().sum().backward()
    for layer in model:
        assert layer.weight_orig.stride() != (layer.weight_orig.shape[1] * kernel * kernel, kernel * kernel, kernel, 1)
        assert layer.weight_orig.grad.stride() == layer.weight_orig.stride()
