"""The run plan: everything that follows from the config, the data size and the world, computed once.

``"auto"`` batch sizes and schedule lengths are filled here (the way Hugging Face's DeepSpeed
integration fills them), and the memory format and master-weights policy are decided here. The
loop, checkpoint scheduling and Lookahead read the plan; nothing recomputes it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import torch.nn as nn

from cifar10ds.batches import batches_per_epoch, last_batch_size
from cifar10ds.config import AUTO, Config, TrainerConfig
from cifar10ds.errors import ConfigError
from cifar10ds.schedules import RunSteps, fill_auto


@dataclass(frozen=True)
class RunPlan:
    config: Config  # resolved: DeepSpeed's "auto" values filled in, channels_last a bool
    n_train: int  # training images (all ranks together)
    micro: int  # images per rank and micro step
    accumulation: int  # micro steps per optimizer step
    per_epoch: int  # micro steps per epoch and rank
    total_micro: int  # micro steps of the whole run
    epochs: int  # epochs begun (a fractional last epoch counts)
    optimizer_steps: int
    master_weights: bool  # the engine keeps its own fp32 copy of the weights (DeepSpeed bf16/fp16, ZeRO)
    even_batches: bool  # every micro batch of an epoch has the same size (no smaller last one)

    @property
    def optimizer_steps_per_epoch(self) -> float:
        return self.per_epoch / self.accumulation

    def steps_in_epoch(self, epoch: int) -> int:
        """Micro steps of ``epoch`` (0-based): all of them but in a fractional last epoch."""
        return min(self.per_epoch, self.total_micro - epoch * self.per_epoch)


def make_plan(cfg: Config, model: nn.Module, groups: list[dict[str, Any]], n_train: int, world_size: int,
              backend: str, on_gpu: bool) -> RunPlan:
    """The plan of a run whose batch sizes are resolved (``resolve_batch_sizes``); ConfigError if it cannot run."""
    import models

    t, ds = cfg.trainer, cfg.ds
    micro, accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    per_epoch = batches_per_epoch(n_train, world_size, micro, t.data.drop_last)
    if per_epoch == 0:
        raise ConfigError(
            f"trainer.data.drop_last=true leaves no training batch: each rank holds {math.ceil(n_train / world_size)} "
            f"images per epoch, fewer than one micro batch of {micro}; set trainer.data.drop_last=false or use more images"
        )
    if models.has_batchnorm(model) and last_batch_size(n_train, world_size, micro, t.data.drop_last) == 1:
        raise ConfigError(
            f"each rank's last training batch would hold 1 image ({n_train} images, world size {world_size}, "
            f"micro batch {micro}) and BatchNorm cannot train on one; change trainer.data.train_limit or the batch size"
        )
    ds = resolve_schedule(ds, t, per_epoch, group_lrs(groups, ds["optimizer"].get("params", {})))
    master_weights = backend == "deepspeed" and (
        (cfg.precision != "fp32" and not cfg.autocast) or bool(ds.get("zero_optimization", {}).get("stage")))
    blind = channels_last_blind_optimizer(backend, ds["optimizer"], on_gpu)
    channels_last = resolve_channels_last(t.channels_last, on_gpu, cfg.precision != "fp32", master_weights, blind)
    check_own_weights(master_weights, t.lookahead.enabled, channels_last)
    total_micro = total_micro_steps(per_epoch, t.epochs)
    resolved = replace(cfg, ds=ds, trainer=t.model_copy(update={"channels_last": channels_last}))
    return RunPlan(config=resolved, n_train=n_train, micro=micro, accumulation=accumulation, per_epoch=per_epoch,
                   total_micro=total_micro, epochs=math.ceil(total_micro / per_epoch),
                   optimizer_steps=optimizer_steps(per_epoch, t.epochs, accumulation), master_weights=master_weights,
                   even_batches=last_batch_size(n_train, world_size, micro, t.data.drop_last) == micro)


def group_lrs(groups: list[dict[str, Any]], opt_params: dict[str, Any]) -> list[float]:
    return [float(g.get("lr", opt_params.get("lr", 0.001))) for g in groups]


# ---------------------------------------------------------------------------- "auto" values


def resolve_batch_sizes(ds: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Fill "auto" among train_batch_size = micro batch x gradient accumulation x world size."""
    ds = copy.deepcopy(ds)
    total = ds.get("train_batch_size", AUTO)
    micro = ds.get("train_micro_batch_size_per_gpu", AUTO)
    accum = ds.get("gradient_accumulation_steps", AUTO)
    if total != AUTO and micro != AUTO:
        if accum == AUTO:
            accum = total // (micro * world_size) if total % (micro * world_size) == 0 else -1
        if accum <= 0 or total != micro * accum * world_size:
            raise ConfigError(
                f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
                f"{ds.get('gradient_accumulation_steps', AUTO)} x world size {world_size}; "
                'set train_micro_batch_size_per_gpu to "auto" or make the product match'
            )
    elif total != AUTO:
        accum = 1 if accum == AUTO else accum
        if total % (world_size * accum):
            raise ConfigError(
                f"train_batch_size {total} is not divisible by world size {world_size} x gradient_accumulation_steps "
                f"{accum}; use a multiple of {world_size * accum}"
            )
        micro = total // (world_size * accum)
    else:
        accum = 1 if accum == AUTO else accum
        total = micro * accum * world_size
    ds.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    return ds


def optimizer_steps(micro_steps_per_epoch: int, epochs: float, accumulation: int) -> int:
    """Optimizer steps in a run of ``epochs`` (fractions allowed) at ``micro_steps_per_epoch`` per rank."""
    return max(1, total_micro_steps(micro_steps_per_epoch, epochs) // accumulation)


def total_micro_steps(micro_steps_per_epoch: int, epochs: float) -> int:
    return max(1, math.ceil(round(epochs * micro_steps_per_epoch, 6)))


def resolve_schedule(ds: dict[str, Any], trainer: TrainerConfig, micro_steps_per_epoch: int,
                     group_lrs: list[float] | None = None) -> dict[str, Any]:
    """Fill the scheduler's "auto" values from epochs, warmup and steps per epoch (see ``schedules.SCHEDULES``).

    ``group_lrs``: the optimizer's parameter-group lrs, which an "auto" OneCycleLR max_lr becomes.
    """
    ds = copy.deepcopy(ds)
    accum = ds["gradient_accumulation_steps"]
    micro_total = total_micro_steps(micro_steps_per_epoch, trainer.epochs)
    if micro_total < accum:
        raise ConfigError(
            f"the run has {micro_total} micro steps, fewer than gradient_accumulation_steps {accum}: no optimizer "
            "step would happen; raise trainer.epochs or lower gradient_accumulation_steps"
        )
    every = trainer.checkpoint.every_steps
    if every and every % accum:
        raise ConfigError(
            f"trainer.checkpoint.every_steps ({every}) must be a multiple of gradient_accumulation_steps ({accum}): "
            "checkpoints are taken between optimizer steps"
        )
    sched = ds.get("scheduler")
    if sched is None:
        return ds
    total = optimizer_steps(micro_steps_per_epoch, trainer.epochs, accum)
    if trainer.warmup_fraction is not None:
        warmup = max(1, round(trainer.warmup_fraction * total))
    else:
        warmup = max(1, round((trainer.warmup_epochs or 0) * micro_steps_per_epoch / accum))
    params = sched.setdefault("params", {})
    lrs = tuple(group_lrs or [ds["optimizer"].get("params", {}).get("lr", 0.001)])
    fill_auto(sched["type"], params, RunSteps(total=total, warmup=warmup, group_lrs=lrs))
    if "total_num_steps" in params and "warmup_num_steps" in params:
        if params["warmup_num_steps"] >= params["total_num_steps"]:
            raise ConfigError(
                f"scheduler.params.warmup_num_steps ({params['warmup_num_steps']}) must be smaller than "
                f"total_num_steps ({params['total_num_steps']}); shorten the warmup (trainer.warmup_epochs="
                f"{trainer.warmup_epochs}, trainer.warmup_fraction={trainer.warmup_fraction}) or raise trainer.epochs "
                f"({trainer.epochs})"
            )
    return ds


# ------------------------------------------------------------------- memory format, master weights


def resolve_channels_last(setting: bool | str, on_gpu: bool, half_compute: bool, master_weights: bool,
                          blind_optimizer: str | None = None) -> bool:
    """trainer.channels_last as a bool: "auto" turns it on where it trains faster and the engine allows it.

    On a CPU oneDNN's convolutions prefer channels_last (docs/benchmarks.md); on a GPU its gain comes with bf16/fp16
    tensor cores, so fp32 stays contiguous there. An engine with master weights would not see weights converted after
    it is built. ``blind_optimizer`` names an optimizer that leaves channels_last weights unchanged
    (``channels_last_blind_optimizer``): "auto" stays contiguous with it and an explicit true is refused.
    """
    if setting == "auto":
        return not master_weights and not blind_optimizer and (half_compute or not on_gpu)
    if setting and blind_optimizer:
        raise ConfigError(f"trainer.channels_last=true: {blind_optimizer} does not update weights stored channels_last "
                          "(every conv weight would stay as initialised); set optimizer.params.torch_adam=true "
                          "(torch's Adam) or trainer.channels_last=false")
    return bool(setting)


def channels_last_blind_optimizer(backend_name: str, opt_cfg: dict[str, Any], on_gpu: bool) -> str | None:
    """DeepSpeed's fused Adam on a CPU (its op for Adam/AdamW unless torch_adam) updates a contiguous copy of each
    weight that is not contiguous and drops it: a channels_last conv weight never changes (DeepSpeed 0.19.8; its
    CUDA kernel handles channels_last). The Accelerate backend uses torch's Adam, which does."""
    if backend_name != "deepspeed" or on_gpu or opt_cfg.get("params", {}).get("torch_adam", False):
        return None
    kind = str(opt_cfg.get("type", ""))
    return f"DeepSpeed's fused {kind} on a CPU" if kind.lower() in ("adam", "adamw") else None


def check_own_weights(master_weights: bool, lookahead: bool, channels_last: bool) -> None:
    """Lookahead and channels_last change the model's weights in place after the engine is built; an engine
    that keeps its own master weights (DeepSpeed bf16/fp16 optimizers, ZeRO) would not see the change."""
    key = "lookahead.enabled" if lookahead else "channels_last" if channels_last else None
    if master_weights and key:
        raise ConfigError(
            f"trainer.{key}=true needs the optimizer to update the model's own fp32 weights, but DeepSpeed's "
            "bf16/fp16/ZeRO keep separate master weights: use \"torch_autocast\": {\"enabled\": true, \"dtype\": "
            f"\"bfloat16\"}} instead of bf16/fp16 with ZeRO stage 0, or set trainer.{key}=false"
        )
