"""Spectral normalisation of many weights in one call (Miyato et al. 2018; BigGAN).

For each weight ``W`` (any ndim >= 2, viewed as the matrix ``W.reshape(W.shape[0], -1)``) with
its left and right singular-vector estimates ``u`` (rows) and ``v`` (columns)::

    repeat n_power_iterations times:  u = normalize(W v),  v = normalize(Wᵀ u)
    σ = uᵀ W v           (u, v constants for autograd; |σ| < eps becomes eps: no 0/0)
    return W / σ

exactly the numerics of ``torch.nn.utils.parametrizations.spectral_norm``; ``normalize(x)`` is
``x / max(‖x‖, eps)``. ``n_power_iterations = 0`` is eval mode (torch's parametrization in
``.eval()``): σ from the stored u, v. u, v and σ are float32 for fp32/bf16/fp16 weights and
float64 for float64 weights.

Why the op returns ``W/σ`` and not σ: with σ the layers would have to scale their outputs (an
extra elementwise pass over activations, which for convolutions are larger than the weights,
and a change to every layer), while ``W/σ`` costs one read and one write of the weights and
lets every layer stay a plain ``F.conv2d``/``F.linear``/``F.embedding``. In the CPU benchmark
(benchmarks/bench_spectral_norm.py) writing ``W/σ`` is ~10% of the op's time.

The op is functional: it returns the new u and v (and σ) instead of writing its inputs, because
PyTorch cannot attach an autograd formula to an op that mutates its inputs, and because the
backward needs the u, v of *this* forward even when a second forward (D(real), then D(fake))
updates the buffers before backward. ``spectral_norm_`` copies them into the buffers with one
``torch._foreach_copy_``. The backward, for all weights together::

    dL/dW = g / σ - (Σ g∘W) / σ² · u vᵀ

Implementations, all behind the same ops:
  reference  ``spectral_norm_reference`` below (pure PyTorch, every device)
  CPU        csrc/cpu/spectral_norm.cpp
  CUDA       csrc/cuda/spectral_norm.cu
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastinv.ops._library import define
from fastinv.ops._validate import acc_dtype  # u, v and σ: float64 for float64 weights, else float32

_OP = "fastinv.spectral_norm"
_OP_BWD = "fastinv.spectral_norm_backward"


def _check(weights, us, vs, n_power_iterations: int, eps: float) -> None:
    _check_counts(weights, us, vs, _OP)
    if n_power_iterations < 0:
        raise ValueError(f"{_OP}: n_power_iterations must be >= 0 (0 = eval), got {n_power_iterations}")
    if not eps > 0:
        raise ValueError(f"{_OP}: eps must be > 0, got {eps}")
    _check_weights(weights, us, vs, _OP)


def _check_counts(weights, us, vs, op: str) -> None:
    if not (len(weights) == len(us) == len(vs)):
        raise ValueError(
            f"{op}: got {len(weights)} weights, {len(us)} u vectors and {len(vs)} v vectors; "
            "pass one u and one v per weight"
        )


def _check_weights(weights, us, vs, op: str) -> None:
    """Per weight: floating, >= 2 dims, non-empty, one dtype/device for all; its u and v 1-d of
    rows/cols elements in the accumulation dtype on its device (csrc/spectral_norm.h)."""
    _check_counts(weights, us, vs, op)
    if not weights:
        return
    w0 = weights[0]
    for i, (w, u, v) in enumerate(zip(weights, us, vs)):
        if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
            raise TypeError(
                f"{op}: weights[{i}] must be a floating tensor (float32, float64, float16 or "
                f"bfloat16), got {getattr(w, 'dtype', type(w).__name__)}"
            )
        if w.dim() < 2 or w.numel() == 0:
            raise ValueError(
                f"{op}: weights[{i}] has shape {tuple(w.shape)}; spectral norm needs a non-empty "
                "tensor with at least 2 dims (normalise a 1-d tensor with F.normalize instead)"
            )
        if w.dtype != w0.dtype or w.device != w0.device:
            raise TypeError(
                f"{op}: weights[{i}] is {w.dtype} on {w.device} but weights[0] is {w0.dtype} on "
                f"{w0.device}; one call takes weights of one dtype and device (group them)"
            )
        rows, cols = w.shape[0], w.numel() // w.shape[0]
        acc = acc_dtype(w.dtype)
        for name, t, n in (("us", u, rows), ("vs", v, cols)):
            if t.dim() != 1 or t.numel() != n:
                raise ValueError(
                    f"{op}: {name}[{i}] has shape {tuple(t.shape)} but weights[{i}] of shape "
                    f"{tuple(w.shape)} is a {rows}x{cols} matrix; pass a 1-d {name[0]} of {n} elements"
                )
            if t.dtype != acc or t.device != w.device:
                raise TypeError(
                    f"{op}: {name}[{i}] is {t.dtype} on {t.device}; for {w.dtype} weights on "
                    f"{w.device} it must be {acc} on {w.device}"
                )


def _check_backward(grads, weights, us, vs, sigma) -> None:
    """The backward of one forward call (csrc/spectral_norm.h checks the same)."""
    if len(grads) != len(weights):
        raise ValueError(
            f"{_OP_BWD}: got {len(grads)} grads for {len(weights)} weights; pass one gradient per weight"
        )
    _check_weights(weights, us, vs, _OP_BWD)
    k = len(weights)
    if sigma.dim() != 1 or sigma.numel() != k:
        raise ValueError(
            f"{_OP_BWD}: sigma has shape {tuple(sigma.shape)}; pass the forward's sigma, a 1-d tensor "
            f"of one value per weight ({k})"
        )
    if not weights:
        return
    w0 = weights[0]
    acc = acc_dtype(w0.dtype)
    if sigma.dtype != acc or sigma.device != w0.device:
        raise TypeError(
            f"{_OP_BWD}: sigma is {sigma.dtype} on {sigma.device}; for {w0.dtype} weights on "
            f"{w0.device} it must be {acc} on {w0.device}"
        )
    for i, (g, w) in enumerate(zip(grads, weights)):
        if not g.dtype.is_floating_point:
            raise TypeError(f"{_OP_BWD}: grads[{i}] must be a floating tensor, got {g.dtype}")
        if g.numel() != w.numel():
            raise ValueError(
                f"{_OP_BWD}: grads[{i}] has shape {tuple(g.shape)} but weights[{i}] has shape {tuple(w.shape)}"
            )
        if g.device != w0.device:
            raise ValueError(
                f"{_OP_BWD}: grads[{i}] is on {g.device} but the weights are on {w0.device}; move both "
                "to the same device"
            )


# --- references (pure PyTorch) -----------------------------------------------------------


def spectral_norm_reference(
    weights: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    n_power_iterations: int,
    eps: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Returns ``(W/σ for each weight, new u's, new v's, σ's as one 1-d tensor)``."""
    _check(weights, us, vs, n_power_iterations, eps)
    outs, us_new, vs_new, sigmas = [], [], [], []
    for w, u, v in zip(weights, us, vs):
        mat = w.reshape(w.shape[0], -1).to(u.dtype)
        u, v = u.clone(), v.clone()
        for _ in range(n_power_iterations):
            u = F.normalize(torch.mv(mat, v), dim=0, eps=eps)
            v = F.normalize(torch.mv(mat.t(), u), dim=0, eps=eps)
        # |σ| < eps becomes eps, so that an all-zero weight gives 0 instead of torch's 0/0 = NaN
        sigma = torch.dot(u, torch.mv(mat, v))
        sigma = torch.where(sigma.abs() < eps, torch.full_like(sigma, eps), sigma)
        outs.append((w.to(u.dtype) / sigma).to(w.dtype).contiguous())
        us_new.append(u)
        vs_new.append(v)
        sigmas.append(sigma)
    if sigmas:
        sigma_all = torch.stack(sigmas)
    else:
        sigma_all = torch.empty(0, dtype=torch.float32)
    return outs, us_new, vs_new, sigma_all


