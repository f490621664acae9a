"""DeePSiM-style feedforward decoder (Dosovitskiy & Brox, NeurIPS 2016), a baseline inverter.

logits -> three fully connected layers -> up-convolutions (transposed 4x4, stride 2,
LeakyReLU 0.3) -> image in [-1, 1]. It is deterministic: it takes no noise, so for the
analyses it offers the inverter's interface with ``noise_dim = 0`` (``G(logits, noise)`` with an
empty noise tensor). ``DeepSimDiscriminator`` judges an image together with the logits it should
match, as in the paper's conditional discriminator. Training: ``fastinv.invert.deepsim_train``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _act() -> nn.Module:
    return nn.LeakyReLU(0.3)


class DeepSimDecoder(nn.Module):
    def __init__(self, num_classes: int, resolution: int = 32, width: int = 64):
        super().__init__()
        n_up = int(math.log2(resolution)) - 2
        if resolution < 8 or 2 ** (n_up + 2) != resolution:
            raise ValueError(f"DeepSimDecoder needs a power-of-two resolution >= 8, got {resolution}")
        self.num_classes, self.resolution, self.width = num_classes, resolution, width
        self.noise_dim = 0
        top = width * 2 ** min(n_up, 2)
        self.fc = nn.Sequential(
            nn.Linear(num_classes, 512), _act(),
            nn.Linear(512, 512), _act(),
            nn.Linear(512, top * 16), _act(),
        )
        layers, ch = [], top
        for i in range(n_up):
            out = max(width, top // 2 ** (i + 1))
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1), _act(), nn.Conv2d(out, out, 3, 1, 1), _act()]
            ch = out
        layers += [nn.Conv2d(ch, 3, 3, 1, 1), nn.Tanh()]
        self.up = nn.Sequential(*layers)
        self._top = top
        # Each logit in units of its training-set spread (``set_statistics``; identity until
        # then). A confident classifier's raw logits have norm ~30: fed raw, the fully connected
        # stack learns little in a few hundred steps and the decoder draws the data's mean.
        self.register_buffer("logit_shift", torch.zeros(num_classes))
        self.register_buffer("logit_scale", torch.ones(num_classes))

    @torch.no_grad()
    def set_statistics(self, logits: torch.Tensor) -> None:
        """Standardise inputs with the per-logit mean and std of ``logits`` (N, num_classes)."""
        z = logits.float()
        self.logit_shift.copy_(z.mean(0))
        self.logit_scale.copy_(z.std(0).clamp_min(1e-6))

    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.empty(batch, 0)

    def standardise(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits in units of the training-set spread (what the FC stack sees)."""
        return (logits.float() - self.logit_shift) / self.logit_scale

    def forward(self, logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(self.standardise(logits)).view(-1, self._top, 4, 4)
        return self.up(h)


class DeepSimDiscriminator(nn.Module):
    """D(x, z): image features from strided convolutions, joined with the logits z."""

    def __init__(self, num_classes: int, resolution: int = 32, width: int = 32):
        super().__init__()
        layers, ch, out, size = [], 3, width, resolution
        while size > 4:
            layers += [nn.Conv2d(ch, out, 4, 2, 1), _act()]
            ch, out, size = out, min(2 * out, 8 * width), size // 2
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.cond = nn.Sequential(nn.Linear(num_classes, 256), _act())
        self.head = nn.Sequential(nn.Linear(ch + 256, 256), _act(), nn.Dropout(0.2), nn.Linear(256, 1))

    def forward(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.conv(images), self.cond(logits.float())], dim=1)
        return self.head(h).squeeze(1)
