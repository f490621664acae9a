"""Conditional batch norm (BigGAN's ccbn), fused.

    y[n,c,h,w] = (x[n,c,h,w] - mean[c]) * invstd[c] * gain[n,c] + bias[n,c]
    invstd[c]  = 1 / sqrt(var[c] + eps)
    relu=True: y = max(y, 0) in the same pass (BigGAN's ReLU after every CBN)

``x`` is (N, C, H, W), contiguous or channels_last (the output keeps the layout); ``gain`` and
``bias`` are (N, C) in ``x``'s dtype. Training: ``mean``/``var`` are the biased batch statistics
over N, H, W, and ``running_mean``/``running_var`` (optional, any floating dtype) are updated in
place, ``r = (1 - momentum) * r + momentum * s``, with the *unbiased* variance (PyTorch's
convention). Eval: the running statistics normalise. Statistics and accumulation are fp32 for
fp16/bf16/fp32 input (float64 for float64), computed as a shifted two-pass / Welford merge,
never ``E[x^2] - E[x]^2``.

Ops (all in the ``fastinv`` namespace, each with a reference here and CPU/CUDA kernels):

  conditional_batch_norm            the fused forward -> (y, mean, invstd); mean/invstd are the
                                    statistics used (saved for backward)
  conditional_batch_norm_backward   -> (grad_x, grad_gain, grad_bias)
  conditional_batch_norm_stats      per-channel (mean, biased var) of one replica's batch
  conditional_batch_norm_apply      the normalise-and-affine step given mean/invstd
  conditional_batch_norm_backward_reduce   per-(n, c) sums of dy * xhat and dy
  conditional_batch_norm_backward_elemt    grad_x given the two per-channel sums

Why two sets: a ``ProcessGroup`` cannot pass through an op schema, and a collective inside a
kernel would hide a host-side wait from the dispatcher. So cross-replica BN (``process_group``)
is a ``torch.autograd.Function`` in Python that calls the split ops and does the all-gather
(forward: count, mean, M2 per rank, merged exactly as Welford's parallel formula, so ranks may
have different batch sizes) and the all-reduce (backward: the two per-channel sums) between
them. Without a group the fused op runs: one call (CPU: two streaming passes; CUDA: three
launches) instead of the split ops' separate calls and Python glue.

Backward (training), with xhat = (x - mean) * invstd, M = N*H*W summed over all replicas:
    grad_bias[n,c] = sum_hw dy,   grad_gain[n,c] = sum_hw dy * xhat
    grad_x = invstd * (dy * gain - A[c] / M - xhat * B[c] / M)
    A[c] = sum_n gain[n,c] grad_bias[n,c],   B[c] = sum_n gain[n,c] grad_gain[n,c]
Eval: grad_x = dy * gain * invstd.
relu=True: the same with dy replaced by dy * (y > 0), y the stored output (torch's ReLU
backward), inside the backward kernel. y > 0 is recomputed there from x, mean, invstd, gain
and bias rather than read from a saved y: both backward passes read x already, so the mask
costs O(N*C) extra bytes, where a saved y is one more tensor read in each pass (5 -> 7
tensor-sized transfers) and y kept alive until the backward. The ReLU's second derivative is
0 almost everywhere, so double backward is the same formula with the mask as a constant.

Cross-replica BN with relu=True applies torch.relu after the synchronised op (unfused).

Implementations: reference (``*_reference`` below, every device), csrc/cpu/conditional_batch_norm.cpp,
csrc/cuda/conditional_batch_norm.cu.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastinv.ops import _validate as check
from fastinv.ops._library import define

_OP = "fastinv.conditional_batch_norm"


# --- shared checks and layout rule (the C++ kernels mirror both) ----------------------------


def _layout(x: torch.Tensor) -> torch.memory_format:
    """Outputs shaped like x are channels_last when x is (and not also plain contiguous, as
    when C == 1 or H == W == 1), contiguous otherwise."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_x(x: torch.Tensor) -> None:
    check.floating(x, _OP, "x")
    if x.dim() != 4:
        raise ValueError(f"{_OP}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{_OP}: x is empty (shape {tuple(x.shape)}); batch norm needs values")


