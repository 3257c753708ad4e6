"""Model registry: ``@register_model`` adds a constructor, ``create_model(name)`` builds one.

Every constructor takes ``num_classes`` and returns an ``nn.Module`` mapping a float batch
``(N, 3, 32, 32)`` to logits ``(N, num_classes)``. Importing this package registers the
built-in families (one file each).

A model may define these optional hooks; the trainer reads them through ``hook(model, name)``:

- ``init_from_data(images)``: set weights from normalized training images (N, 3, H, W) of this run,
  before the engine is built (airbench94's whitening filters);
- ``freeze_after_epochs``: a dict, parameter name -> the number of epochs it trains for; after that it
  stays exactly as it is (airbench94's whitening bias). The parameter keeps its gradient (DDP, ZeRO and
  torch.compile see the same graph every step); its own parameter group's lr is held at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name; the name is what configs use (``trainer.model``)."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes)


HOOKS = ("init_from_data", "freeze_after_epochs")


def hook(model: nn.Module, name: str) -> Any:
    """The model's optional hook ``name`` (one of ``HOOKS``), or None where it has none."""
    if name not in HOOKS:
        raise ValueError(f"unknown model hook {name!r}; hooks: {', '.join(HOOKS)}")
    return getattr(model, name, None)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def has_normalization(model: nn.Module) -> bool:
    """BatchNorm, GroupNorm, LayerNorm or InstanceNorm anywhere in the model."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    return any(isinstance(m, kinds) for m in model.modules())


# Registration happens on import; keep these last.
from models import airbench, bn_cnn, cnn3, resnet, simple_cnn  # noqa: E402,F401
