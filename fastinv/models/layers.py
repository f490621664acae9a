"""Building blocks shared by the logit-conditioned BigGAN generator and discriminator.

A model gets its layers from a :class:`LayerFactory` it passes down to every block:
``for_implementation("fastinv")`` builds spectral norm and conditional batch norm from
``fastinv.nn`` (fused kernels, one multi-tensor spectral-norm refresh per forward);
``for_implementation("torch")`` (the models' ``layers="torch"``) builds torch's own layers with
the same numerics and the same state-dict layout: the baseline the benchmarks and parity tests
compare against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastinv.nn as fnn

LOGIT_PREPROCESS = ("none", "standardise", "temperature", "affine")


def _torch_sn(module: nn.Module, eps: float) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(module, eps=eps)


class _TorchConditionalBatchNorm2d(nn.Module):
    """BigGAN's ``ccbn`` on torch layers: ``BN(x) * (1 + Linear(cond)) + Linear(cond)``, with
    the parameter and buffer names of fastinv.nn.ConditionalBatchNorm2d; ``relu``: then
    ``torch.relu``, as its own op (what the fused kernels' ReLU replaces)."""

    def __init__(self, num_features: int, cond_dim: int, eps: float, momentum: float | None,
                 spectral_norm: bool = True, relu: bool = False):
        super().__init__()
        self.eps, self.momentum, self.relu = eps, momentum, relu
        make = (lambda i, o: nn.utils.parametrizations.spectral_norm(nn.Linear(i, o))) if (
            spectral_norm) else nn.Linear
        self.gain = make(cond_dim, num_features)
        self.bias = make(cond_dim, num_features)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        h = F.batch_norm(x, self.running_mean, self.running_var, training=self.training,
                         momentum=0.0 if momentum is None else momentum, eps=self.eps)
        gain = (1 + self.gain(cond)).to(x.dtype).view(cond.shape[0], -1, 1, 1)
        bias = self.bias(cond).to(x.dtype).view(cond.shape[0], -1, 1, 1)
        h = h * gain + bias
        return torch.relu(h) if self.relu else h


@dataclass(frozen=True)
class LayerFactory:
    """How a model makes its layers, passed down to every block (BigGAN-PyTorch's
    ``which_conv`` / ``which_linear`` / ``which_bn``). ``for_implementation("fastinv")``: the
    fused ops (fastinv.nn); ``"torch"``: torch's own layers with the same numerics and the
    same state-dict layout, the baseline the benchmarks and parity tests compare against.

    ``sn_conv2d(in, out, kernel_size, padding, eps)``, ``sn_linear(in, out, eps, bias=True)``,
    ``conditional_bn(features, cond_dim, eps=1e-5, momentum=0.1, relu=False)`` (BigGAN's ccbn;
    ``relu=True`` fused into fastinv's kernels), ``self_attention(channels, sn_eps)``."""

    name: str
    sn_conv2d: Callable[..., nn.Module]
    sn_linear: Callable[..., nn.Module]
    conditional_bn: Callable[..., nn.Module]
    self_attention: Callable[..., nn.Module]


def _fastinv_factory() -> LayerFactory:
    from fastinv.nn.attention import SelfAttention

    def conv(in_ch, out_ch, kernel_size, padding, eps):
        return fnn.SNConv2d(in_ch, out_ch, kernel_size=kernel_size, padding=padding, eps=eps)

    def linear(in_features, out_features, eps, bias=True):
        return fnn.SNLinear(in_features, out_features, bias=bias, eps=eps)

    def cbn(num_features, cond_dim, eps=1e-5, momentum=0.1, relu=False):
        return fnn.ConditionalBatchNorm2d(num_features, cond_dim, eps=eps, momentum=momentum,
                                          spectral_norm=True, relu=relu)

    return LayerFactory("fastinv", conv, linear, cbn,
                        lambda channels, sn_eps: SelfAttention(channels, sn_eps=sn_eps))


def _torch_factory() -> LayerFactory:
    from fastinv.nn.attention import SelfAttention

    def conv(in_ch, out_ch, kernel_size, padding, eps):
        return _torch_sn(nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size, padding=padding), eps)

    def linear(in_features, out_features, eps, bias=True):
        return _torch_sn(nn.Linear(in_features, out_features, bias=bias), eps)

    def cbn(num_features, cond_dim, eps=1e-5, momentum=0.1, relu=False):
        return _TorchConditionalBatchNorm2d(num_features, cond_dim, eps=eps, momentum=momentum,
                                            spectral_norm=True, relu=relu)

    def attention(channels, sn_eps):
        return SelfAttention(channels, sn_eps=sn_eps,
                             conv=lambda i, o, eps: _torch_sn(nn.Conv2d(i, o, 1, bias=False), eps))

    return LayerFactory("torch", conv, linear, cbn, attention)


