"""Learning-rate schedules: one registry of what ``scheduler.type`` may name.

For each schedule it says which parameters the trainer fills where the config says "auto" (and
from what), which parameters it takes, and how the Accelerate backend builds it; DeepSpeed builds
its own from the same config. The Accelerate implementations follow DeepSpeed's
``runtime/lr_schedules.py`` step for step (including its lr of 0 before the first ``step()`` and
at iteration 0 of a linear warmup); ``tests/test_schedules.py`` checks them against DeepSpeed's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cifar10ds.errors import ConfigError


@dataclass(frozen=True)
class RunSteps:
    """What "auto" values are made of: the run's optimizer steps, its warmup, the param groups' lrs."""

    total: int
    warmup: int
    group_lrs: tuple[float, ...]


# How each "auto" parameter is filled. OneCycleLR's total_steps counts the lrs it defines: T + 1 for T
# steps, so that the scheduler's step after the last update lands on its final lr (airbench's schedule
# has the same T + 1 points) instead of extrapolating past it (below zero, on short runs).
STEP_COUNTS: dict[str, Callable[[RunSteps], int]] = {
    "total_num_steps": lambda s: s.total,
    "warmup_num_steps": lambda s: s.warmup,
    "cycle_first_step_size": lambda s: max(1, s.total // 2),
    "total_steps": lambda s: s.total + 1,
}


@dataclass(frozen=True)
class Schedule:
    auto: tuple[str, ...]  # step counts filled where "auto" (see STEP_COUNTS)
    accelerate: str | None  # the Accelerate backend's implementation: "deepspeed_style", "torch", or none
    params: tuple[str, ...] = ()  # what the deepspeed_style implementation takes (DeepSpeed's own names)


_WARMUP = ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type")
SCHEDULES: dict[str, Schedule] = {
    "WarmupLR": Schedule(("warmup_num_steps",), "deepspeed_style", _WARMUP),
    "WarmupDecayLR": Schedule(("total_num_steps", "warmup_num_steps"), "deepspeed_style", ("total_num_steps", *_WARMUP)),
    "WarmupCosineLR": Schedule(("total_num_steps", "warmup_num_steps"), "deepspeed_style",
                               ("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type")),
    "OneCycle": Schedule(("cycle_first_step_size",), None),
    "LRRangeTest": Schedule((), None),
    # torch's own class, which DeepSpeed also builds by name: with anneal_strategy "linear" it is the speedrun
    # schedule, a linear warmup from max_lr/div_factor and a linear decay to max_lr/div_factor/final_div_factor.
    # An "auto" max_lr becomes each param group's own lr.
    "OneCycleLR": Schedule(("total_steps",), "torch"),
}


def fill_auto(kind: str, params: dict[str, Any], steps: RunSteps) -> None:
    """Fill ``params``' "auto" values in place; refuse an explicit step count that is not a positive integer."""
    if kind == "OneCycleLR":
        explicit = params.get("total_steps", "auto")
        if explicit not in ("auto", None) and (not isinstance(explicit, int) or explicit < steps.total + 1):
            raise ConfigError(f"scheduler.params.total_steps={explicit!r}: OneCycleLR stops the run with an error "
                              f"after that many steps, and this run takes {steps.total} (+1 for its final lr); set it "
                              f'to "auto" or at least {steps.total + 1}')
        if params.get("max_lr", "auto") == "auto":
            lrs = list(steps.group_lrs)
            params["max_lr"] = lrs[0] if len(lrs) == 1 else lrs
    for key in SCHEDULES[kind].auto:
        if params.get(key, "auto") == "auto":
            params[key] = STEP_COUNTS[key](steps)
        elif not (isinstance(params[key], int) and not isinstance(params[key], bool) and params[key] > 0):
            raise ConfigError(f'scheduler.params.{key} must be a positive integer or "auto" (got {params[key]!r})')


def _reference_class(kind: str) -> Any | None:
    """The class that will build ``kind``: torch's, or DeepSpeed's (None where DeepSpeed is not installed)."""
    if SCHEDULES[kind].accelerate == "torch":
        return getattr(torch.optim.lr_scheduler, kind)
    try:
        from deepspeed.runtime import lr_schedules
    except ImportError:  # the Accelerate backend without DeepSpeed: its own classes check what they read
        return None
    return getattr(lr_schedules, kind)


def check_params(sched: dict[str, Any] | None) -> None:
    """What the scheduler's constructor would only find out inside the engine's start-up (a traceback): an unknown
    or missing parameter, or something else where it takes a number. Both backends take DeepSpeed's names."""
    if not sched:
        return
    kind, params = sched["type"], sched.get("params", {})
    cls = _reference_class(kind)
    if cls is None:
        return
    own = {n: p for n, p in inspect.signature(cls).parameters.items()
           if n not in ("optimizer", "last_batch_iteration", "last_epoch", "verbose")}
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise ConfigError(f"scheduler.params.{unknown[0]}: not a parameter of {kind}; it takes {', '.join(own)}")
    missing = [n for n, p in own.items() if p.default is inspect.Parameter.empty and n not in params]
    if missing:
        raise ConfigError(f"scheduler.params.{missing[0]}: {kind} needs it (a number)")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for name, value in params.items():
        default, annotation = own[name].default, str(own[name].annotation)
        takes_number = number(default) or annotation.startswith(("float", "int", "<class 'float'>", "<class 'int'>"))
        ok = number(value) or (isinstance(value, list) and all(map(number, value))) or (value is None and default is None)
        if takes_number and not ok:
            raise ConfigError(f"scheduler.params.{name} must be a number (got {value!r})")


def build_schedule(optimizer: torch.optim.Optimizer, kind: str, params: dict[str, Any]) -> Any:
    """The Accelerate backend's scheduler for ``scheduler.type``: what DeepSpeed's engine would build."""
    how = SCHEDULES[kind].accelerate
    if how == "torch":
        try:
            return getattr(torch.optim.lr_scheduler, kind)(optimizer, **params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"scheduler.params for {kind}: {e}") from None
    return DeepSpeedStyleSchedule(optimizer, kind, params)


class DeepSpeedStyleSchedule:
    """Sets the optimizer's lr for iteration ``last_batch_iteration`` (-1 before the first step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, params: dict[str, Any]) -> None:
        if SCHEDULES[kind].accelerate is None:
            supported = [name for name, s in SCHEDULES.items() if s.accelerate]
            raise ConfigError(
                f"scheduler.type={kind} is not available with the accelerate backend (supported: "
                f"{', '.join(supported)}); use --backend deepspeed or another scheduler"
            )
        allowed = set(SCHEDULES[kind].params)
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
