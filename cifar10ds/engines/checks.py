"""What each engine accepts from ds_config.json, checked before it is built (one line, not a traceback)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from cifar10ds.config import precision_of
from cifar10ds.errors import ConfigError

# DeepSpeed keys the Accelerate backend honours, and those it can ignore without changing the run.
_ACCELERATE_HONOURS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "gradient_clipping", "fp16", "bf16", "zero_optimization", "wandb", "steps_per_print",
    "wall_clock_breakdown", "torch_autocast", "timers",
}
_DEEPSPEED_ONLY_OPTIMIZERS = {"lamb", "onebitadam", "zerooneadam", "onebitlamb", "muon", "lion", "adagrad_cpu"}


def check_precision(ds_config: dict[str, Any]) -> None:
    """Refuse a precision the accelerator cannot train in, before DeepSpeed fails deep inside (or, worse, does not).

    fp16 on a CPU is refused even where DeepSpeed calls it supported (CPUs with AVX512-FP16): DeepSpeed 0.19.8's fp16
    optimizer without ZeRO divides gradients by a loss scale that its engine.backward() never applied, so nothing
    trains (docs/troubleshooting.md), and a CPU's half format is bf16 anyway.
    """
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    for key, supported in (("fp16", acc.is_fp16_supported), ("bf16", acc.is_bf16_supported)):
        if ds_config.get(key, {}).get("enabled") and (not supported() or (key == "fp16" and on_cpu)):
            other = "bf16.enabled=true or " if key == "fp16" and acc.is_bf16_supported() else ""
            raise ConfigError(
                f"{key}.enabled=true is not supported on this device ({acc.device_name()}); "
                f"use {other}fp32 (set {key}.enabled=false), or run on a GPU"
            )


def accelerate_precision(ds_config: dict[str, Any]) -> str:
    """Accelerate's mixed_precision (autocast over fp32 weights) for DeepSpeed's bf16, fp16 or torch_autocast."""
    precision = precision_of(ds_config)
    return "no" if precision == "fp32" else precision


def check_accelerate_config(ds_config: dict[str, Any]) -> list[str]:
    """Errors for what the Accelerate backend cannot honour; returns warnings for what it ignores."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage:
        raise ConfigError(
            f"zero_optimization.stage={stage} needs the DeepSpeed backend; launch with deepspeed "
            "(or pass --backend deepspeed), or set zero_optimization.stage to 0"
        )
    opt_type = str(ds_config.get("optimizer", {}).get("type", "")).lower()
    if opt_type in _DEEPSPEED_ONLY_OPTIMIZERS:
        raise ConfigError(f"optimizer.type={ds_config['optimizer']['type']} is a DeepSpeed optimizer; use "
                          "--backend deepspeed, or a torch.optim type such as SGD or AdamW")
    ignored = sorted(k for k in ds_config if k not in _ACCELERATE_HONOURS)
    for section in ("fp16", "bf16"):
        ignored += [f"{section}.{k}" for k in ds_config.get(section, {}) if k != "enabled"]
    return [f"the accelerate backend ignores DeepSpeed key(s) {', '.join(ignored)}"] if ignored else []


# DeepSpeed's config sections validated by its pydantic models: key -> (module, class). DeepSpeed stops at the first
# section it refuses; reading them all here names every refused key at once.
_DEEPSPEED_SECTIONS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "bfloat16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),  # bf16's old name
    "compile": ("deepspeed.compile.config", "CompileConfig"),
}
_SIBLINGS = {"bf16": "fp16", "bfloat16": "fp16", "fp16": "bf16"}  # keys users carry from one precision to the other


