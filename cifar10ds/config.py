"""ds_config.json -> one validated, resolved configuration.

The file holds DeepSpeed's own keys (passed to the engine as they are, with "auto" values
filled in) plus a ``"trainer"`` section for what DeepSpeed lacks (model, epochs, data, early
stopping). The trainer section is checked by a pydantic schema; the DeepSpeed keys the trainer
depends on are checked here too, so that a mistake stops the run before any work with one line
naming the key and what is allowed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cifar10ds.errors import ConfigError
from cifar10ds.schedules import SCHEDULES

AUTO = "auto"
# DeepSpeed clips the global gradient norm to 1.0 when "gradient_clipping" is absent
# (deepspeed.runtime.constants.GRADIENT_CLIPPING_DEFAULT). The trainer writes that default into
# the resolved config, so config.json says what ran and every backend clips alike.
DEEPSPEED_GRADIENT_CLIPPING_DEFAULT = 1.0

class _Section(BaseModel):
    # strict: "3" is not 3 and true is not 1; extra keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", strict=True)


class AugmentationConfig(_Section):
    crop_padding: int = Field(4, ge=0, le=16, description="random-crop padding in pixels (reflect); 0 turns cropping off")
    flip: bool | Literal["alternate"] = Field(
        True, description='random horizontal flip with probability 0.5; "alternate": a random flip in the first epoch, '
        "then every image the other way round each epoch (airbench's alternating flip)"
    )
    cutout: int = Field(0, ge=0, le=32, description="side in pixels of a random square set to zero (0 = off)")

    @field_validator("flip", mode="before")
    @classmethod
    def _flip(cls, value: Any) -> Any:
        if not (isinstance(value, bool) or value == "alternate"):
            raise ValueError('Input should be true, false or "alternate"')
        return value


class DataConfig(_Section):
    dir: str = Field("data", description="folder or .tar.gz holding CIFAR-10; --data-dir overrides it")
    download: bool = Field(True, description="download the official archive when no data is found")
    cache_dir: str | None = Field(
        None, description="where decoded tensors are cached (default $CIFAR10DS_CACHE or ~/.cache/cifar10-deepspeed)"
    )
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    train_limit: int | None = Field(None, ge=2, description="train on a seeded class-balanced subset of this size")
    test_limit: int | None = Field(None, ge=1, description="evaluate on a seeded class-balanced subset of this size")
    subset_seed: int = Field(0, description="seed of the class-balanced subsets (fixed across training seeds)")
    eval_batch_size: int = Field(1000, ge=1, description="images per evaluation batch and rank")
    drop_last: bool = Field(
        False, description="train on full batches only: each rank's last, smaller batch of an epoch is left out "
        "(as airbench does; its images come back in other epochs' shuffles)"
    )


class EarlyStoppingConfig(_Section):
    monitor: Literal["val_acc", "val_loss", "train_loss"] = Field("val_acc", description="metric the rules watch")
    mode: Literal["auto", "max", "min"] = Field("auto", description="auto: max for accuracies, min for losses")
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without improvement (null = off)")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")
    target: float | None = Field(None, description="stop as soon as the monitored metric reaches this value")
    time_budget_s: float | None = Field(None, gt=0, description="stop after the epoch that crosses this wall time")

    @property
    def direction(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "max" if self.monitor.endswith("acc") else "min"


class CheckpointConfig(_Section):
    dir: str | None = Field(None, description="checkpoint folder (default <output dir>/checkpoints)")
    every_epochs: int | None = Field(1, ge=1, description="save at the end of every N-th epoch (null = never)")
    every_steps: int | None = Field(None, ge=1, description="also save every N micro steps, mid-epoch (null = never)")
    keep_last: int = Field(2, ge=1, description="committed checkpoints kept; older ones are deleted after a new commit")
    save_best: bool = Field(False, description="also keep the checkpoint with the best val_acc, outside keep_last")
    signal_exit_zero: bool = Field(False, description="exit 0 after SIGTERM/SIGINT (default: 128 + signal number)")


class StabilityConfig(_Section):
    enabled: bool = Field(
        True, description="check every optimizer step (costs one device-to-host read per step on GPU in fp32); "
        "off: only a non-finite epoch loss is caught, and stops the run"
    )
    on_nonfinite: Literal["skip", "stop", "rollback"] = Field(
        "skip", description="non-finite gradient norm: skip the step on all ranks, stop with a checkpoint, or "
        "reload the last checkpoint with a lower lr"
    )
    max_consecutive_skips: int = Field(
        20, ge=1, description="stop after this many skipped steps in a row instead of spinning (fp16 overflows included)"
    )
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1, description="lr multiplier applied at each rollback")
    max_rollbacks: int = Field(3, ge=1, description="rollbacks allowed before the run stops")
    max_grad_norm_warn: float | None = Field(
        100.0, gt=0, description="warn when the gradient norm (before clipping) exceeds this (null = off)"
    )
    loss_spike_factor: float | None = Field(
        5.0, gt=1, description="warn when a step's loss exceeds this multiple of the running median (null = off)"
    )
    loss_window: int = Field(50, ge=5, description="steps in the running median of the loss")
    stuck_epochs: int | None = Field(
        3, ge=1, description="epochs with val_acc within 2 points of chance before the run counts as stuck (null = off)"
    )
    on_stuck: Literal["warn", "stop"] = Field("stop", description="what a stuck run does: warn and go on, or stop")


class ParamGroupRule(_Section):
    match: str = Field(description="regular expression searched for in parameter names (model.named_parameters())")
    lr_scale: float = Field(1.0, gt=0, description="the group's lr is optimizer.params.lr times this")
    weight_decay_scale: float = Field(1.0, ge=0, description="the group's weight_decay is optimizer.params.weight_decay times this")

    @field_validator("match")
    @classmethod
    def _regex(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return pattern


class LookaheadConfig(_Section):
    enabled: bool = Field(False, description="keep an average of the weights and copy it back into the model every "
                          "every_steps steps (airbench's Lookahead); the run ends on the averaged weights")
    every_steps: int = Field(5, ge=1, description="optimizer steps between two updates of the average")
    decay: float = Field(0.95**5, ge=0, lt=1, description="the average's decay at the end of the run")
    power: float = Field(3.0, ge=0, description="decay at optimizer step s of T: decay x (s/T)**power (0 = constant)")
    start_epoch: float = Field(
        0.0, ge=0, description="epoch from which the average is kept (airbench94 keeps it from its first steps)"
    )


class TrainerConfig(_Section):
    model: str = Field("resnet9", description="registered model name (python cifar10_deepspeed.py --list-models)")
    epochs: float = Field(10, gt=0, description="epochs to train; fractions allowed (2.5 = two and a half)")
    seed: int = Field(0, description="seed of initialisation, data order and augmentation")
    warmup_epochs: float | None = Field(None, ge=0, description='warmup length in epochs when the scheduler says "auto"')
    warmup_fraction: float | None = Field(
        None, ge=0, lt=1, description='warmup length as a fraction of the run when the scheduler says "auto"'
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the training loss")
    param_groups: list[ParamGroupRule] = Field(
        default_factory=list, description="optimizer parameter groups, first match wins (e.g. BatchNorm biases at 64x "
        "the lr); the other trainable parameters form the first group, with the optimizer's own lr and weight_decay"
    )
    lookahead: LookaheadConfig = Field(default_factory=LookaheadConfig)
    tta_level: Literal[0, 1, 2] = Field(
        0, description="test-time augmentation of the last evaluation: 0 none, 1 mirror, 2 mirror + 1-pixel translations"
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto", description='model and batches in channels_last memory format; "auto": on a CPU, and on a GPU when the '
        "forward pass runs in bf16/fp16, unless DeepSpeed keeps master weights (bf16/fp16 optimizers, ZeRO) or its fused "
        "Adam runs on a CPU (it leaves channels_last weights unchanged; true is refused there); on a CPU every model "
        "here trains faster in it (docs/benchmarks.md)"
    )
    compile: bool | str = Field(
        False, description='torch.compile the model (DeepSpeed: engine.compile()); true = the default backend '
        '("inductor"), a string names another ("eager" checks tracing only); the first step compiles, and the '
        "evaluation's graphs with it, timed apart from train_time_s and eval_time_s (compile_time_s); a smaller last "
        "batch compiles with dynamic shapes"
    )
    cpu_keep_freed_memory: bool = Field(
        True, description="on CPU (Linux, glibc): keep freed tensor memory in the process instead of returning it to "
        "the kernel and faulting it in again every step (mallopt; up to 1 GB kept); false leaves malloc as it is"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    stability: StabilityConfig = Field(default_factory=StabilityConfig)
    dist_timeout_s: float = Field(
        600, gt=0, description="seconds a rank waits for the others before the run fails instead of hanging"
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainerConfig:
        if self.warmup_epochs is not None and self.warmup_fraction is not None:
            raise ValueError("set at most one of warmup_epochs and warmup_fraction")
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        import models

        if name not in models.list_models():
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(models.list_models())}")
        return name


@dataclass
class Config:
    """The whole run configuration: DeepSpeed's keys (``ds``) and the validated trainer section."""

    ds: dict[str, Any]
    trainer: TrainerConfig
    path: str

    def to_json(self) -> dict[str, Any]:
        return {**self.ds, "trainer": self.trainer.model_dump()}

    @property
    def precision(self) -> str:
        return precision_of(self.ds)

    @property
    def autocast(self) -> bool:
        """DeepSpeed's torch_autocast: fp32 weights, the forward pass in bf16/fp16 (torch.autocast)."""
        return _enabled(self.ds, "torch_autocast")


