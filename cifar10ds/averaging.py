"""Lookahead weight averaging (airbench94's): an average of the weights, copied back into the model.

From ``start_epoch`` on, every ``every_steps`` optimizer steps the average moves towards the current
weights, ``avg = decay_s * avg + (1 - decay_s) * w`` with ``decay_s = decay * (s / T) ** power`` (fast
early, strong at the end), and the model continues from the average (Lookahead). At the end of every
epoch the model holds the average, so evaluations, checkpoints and the final weights are the
averaged ones; the weights it trained to since its last blend are set aside (and saved with a
checkpoint) and training resumes from them at the next epoch's start, so that, as in airbench94,
only the blends every ``every_steps`` steps move the training weights to the average. Floating-point
buffers (BatchNorm statistics) are averaged with the weights.

It changes the weights the optimizer updates, so it needs an engine whose optimizer steps the model's
own fp32 tensors: fp32, or ``torch_autocast`` (DeepSpeed) / mixed precision (Accelerate); not
DeepSpeed's bf16/fp16 optimizers or ZeRO, which keep separate master weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn


class Lookahead:
    def __init__(self, cfg: Any, module: nn.Module, total_steps: int, steps_per_epoch: float) -> None:
        self.cfg = cfg
        self.module = module
        self.total = max(1, total_steps)
        self.start = math.ceil(cfg.start_epoch * steps_per_epoch)
        self.avg: list[torch.Tensor] | None = None
        self.fast: list[torch.Tensor] | None = None  # the training weights while the model holds the average

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in self.module.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def _blend(self, decay: float) -> None:
        assert self.avg is not None
        for avg, w in zip(self.avg, self._tensors()):
            avg.lerp_(w.to(avg.dtype), 1.0 - decay)
            w.copy_(avg)

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based, applied steps and skipped ones alike)."""
        if step < self.start or step % self.cfg.every_steps:
            return
        if self.avg is None:
            self.avg = [t.detach().clone() for t in self._tensors()]
        else:
            self._blend(self.cfg.decay * (step / self.total) ** self.cfg.power)

    def end_epoch(self) -> None:
        """The model takes the average (to be evaluated and saved); its own weights wait for start_epoch()."""
        if self.avg is not None and self.fast is None:
            self.fast = [t.detach().clone() for t in self._tensors()]
            self._blend(1.0)

    @torch.no_grad()
    def start_epoch(self) -> None:
        """Training goes on from the weights the model had before end_epoch()."""
        if self.fast is not None:
            for w, f in zip(self._tensors(), self.fast):
                w.copy_(f)
            self.fast = None

    def state_dict(self) -> dict[str, Any]:
        def host(ts: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if ts is None else [t.detach().cpu() for t in ts]

        return {"avg": host(self.avg), "fast": host(self.fast)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def placed(saved: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if saved is None else [s.to(w.device, w.dtype) for s, w in zip(saved, self._tensors())]

        self.avg, self.fast = placed(state.get("avg")), placed(state.get("fast"))