def deepspeed_schema_problems(ds_config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, deprecated): one line per key DeepSpeed's own schema refuses, naming what to do, and one per
    deprecated key it would rewrite (it only warns about those, but a config being fixed should lose them too)."""
    import importlib
    import logging

    import deepspeed  # noqa: F401  (its logger is set up on import; quieted below)

    refused: list[str] = []
    deprecated: list[str] = []
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # its own "is deprecated" warning: the lines below say it with the fix
    try:
        for section, (module, name) in _DEEPSPEED_SECTIONS.items():
            value = ds_config.get(section)
            if not isinstance(value, dict):
                continue
            model = getattr(importlib.import_module(module), name)
            try:
                model(**value)
            except ValidationError as e:
                refused += explain_validation_error(e, section, model)
            deprecated += _deprecated_keys(model, value, section)
    finally:
        ds_logger.setLevel(level)
    return refused, deprecated


def explain_validation_error(err: ValidationError, section: str | None, model: Any = None) -> list[str]:
    """DeepSpeed's pydantic error as one line per problem: the dotted key, what is wrong, what to do."""
    import deepspeed

    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(([section] if section else []) + loc)
        if item["type"] == "extra_forbidden":
            owner = _field_model(model, loc[:-1])
            fields = _live_fields(owner) if owner is not None else []
            sibling = _SIBLINGS.get(section) if len(loc) == 1 else None
            close = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.8)
            if sibling and loc[-1] in _live_fields(_section_model(sibling)):
                article = "an" if section[0] in "aefhilmnorsx" else "a"  # as the letter is read: "an fp16 key"
                lines.append(f"{key}: not {article} {section} key ({sibling} only): remove it")
            elif close:
                lines.append(f"{key}: not a DeepSpeed key (did you mean {'.'.join([*key.split('.')[:-1], close[0]])}?)")
            elif fields:
                lines.append(f"{key}: not a key of DeepSpeed {deepspeed.__version__}'s {'.'.join(key.split('.')[:-1])} "
                             f"(it has {', '.join(fields)}): remove it")
            else:
                lines.append(f"{key}: not a key DeepSpeed {deepspeed.__version__} knows here: remove it")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {item.get('input')!r})")
    return lines


def section_of(model_name: str) -> str | None:
    """The config key a DeepSpeed config model validates (None: one that names its keys itself, or unknown)."""
    return next((k for k, (_, name) in _DEEPSPEED_SECTIONS.items() if name == model_name), None)


def _section_model(section: str) -> Any:
    import importlib

    module, name = _DEEPSPEED_SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def _live_fields(model: Any) -> list[str]:
    """A model's keys that are not deprecated."""
    return [k for k, f in model.model_fields.items() if not (f.json_schema_extra or {}).get("deprecated")]


def _field_model(model: Any, path: list[str]) -> Any:
    """The pydantic model that holds the key at ``path`` below ``model`` (None where it cannot be told)."""
    import typing

    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        kinds = [a for a in (typing.get_args(field.annotation) or (field.annotation,)) if hasattr(a, "model_fields")]
        model = kinds[0] if kinds else None
    return model if hasattr(model, "model_fields") else None


def _deprecated_keys(model: Any, value: dict[str, Any], section: str) -> list[str]:
    """One line per deprecated key in ``value``, with its replacement as DeepSpeed would read it."""
    import json

    lines = []
    for key, field in model.model_fields.items():
        extra = field.json_schema_extra or {}
        if key not in value or not extra.get("deprecated"):
            continue
        new = extra.get("new_param", "")
        if not new:
            lines.append(f"{section}.{key}: deprecated: remove it {extra.get('deprecated_msg', '')}".rstrip())
        elif not extra.get("set_new_param", True):
            lines.append(f"{section}.{key}: deprecated: use {new} instead")
        else:
            replacement = extra.get("new_param_fn", lambda v: v)(value[key])
            if replacement is None or replacement is False:
                lines.append(f"{section}.{key}: deprecated (now {new}); {json.dumps(value[key])} asks for nothing: "
                             "remove it")
            else:
                if hasattr(replacement, "model_dump"):
                    replacement = replacement.model_dump(exclude_unset=True, mode="json")
                lines.append(f"{section}.{key}: deprecated (now {new}): replace it with \"{new}\": "
                             f"{json.dumps(replacement)}")
    return lines
