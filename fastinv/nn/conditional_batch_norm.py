"""BigGAN's conditional batch norm layer (``ccbn``) on the fused op.

``gain = 1 + Linear(cond)``, ``bias = Linear(cond)``, both (N, C), then
``fastinv.ops.conditional_batch_norm`` (``relu=True``: with the ReLU that follows every CBN
in BigGAN's generator fused into its kernels). The running statistics follow ``nn.BatchNorm2d``
(same buffer names, same state-dict keys, ``momentum=None`` = cumulative moving average).
``convert_sync_cbn`` turns on cross-replica statistics for every layer of a model.
"""

from __future__ import annotations

import torch
from torch import nn

from fastinv.nn.spectral_norm import SNLinear
from fastinv.ops import conditional_batch_norm


def _linear(in_features: int, out_features: int, spectral_norm: bool) -> nn.Module:
    # fastinv's SNLinear, so that a model's SpectralNormGroup refreshes these weights too
    if spectral_norm:
        return SNLinear(in_features, out_features, bias=True)
    return nn.Linear(in_features, out_features)


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose per-sample affine comes from a conditioning vector (BigGAN ccbn).

    Args:
        num_features: C, the channels of ``x``.
        cond_dim: the size of ``cond`` (in the inverter: logits, noise chunk and embedding).
        eps, momentum: as ``nn.BatchNorm2d``; ``momentum=None`` is the cumulative average.
        spectral_norm: spectral-normalise the two linear maps (BigGAN does).
        relu: return ``relu(ccbn(x, cond))``, the ReLU applied inside the fused kernels (one
            pass over the output instead of two, and no separate ReLU backward).
    """

    def __init__(
        self,
        num_features: int,
        cond_dim: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        spectral_norm: bool = True,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.num_features, self.cond_dim = num_features, cond_dim
        self.eps, self.momentum, self.relu = eps, momentum, relu
        self.gain = _linear(cond_dim, num_features, spectral_norm)
        self.bias = _linear(cond_dim, num_features, spectral_norm)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.process_group = None  # set by convert_sync_cbn

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.dim() != 2 or cond.shape[0] != x.shape[0] or cond.shape[1] != self.cond_dim:
            raise ValueError(
                f"ConditionalBatchNorm2d: cond must have shape (N, cond_dim) = "
                f"({x.shape[0]}, {self.cond_dim}) for x of shape {tuple(x.shape)}, got "
                f"{tuple(cond.shape)}"
            )
        gain = (1 + self.gain(cond)).to(x.dtype)
        bias = self.bias(cond).to(x.dtype)
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        elif momentum is None:
            momentum = 0.0  # unused in eval
        return conditional_batch_norm(
            x,
            gain,
            bias,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=momentum,
            eps=self.eps,
            process_group=self.process_group,
            relu=self.relu,
        )

    def extra_repr(self) -> str:
        sync = ", sync" if self.process_group is not None else ""
        return (
            f"{self.num_features}, cond_dim={self.cond_dim}, eps={self.eps}, "
            f"momentum={self.momentum}{', relu' if self.relu else ''}{sync}"
        )


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state-dict keys) computed by the fused
    conditional-batch-norm op with the per-channel affine as every sample's gain and bias, so
    its training statistics can span the ranks of ``process_group`` the way the conditional
    batch norms' do: over gloo on CPU as over NCCL on GPU (torch's SyncBatchNorm is CUDA-only).
    With ``process_group=None`` it is a plain batch norm. ``convert_sync_batchnorm`` makes them."""

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d expects (N, C, H, W), got {tuple(x.shape)}")
        n = x.shape[0]
        if self.affine:
            weight, bias = self.weight, self.bias
        else:
            weight = torch.ones(self.num_features, device=x.device, dtype=x.dtype)
            bias = torch.zeros_like(weight)
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or not self.track_running_stats
        return conditional_batch_norm(
            x, weight.to(x.dtype).expand(n, -1), bias.to(x.dtype).expand(n, -1),
            self.running_mean, self.running_var, training=use_batch,
            momentum=momentum if momentum is not None else 0.0, eps=self.eps,
            process_group=self.process_group if self.training else None)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Cross-replica batch norm for a whole model, one mechanism for every device: each
    ConditionalBatchNorm2d gets ``process_group`` (``convert_sync_cbn``) and each plain
    ``nn.BatchNorm2d`` (BigGAN's output BN) becomes a :class:`SyncBatchNorm2d` in place (same
    parameters and buffers, the same objects). Returns ``module``."""
    group = _group(process_group)
    convert_sync_cbn(module, group)
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            _as_sync(m, group)
    return module


def _as_sync(bn: nn.BatchNorm2d, group) -> None:
    # The same object with the subclass's forward: its parameters, buffers (dtype, device) and
    # hooks stay exactly what they were, and an optimizer holding the parameters still does.
    bn.__class__ = SyncBatchNorm2d
    bn.process_group = group


def _group(process_group):
    import torch.distributed as dist

    if process_group is not None:
        return process_group
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("convert_sync_cbn / convert_sync_batchnorm: torch.distributed is not "
                           "initialized; call init_process_group first, or pass a process_group")
    return dist.group.WORLD


def convert_sync_cbn(module: nn.Module, process_group=None) -> nn.Module:
    """Make every ConditionalBatchNorm2d in ``module`` compute its training statistics over the
    ranks of ``process_group`` (``None``: the default group, ``torch.distributed.group.WORLD``).
    Modifies ``module`` in place and returns it."""
    process_group = _group(process_group)
    for m in module.modules():
        if isinstance(m, ConditionalBatchNorm2d):
            m.process_group = process_group
    return module
