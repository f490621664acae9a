"""Spectral norm forward+backward: torch's parametrization vs fastinv, per layer and grouped.

Cases
- ``60 SN linears``: 60 spectral-normed 128x128 linears (+ReLU), batch 2, a training step's
  forward+backward of the whole model (the issue's model). Impls: ``no-SN`` (plain linears:
  the floor), ``reference-eager`` (torch.nn.utils.parametrizations.spectral_norm),
  ``torch.compile`` (of that model), ``fastinv-per-layer`` (fastinv SN layers, no group),
  ``fastinv`` (the same layers in a SpectralNormGroup).
- ``BigGAN G+D weights``: the spectral-normed weight set of a BigGAN-128 generator and
  discriminator (BigGAN-PyTorch shapes; ``ch=32`` on CPU, the paper's ``ch=96`` on CUDA) and of
  the demo-sized 64x64 model (``ch=16``): every weight normalised, then backward with a given
  gradient. Impls: ``reference-eager`` (torch's parametrization, one per weight),
  ``fastinv-per-layer`` and ``fastinv`` (one call for all weights).

Bytes that must move (the GB/s column): forward reads W for the power iteration, reads it again
and writes W/σ (σ is only known after the first pass); backward reads g and W (Σ g∘W), then
reads g and writes dW: 7 × the weights' bytes. For the linears model the activations are
negligible. The ``launches`` column: kernels + copies per step on CUDA (profiler), aten/fastinv
ops per step on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm
from torch.utils._python_dispatch import TorchDispatchMode

import fastinv.nn as fnn
from fastinv import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_launches(step, device) -> int:
    step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    with _OpCounter() as counter:
        step()
    return counter.n


# --- 60 spectral-normed linears --------------------------------------------------------------


def _linears(kind: str, device) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(60):
        if kind in ("reference-eager", "torch.compile"):
            layers.append(torch_spectral_norm(nn.Linear(128, 128)))
        elif kind == "no-SN":
            layers.append(nn.Linear(128, 128))
        else:
            layers.append(fnn.SNLinear(128, 128))
        layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to(device)
    if kind == "fastinv":
        fnn.SpectralNormGroup(model)
    return model


@pytest.mark.parametrize("impl", ["no-SN", "reference-eager", "torch.compile", "fastinv-per-layer", "fastinv"])
@pytest.mark.parametrize("device", DEVICES)
def test_sn_linears_fwd_bwd(measure, device, impl):
    model = _linears(impl, device)
    fn = torch.compile(model) if impl == "torch.compile" else model
    x = torch.randn(2, 128, device=device)

    def step():
        for p in model.parameters():
            p.grad = None
        fn(x).sum().backward()

    nbytes = 7 * 60 * 128 * 128 * 4
    measure(step, op="spectral norm", case="60 SN linears 128x128 batch 2", impl=impl, nbytes=nbytes,
            device=device, launches=count_launches(step, device))


# --- BigGAN weight sets ----------------------------------------------------------------------


def biggan_shapes(ch: int, resolution: int, shared_dim: int = 128, z_chunk: int = 20) -> list[tuple[int, ...]]:
    """Shapes of the spectral-normed weights of BigGAN-PyTorch's G and D (hierarchical z,
    shared embedding, attention at 64x64); the projection embedding has 1000 classes."""
    g_in = {128: [16, 16, 8, 4, 2], 64: [16, 16, 8, 4]}[resolution]
    g_out = {128: [16, 8, 4, 2, 1], 64: [16, 8, 4, 2]}[resolution]
    d_in = {128: [3, 1, 2, 4, 8, 16], 64: [3, 1, 2, 4, 8]}[resolution]
    d_out = {128: [1, 2, 4, 8, 16, 16], 64: [1, 2, 4, 8, 16]}[resolution]
    cond = shared_dim + z_chunk
    shapes: list[tuple[int, ...]] = [(g_in[0] * ch * 16, z_chunk)]
    res = 4
    for i, o in zip(g_in, g_out):
        i, o = i * ch, o * ch
        shapes += [(i, cond), (i, cond), (o, i, 3, 3), (o, cond), (o, cond), (o, o, 3, 3), (o, i, 1, 1)]
        res *= 2
        if res == 64:
            shapes += [(o // 8, o, 1, 1), (o // 8, o, 1, 1), (o // 2, o, 1, 1), (o, o // 2, 1, 1)]
    shapes.append((3, g_out[-1] * ch, 3, 3))
    res = resolution
    for n, (i, o) in enumerate(zip(d_in, d_out)):
        i, o = i if n == 0 else i * ch, o * ch
        down = n < len(d_in) - 1
        shapes += [(o, i, 3, 3), (o, o, 3, 3)] + ([(o, i, 1, 1)] if (i != o or down) else [])
        res //= 2 if down else 1
        if res == 64:
            shapes += [(o // 8, o, 1, 1), (o // 8, o, 1, 1), (o // 2, o, 1, 1), (o, o // 2, 1, 1)]
    shapes += [(1, d_out[-1] * ch), (1000, d_out[-1] * ch)]
    return shapes


def _weight_set(shapes, device):
    torch.manual_seed(0)
    ws = [(torch.randn(s, device=device) * 0.05).requires_grad_() for s in shapes]
    us = [F.normalize(torch.randn(s[0], device=device), dim=0) for s in shapes]
    vs = [F.normalize(torch.randn(w.numel() // s[0], device=device), dim=0) for w, s in zip(ws, shapes)]
    grads = [torch.randn(s, device=device) for s in shapes]
    return ws, us, vs, grads


def _holder(w: torch.Tensor) -> nn.Module:
    m = nn.Module()
    m.weight = nn.Parameter(w.detach().clone())
    return torch_spectral_norm(m)


CASES = [("cpu", 32, 128), ("cpu", 16, 64), ("cuda", 96, 128), ("cuda", 16, 64)]


@pytest.mark.parametrize("impl", ["reference-eager", "fastinv-per-layer", "fastinv"])
@pytest.mark.parametrize("device,ch,resolution", CASES)
def test_biggan_weights_fwd_bwd(measure, device, ch, resolution, impl):
    if device not in DEVICES:
        pytest.skip("needs a CUDA GPU")
    shapes = biggan_shapes(ch, resolution)
    ws, us, vs, grads = _weight_set(shapes, device)
    if impl == "reference-eager":
        holders = [_holder(w) for w in ws]
        params = [h.parametrizations.weight.original for h in holders]

        def step():
            for p in params:
                p.grad = None
            torch.autograd.backward([h.weight for h in holders], grads)
    elif impl == "fastinv-per-layer":
        def step():
            for w in ws:
                w.grad = None
            outs = [ops.spectral_norm_([w], [u], [v])[0] for w, u, v in zip(ws, us, vs)]
            torch.autograd.backward(outs, grads)
    else:
        def step():
            for w in ws:
                w.grad = None
            torch.autograd.backward(ops.spectral_norm_(ws, us, vs), grads)

    nparams = sum(w.numel() for w in ws)
    case = f"BigGAN-{resolution} ch={ch} G+D {len(ws)} weights {nparams / 1e6:.1f}M"
    measure(step, op="spectral norm", case=case, impl=impl, nbytes=7 * nparams * 4, device=device,
            launches=count_launches(step, device))


def _cpu_time_table(rounds: int = 30) -> None:
    """Per-step CPU time of this thread (``time.thread_time``) for the 60-linears model, one
    thread: on a shared machine the CPU time a step consumes moves much less with the
    neighbours' load than its wall time."""
    import time

    torch.set_num_threads(1)
    x = torch.randn(2, 128)
    base = None
    for impl in ["no-SN", "reference-eager", "torch.compile", "fastinv-per-layer", "fastinv"]:
        model = _linears(impl, "cpu")
        fn = torch.compile(model) if impl == "torch.compile" else model

        def step(model=model, fn=fn):
            for p in model.parameters():
                p.grad = None
            fn(x).sum().backward()

        for _ in range(5):
            step()
        times = []
        for _ in range(rounds):
            t0 = time.thread_time()
            step()
            times.append(time.thread_time() - t0)
        median = sorted(times)[len(times) // 2]
        base = median if impl == "reference-eager" else base
        ratio = f"{base / median:.2f}x" if base else "-"
        print(f"{impl:<20}{median * 1e3:>9.2f} ms CPU   vs torch SN {ratio}")


if __name__ == "__main__":
    _cpu_time_table()
