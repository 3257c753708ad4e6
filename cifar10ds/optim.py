"""The optimizer's parameter groups, and the torch optimizer a DeepSpeed ``"optimizer"`` block names."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from cifar10ds.errors import ConfigError


def param_groups(model: nn.Module, rules: list[Any], opt_params: dict[str, Any],
                 freeze_after_epochs: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: every trainable parameter once, the first matching rule's group.

    The parameters no rule matches come first, with the optimizer's own lr and weight_decay (so the lr the
    trainer reports is theirs); each rule's group follows with its scaled lr and weight_decay. Frozen
    parameters (requires_grad False when the engine is built) are left out. Each parameter named in
    ``freeze_after_epochs`` (the model's hook) gets a group of its own at the end, with the lr and weight_decay
    it would have had and the key ``freeze_after_epochs``: the engine holds that group's lr at 0 from then on.
    """
    base_lr = float(opt_params.get("lr", 0.001))
    base_wd = float(opt_params.get("weight_decay", 0.0))
    freeze = freeze_after_epochs or {}
    buckets: list[list[nn.Parameter]] = [[] for _ in range(len(rules) + 1)]
    own: list[tuple[int, nn.Parameter, int]] = []  # (bucket, parameter, epochs) of the parameters frozen later
    for name, p in model.named_parameters():
        if p.requires_grad:
            i = next((i for i, r in enumerate(rules) if re.search(r.match, name)), -1)
            if name in freeze:
                own.append((i + 1, p, freeze[name]))
            else:
                buckets[i + 1].append(p)
    scales = [(1.0, 1.0)] + [(r.lr_scale, r.weight_decay_scale) for r in rules]
    groups: list[dict[str, Any]] = [{"params": buckets[0]}] if buckets[0] else []
    for i, (rule, params) in enumerate(zip(rules, buckets[1:])):
        if not params and not any(b == i + 1 for b, _, _ in own):
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            raise ConfigError(f"trainer.param_groups[{i}].match={rule.match!r} matches no trainable parameter (or an "
                              f"earlier rule took them all); this model's names look like {', '.join(names[:4])}, ...")
        if params:
            groups.append({"params": params, "lr": base_lr * rule.lr_scale, "weight_decay": base_wd * rule.weight_decay_scale})
    for bucket, p, epochs in own:
        lr_scale, wd_scale = scales[bucket]
        groups.append({"params": [p], "lr": base_lr * lr_scale, "weight_decay": base_wd * wd_scale,
                       "freeze_after_epochs": epochs})
    return groups


def check_deepspeed_optimizer(opt_cfg: dict[str, Any]) -> None:
    """What DeepSpeed would only find out inside initialize(): an unknown type or a bad parameter."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    kind = opt_cfg["type"]
    if kind.lower() in DEEPSPEED_OPTIMIZERS:
        return  # DeepSpeed's own optimizers check their parameters themselves
    cls = getattr(torch.optim, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optimizer.type={kind!r} is neither a DeepSpeed optimizer ({', '.join(DEEPSPEED_OPTIMIZERS)}) "
                          "nor a torch.optim class (names are case-sensitive: SGD, AdamW, RMSprop)")
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **opt_cfg.get("params", {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer.params for {kind}: {e}") from None


def build_torch_optimizer(params: Any, opt_cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed would build for this config (its "Adam" is AdamW unless adam_w_mode=false)."""
    kind = opt_cfg.get("type", "")
    kwargs = dict(opt_cfg.get("params", {}))
    adam_w_mode = kwargs.pop("adam_w_mode", True)
    for ds_only in ("torch_adam", "fused"):
        kwargs.pop(ds_only, None)
    if kind.lower() in ("adam", "adamw"):
        kwargs.setdefault("weight_decay", 0.0)  # DeepSpeed's FusedAdam default; torch's AdamW would use 0.01
    if kind.lower() == "adam":
        cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    else:
        by_name = {name.lower(): getattr(torch.optim, name) for name in dir(torch.optim)}
        cls = by_name.get(kind.lower())
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError(f"optimizer.type={kind!r} is not a torch.optim optimizer (e.g. SGD, AdamW, Adam)")
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer.params for {cls.__name__}: {e}") from None
