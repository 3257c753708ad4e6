"""Residual networks: the DAWNBench ResNet-9 and the CIFAR ResNet-18.

Naming note: the speedrun log calls its 11,173,962-parameter network "ResNet-9"; it is the
CIFAR ResNet-18 (four stages of two basic blocks), registered here as ``resnet18``.
``resnet9`` is the DAWNBench network (prep, three stages, two residual blocks).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from models.layers import BatchNorm2d, conv_bn


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """prep 64; 128 + pool + residual(128, 128); 256 + pool; 512 + pool + residual(512, 512);
    global max pool; fc 512->10 with the logits scaled by 0.125 (as in the DAWNBench entry)."""

    def __init__(self, num_classes: int = 10, logit_scale: float = 0.125) -> None:
        super().__init__()
        self.net = nn.Sequential(
            conv_bn(3, 64),
            conv_bn(64, 128),
            nn.MaxPool2d(2),
            Residual(nn.Sequential(conv_bn(128, 128), conv_bn(128, 128))),
            conv_bn(128, 256),
            nn.MaxPool2d(2),
            conv_bn(256, 512),
            nn.MaxPool2d(2),
            Residual(nn.Sequential(conv_bn(512, 512), conv_bn(512, 512))),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(512, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x)) * self.logit_scale


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """3x3 stem 64 (no max pool), stages 64/128/256/512 of two basic blocks, avg pool, fc."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), BatchNorm2d(64), nn.ReLU())
        blocks: list[nn.Module] = []
        c_in = 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model
def resnet9(num_classes: int = 10) -> nn.Module:
    return ResNet9(num_classes)


@register_model
def resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet18(num_classes)