def _check_nc(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    check.floating(t, _OP, name)
    if tuple(t.shape) != (x.shape[0], x.shape[1]):
        raise ValueError(
            f"{_OP}: {name} must have shape (N, C) = {(x.shape[0], x.shape[1])} to match x of "
            f"shape {tuple(x.shape)}, got {tuple(t.shape)}"
        )
    check.same_dtype(x, t, _OP, "x", name)
    check.same_device(x, t, _OP, "x", name)


def _check_c(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    check.floating(t, _OP, name)
    if tuple(t.shape) != (x.shape[1],):
        raise ValueError(
            f"{_OP}: {name} must have shape (C,) = ({x.shape[1]},) to match x of shape "
            f"{tuple(x.shape)}, got {tuple(t.shape)}"
        )
    check.same_device(x, t, _OP, "x", name)


def _check_training_count(count: int, shape) -> None:
    if count <= 1:
        raise ValueError(
            f"{_OP}: Expected more than 1 value per channel when training, got input size "
            f"{list(shape)}; use a batch of at least 2 (or H*W > 1), or eval mode"
        )


def _check_args(x, gain, bias, running_mean, running_var) -> None:
    _check_x(x)
    _check_nc(gain, x, "gain")
    _check_nc(bias, x, "bias")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{_OP}: pass both running_mean and running_var, or neither")
    if running_mean is not None:
        _check_c(running_mean, x, "running_mean")
        _check_c(running_var, x, "running_var")


def _check_forward(x, gain, bias, running_mean, running_var, training) -> None:
    _check_args(x, gain, bias, running_mean, running_var)
    if training:
        _check_training_count(x.numel() // x.shape[1], x.shape)
    elif running_mean is None:
        raise ValueError(
            f"{_OP}: eval mode (training=False) normalises with running_mean and running_var; "
            "pass them, or use training=True for batch statistics"
        )


def _check_grad(grad_y: torch.Tensor, x: torch.Tensor) -> None:
    check.floating(grad_y, _OP, "grad_y")
    if tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(f"{_OP}: grad_y has shape {list(grad_y.shape)} but x has shape {list(x.shape)}")
    check.same_device(x, grad_y, _OP, "x", "grad_y")


def _check_split(x, grad_y=None, gain=None, bias=None, **per_channel) -> None:
    """The arguments of the split ops and the backward (csrc/conditional_batch_norm.h checks the
    same): x, then gain/bias (N, C), grad_y like x, each named per-channel tensor (C,)."""
    _check_x(x)
    if gain is not None:
        _check_nc(gain, x, "gain")
    if bias is not None:
        _check_nc(bias, x, "bias")
    if grad_y is not None:
        _check_grad(grad_y, x)
    for name, t in per_channel.items():
        _check_c(t, x, name)


def _check_update_running(running_mean, running_var, mean, var, count: int) -> None:
    if count <= 1:
        raise ValueError(f"{_OP}: the running variance needs count > 1, got {count}")
    names = ("running_mean", "running_var", "mean", "var")
    for name, t in zip(names, (running_mean, running_var, mean, var)):
        check.floating(t, _OP, name)
        if t.dim() != 1 or t.numel() != mean.numel():
            raise ValueError(
                f"{_OP}: {name} has shape {list(t.shape)} but the batch statistics have "
                f"{mean.numel()} channels; pass 1-d running statistics of one value per channel"
            )
        check.same_device(running_mean, t, _OP, "running_mean", name)


def _bc(t: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C, 1, 1); (N, C) -> (N, C, 1, 1)."""
    return t.view(1, -1, 1, 1) if t.dim() == 1 else t[:, :, None, None]


# --- references (pure PyTorch) -----------------------------------------------------------


def conditional_batch_norm_stats_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_x(x)
    var, mean = torch.var_mean(x.to(check.acc_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def conditional_batch_norm_apply_reference(x, gain, bias, mean, invstd) -> torch.Tensor:
    _check_split(x, gain=gain, bias=bias, mean=mean, invstd=invstd)
    acc = check.acc_dtype(x.dtype)
    scale = _bc(invstd.to(acc)) * _bc(gain.to(acc))
    y = (x.to(acc) - _bc(mean.to(acc))) * scale + _bc(bias.to(acc))
    return y.to(x.dtype).contiguous(memory_format=_layout(x))


def _relu_passes(x, gain, bias, mean, invstd) -> torch.Tensor:
    """relu=True backward: where the forward's stored output y (before the ReLU, rounded to x's
    dtype) is > 0, recomputed from the saved statistics (csrc: relu_passes, the same rule). A
    constant to autograd: the ReLU's derivative is piecewise constant."""
    with torch.no_grad():
        return conditional_batch_norm_apply_reference(x, gain, bias, mean, invstd) > 0


def _relu_mask_grad(grad_y, x, gain, bias, mean, invstd) -> torch.Tensor:
    # where, not a product: torch's ReLU backward gives 0, not NaN, for a NaN dy it masks
    passes = _relu_passes(x, gain, bias, mean, invstd)
    return torch.where(passes, grad_y, grad_y.new_zeros(()))


def _check_backward_relu(x, relu: bool, bias) -> None:
    if relu and bias is None:
        raise ValueError(
            f"{_OP}: relu=True masks grad_y where the forward's output is > 0, recomputed from x "
            "and the statistics, and needs the forward's bias; pass bias"
        )
    if bias is not None:
        _check_nc(bias, x, "bias")


def conditional_batch_norm_reference(
    x, gain, bias, running_mean, running_var, training: bool, eps: float, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_forward(x, gain, bias, running_mean, running_var, training)
    acc = check.acc_dtype(x.dtype)
    if training:
        mean, var = conditional_batch_norm_stats_reference(x)
    else:
        mean, var = running_mean.to(acc).clone(), running_var.to(acc).clone()
    invstd = torch.rsqrt(var + eps)
    y = conditional_batch_norm_apply_reference(x, gain, bias, mean, invstd)
    if relu:
        y = torch.relu(y)
    return y, mean, invstd, var


def conditional_batch_norm_update_running_reference(
    running_mean, running_var, mean, var, count: int, momentum: float
) -> None:
    """PyTorch's convention: the running variance tracks the unbiased batch variance."""
    _check_update_running(running_mean, running_var, mean, var, count)
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        running_mean.copy_(running_mean.to(mean.dtype) * (1 - momentum) + mean * momentum)
        running_var.copy_(running_var.to(var.dtype) * (1 - momentum) + unbiased * momentum)


def conditional_batch_norm_backward_reduce_reference(grad_y, x, mean, invstd):
    _check_split(x, grad_y, mean=mean, invstd=invstd)
    acc = check.acc_dtype(x.dtype)
    dy = grad_y.to(acc)
    xhat = (x.to(acc) - _bc(mean.to(acc))) * _bc(invstd.to(acc))
    return (dy * xhat).sum((2, 3)), dy.sum((2, 3))


def conditional_batch_norm_backward_elemt_reference(
    grad_y, x, gain, mean, invstd, sum_dxhat, sum_dxhat_xhat, count: int
) -> torch.Tensor:
    _check_split(x, grad_y, gain, mean=mean, invstd=invstd, sum_dxhat=sum_dxhat,
                 sum_dxhat_xhat=sum_dxhat_xhat)
    if count <= 0:
        raise ValueError(f"{_OP}: count must be positive, got {count}")
    acc = check.acc_dtype(x.dtype)
    inv = _bc(invstd.to(acc))
    xhat = (x.to(acc) - _bc(mean.to(acc))) * inv
    a = _bc(sum_dxhat.to(acc) / count)
    b = _bc(sum_dxhat_xhat.to(acc) / count)
    gx = (grad_y.to(acc) * _bc(gain.to(acc)) - a - xhat * b) * inv
    return gx.to(x.dtype).contiguous(memory_format=_layout(x))


def conditional_batch_norm_backward_reference(
    grad_y, x, gain, mean, invstd, training: bool, relu: bool = False, bias=None
):
    _check_split(x, grad_y, gain, mean=mean, invstd=invstd)
    _check_backward_relu(x, relu, bias)
    if relu:
        grad_y = _relu_mask_grad(grad_y, x, gain, bias, mean, invstd)
    acc = check.acc_dtype(x.dtype)
    grad_gain, grad_bias = conditional_batch_norm_backward_reduce_reference(grad_y, x, mean, invstd)
    if training:
        g = gain.to(acc)
        sum_dxhat, sum_dxhat_xhat = (g * grad_bias).sum(0), (g * grad_gain).sum(0)
        count = x.numel() // x.shape[1]
        gx = conditional_batch_norm_backward_elemt_reference(
            grad_y, x, gain, mean, invstd, sum_dxhat, sum_dxhat_xhat, count
        )
    else:
        gx = grad_y.to(acc) * _bc(gain.to(acc)) * _bc(invstd.to(acc))
        gx = gx.to(x.dtype).contiguous(memory_format=_layout(x))
    return gx, grad_gain.to(gain.dtype), grad_bias.to(gain.dtype)


# --- schemas -----------------------------------------------------------------------------

# Functional (autograd needs that): returns (y, mean, invstd, var), the statistics used; the
# running-stat update is its own small mutating op, fed detached statistics.
_cbn = define(
    "conditional_batch_norm(Tensor x, Tensor gain, Tensor bias, Tensor? running_mean, "
    "Tensor? running_var, bool training, float eps, bool relu=False) -> (Tensor, Tensor, Tensor, Tensor)",
    conditional_batch_norm_reference,
)
_cbn_update = define(
    "conditional_batch_norm_update_running(Tensor(a!) running_mean, Tensor(b!) running_var, "
    "Tensor mean, Tensor var, int count, float momentum) -> ()",
    conditional_batch_norm_update_running_reference,
)
_cbn_bwd = define(
    "conditional_batch_norm_backward(Tensor grad_y, Tensor x, Tensor gain, Tensor mean, "
    "Tensor invstd, bool training, bool relu=False, Tensor? bias=None) -> (Tensor, Tensor, Tensor)",
    conditional_batch_norm_backward_reference,
)
_cbn_stats = define(
    "conditional_batch_norm_stats(Tensor x) -> (Tensor, Tensor)",
    conditional_batch_norm_stats_reference,
)
_cbn_apply = define(
    "conditional_batch_norm_apply(Tensor x, Tensor gain, Tensor bias, Tensor mean, Tensor invstd) -> Tensor",
    conditional_batch_norm_apply_reference,
)
_cbn_bwd_reduce = define(
    "conditional_batch_norm_backward_reduce(Tensor grad_y, Tensor x, Tensor mean, Tensor invstd) "
    "-> (Tensor, Tensor)",
    conditional_batch_norm_backward_reduce_reference,
)
_cbn_bwd_elemt = define(
    "conditional_batch_norm_backward_elemt(Tensor grad_y, Tensor x, Tensor gain, Tensor mean, "
    "Tensor invstd, Tensor sum_dxhat, Tensor sum_dxhat_xhat, int count) -> Tensor",
    conditional_batch_norm_backward_elemt_reference,
)


# --- fake (meta) kernels ---------------------------------------------------------------------


def _like_x(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))


def _per_channel(x: torch.Tensor, *lead: int) -> torch.Tensor:
    return x.new_empty((*lead, x.shape[1]), dtype=check.acc_dtype(x.dtype))


@torch.library.register_fake("fastinv::conditional_batch_norm")
def _(x, gain, bias, running_mean, running_var, training, eps, relu=False):
    _check_forward(x, gain, bias, running_mean, running_var, training)
    return _like_x(x), _per_channel(x), _per_channel(x), _per_channel(x)


@torch.library.register_fake("fastinv::conditional_batch_norm_update_running")
def _(running_mean, running_var, mean, var, count, momentum):
    return None


@torch.library.register_fake("fastinv::conditional_batch_norm_backward")
def _(grad_y, x, gain, mean, invstd, training, relu=False, bias=None):
    _check_backward_relu(x, relu, bias)
    return _like_x(x), torch.empty_like(gain), torch.empty_like(gain)


@torch.library.register_fake("fastinv::conditional_batch_norm_stats")
def _(x):
    _check_x(x)
    return _per_channel(x), _per_channel(x)


@torch.library.register_fake("fastinv::conditional_batch_norm_apply")
def _(x, gain, bias, mean, invstd):
    return _like_x(x)


@torch.library.register_fake("fastinv::conditional_batch_norm_backward_reduce")
def _(grad_y, x, mean, invstd):
    return _per_channel(x, x.shape[0]), _per_channel(x, x.shape[0])


@torch.library.register_fake("fastinv::conditional_batch_norm_backward_elemt")
def _(grad_y, x, gain, mean, invstd, sum_dxhat, sum_dxhat_xhat, count):
    return _like_x(x)


# --- autograd of the fused op ---------------------------------------------------------------


def conditional_batch_norm_backward_differentiable(
    grad_y, x, gain, mean, invstd, training: bool, eps: float, relu: bool = False, bias=None
):
    """The backward written in differentiable PyTorch ops, for ``create_graph=True`` (gradient
    penalties: R1, WGAN-GP, path length). In training the statistics are recomputed from ``x``
    so that their dependence on ``x`` reaches the second derivative; the saved ``mean``/``invstd``
    are constants to autograd. Eval: the running statistics are constants, as in the forward.
    relu: grad_y masked by the forward's output > 0, the mask a constant (the ReLU's second
    derivative is 0 almost everywhere, as autograd of torch.relu has it)."""
    if relu:
        grad_y = _relu_mask_grad(grad_y, x, gain, bias, mean, invstd)
    acc = check.acc_dtype(x.dtype)
    xa, dy, g = x.to(acc), grad_y.to(acc), gain.to(acc)
    if training:
        var, mean = torch.var_mean(xa, dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + eps)
    mean, invstd = _bc(mean.to(acc)), _bc(invstd.to(acc))
    xhat = (xa - mean) * invstd
    grad_bias = dy.sum((2, 3))
    grad_gain = (dy * xhat).sum((2, 3))
    if training:
        count = x.numel() // x.shape[1]
        a = _bc((g * grad_bias).sum(0) / count)
        b = _bc((g * grad_gain).sum(0) / count)
        gx = (dy * _bc(g) - a - xhat * b) * invstd
    else:
        gx = dy * _bc(g) * invstd
    gx = gx.to(x.dtype).contiguous(memory_format=_layout(x))
    return gx, grad_gain.to(gain.dtype), grad_bias.to(gain.dtype)


def _setup(ctx, inputs, output):
    x, gain, bias, _rm, _rv, training, eps, relu = inputs  # defaults filled in by torch.library
    _y, mean, invstd, _var = output
    ctx.mark_non_differentiable(mean, invstd, _var)
    # relu: bias (N, C) to recompute the output's sign; not the output y (module docstring)
    ctx.save_for_backward(x, gain, mean, invstd, bias if relu else None)
    ctx.training, ctx.eps, ctx.relu = training, eps, relu


def _backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
    # The statistics are outputs for saving and the running-stat update only (marked
    # non-differentiable): the public function never exposes them.
    x, gain, mean, invstd, bias = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the fused backward op has no autograd of its own (its second
        # derivative would silently be dropped), so build the graph from differentiable ops.
        # Grad mode is off in an ordinary backward and in torch.compile's traced backward.
        grads = conditional_batch_norm_backward_differentiable(
            grad_y, x, gain, mean, invstd, ctx.training, ctx.eps, ctx.relu, bias
        )
    else:
        grads = _cbn_bwd.default(grad_y, x, gain, mean, invstd, ctx.training, ctx.relu, bias)
    grad_x, grad_gain, grad_bias = grads
    return grad_x, grad_gain, grad_bias, None, None, None, None, None


torch.library.register_autograd("fastinv::conditional_batch_norm", _backward, setup_context=_setup)


# --- cross-replica (sync) path ---------------------------------------------------------------


class _SyncConditionalBatchNorm(torch.autograd.Function):
    """Statistics and backward reductions summed over the ranks of ``group``: the result equals
    one process running the concatenated batch, also when ranks hold different batch sizes."""

    @staticmethod
    def forward(ctx, x, gain, bias, running_mean, running_var, momentum, eps, group):
        # The count check is on the global batch (below): a rank may hold a single value.
        _check_args(x, gain, bias, running_mean, running_var)
        local_count = x.numel() // x.shape[1]
        mean, var = _cbn_stats.default(x)
        # One all_gather of (count, mean, M2) per rank; merged in float64 with Chan et al.'s
        # parallel formula (exact, stable, weights each rank by its own count).
        packed = torch.cat(
            [torch.tensor([float(local_count)], dtype=torch.float64, device=x.device),
             mean.double(), var.double() * local_count]
        )
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        table = torch.stack(gathered)  # (world, 1 + 2C)
        c = x.shape[1]
        counts, means, m2s = table[:, :1], table[:, 1 : 1 + c], table[:, 1 + c :]
        total = counts.sum()
        count = int(total.item())
        _check_training_count(count, (count // max(1, x.shape[2] * x.shape[3]), *x.shape[1:]))
        gmean = (counts * means).sum(0) / total
        gvar = (m2s + counts * (means - gmean) ** 2).sum(0) / total
        acc = check.acc_dtype(x.dtype)
        mean_acc = gmean.to(acc)
        if running_mean is not None:
            _cbn_update.default(running_mean, running_var, mean_acc, gvar.to(acc), count, momentum)
        invstd = torch.rsqrt(gvar + eps).to(acc)
        y = _cbn_apply.default(x, gain, bias, mean_acc, invstd)
        ctx.save_for_backward(x, gain, mean_acc, invstd)
        ctx.count, ctx.group = count, group
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, gain, mean, invstd = ctx.saved_tensors
        grads = _SyncConditionalBatchNormBackward.apply(grad_y, x, gain, mean, invstd, ctx.count, ctx.group)
        return (*grads, None, None, None, None, None)


class _SyncConditionalBatchNormBackward(torch.autograd.Function):
    """The cross-replica backward as a node of its own, so that differentiating its result
    (create_graph=True, a gradient penalty through G) raises instead of silently dropping the
    second-order terms: a differentiable version would need differentiable collectives."""

    @staticmethod
    def forward(ctx, grad_y, x, gain, mean, invstd, count, group):
        grad_gain, grad_bias = _cbn_bwd_reduce.default(grad_y, x, mean, invstd)
        g = gain.to(grad_gain.dtype)
        sums = torch.stack([(g * grad_bias).sum(0), (g * grad_gain).sum(0)])
        dist.all_reduce(sums, group=group)
        grad_x = _cbn_bwd_elemt.default(grad_y, x, gain, mean, invstd, sums[0], sums[1], count)
        return grad_x, grad_gain.to(gain.dtype), grad_bias.to(gain.dtype)

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(
            f"{_OP}: cross-replica batch norm (process_group set) has no double backward, so a "
            "gradient penalty differentiated through it (create_graph=True) is not supported; "
            "compute the penalty through a model without the process group (do not call "
            "convert_sync_cbn on it)"
        )


# --- public API ----------------------------------------------------------------------------


def conditional_batch_norm(
    x: torch.Tensor,
    gain: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
    relu: bool = False,
) -> torch.Tensor:
    """Conditional batch norm ``(x - mean) * invstd * gain[:, :, None, None] + bias[:, :, None, None]``,
    followed by a ReLU fused into the same kernels when ``relu`` (BigGAN's GBlock).

    ``momentum`` is the running-stat factor; for PyTorch's ``momentum=None`` (cumulative average)
    pass ``1 / num_batches_tracked`` (``fastinv.nn.ConditionalBatchNorm2d`` does). With a
    ``process_group`` of more than one rank, training statistics and backward reductions are
    summed over its ranks (cross-replica batch norm)."""
    if momentum is None:
        raise ValueError(
            f"{_OP}: momentum=None (cumulative average) needs the batch count; pass "
            "momentum=1/num_batches_tracked, or use fastinv.nn.ConditionalBatchNorm2d(momentum=None)"
        )
    if training and process_group is not None and dist.is_available() and dist.is_initialized():
        if dist.get_world_size(process_group) > 1:
            y = _SyncConditionalBatchNorm.apply(
                x, gain, bias, running_mean, running_var, float(momentum), float(eps), process_group
            )
            return torch.relu(y) if relu else y  # unfused: the split ops have no ReLU
    y, mean, _invstd, var = _cbn.default(
        x, gain, bias, running_mean, running_var, bool(training), float(eps), bool(relu)
    )
    if training and running_mean is not None:
        count = x.numel() // x.shape[1]
        _cbn_update.default(running_mean, running_var, mean, var, count, float(momentum))
    return y
