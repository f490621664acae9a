"""Gradient penalties for the discriminator.

R1 (Mescheder, Geiger & Nowozin 2018, "Which training methods for GANs actually converge?")
penalises the gradient of D at real images, ``γ/2 · E_x ||∇_x D(x, z)||²``: it pulls D towards
zero slope on the data, which damps the oscillation of D around the real distribution. Use it
when D overfits or the losses oscillate (D(real) drifts far above 1 while D(fake) stays far
below -1, samples change a lot from step to step), typically on small data sets and at high
resolution; it is not needed for every run, and too large a γ blurs the samples (D can no
longer tell fine detail apart). Spectral norm bounds D's Lipschitz constant everywhere;
R1 acts only at the data, so the two do not replace each other.

Lazy regularisation (Karras et al. 2020, StyleGAN2, appendix B): computing the penalty costs a
second D forward and a double backward, so it is applied only every ``every`` D steps, with γ
multiplied by ``every`` so that the penalty's average strength per step is unchanged::

    if step % every == 0:
        (r1_loss(D, x_real, z, gamma, every) / accumulate).backward()

The double backward runs through fastinv's fused spectral-norm op (correct second-order
gradients, tests/test_higher_order_grads.py); the extra forward advances D's power iteration
once more, as any extra D forward does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def r1_penalty(
    D: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_real: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """``0.5 · mean over the batch of ||∇_x D(x, z)||²`` (the squared gradient summed over all
    pixels and channels of each image), a 0-dim float32 tensor (float64 for float64 input)
    with a graph to D's parameters: multiply by γ and backpropagate.

    ``x_real`` is detached (the penalty differentiates D, not the data pipeline); ``z`` (the
    logits D is conditioned on) is held fixed. Run D under autocast if training does: the
    gradients are summed in float32."""
    if x_real.dim() < 2 or x_real.shape[0] == 0:
        raise ValueError(
            f"r1_penalty: x_real must be a non-empty batch (N, ...), got shape {tuple(x_real.shape)}"
        )
    x = x_real.detach().requires_grad_(True)
    out = D(x, z.detach())
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return 0.5 * grad.to(acc).pow(2).flatten(1).sum(1).mean()


def r1_loss(
    D: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_real: torch.Tensor,
    z: torch.Tensor,
    gamma: float,
    every: int = 1,
) -> torch.Tensor:
    """The lazy R1 term to add to D's loss on the steps it is applied: ``gamma · every ·
    r1_penalty(D, x_real, z)`` (StyleGAN2's convention; ``every=1`` is plain R1)."""
    if gamma < 0:
        raise ValueError(f"r1_loss: gamma must be >= 0, got {gamma}; set optim.r1_gamma=0 to turn R1 off")
    if every < 1:
        raise ValueError(f"r1_loss: every must be >= 1 (apply every k-th D step), got {every}")
    return (gamma * every) * r1_penalty(D, x_real, z)


def r1_due(d_step: int, every: int) -> bool:
    """Whether lazy R1 is applied at D step ``d_step`` (0-based): every ``every``-th step."""
    if every < 1:
        raise ValueError(f"r1_due: every must be >= 1, got {every}")
    return d_step % every == 0