IMPLEMENTATIONS: dict[str, Callable[[], LayerFactory]] = {
    "fastinv": _fastinv_factory, "torch": _torch_factory}


def model_config(cls: type, config, args: tuple, kwargs: dict, model: str):
    """A model's config dataclass ``cls`` from what its constructor got: an instance, or the
    fields (num_classes first), never both (``Generator(cfg)`` / ``Generator(10, ch=8)``)."""
    if config is None:
        return cls(*args, **kwargs)
    if not isinstance(config, cls):
        return cls(config, *args, **kwargs)
    if args or kwargs:
        raise TypeError(f"{model} takes a {cls.__name__} or its fields, not both")
    return config


def config_from_dict(cls: type, d: dict):
    """A stored config (a checkpoint's ``model_config``) as ``cls``; fields newer than the
    checkpoint take their defaults, which is what those models were; unknown ones are refused."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has unknown fields {sorted(unknown)}")
    return cls(**d)


def for_implementation(name: str) -> LayerFactory:
    """The layer factory of ``name`` (a model config's ``layers`` field)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"layer implementation must be one of {tuple(IMPLEMENTATIONS)}, "
                         f"got {name!r}")
    return IMPLEMENTATIONS[name]()


def attach_spectral_norm_group(model: nn.Module) -> object | None:
    """Refresh every spectral norm of ``model`` in one op call per forward (fastinv.nn).

    Kept out of the module tree (``__dict__``), so it is neither a child module nor saved.
    Returns None when the model has no fastinv SN layer (torch's layers refresh themselves)."""
    if not any(fnn.is_spectral_norm(m) for m in model.modules()):
        return None
    group = fnn.SpectralNormGroup(model)
    model.__dict__["_sn_group"] = group
    return group


def init_orthogonal(model: nn.Module) -> None:
    """BigGAN's orthogonal init of every conv / linear / embedding weight (SN or not)."""
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            continue
        if nn.utils.parametrize.is_parametrized(m, "weight"):
            w = m.parametrizations.weight.original
        elif fnn.is_spectral_norm(m):  # the raw weight, documented as what to initialise
            w = m.weight_orig
        else:
            w = m.weight
        if isinstance(w, nn.Parameter) and w.dim() >= 2:
            nn.init.orthogonal_(w)
    retune_spectral_norms(model)


@torch.no_grad()
def retune_spectral_norms(model: nn.Module, iterations: int = 15) -> None:
    """Run power iterations on every SN weight's (u, v), as torch does when SN is attached:
    after re-initialising the weights, stale (u, v) would make σ = uᵀWv far too small and an
    eval-mode forward (no power iteration) blow up. fastinv's layers do it themselves
    (``reset_power_iteration``); torch's parametrizations the same way with their own eps."""
    for m in model.modules():
        if fnn.is_spectral_norm(m):
            m.reset_power_iteration(iterations)
        elif nn.utils.parametrize.is_parametrized(m, "weight"):
            p = m.parametrizations.weight
            w, u, v, eps = p.original.detach(), p[0]._u, p[0]._v, p[0].eps
            w = w.reshape(w.shape[0], -1).to(u.dtype)
            for _ in range(iterations):
                v.copy_(F.normalize(w.T @ u, dim=0, eps=eps))
                u.copy_(F.normalize(w @ v, dim=0, eps=eps))


class LogitPreprocess(nn.Module):
    """What G and D see of the classifier's logits ``z``.

    ``none`` (the paper): raw logits. ``affine``: ``(z - μ) / σ`` with per-logit mean and std
    of the training set, fixed once before training (``set_statistics``; saved with the
    model) — an invertible map, so nothing of z is lost, but O(1) inputs: raw logits of a
    confident classifier have norms of 30+ (measured on the demo's CNN), and a spectrally
    normalised embedding cannot scale them down, so every conditional gain starts saturated.
    ``standardise``: per-sample zero mean, unit std (drops the offset and scale, which a
    softmax ignores, and the confidence with them). ``temperature``: ``z / T``.
    """

    def __init__(self, mode: str = "none", temperature: float = 1.0, num_classes: int = 0):
        super().__init__()
        if mode not in LOGIT_PREPROCESS:
            raise ValueError(f"logit_preprocess must be one of {LOGIT_PREPROCESS}, got {mode!r}")
        if mode == "temperature" and not temperature > 0:
            raise ValueError(f"logit temperature must be > 0, got {temperature}")
        if mode == "affine" and num_classes < 1:
            raise ValueError("logit_preprocess='affine' needs num_classes")
        self.mode, self.temperature = mode, float(temperature)
        if mode == "affine":
            self.register_buffer("shift", torch.zeros(num_classes))
            self.register_buffer("scale", torch.ones(num_classes))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the affine map: per-logit mean and std (K,) of the training set."""
        if self.mode != "affine":
            return
        self.shift.copy_(mean.float())
        self.scale.copy_(std.float().clamp_min(1e-3))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # 16-bit logits (autocast) are widened; a float64 model keeps float64
        z = z if z.dtype == torch.float64 else z.float()
        if self.mode == "standardise":
            return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)
        if self.mode == "temperature":
            return z / self.temperature
        if self.mode == "affine":
            return (z - self.shift) / self.scale
        return z

    def extra_repr(self) -> str:
        return self.mode + (f", T={self.temperature}" if self.mode == "temperature" else "")


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample2(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling. On CPU, for an NCHW tensor of even size, as two sums of
    neighbouring pairs: ATen's CPU avg_pool2d walks NCHW pixels one at a time, and these
    vectorised adds take 0.4-0.6x its forward + backward time at the demo's D sizes (fp32 and
    bf16, benchmarks/RESULTS.md). channels_last inputs (ATen's pooling is vectorised over
    channels there), CUDA and torch.compile (which generates its own loop) keep avg_pool2d."""
    n, c, h, w = x.shape
    if (x.device.type != "cpu" or h % 2 or w % 2 or not x.is_contiguous()
            or torch.compiler.is_compiling()):
        return F.avg_pool2d(x, 2)
    pairs = x.view(n, c, h, w // 2, 2)
    rows = (pairs[..., 0] + pairs[..., 1]).view(n, c, h // 2, 2, w // 2)
    return (rows[:, :, :, 0] + rows[:, :, :, 1]) * 0.25


def _sn_triples(model: nn.Module):
    """(W as a matrix, u, v) of every spectral-normed weight (fastinv's or torch's)."""
    for m in model.modules():
        if fnn.is_spectral_norm(m):
            yield from (m.spectral_norm_state(name) for name in m.spectral_norm_names)
        elif nn.utils.parametrize.is_parametrized(m, "weight"):
            # torch's parametrization keeps (u, v) under private names: there is no public API
            p = m.parametrizations.weight
            yield p.original.reshape(p.original.shape[0], -1), p[0]._u, p[0]._v


@torch.no_grad()
def sigma_stats(model: nn.Module) -> dict[str, float]:
    """Mean / max of the spectral norm estimates σ = uᵀWv over the model's SN weights."""
    sigmas = [torch.dot(u.float(), w.float() @ v.float()) for w, u, v in _sn_triples(model)]
    if not sigmas:
        return {}
    s = torch.stack(sigmas)
    return {"sigma_mean": s.mean().item(), "sigma_max": s.max().item()}