def spectral_norm_backward_reference(
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    sigma: torch.Tensor,
) -> list[torch.Tensor]:
    _check_backward(grads, weights, us, vs, sigma)
    out = []
    for i, (g, w, u, v) in enumerate(zip(grads, weights, us, vs)):
        s = sigma[i]
        gm = g.reshape(w.shape[0], -1).to(u.dtype)
        coef = (gm * w.reshape(w.shape[0], -1).to(u.dtype)).sum() / (s * s)
        dw = gm / s - coef * torch.outer(u, v)
        out.append(dw.to(w.dtype).reshape(w.shape))
    return out


def spectral_norm_backward_differentiable(
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    eps: float,
) -> list[torch.Tensor]:
    """The backward in differentiable ops, for ``create_graph=True``: σ = uᵀ W v is recomputed
    from ``W`` (u, v constants, as in the forward) so that its dependence on ``W`` reaches the
    second derivative."""
    out = []
    for g, w, u, v in zip(grads, weights, us, vs):
        mat = w.reshape(w.shape[0], -1).to(u.dtype)
        s = torch.dot(u, torch.mv(mat, v))
        s = torch.where(s.abs() < eps, torch.full_like(s, eps), s)
        gm = g.reshape(w.shape[0], -1).to(u.dtype)
        dw = gm / s - (gm * mat).sum() / (s * s) * torch.outer(u, v)
        out.append(dw.to(w.dtype).reshape(w.shape))
    return out


# --- schemas -----------------------------------------------------------------------------

_sn = define(
    "spectral_norm(Tensor[] weights, Tensor[] us, Tensor[] vs, int n_power_iterations, float eps)"
    " -> (Tensor[], Tensor[], Tensor[], Tensor)",
    spectral_norm_reference,
)
_sn_bwd = define(
    "spectral_norm_backward(Tensor[] grads, Tensor[] weights, Tensor[] us, Tensor[] vs, "
    "Tensor sigma) -> Tensor[]",
    spectral_norm_backward_reference,
)


# --- fake (meta) kernels: shapes and dtypes for torch.compile ------------------------------


@torch.library.register_fake("fastinv::spectral_norm")
def _(weights, us, vs, n_power_iterations, eps):
    _check(weights, us, vs, n_power_iterations, eps)
    if not weights:
        return [], [], [], torch.empty(0, dtype=torch.float32)
    outs = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    acc = acc_dtype(weights[0].dtype)
    return (
        outs,
        [torch.empty_like(u) for u in us],
        [torch.empty_like(v) for v in vs],
        weights[0].new_empty((len(weights),), dtype=acc),
    )


@torch.library.register_fake("fastinv::spectral_norm_backward")
def _(grads, weights, us, vs, sigma):
    return [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]


# --- autograd ------------------------------------------------------------------------------


def _setup(ctx, inputs, output):
    weights = inputs[0]
    _, us_new, vs_new, sigma = output
    ctx.n, ctx.eps = len(weights), inputs[4]
    # u, v, σ of THIS forward (fresh outputs, never mutated later): the buffers themselves may
    # be updated by another forward before this backward runs.
    ctx.save_for_backward(*weights, *us_new, *vs_new, sigma)
    ctx.mark_non_differentiable(*us_new, *vs_new, sigma)


def _backward(ctx, grads, _gu, _gv, _gsigma):
    n = ctx.n
    saved = ctx.saved_tensors
    weights, us, vs, sigma = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n], saved[3 * n]
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
    if torch.is_grad_enabled():  # create_graph=True: see _EagerSpectralNorm.backward
        grad_weights = spectral_norm_backward_differentiable(grads, weights, us, vs, ctx.eps)
    else:
        grad_weights = _sn_bwd.default(grads, list(weights), list(us), list(vs), sigma)
    return _strided_like(grad_weights, weights), [None] * n, [None] * n, None, None


