"""Spectrally normalised layers on the fused op ``fastinv.ops.spectral_norm_``.

Each layer works on its own like ``torch.nn.utils.parametrizations.spectral_norm``: reading
``layer.weight`` returns ``W/σ``; in training mode that read first runs the power iteration
and updates the buffers u, v; in eval mode it does not. Put a model's layers in a
:class:`SpectralNormGroup` and all of them are refreshed by ONE op call at the start of each
forward of the model.

State of a layer with ``name="weight"`` (the layout of the older
``torch.nn.utils.spectral_norm``): parameter ``weight_orig`` (the raw weight, what the
optimizer updates and what to initialise), buffers ``weight_u`` and ``weight_v`` (float32 for
fp32/bf16/fp16 weights, float64 for float64 weights; ``module.half()`` keeps them float32).
``load_state_dict`` also accepts torch's parametrization keys (``parametrizations.weight.
original``, ``parametrizations.weight.0._u``, ``._v``) and BigGAN-PyTorch's (``weight``, ``u0``,
``sv0``); fastinv/nn/spectral_norm_state.py writes those layouts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastinv.ops.spectral_norm import acc_dtype, spectral_norm_


class _Spec(NamedTuple):
    n_power_iterations: int
    eps: float
    dim: int


def _as_matrix_input(weight: torch.Tensor, dim: int) -> torch.Tensor:
    # The op views its input as (shape[0], -1): bring `dim` to the front as torch does.
    return weight if dim == 0 else weight.movedim(dim, 0)


def _from_matrix_output(out: torch.Tensor, dim: int) -> torch.Tensor:
    # the op hands W/σ back laid out like its input (a channels_last weight's W/σ included)
    return out if dim == 0 else out.movedim(0, dim)


def convert_keys_for_loading(state_dict: dict, prefix: str, name: str, dim: int, eps: float) -> None:
    """Rewrite, in place, torch-parametrization or BigGAN keys of one layer to fastinv's."""
    ours = prefix + name + "_orig"
    if ours in state_dict:
        return
    torch_keys = (
        f"{prefix}parametrizations.{name}.original",
        f"{prefix}parametrizations.{name}.0._u",
        f"{prefix}parametrizations.{name}.0._v",
    )
    if torch_keys[0] in state_dict:
        for old, new in zip(torch_keys, ("_orig", "_u", "_v")):
            if old in state_dict:
                state_dict[prefix + name + new] = state_dict.pop(old)
        return
    if prefix + name in state_dict and prefix + "u0" in state_dict:
        weight = state_dict.pop(prefix + name)
        u = state_dict.pop(prefix + "u0").reshape(-1)
        state_dict.pop(prefix + "sv0", None)
        mat = _as_matrix_input(weight, dim)
        mat = mat.reshape(mat.shape[0], -1).to(torch.float64)
        u = F.normalize(u.to(torch.float64), dim=0, eps=eps)
        v = F.normalize(torch.mv(mat.t(), u), dim=0, eps=eps)
        state_dict[ours] = weight
        state_dict[prefix + name + "_u"] = u
        state_dict[prefix + name + "_v"] = v


