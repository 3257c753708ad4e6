"""Layers shared by the model families."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalizes in fp32, whatever the dtype of its input and weights.

    With fp32 parameters (fp32 training, ``torch_autocast``, Accelerate's mixed precision) torch's own
    kernels already take a bf16/fp16 input and normalize it in fp32, on CPU and GPU alike, without a
    copy: that is stock BatchNorm. Under DeepSpeed bf16/fp16 the engine casts the parameters to half
    precision but keeps the buffers (running statistics) in fp32; stock BatchNorm then fails on CPU
    ("expected scalar type BFloat16 but found Float"), so the input and parameters are cast to fp32 and
    the output back, as the fast CIFAR trainers keep BatchNorm in fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.dtype == torch.float32:
            return super().forward(x)
        use_batch_stats = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(
            x.float(),
            self.running_mean,
            self.running_var,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            use_batch_stats,
            self.momentum,
            self.eps,
        )
        return y.to(x.dtype)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias: BatchNorm supplies it) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )
