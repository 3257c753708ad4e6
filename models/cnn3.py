"""The DeepSpeed write-up's original network and its one-fix-at-a-time variants.

``cnn3`` is the model whose run exploded in the write-up (loss 17, accuracy 10%, gradient norm
inf): conv 3->32, conv 32->64, conv 64->64 (two 2x2 max-pools), fc 4096->512, fc 512->10,
2,159,114 parameters, no normalization, Kaiming-normal weights in fan_out mode. The variants
change one thing each, so the stability demos (configs/unstable_*.json, configs/fixed_*.json)
can show what each fix does on its own:

- ``cnn3_bn``: BatchNorm after every conv (computed in fp32, see models/layers.py);
- ``cnn3_fanin``: the write-up's conservative init (fan_in mode, linear weights x 0.5).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from models.layers import BatchNorm2d


class CNN3(nn.Module):
    def __init__(self, num_classes: int = 10, batchnorm: bool = False, conservative_init: bool = False) -> None:
        super().__init__()
        widths = [(3, 32), (32, 64), (64, 64)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, kernel_size=3, padding=1) for i, o in widths)
        self.norms = nn.ModuleList(BatchNorm2d(o) if batchnorm else nn.Identity() for _, o in widths)
        self.fc1 = nn.Linear(64 * 8 * 8, 512)
        self.fc2 = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in" if conservative_init else "fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
                if conservative_init and isinstance(m, nn.Linear):
                    with torch.no_grad():
                        m.weight.mul_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if i < 2:  # 32 -> 16 -> 8
                x = F.max_pool2d(x, 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@register_model
def cnn3(num_classes: int = 10) -> nn.Module:
    return CNN3(num_classes)


@register_model
def cnn3_bn(num_classes: int = 10) -> nn.Module:
    return CNN3(num_classes, batchnorm=True)


@register_model
def cnn3_fanin(num_classes: int = 10) -> nn.Module:
    return CNN3(num_classes, conservative_init=True)