# ---------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read ``path``, apply ``--set`` overrides, validate. Raises ConfigError on any user mistake."""
    path = Path(path)
    raw = read_json(path)
    for item in overrides or []:
        apply_override(raw, item)
    trainer_raw = raw.pop("trainer", {})
    if not isinstance(trainer_raw, dict):
        raise ConfigError(f'{path}: "trainer" must be an object, got {type(trainer_raw).__name__}')
    try:
        trainer = TrainerConfig.model_validate(trainer_raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_describe(e, TrainerConfig, 'trainer')}") from None
    for key in [k for k, v in raw.items() if v is None]:  # null = left out (DeepSpeed fails on a null section)
        del raw[key]
    check_deepspeed_keys(raw, path)
    raw.setdefault("gradient_clipping", DEEPSPEED_GRADIENT_CLIPPING_DEFAULT)
    return Config(ds=raw, trainer=trainer, path=str(path))


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass --deepspeed_config PATH (e.g. ds_config.json)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def apply_override(cfg: dict[str, Any], item: str) -> None:
    """``a.b.c=VALUE``: set a nested key; VALUE is parsed as JSON when it can be, else kept as a string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. --set trainer.epochs=3")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {item!r}: {where} is a {type(child).__name__}, not an object")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError, model: type[BaseModel], prefix: str) -> str:
    """One line for the first schema error: the dotted key, what is wrong, what is allowed."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join([prefix, *loc])
    if first["type"] == "extra_forbidden":
        owner: Any = model
        for part in loc[:-1]:
            owner = owner.model_fields[part].annotation
        return f"{key}: unknown key; allowed keys: {', '.join(owner.model_fields)}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{key}: {msg} (got {first['input']!r})"