def _strided_like(tensors, weights) -> list[torch.Tensor]:
    """Each of ``tensors`` (W/σ or a gradient) with its weight's exact strides; the kernels
    write contiguous ones. A channels_last model needs both: a convolution runs in
    channels_last only when its input or its weight is (an NCHW W/σ meeting an NCHW input, as
    DiffAugment hands D, convolves and copies activations in NCHW), and DDP copies a gradient
    whose strides differ from its parameter's with a "grad strides do not match" warning
    (autograd re-lays most gradients itself, but takes a 1x1 kernel's NCHW gradient as
    matching: its size-1 dims are "contiguous" in both layouts, so strides are compared
    exactly)."""
    return [t if t.stride() == w.stride() else torch.empty_like(w, dtype=t.dtype).copy_(t)
            for t, w in zip(tensors, weights)]


torch.library.register_autograd("fastinv::spectral_norm", _backward, setup_context=_setup)


# --- eager fast path ------------------------------------------------------------------------


class _EagerSpectralNorm(torch.autograd.Function):
    """The same two ops and formula as the registered autograd above, for eager mode only:
    ``register_autograd``'s generic wrapper flattens the tensor lists with pytree on every call
    and costs ~50 µs a call on the dev box (more than the kernels of a 128x128 weight), which
    matters when each layer normalises its own weight. Only the weights are autograd inputs and
    only W/σ outputs (u, v go straight into the buffers). torch.compile traces the op itself."""

    @staticmethod
    def forward(ctx, n_power_iterations, eps, us, vs, *weights):
        with torch._C._AutoDispatchBelowAutograd():
            outs, us_new, vs_new, sigma = _sn.default(list(weights), us, vs, n_power_iterations, eps)
        if n_power_iterations > 0:
            torch._foreach_copy_(us + vs, us_new + vs_new)
        ctx.save_for_backward(*weights, *us_new, *vs_new, sigma)
        ctx.eps = eps
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(grads)
        saved = ctx.saved_tensors
        weights = saved[:n]
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
        us, vs = list(saved[n : 2 * n]), list(saved[2 * n : 3 * n])
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty through an SN layer): the fused backward op
            # has no autograd of its own, so its result would carry no graph and the
            # second-order terms would be dropped. Differentiable ops build the graph instead.
            grad_weights = spectral_norm_backward_differentiable(grads, weights, us, vs, ctx.eps)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                grad_weights = _sn_bwd.default(grads, list(weights), us, vs, saved[3 * n])
        return (None, None, None, None, *_strided_like(grad_weights, weights))


# --- public API ----------------------------------------------------------------------------


def spectral_norm_(
    weights: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    training: bool = True,
) -> list[torch.Tensor]:
    """``W/σ`` for every weight, in one op call, laid out like its weight (strides and all).
    In training, runs ``n_power_iterations`` power iterations and writes the new u, v into
    ``us``/``vs`` in place (one ``_foreach_copy_``); in eval, uses u, v as they are. All
    weights must share dtype and device."""
    if not weights:
        _check(weights, us, vs, n_power_iterations, eps)
        return []
    n = n_power_iterations if training else 0
    us, vs = list(us), list(vs)
    if not torch.compiler.is_compiling() and torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return _strided_like(_EagerSpectralNorm.apply(n, eps, us, vs, *weights), weights)
    outs, us_new, vs_new, _ = _sn.default(list(weights), us, vs, n, eps)
    if n > 0:
        with torch.no_grad():
            torch._foreach_copy_(us + vs, list(us_new) + list(vs_new))
    return _strided_like(outs, weights)


def spectral_norm_with_sigma(
    weights: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    n_power_iterations: int = 1,
    eps: float = 1e-12,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The functional op itself: ``(W/σ list, new u list, new v list, σ)``; writes nothing.
    σ (and u, v) carry no gradient."""
    return _sn.default(list(weights), list(us), list(vs), n_power_iterations, eps)
