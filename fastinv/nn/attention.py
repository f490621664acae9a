"""BigGAN's self-attention block (Zhang et al. 2019, SAGAN; Brock et al. 2019), with
spectral-normed 1x1 convolutions.

    theta = conv(x)            C/8 channels, every position
    phi   = maxpool2(conv(x))  C/8 channels, a quarter of the positions (keys)
    g     = maxpool2(conv(x))  C/2 channels, a quarter of the positions (values)
    out   = x + gamma * conv_o(g @ softmax(theta^T phi)^T)

``gamma`` starts at 0, so a freshly built block is the identity and attention is learned in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastinv.nn.spectral_norm import SNConv2d


def _sn_conv1x1(in_ch: int, out_ch: int, eps: float) -> nn.Module:
    return SNConv2d(in_ch, out_ch, kernel_size=1, padding=0, bias=False, eps=eps)


class SelfAttention(nn.Module):
    """Self-attention over the spatial positions of an ``(N, C, H, W)`` map (H, W even)."""

    def __init__(self, channels: int, sn_eps: float = 1e-6, conv=None):
        """``conv(in_ch, out_ch, eps)`` makes the spectral-normed 1x1 convolutions (default:
        fastinv's SNConv2d)."""
        super().__init__()
        if channels < 8:
            raise ValueError(f"SelfAttention needs at least 8 channels (C/8 keys), got {channels}")
        self.channels = channels
        conv = conv or _sn_conv1x1
        self.theta = conv(channels, channels // 8, sn_eps)
        self.phi = conv(channels, channels // 8, sn_eps)
        self.g = conv(channels, channels // 2, sn_eps)
        self.o = conv(channels // 2, channels, sn_eps)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).flatten(2)  # (n, c/8, hw)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # (n, c/8, hw/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # (n, c/2, hw/4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # (n, hw, hw/4)
        o = torch.bmm(g, beta.transpose(1, 2)).view(n, c // 2, h, w)
        return x + self.gamma * self.o(o)
