"""The training engines behind one small interface (``Backend``): DeepSpeed, or Hugging Face Accelerate.

The loop talks only to ``Backend``; ``build_backend`` makes the one a run asked for (``choose_backend``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.nn as nn

from cifar10ds.engines.accelerate_engine import AccelerateBackend
from cifar10ds.engines.base import Backend, LossScaleFloor
from cifar10ds.engines.checks import deepspeed_schema_problems
from cifar10ds.engines.deepspeed_engine import DeepSpeedBackend
from cifar10ds.errors import ConfigError
from cifar10ds.schedules import check_params

__all__ = ["AccelerateBackend", "Backend", "DeepSpeedBackend", "LossScaleFloor", "build_backend", "check_config",
           "choose_backend"]

BACKENDS = ("auto", "deepspeed", "accelerate")


def launched_by_accelerate() -> bool:
    return any(k in os.environ for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND"))


def choose_backend(requested: str) -> str:
    """``auto``: Accelerate when launched by ``accelerate launch`` or when DeepSpeed is missing."""
    installed = {name: importlib.util.find_spec(name) is not None for name in ("deepspeed", "accelerate")}
    if requested == "auto":
        requested = "accelerate" if launched_by_accelerate() or not installed["deepspeed"] else "deepspeed"
    if not installed[requested]:
        other = "accelerate" if requested == "deepspeed" else "deepspeed"
        raise ConfigError(f"the {requested} backend needs the {requested} package: pip install {requested}, "
                          f"or use --backend {other}")
    return requested


def check_config(name: str, ds_config: dict[str, Any], path: str) -> None:
    """Every key of ``path`` that the engine ``name`` would refuse, before any work: one line each, with what to do.
    The Accelerate backend ignores DeepSpeed's sections (it warns, once built)."""
    if name != "deepspeed":
        return
    refused, deprecated = deepspeed_schema_problems(ds_config)
    if refused:
        raise ConfigError(*(f"{path}: {line}" for line in refused + deprecated))


def build_backend(name: str, model: nn.Module, ds_config: dict[str, Any], warn: Any = print,
                  groups: list[dict[str, Any]] | None = None, channels_last: bool = False,
                  track_norm: bool = True) -> Backend:
    """The engine for ``name``, its model in channels_last memory format when asked. ``track_norm``: measure the
    global gradient norm at every optimizer step even where nothing needs it to clip (the doctor reads it).

    DeepSpeed gets the model as built (its start-up broadcast needs contiguous weights) and the module is
    converted after; Accelerate's DistributedDataParallel gets it converted, so its gradient buckets follow
    the weights' layout from the start.
    """
    check_params(ds_config.get("scheduler"))
    if name == "deepspeed":
        backend: Backend = DeepSpeedBackend(model, ds_config, groups, track_norm)
        if channels_last:
            backend.module.to(memory_format=torch.channels_last)
        return backend
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return AccelerateBackend(model, ds_config, warn, groups, track_norm)