class SpectralNormMixin:
    """What every fastinv spectral-normed module has (mixed in front of its torch class)."""

    _sn_specs: dict[str, _Spec]
    _sn_group_cache: dict[str, torch.Tensor]

    def _sn_weight(self, name: str) -> torch.Tensor:
        params = self._parameters
        if name in params:  # before conversion (the torch class's __init__ initialising it)
            return params[name]
        w = self._sn_group_cache.get(name)
        if w is not None:  # computed by the SpectralNormGroup for this forward
            return w
        spec = self._sn_specs[name]
        (out,) = spectral_norm_(
            [_as_matrix_input(params[name + "_orig"], spec.dim)],
            [self._buffers[name + "_u"]],
            [self._buffers[name + "_v"]],
            spec.n_power_iterations,
            spec.eps,
            self.training,
        )
        return _from_matrix_output(out, spec.dim)

    @property
    def spectral_norm_names(self) -> tuple[str, ...]:
        """Names of the spectral-normed parameters (``("weight",)`` for the SN layers)."""
        return tuple(self._sn_specs)

    def spectral_norm_state(self, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W, u, v)`` of parameter ``name``: the raw weight as the (rows, cols) matrix the
        power iteration sees, and its singular-vector estimates (updated in place)."""
        spec = self._sn_specs[name]
        w = _as_matrix_input(self._parameters[name + "_orig"], spec.dim)
        return w.reshape(w.shape[0], -1), self._buffers[name + "_u"], self._buffers[name + "_v"]

    @torch.no_grad()
    def reset_power_iteration(self, iterations: int = 15) -> None:
        """Run ``iterations`` power iterations on every (u, v) from the current weights, as
        conversion does: after the weights are re-initialised (BigGAN's orthogonal init), stale
        (u, v) make σ = uᵀWv far too small and an eval-mode forward (no iteration) blow up.
        Plain matrix-vector products, not the op's kernel: initial states stay bit for bit
        what models built before this method got (same seed, same pictures)."""
        for name, spec in self._sn_specs.items():
            w, u, v = self.spectral_norm_state(name)
            w = w.detach().to(u.dtype)
            for _ in range(iterations):
                v.copy_(F.normalize(w.T @ u, dim=0, eps=spec.eps))
                u.copy_(F.normalize(w @ v, dim=0, eps=spec.eps))

    def _apply(self, fn, recurse=True):
        # nn.Module.half()/.to(dtype) would round u, v to the weight's dtype: keep them in the
        # accumulation dtype (converted from their values before the call, not after).
        saved = {k: self._buffers[k] for n in self._sn_specs for k in (n + "_u", n + "_v")}
        result = super()._apply(fn, recurse)
        for name in self._sn_specs:
            acc = acc_dtype(self._parameters[name + "_orig"].dtype)
            for key in (name + "_u", name + "_v"):
                new = self._buffers[key]
                if new is not None and new.dtype != acc:
                    self._buffers[key] = saved[key].to(device=new.device, dtype=acc)
        return result

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, spec in self._sn_specs.items():
            convert_keys_for_loading(state_dict, prefix, name, spec.dim, spec.eps)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        sn = ", ".join(
            f"spectral_norm({n}, n_power_iterations={s.n_power_iterations}, dim={s.dim})"
            for n, s in self._sn_specs.items()
        )
        return f"{base}, {sn}" if base else sn


def _property(name: str) -> property:
    def get(self):
        return self._sn_weight(name)

    return property(get, doc=f"``{name}_orig / σ`` (power iteration first in training mode)")


_CLASSES: dict[tuple[type, str], type] = {}


def _sn_class(cls: type, name: str) -> type:
    key = (cls, name)
    if key not in _CLASSES:
        bases = (cls,) if issubclass(cls, SpectralNormMixin) else (SpectralNormMixin, cls)
        _CLASSES[key] = type(f"SN{cls.__name__}", bases, {name: _property(name)})
    return _CLASSES[key]


@torch.no_grad()
def _convert(module: nn.Module, name: str, n_power_iterations: int, eps: float, dim: int) -> None:
    """Move parameter ``name`` to ``name_orig``, add the u, v buffers, start them with 15
    power iterations (as torch does)."""
    if n_power_iterations <= 0:
        raise ValueError(f"spectral_norm: n_power_iterations must be positive, got {n_power_iterations}")
    weight = module._parameters.get(name)
    if weight is None:
        raise ValueError(
            f"spectral_norm: {type(module).__name__} has no parameter {name!r}; pass the name of "
            "a parameter with at least 2 dims"
        )
    if weight.dim() < 2:
        raise ValueError(f"spectral_norm: parameter {name!r} has shape {tuple(weight.shape)}; it needs >= 2 dims")
    if not -weight.dim() <= dim < weight.dim():
        raise IndexError(f"spectral_norm: dim={dim} is out of range for a {weight.dim()}-d weight")
    dim = dim % weight.dim()
    mat = _as_matrix_input(weight, dim)
    rows, cols = mat.shape[0], mat.numel() // mat.shape[0]
    acc = acc_dtype(weight.dtype)
    u = F.normalize(torch.randn(rows, device=weight.device, dtype=acc), dim=0, eps=eps)
    v = F.normalize(torch.randn(cols, device=weight.device, dtype=acc), dim=0, eps=eps)
    del module._parameters[name]
    module.register_parameter(name + "_orig", weight)
    module.register_buffer(name + "_u", u)
    module.register_buffer(name + "_v", v)
    if "_sn_specs" not in module.__dict__:
        module._sn_specs = {}
        module._sn_group_cache = {}
    module._sn_specs[name] = _Spec(n_power_iterations, eps, dim)
    spectral_norm_([mat], [u], [v], 15, eps, training=True)


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> nn.Module:
    """Spectral-normalise ``module.<name>`` in place with the fused op and return the module.

    Like ``torch.nn.utils.parametrizations.spectral_norm``: ``dim`` defaults to 1 for
    ConvTranspose and 0 otherwise. The module's class becomes a subclass ``SN<Class>`` whose
    ``<name>`` is a property, so its own forward is unchanged (save it with ``state_dict``:
    pickling the whole module needs the class to be importable, as with torch's parametrize).
    """
    if isinstance(module, SpectralNormMixin) and name in module._sn_specs:
        raise RuntimeError(f"spectral_norm: {name!r} of {type(module).__name__} is already spectral-normed")
    if dim is None:
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    weight = module._parameters.get(name)
    if weight is None:  # check before changing the class
        raise ValueError(
            f"spectral_norm: {type(module).__name__} has no parameter {name!r}; pass the name of "
            "a parameter with at least 2 dims"
        )
    old_class = module.__class__
    module.__class__ = _sn_class(old_class, name)
    try:
        _convert(module, name, n_power_iterations, eps, dim)
    except Exception:
        module.__class__ = old_class
        raise
    return module


def is_spectral_norm(module: nn.Module) -> bool:
    return isinstance(module, SpectralNormMixin) and bool(getattr(module, "_sn_specs", None))


# A CPU linear of at most this many multiply-adds runs in float32 under bf16 / fp16 autocast.
# oneDNN's reduced-precision GEMM has a fixed cost that dwarfs these products: on the 2-core
# Xeon (AMX) of RESULTS.md a 24x80 @ 80x32 forward + backward took 175-346 µs under bf16 autocast
# against 60-96 µs in float32; the two were even at 64x128 @ 128x512 (4.2M), and bf16 won from
# 64x256 @ 256x1024 up. BigGAN's per-layer CBN projections, its first linear and D's class
# embedding are all of the small kind at the demo's sizes (issue 11, round 15).
SMALL_CPU_LINEAR_MACS = 1 << 21


def _float32_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` is a small CPU GEMM that autocast would run in low precision."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    if torch.get_autocast_dtype("cpu") == torch.float32:
        return False
    return x.numel() * weight.shape[0] <= SMALL_CPU_LINEAR_MACS


class SNLinear(SpectralNormMixin, nn.Linear):
    """``nn.Linear`` with a spectral-normed weight (dim 0).

    Under CPU autocast a small product (``SMALL_CPU_LINEAR_MACS``) runs in float32 and
    returns float32: faster there, and at least as precise."""

    weight = _property("weight")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        _convert(self, "weight", n_power_iterations, eps, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.dtype == torch.float32 and _float32_on_cpu(x, weight):
            with torch.autocast("cpu", enabled=False):
                return F.linear(x.float(), weight, self.bias)
        return F.linear(x, weight, self.bias)


class SNConv2d(SpectralNormMixin, nn.Conv2d):
    """``nn.Conv2d`` with a spectral-normed weight (dim 0: out channels)."""

    weight = _property("weight")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, n_power_iterations: int = 1,
                 eps: float = 1e-12) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        _convert(self, "weight", n_power_iterations, eps, 0)


class SNEmbedding(SpectralNormMixin, nn.Embedding):
    """``nn.Embedding`` with a spectral-normed table (dim 0, as torch and BigGAN do)."""

    weight = _property("weight")

    def __init__(self, num_embeddings: int, embedding_dim: int, *args,
                 n_power_iterations: int = 1, eps: float = 1e-12, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        _convert(self, "weight", n_power_iterations, eps, 0)


class SpectralNormGroup:
    """Refresh every fastinv spectral-normed weight of ``model`` in one op call per forward.

    A forward pre-hook on ``model`` runs the op for all of them (one call per (device, dtype,
    train/eval, n_power_iterations, eps) bucket: one for a usual model) and hands each layer
    its ``W/σ``; a forward hook drops them after the forward (layers called outside the
    model's forward compute their own). Autograd flows to every ``*_orig`` through the op's
    backward, once for all weights. ``refresh()`` computes them now: the next forward of the
    model uses those instead of refreshing again (so ``group.refresh(); y = G.shared(c);
    G(z, y)`` does one power iteration for both). Each forward in training does one power
    iteration per weight, as torch's parametrization does when each layer runs once.

    With DDP, make the group on the model and then wrap it (``SpectralNormGroup(model);
    DDP(model)``): DDP broadcasts the buffers (u, v among them) from rank 0 before the forward,
    then the group's power iteration runs the same deterministic kernel on the same weights on
    every rank, so u, v stay identical. ``torch.compile(model)`` traces the hooks and the op.
    """

    def __init__(self, model: nn.Module) -> None:
        self.entries: list[tuple[nn.Module, str]] = [
            (m, name) for m in model.modules() if is_spectral_norm(m) for name in m._sn_specs
        ]
        self._explicit = False
        self._handles = [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    def __len__(self) -> int:
        return len(self.entries)

    def _compute(self) -> None:
        buckets: dict[tuple, list[tuple[nn.Module, str]]] = {}
        for m, name in self.entries:
            spec = m._sn_specs[name]
            w = m._parameters[name + "_orig"]
            key = (w.device, w.dtype, m.training, spec.n_power_iterations, spec.eps)
            buckets.setdefault(key, []).append((m, name))
        for (_, _, training, n, eps), items in buckets.items():
            outs = spectral_norm_(
                [_as_matrix_input(m._parameters[nm + "_orig"], m._sn_specs[nm].dim) for m, nm in items],
                [m._buffers[nm + "_u"] for m, nm in items],
                [m._buffers[nm + "_v"] for m, nm in items],
                n,
                eps,
                training,
            )
            for (m, nm), out in zip(items, outs):
                m._sn_group_cache[nm] = _from_matrix_output(out, m._sn_specs[nm].dim)

    def refresh(self) -> None:
        """Compute every ``W/σ`` now (power iteration in training); the next forward of the
        model uses them."""
        self._compute()
        self._explicit = True

    def clear(self) -> None:
        """Drop the computed weights: layers compute their own until the next refresh."""
        for m, _ in self.entries:
            m._sn_group_cache.clear()

    def _before_forward(self, module, args):
        if self._explicit:
            self._explicit = False
        else:
            self._compute()

    def _after_forward(self, module, args, output):
        self.clear()

    def remove(self) -> None:
        """Detach the group from the model (its layers go back to working on their own)."""
        for h in self._handles:
            h.remove()
        self.clear()
