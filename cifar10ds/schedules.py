"""DeepSpeed's learning-rate schedules for engines other than DeepSpeed (the Accelerate backend).

The same config must give the same learning rate at every step whichever backend runs it, and the
Accelerate path must work without DeepSpeed installed. These classes follow DeepSpeed's
``runtime/lr_schedules.py`` step for step (including its lr of 0 before the first ``step()``
and at iteration 0 of a linear warmup); ``tests/test_schedules.py`` checks them against
DeepSpeed's own classes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cifar10ds.errors import ConfigError

SUPPORTED = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
TORCH = ("OneCycleLR",)  # torch's own classes, which DeepSpeed also builds by name


def build_schedule(optimizer: torch.optim.Optimizer, kind: str, params: dict[str, Any]) -> Any:
    """What DeepSpeed's engine builds for ``scheduler.type``: its own classes' formulas, or torch's class."""
    if kind in TORCH:
        try:
            return getattr(torch.optim.lr_scheduler, kind)(optimizer, **params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"scheduler.params for {kind}: {e}") from None
    return DeepSpeedStyleSchedule(optimizer, kind, params)


class DeepSpeedStyleSchedule:
    """Sets the optimizer's lr for iteration ``last_batch_iteration`` (-1 before the first step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, params: dict[str, Any]) -> None:
        if kind not in SUPPORTED:
            raise ConfigError(
                f"scheduler.type={kind} is not available with the accelerate backend (supported: "
                f"{', '.join(SUPPORTED + TORCH)}); use --backend deepspeed or another scheduler"
            )
        allowed = {
            "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"},
            "WarmupDecayLR": {"total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"},
            "WarmupCosineLR": {"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type"},
        }[kind]
        unknown = sorted(set(params) - allowed - {"last_batch_iteration"})
        if unknown:
            raise ConfigError(f"scheduler.params.{unknown[0]} is not a {kind} parameter (allowed: {', '.join(sorted(allowed))})")
        self.optimizer = optimizer
        self.kind = kind
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        warmup = params.get("warmup_num_steps", 1000)
        self.warmup_steps = max(2, warmup)
        self.linear = params.get("warmup_type", "log") == "linear"
        self.inverse_log_warmup = 1.0 / math.log(self.warmup_steps)
        self.total = params.get("total_num_steps")
        if kind == "WarmupCosineLR":
            self.warmup_min_ratio = params.get("warmup_min_ratio", 0.0)
            self.cos_min_ratio = params.get("cos_min_ratio", 0.0001)
        else:
            default_max = None if kind == "WarmupLR" else 0.001
            max_lr = params.get("warmup_max_lr", default_max)
            self.max_lrs = list(self.base_lrs) if max_lr is None else [max_lr] * len(self.base_lrs)
            self.min_lrs = [params.get("warmup_min_lr", 0.0)] * len(self.base_lrs)
        self.last_batch_iteration = -1
        self._apply()

    def _warmup_gamma(self) -> float:
        it = self.last_batch_iteration
        if self.linear:
            return it / self.warmup_steps
        return self.inverse_log_warmup * math.log(it + 1)

    def get_lr(self) -> list[float]:
        it = self.last_batch_iteration
        if self.kind == "WarmupCosineLR":
            if it < 0:
                return [0.0 for _ in self.base_lrs]
            if it < self.warmup_steps:
                ratio = self.warmup_min_ratio + self._warmup_gamma() * (1.0 - self.warmup_min_ratio)
            else:
                real_last = it - self.warmup_steps + 1
                real_total = max(1, self.total - self.warmup_steps)
                progress = min(1.0, real_last / real_total)
                ratio = max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * ((1 + math.cos(math.pi * progress)) / 2))
            return [lr * ratio for lr in self.base_lrs]
        if it < 0:
            return list(self.min_lrs)
        if it < self.warmup_steps:
            gamma = self._warmup_gamma()
        elif self.kind == "WarmupDecayLR":
            gamma = max(0.0, float(self.total - it) / float(max(1.0, self.total - self.warmup_steps)))
        else:
            gamma = 1.0
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs)]

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr

    def step(self) -> None:
        self.last_batch_iteration += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_batch_iteration = state["last_batch_iteration"]
        self._apply()
