"""Exponential moving average of the generator's weights (BigGAN's G_ema).

Before ``start`` the average is a copy of G (decay 0), then ``ema = d * ema + (1 - d) * G``
for parameters; buffers (batch norm running statistics, spectral norm u/v) are copied from G.
``standing_statistics`` then gives the average batch-norm statistics of its own weights before
it is saved (BigGAN's "standing statistics").
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


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    """The modules that keep batch-norm running statistics (nn.BatchNorm*, fastinv's
    conditional and sync batch norms)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor)]


@torch.no_grad()
def standing_statistics(G: nn.Module, cond: torch.Tensor, batch_size: int,
                        generator: torch.Generator) -> int:
    """Recompute the batch norms' running statistics of ``G`` in place: the cumulative average
    of their batch statistics over ``cond`` in chunks of ``batch_size``, each with fresh noise
    from ``generator`` (BigGAN's "standing statistics", Brock et al. 2019). Only the batch
    norms run in training mode: parameters and spectral-norm vectors are untouched, and G
    ends in eval mode. Returns the number of batches (0, statistics untouched, if ``cond`` is
    empty).

    Why: the EMA's weights average the last ~1 / (1 - decay) steps of G, but the statistics
    it carries are the live G's (``EMA.update`` copies them; momentum 0.1 averages ~10 steps),
    measured on another network's activations. On 24 finished demo runs (benchmarks/
    RESULTS.md, Demo round 28) the standing statistics raised the judge agreement of the
    saved EMA G."""
    norms = _batch_norms(G)
    if not norms or len(cond) == 0:
        return 0
    G.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative: every batch counts the same
        m.training = True  # the norm alone: its children (spectral-norm linears) stay in eval
    try:
        chunks = cond.split(batch_size)
        for chunk in chunks:
            noise = G.sample_noise(len(chunk), generator=generator)
            G(chunk, noise.to(chunk.device, chunk.dtype))
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        G.eval()
    return len(chunks)
