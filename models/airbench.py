"""An airbench94-style network: a frozen patch-whitening first layer and three conv groups.

The design of Keller Jordan's airbench94 (94% on CIFAR-10 in seconds), rebuilt for this trainer:

- ``whiten``: a 2x2 convolution whose 24 filters are the eigenvectors of the training images' 2x2
  patch covariance, scaled to unit variance, each with its negation. It is computed from data
  (``init_from_data``, which the trainer calls before the engine starts) and never trained; its
  bias trains for the first ``whiten_bias_epochs`` epochs only (``freeze_after_epochs``).
- three groups of conv3x3 -> maxpool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU, widths
  64, 256, 256; every conv starts as an identity on its first input channels (Dirac init), an
  implicit residual connection.
- BatchNorm computes in fp32 whatever the training precision, with a fixed scale of 1 (only its bias
  trains: give the biases their own lr with ``trainer.param_groups``, names ``*.norm1.bias``), eps
  1e-12 and a running-statistics momentum of 0.4.
- max pool 3, a bias-free linear layer, logits times 1/9.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models import register_model
from models.layers import BatchNorm2d


def _norm(channels: int) -> BatchNorm2d:
    bn = BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)  # stays 1: the next conv can scale
    return bn


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding="same", bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])  # identity on the first c_in channels
    return conv


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1, self.norm1 = _conv(c_in, c_out), _norm(c_out)
        self.conv2, self.norm2 = _conv(c_out, c_out), _norm(c_out)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class Airbench(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256), whiten_kernel: int = 2,
                 logit_scale: float = 1 / 9, whiten_bias_epochs: int = 3) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 2 * 3 * whiten_kernel**2, kernel_size=whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        self.freeze_after_epochs = {"whiten.bias": whiten_bias_epochs}
        self.groups = nn.Sequential(ConvGroup(self.whiten.out_channels, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_scale = logit_scale
        self.act = nn.GELU()

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalized training images (N, 3, H, W)."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        order = eigenvalues.argsort(descending=True)
        filters = (eigenvectors[:, order] / torch.sqrt(eigenvalues[order] + eps)).T.reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act(self.whiten(x)))  # 32 -> 31 -> 15 -> 7 -> 3 pixels
        return self.head(torch.nn.functional.max_pool2d(x, 3).flatten(1)) * self.logit_scale


@register_model
def airbench94(num_classes: int = 10) -> nn.Module:
    return Airbench(num_classes)
