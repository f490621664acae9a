"""A small pre-activation-free ResNet for the synthetic dataset (32-64 px inputs).

Three stages of two BasicBlocks (widths w, 2w, 4w; stride 2 between stages), global *max*
pooling, one linear layer. Max, not average: the synthetic images are a small shape on a
textured background, and averaging drowns the few positions that see the shape in background
texture. Measured on 4 synthetic classes at 32 px (2,700 images, Adam 1e-3, 400 steps):
training accuracy 38% with average pooling (chance 25%), 91% with max pooling. ``fastinv classifier train`` trains it standard or PGD-robust.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        # The projection shortcut is a 1x1 convolution of every stride-th pixel, so the input
        # is subsampled first and the convolution runs at stride 1: the same arithmetic (and
        # weights) as a stride-2 1x1 convolution, whose oneDNN AVX2 backward kernel corrupts
        # the heap or hangs for fewer than 8 input channels in channels_last (torch 2.14.1 on
        # a 2-core Zen 3 EPYC; the classifier tests hung there: RESULTS.md Demo round 30).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, 1, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        s = self.conv1.stride[0]  # the block's stride
        return F.relu(h + self.shortcut(x[:, :, ::s, ::s] if s > 1 else x))


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 32, blocks_per_stage: int = 2):
        super().__init__()
        if num_classes < 2 or width < 1 or blocks_per_stage < 1:
            raise ValueError("SmallResNet needs num_classes >= 2, width >= 1, blocks_per_stage >= 1")
        self.num_classes, self.width, self.blocks_per_stage = num_classes, width, blocks_per_stage
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages, ch = [], width
        for i, out in enumerate([width, 2 * width, 4 * width]):
            for j in range(blocks_per_stage):
                stages.append(BasicBlock(ch, out, 2 if (i > 0 and j == 0) else 1))
                ch = out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(ch, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate feature (N, 4w): the space KID is measured in."""
        return self.stages(self.stem(x)).amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))
