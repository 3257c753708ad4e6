"""What each engine accepts from ds_config.json, checked before it is built (one line, not a traceback)."""

from __future__ import annotations

from typing import Any

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
