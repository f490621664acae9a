"""GAN hinge loss (Lim & Ye 2017; BigGAN; Teterwak et al. 2021), fused.

    hinge_loss_d(d_real, d_fake) = mean(relu(1 - d_real)) + mean(relu(1 + d_fake))
    hinge_loss_g(d_fake)         = -mean(d_fake)

``L_D`` equals the paper's ``E[max(-1, D(fake)) - min(1, D(real))]`` plus 2. Inputs may have any
shape (the discriminator's output) and different batch sizes. Accumulation is fp32 for
fp16/bf16/fp32 inputs; the loss is returned in **float32** (float64 for float64 input), so a
low-precision discriminator never rounds its loss. NaN in the input propagates to the loss,
as with ``torch.relu(...).mean()``.

Implementations, all behind the same ops:
  reference  ``hinge_loss_d_reference`` below (pure PyTorch, every device)
  CPU        csrc/cpu/hinge_loss.cpp
  CUDA       csrc/cuda/hinge_loss.cu
"""

from __future__ import annotations

import torch

from fastinv.ops import _validate as check
from fastinv.ops._library import define

_D = "fastinv.hinge_loss_d"
_G = "fastinv.hinge_loss_g"
_D_BWD = "fastinv.hinge_loss_d_backward"


def _check_d(d_real: torch.Tensor, d_fake: torch.Tensor) -> None:
    check.floating(d_real, _D, "d_real")
    check.floating(d_fake, _D, "d_fake")
    check.same_dtype(d_real, d_fake, _D, "d_real", "d_fake")
    check.same_device(d_real, d_fake, _D, "d_real", "d_fake")
    check.nonempty(d_real, _D, "d_real")
    check.nonempty(d_fake, _D, "d_fake")


def _check_g(d_fake: torch.Tensor) -> None:
    check.floating(d_fake, _G, "d_fake")
    check.nonempty(d_fake, _G, "d_fake")


def _check_d_backward(grad: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor) -> None:
    """grad: one value on any device; empty inputs give empty gradients (csrc/hinge_loss.h)."""
    check.floating(grad, _D_BWD, "grad")
    if grad.numel() != 1:
        raise ValueError(
            f"{_D_BWD}: grad must hold one value (the loss's gradient), got shape {list(grad.shape)}"
        )
    check.floating(d_real, _D_BWD, "d_real")
    check.floating(d_fake, _D_BWD, "d_fake")
    check.same_dtype(d_real, d_fake, _D_BWD, "d_real", "d_fake")
    check.same_device(d_real, d_fake, _D_BWD, "d_real", "d_fake")


# --- references (pure PyTorch) -----------------------------------------------------------


def hinge_loss_d_reference(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    _check_d(d_real, d_fake)
    acc = check.acc_dtype(d_real.dtype)
    return torch.relu(1 - d_real.to(acc)).mean() + torch.relu(1 + d_fake.to(acc)).mean()


def hinge_loss_g_reference(d_fake: torch.Tensor) -> torch.Tensor:
    _check_g(d_fake)
    return -d_fake.to(check.acc_dtype(d_fake.dtype)).mean()


def hinge_loss_d_backward_reference(
    grad: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_d_backward(grad, d_real, d_fake)
    acc = check.acc_dtype(d_real.dtype)
    g = grad.to(device=d_real.device, dtype=acc)
    zero = torch.zeros((), dtype=acc, device=d_real.device)
    # threshold_backward semantics (what autograd does for relu): zero where relu's input <= 0.
    gr = torch.where(1 - d_real.to(acc) <= 0, zero, -g / d_real.numel())
    gf = torch.where(1 + d_fake.to(acc) <= 0, zero, g / d_fake.numel())
    return gr.to(d_real.dtype).contiguous(), gf.to(d_fake.dtype).contiguous()


# --- schemas -----------------------------------------------------------------------------

_hinge_d = define("hinge_loss_d(Tensor d_real, Tensor d_fake) -> Tensor", hinge_loss_d_reference)
_hinge_g = define("hinge_loss_g(Tensor d_fake) -> Tensor", hinge_loss_g_reference)
_hinge_d_bwd = define(
    "hinge_loss_d_backward(Tensor grad, Tensor d_real, Tensor d_fake) -> (Tensor, Tensor)",
    hinge_loss_d_backward_reference,
)


# --- fake (meta) kernels: shapes and dtypes for torch.compile ------------------------------


@torch.library.register_fake("fastinv::hinge_loss_d")
def _(d_real, d_fake):
    _check_d(d_real, d_fake)
    return d_real.new_empty((), dtype=check.acc_dtype(d_real.dtype))


@torch.library.register_fake("fastinv::hinge_loss_g")
def _(d_fake):
    _check_g(d_fake)
    return d_fake.new_empty((), dtype=check.acc_dtype(d_fake.dtype))


@torch.library.register_fake("fastinv::hinge_loss_d_backward")
def _(grad, d_real, d_fake):
    return d_real.new_empty(d_real.shape), d_fake.new_empty(d_fake.shape)


# --- autograd ------------------------------------------------------------------------------


def _setup_d(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_d(ctx, grad):
    d_real, d_fake = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the backward op has no autograd of its own. The reference formula
        # is differentiable in ``grad`` (the second derivative in d is 0 almost everywhere,
        # which ``torch.where`` gives), so the graph is exact.
        return hinge_loss_d_backward_reference(grad, d_real, d_fake)
    return tuple(_hinge_d_bwd.default(grad, d_real, d_fake))


def _setup_g(ctx, inputs, output):
    (d_fake,) = inputs
    ctx.shape, ctx.dtype, ctx.n = d_fake.shape, d_fake.dtype, d_fake.numel()


def _backward_g(ctx, grad):
    # d(-mean x)/dx = -1/n everywhere: a broadcast scalar, no kernel needed.
    return (-grad / ctx.n).to(ctx.dtype).expand(ctx.shape)


torch.library.register_autograd("fastinv::hinge_loss_d", _backward_d, setup_context=_setup_d)
torch.library.register_autograd("fastinv::hinge_loss_g", _backward_g, setup_context=_setup_g)


# --- public API ----------------------------------------------------------------------------


def hinge_loss_d(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``mean(relu(1 - d_real)) + mean(relu(1 + d_fake))`` (float32)."""
    return _hinge_d.default(d_real, d_fake)


def hinge_loss_g(d_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss ``-mean(d_fake)`` (float32; float64 for float64 input)."""
    return _hinge_g.default(d_fake)
