"""Optimization-based inversion: gradient descent on x so that Φ(x) matches the target logits.

The classic alternative to a feedforward inverter (Mahendran & Vedaldi 2015): per image,
minimise ``‖Φ(x) − z‖² / ‖z‖² + λ_tv·TV(x) + λ_l2·‖x‖²`` over x, from several random starts,
keeping for each image the start that matches the logits best. It needs no training but costs
``steps × restarts`` forward/backward passes per image; ``OptimizationResult.seconds`` records
that cost so the report can set it against one generator forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fastinv.invert.metrics import classifier_logits


@dataclass
class OptimizationConfig:
    steps: int = 200
    lr: float = 0.1
    restarts: int = 3
    tv_weight: float = 0.05
    l2_weight: float = 1e-3
    batch_size: int = 64
    seed: int = 0


@dataclass
class OptimizationResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1], the best restart per image
    logit_distance: torch.Tensor  # (N,) relative squared logit distance of the kept image
    initial_distance: torch.Tensor  # (N,) same, at the random start of the kept restart
    seconds: float  # wall time for all N images, all restarts
    history: list[float] = field(default_factory=list)  # mean distance per step (all restarts)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean anisotropic TV per image, (N,)."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return dh + dw


def relative_logit_distance(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((logits - target) ** 2).sum(dim=1) / (target**2).sum(dim=1).clamp_min(1e-12)


def _optimize_chunk(classifier, target, resolution, cfg, gen, history):
    n = target.shape[0]
    r = cfg.restarts
    z = target.repeat_interleave(r, dim=0)  # (n*r, K): restarts of one image are adjacent
    # x = tanh(w) keeps pixels in [-1, 1] without clipping gradients away.
    w = (0.5 * torch.randn(n * r, 3, resolution, resolution, generator=gen)).to(target.device)
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.lr)
    with torch.no_grad():
        start = relative_logit_distance(classifier_logits(classifier, torch.tanh(w)), z)
    for step in range(cfg.steps):
        x = torch.tanh(w)
        dist = relative_logit_distance(classifier_logits(classifier, x), z)
        loss = dist + cfg.tv_weight * total_variation(x) + cfg.l2_weight * (x**2).mean(dim=(1, 2, 3))
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        if len(history) <= step:
            history.append(0.0)
        history[step] += dist.detach().sum().item()
    with torch.no_grad():
        x = torch.tanh(w)
        dist = relative_logit_distance(classifier_logits(classifier, x), z).view(n, r)
        best = dist.argmin(dim=1)
        rows = torch.arange(n, device=best.device)
        return x[rows * r + best], dist[rows, best], start.view(n, r)[rows, best]


def optimize_inversion(
    classifier: torch.nn.Module,
    target_logits: torch.Tensor,
    resolution: int,
    cfg: OptimizationConfig | None = None,
) -> OptimizationResult:
    """Invert ``target_logits`` (N, K) into N images of ``resolution`` px by gradient descent."""
    cfg = cfg or OptimizationConfig()
    if cfg.restarts < 1 or cfg.steps < 0:
        raise ValueError(f"need restarts >= 1 and steps >= 0, got {cfg.restarts} and {cfg.steps}")
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    requires = [p.requires_grad for p in classifier.parameters()]
    for p in classifier.parameters():  # gradients flow to x only
        p.requires_grad_(False)
    history: list[float] = []
    images, dists, starts = [], [], []
    t0 = time.perf_counter()
    try:
        for chunk in target_logits.detach().float().split(cfg.batch_size):
            x, d, s = _optimize_chunk(classifier, chunk, resolution, cfg, gen, history)
            images.append(x)
            dists.append(d)
            starts.append(s)
        if target_logits.is_cuda:
            torch.cuda.synchronize()
    finally:
        for p, r in zip(classifier.parameters(), requires):
            p.requires_grad_(r)
    seconds = time.perf_counter() - t0
    total = target_logits.shape[0] * cfg.restarts
    return OptimizationResult(
        images=torch.cat(images),
        logit_distance=torch.cat(dists),
        initial_distance=torch.cat(starts),
        seconds=seconds,
        history=[h / total for h in history],
    )