def precision_of(ds: dict[str, Any]) -> str:
    """The compute precision, fp32/bf16/fp16: from DeepSpeed's bf16/fp16 sections or its torch_autocast."""
    if _enabled(ds, "bf16"):
        return "bf16"
    if _enabled(ds, "fp16"):
        return "fp16"
    if _enabled(ds, "torch_autocast"):
        dtype = str(ds["torch_autocast"].get("dtype", "bfloat16"))
        return "fp16" if dtype in ("fp16", "float16", "half", "torch.float16") else "bf16"
    return "fp32"


def _enabled(ds: dict[str, Any], section: str) -> bool:
    value = ds.get(section, {})
    return isinstance(value, dict) and value.get("enabled") is True


def check_deepspeed_keys(ds: dict[str, Any], path: Path | str) -> None:
    """Check the DeepSpeed keys the trainer reads or fills; DeepSpeed validates the rest itself."""
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds.get(key, AUTO)
        if value != AUTO and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f'{path}: {key} must be a positive integer or "auto" (got {value!r})')
    if ds.get("train_batch_size", AUTO) == AUTO and ds.get("train_micro_batch_size_per_gpu", AUTO) == AUTO:
        raise ConfigError(f"{path}: set train_batch_size or train_micro_batch_size_per_gpu to a positive integer")
    for section in ("fp16", "bf16"):
        value = ds.get(section, {})
        if not isinstance(value, dict) or not isinstance(value.get("enabled", False), bool):
            raise ConfigError(f'{path}: {section} must be an object like {{"enabled": true}} (got {value!r})')
    if _enabled(ds, "fp16") and _enabled(ds, "bf16"):
        raise ConfigError(f"{path}: fp16.enabled and bf16.enabled are both true; enable at most one (neither = fp32)")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"{path}: gradient_clipping must be a number >= 0 (0 = off), got {clip!r}")
    for section in ("wandb", "zero_optimization"):
        if not isinstance(ds.get(section, {}), dict):
            raise ConfigError(f"{path}: {section} must be an object (got {ds[section]!r})")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    opt = ds.get("optimizer")
    if opt is None:
        raise ConfigError(f'{path}: an "optimizer" is required, e.g. {{"type": "SGD", "params": {{"lr": 0.01, "momentum": 0.9}}}}')
    if not (isinstance(opt, dict) and isinstance(opt.get("type"), str)):
        raise ConfigError(f'{path}: optimizer must be an object like {{"type": "SGD", "params": {{"lr": 0.01}}}}')
    if not isinstance(opt.get("params", {}), dict):
        raise ConfigError(f"{path}: optimizer.params must be an object")
    for key in ("lr", "weight_decay", "momentum", "dampening", "eps"):
        value = opt.get("params", {}).get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: optimizer.params.{key} must be a number (got {value!r})")
    sched = ds.get("scheduler")
    if sched is not None:
        if not (isinstance(sched, dict) and sched.get("type") in SCHEDULES):
            got = sched.get("type") if isinstance(sched, dict) else sched
            raise ConfigError(f"{path}: scheduler.type must be one of {', '.join(SCHEDULES)} (got {got!r})")
        if not isinstance(sched.get("params", {}), dict):
            raise ConfigError(f"{path}: scheduler.params must be an object")


def deepspeed_key_typos(ds: dict[str, Any]) -> list[str]:
    """Top-level keys DeepSpeed does not know that look like one it does (``train_batch_sizee``): DeepSpeed ignores
    unknown keys without a word. Keys that resemble none are left alone (a newer DeepSpeed may know them)."""
    import difflib

    try:
        from deepspeed.runtime import constants
    except ImportError:
        return []
    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}
    known |= {"zero_optimization", "wandb", "timers", "flops_profiler", "tensorboard", "csv_monitor", "comet",
              "activation_checkpointing", "comms_logger", "compile", "aio", "autotuning", "elasticity",
              "data_efficiency", "curriculum_learning", "pipeline", "sparse_attention", "nebula", "amp",
              "compression_training", "quantize_training", "monitor_config", "hybrid_engine", "weight_quantization",
              "trainer"}
    found = []
    for key in ds:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
            if close:
                found.append(f"warning: {key}: not a DeepSpeed key (did you mean {close[0]}?); DeepSpeed ignores it")
    return found
