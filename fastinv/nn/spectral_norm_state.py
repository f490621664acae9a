"""Checkpoint layouts of spectral-normed weights, converted both ways.

fastinv (and the older ``torch.nn.utils.spectral_norm``), for ``name="weight"``::

    weight_orig, weight_u, weight_v

torch's ``torch.nn.utils.parametrizations.spectral_norm``::

    parametrizations.weight.original, parametrizations.weight.0._u, parametrizations.weight.0._v

BigGAN-PyTorch (``layers.SN`` with ``num_svs=1``): the raw weight under its own name, u as a
(1, rows) row vector, and the last σ; it keeps no v::

    weight, u0, sv0

Loading: a fastinv layer's ``load_state_dict`` accepts all three
(``fastinv.nn.spectral_norm.convert_keys_for_loading`` rewrites the keys as it loads, so the
layers do not depend on this module). For BigGAN, v is rebuilt as ``normalize(Wᵀ u)``, which is what
BigGAN's next power iteration would compute, and ``sv0`` is dropped (σ is recomputed from u, v).
Saving: ``state_dict_as_torch(model)`` / ``state_dict_as_biggan(model)`` return ``model``'s
state dict in those layouts (u, v in the weight's dtype for torch, as torch keeps them).
"""

from __future__ import annotations

import torch
from torch import nn

from fastinv.nn.spectral_norm import _as_matrix_input, is_spectral_norm


def _layers(model: nn.Module):
    for mname, m in model.named_modules():
        if is_spectral_norm(m):
            yield (mname + "." if mname else ""), m


def state_dict_as_torch(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with spectral-normed weights in torch's parametrization layout
    (loads into a model built with ``torch.nn.utils.parametrizations.spectral_norm``)."""
    sd = model.state_dict()
    for p, m in _layers(model):
        for name in m._sn_specs:
            orig = sd.pop(p + name + "_orig")
            sd[f"{p}parametrizations.{name}.original"] = orig
            sd[f"{p}parametrizations.{name}.0._u"] = sd.pop(p + name + "_u").to(orig.dtype)
            sd[f"{p}parametrizations.{name}.0._v"] = sd.pop(p + name + "_v").to(orig.dtype)
    return sd


def state_dict_as_biggan(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with spectral-normed weights in BigGAN-PyTorch's layout
    (``weight``, ``u0`` of shape (1, rows), ``sv0 = uᵀ W v`` of shape (1,))."""
    sd = model.state_dict()
    for p, m in _layers(model):
        for name, spec in m._sn_specs.items():
            if name != "weight":
                raise ValueError(
                    f"state_dict_as_biggan: {p}{name} is spectral-normed but BigGAN's layout "
                    "only has one per layer, named 'weight'"
                )
            orig = sd.pop(p + "weight_orig")
            u, v = sd.pop(p + "weight_u"), sd.pop(p + "weight_v")
            mat = _as_matrix_input(orig, spec.dim)
            mat = mat.reshape(mat.shape[0], -1).to(u.dtype)
            sd[p + "weight"] = orig
            sd[p + "u0"] = u.reshape(1, -1).clone()
            sd[p + "sv0"] = torch.dot(u, torch.mv(mat, v)).reshape(1)
    return sd
