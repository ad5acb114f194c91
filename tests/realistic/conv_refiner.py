"""A recurrent convolutional refiner: one ``nn.Conv2d`` and one conv + BatchNorm block, each
applied at every refinement step (weights shared across steps). Own code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv2(F.relu(self.bn(self.conv1(h))))


class ConvRefiner(nn.Module):
    def __init__(self, channels: int = 8, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.step = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = ConvBlock(channels)
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, image: Tensor) -> Tensor:
        h = F.relu(self.stem(image))
        for _ in range(self.steps):
            h = h + torch.tanh(self.step(h))
            h = h + self.block(h)
        return self.out(h)


def make_refiner(seed: int = 0, **kw) -> ConvRefiner:
    torch.manual_seed(seed)
    return ConvRefiner(**kw).train()


def make_images(batch: int = 2, size: int = 8, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
