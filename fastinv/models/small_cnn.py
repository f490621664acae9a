"""A plain VGG-style CNN (no residual connections) for the synthetic dataset: the evaluation
*judge*.

An inverter is judged by a classifier that had no part in training or selecting it: another
architecture (this one, against the inverted SmallResNet), another seed, trained only on real
training images. Agreement measured by the inverted classifier itself can be met by patterns
no other network reads as the class (optimisation-based inversion reaches Φ-agreement 1.0 on
images that look like noise); the judge cannot be fooled that way by construction.

Three stages of two 3x3 conv + BN + ReLU (widths w, 2w, 4w), 2x2 max pooling between stages,
global max pooling (the shape is small on a textured background: see small_resnet.py), one
linear layer.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 24, blocks_per_stage: int = 2):
        super().__init__()
        if num_classes < 2 or width < 1 or blocks_per_stage < 1:
            raise ValueError("SmallCNN needs num_classes >= 2, width >= 1, blocks_per_stage >= 1")
        self.num_classes, self.width, self.blocks_per_stage = num_classes, width, blocks_per_stage
        layers: list[nn.Module] = []
        ch = 3
        for i, out in enumerate([width, 2 * width, 4 * width]):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(blocks_per_stage):
                layers += _conv_bn_relu(ch, out)
                ch = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(ch, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate feature (N, 4w): the space KID is measured in."""
        return self.features(x).amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))
