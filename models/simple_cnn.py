"""The speedrun log's first baseline: a plain CNN with no normalization layers, and its run 8's BatchNorm variant."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from models.layers import BatchNorm2d


class SimpleCNN(nn.Module):
    """conv 3->32 + ReLU + pool, conv 32->64 + ReLU + pool, fc 4096->512, fc 512->10 (PyTorch init); with
    ``batchnorm``, BatchNorm after each conv (conv -> BN -> ReLU -> pool, the log's run 8)."""

    def __init__(self, num_classes: int = 10, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.bn1, self.bn2 = (BatchNorm2d(32), BatchNorm2d(64)) if batchnorm else (nn.Identity(), nn.Identity())
        self.fc1 = nn.Linear(64 * 8 * 8, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@register_model
def simple_cnn(num_classes: int = 10) -> nn.Module:
    return SimpleCNN(num_classes)


@register_model
def simple_cnn_bn(num_classes: int = 10) -> nn.Module:
    return SimpleCNN(num_classes, batchnorm=True)
