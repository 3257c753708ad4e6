"""The stable BatchNorm CNN of the DeepSpeed write-up, and the plain CNN it grew from."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from models.layers import BatchNorm2d


class BNCNN(nn.Module):
    """conv 3->16 + BN + ReLU + pool, conv 16->32 + BN + ReLU + pool, fc 2048->128, fc 128->10.

    Initialisation follows the write-up's "conservative" fix: Kaiming normal with fan_in for
    every conv and linear weight, and the linear weights scaled by 0.5 on top.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.bn1 = BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.bn2 = BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
                if isinstance(m, nn.Linear):
                    with torch.no_grad():
                        m.weight.mul_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@register_model
def bn_cnn(num_classes: int = 10) -> nn.Module:
    return BNCNN(num_classes)
