"""Tiny stand-ins with the interfaces of the real inverter and classifier (test fixtures).

``TinyGenerator`` has the inverter's call signature ``G(logits, noise)`` -> images in [-1, 1]
plus ``noise_dim``, ``resolution`` and ``sample_noise``; ``TinyClassifier`` has the classifier
zoo's ``input_size``, ``mean``, ``std`` and ``num_classes``.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyGenerator(nn.Module):
    def __init__(self, num_classes: int = 4, noise_dim: int = 8, resolution: int = 16):
        super().__init__()
        self.noise_dim, self.resolution = noise_dim, resolution
        self.fc = nn.Linear(num_classes + noise_dim, 8 * 4 * 4)
        self.conv = nn.Conv2d(8, 3, 3, padding=1)

    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, self.noise_dim, generator=generator)

    def forward(self, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([logits, noise], dim=1)).view(-1, 8, 4, 4)
        h = nn.functional.interpolate(h, size=self.resolution, mode="nearest")
        return torch.tanh(self.conv(h))


class TinyClassifier(nn.Module):
    def __init__(self, num_classes: int = 4, input_size: int = 16):
        super().__init__()
        self.input_size, self.num_classes = input_size, num_classes
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny_pair(seed: int = 0, num_classes: int = 4, resolution: int = 16):
    torch.manual_seed(seed)
    G = TinyGenerator(num_classes=num_classes, resolution=resolution).eval()
    C = TinyClassifier(num_classes=num_classes, input_size=resolution).eval()
    for p in C.parameters():
        p.requires_grad_(False)
    return G, C


def one_thread():
    """Generator for a module fixture: run on one intra-op thread, restore afterwards.

    The dev machine's 2 cores are shared by several processes; with 2 OpenMP threads, tiny
    ops spend most of their time in contended barriers (measured 18x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
