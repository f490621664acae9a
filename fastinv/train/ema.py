"""Exponential moving average of the generator's weights (BigGAN's G_ema).

Before ``start`` the average is a copy of G (decay 0), then ``ema = d * ema + (1 - d) * G``
for parameters; buffers (batch norm running statistics, spectral norm u/v) are copied from G.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, ema_model: nn.Module, decay: float, start: int):
        self.model, self.ema_model, self.decay, self.start = model, ema_model, decay, start
        ema_model.load_state_dict(model.state_dict())
        ema_model.eval()
        for p in ema_model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.decay if step >= self.start else 0.0
        src = dict(self.model.named_parameters())
        ema_params = [p for _, p in self.ema_model.named_parameters()]
        live = [src[n] for n, _ in self.ema_model.named_parameters()]
        if decay == 0.0:
            torch._foreach_copy_(ema_params, live)
        else:
            torch._foreach_lerp_(ema_params, live, 1.0 - decay)
        src_b = dict(self.model.named_buffers())
        pairs = [(b, src_b[name]) for name, b in self.ema_model.named_buffers()]
        if pairs:  # one call for all (~70 in the demo's G: u, v, running statistics)
            torch._foreach_copy_(*map(list, zip(*pairs)))
