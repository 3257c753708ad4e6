"""One small interface over the training engine (DeepSpeed or Accelerate); the loop talks only to this.

``DeepSpeedBackend`` hands everything DeepSpeed owns to DeepSpeed: the optimizer and scheduler
built from the config, precision and loss scaling, gradient clipping, gradient averaging across
ranks, ZeRO. It only adds what the loop needs to read back (gradient norm, lr, skipped steps).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cifar10ds.errors import ConfigError


class Backend:
    """What the training loop needs from an engine."""

    name: str
    device: torch.device
    input_dtype: torch.dtype
    module: nn.Module

    def train(self, mode: bool = True) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> torch.Tensor | None:
        """Finish a micro step; at an optimizer step return the global gradient norm (pre-clip)."""
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model weights (a collective call: every rank must call it)."""
        raise NotImplementedError

    def loss_scale(self) -> float | None:
        """The fp16 dynamic loss scale (None without fp16)."""
        return None

    def save_checkpoint(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Write model, optimizer, scheduler and ``client_state`` into ckpt_dir/tag (every rank calls it)."""
        raise NotImplementedError

    def load_checkpoint(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        """Restore what save_checkpoint wrote; return its ``client_state`` (every rank calls it)."""
        raise NotImplementedError

    @property
    def skipped_steps(self) -> int:
        raise NotImplementedError


def check_precision(ds_config: dict[str, Any]) -> None:
    """Refuse a precision the accelerator cannot run, before DeepSpeed fails deep inside."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for key, supported in (("fp16", acc.is_fp16_supported), ("bf16", acc.is_bf16_supported)):
        if ds_config.get(key, {}).get("enabled") and not supported():
            other = "bf16.enabled=true or " if key == "fp16" and acc.is_bf16_supported() else ""
            raise ConfigError(
                f"{key}.enabled=true is not supported on this device ({acc.device_name()}); "
                f"use {other}fp32 (set {key}.enabled=false), or run on a GPU"
            )


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


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, model: nn.Module, ds_config: dict[str, Any]) -> None:
        import deepspeed

        check_precision(ds_config)
        # The trainer logs to wandb itself (rank 0, failures never fatal); DeepSpeed's monitor on the
        # same block would open a second run and can stop training when wandb fails.
        ds_config = {k: v for k, v in ds_config.items() if k != "wandb"}
        check_deepspeed_optimizer(ds_config["optimizer"])
        from pydantic import ValidationError

        try:
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        except (deepspeed.DeepSpeedConfigError, ValidationError) as e:
            raise ConfigError(f"DeepSpeed rejected the config: {' '.join(str(e).split())[:400]}") from None
        self.engine = engine
        self.module = engine.module
        self.device = engine.device
        self.input_dtype = (
            torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
        )
        # DeepSpeed's own optimizers (fp16, bf16, ZeRO) compute the global norm while they
        # unscale/clip; a plain fp32 torch optimizer does not, so we take it from the grads,
        # which DeepSpeed has already averaged across ranks when backward() returns.
        self._engine_tracks_norm = bool(engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x.to(self.input_dtype))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> torch.Tensor | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and not self._engine_tracks_norm:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).detach()
        self.engine.step()
        if boundary and self._engine_tracks_norm:
            value = self.engine.get_global_grad_norm()
            norm = None if value is None else torch.as_tensor(value, dtype=torch.float32)
        return norm

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def loss_scale(self) -> float | None:
        scale = getattr(self.engine.optimizer, "cur_scale", None) if self.engine.fp16_enabled() else None
        return None if scale is None else float(scale)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.engine.zero_optimization_partition_weights():  # ZeRO-3: gather the shards
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()

    def save_checkpoint(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        # save_latest=False: the trainer's commit marker, not DeepSpeed's "latest", says what is complete.
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ConfigError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
        return client_state

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)


# ------------------------------------------------------------------------------ Accelerate

# DeepSpeed keys the Accelerate backend honours, and those it can ignore without changing the run.
_ACCELERATE_HONOURS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "gradient_clipping", "fp16", "bf16", "zero_optimization", "wandb", "steps_per_print",
    "wall_clock_breakdown",
}
_DEEPSPEED_ONLY_OPTIMIZERS = {"lamb", "onebitadam", "zerooneadam", "onebitlamb", "muon", "lion", "adagrad_cpu"}


def accelerate_precision(ds_config: dict[str, Any]) -> str:
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "no"


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


class AccelerateBackend(Backend):
    """The same loop on Hugging Face Accelerate, reading the same ds_config.json.

    Data is sharded by the trainer, so no data loader goes through ``prepare`` (Accelerate
    would shard it a second time); the scheduler is stepped here once per optimizer step, as
    DeepSpeed does (a prepared scheduler would step once per process).
    """

    name = "accelerate"

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], warn: Any = print) -> None:
        from accelerate import Accelerator

        from cifar10ds.schedules import DeepSpeedStyleSchedule

        for message in check_accelerate_config(ds_config):
            warn(f"warning: {message}")
        precision = accelerate_precision(ds_config)
        launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if launcher_precision and launcher_precision != precision:
            warn(f"warning: accelerate launch asked for mixed_precision={launcher_precision}; using {precision} from "
                 "the config (set fp16.enabled / bf16.enabled there)")
        if precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("fp16.enabled=true is not supported on this device (cpu); use bf16.enabled=true or fp32 "
                              "(set fp16.enabled=false), or run on a GPU")
        self.accumulation = ds_config["gradient_accumulation_steps"]
        self.accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=self.accumulation)
        optimizer = build_torch_optimizer(model.parameters(), ds_config["optimizer"])
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        sched = ds_config.get("scheduler")
        self.scheduler = DeepSpeedStyleSchedule(optimizer, sched["type"], sched.get("params", {})) if sched else None
        self.module = self.accelerator.unwrap_model(self.model)
        self.device = self.accelerator.device
        self.input_dtype = torch.float32  # autocast casts inside the model
        self.clip = float(ds_config["gradient_clipping"])  # the resolved config always has it
        self._micro = 0
        self._skipped = 0
        self._accumulating = contextlib.ExitStack()
        self._in_micro_step = False

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.training and not self._in_micro_step:
            # Entered here, left in step(): DDP must know before the forward pass whether
            # this micro step synchronises gradients.
            self._accumulating.enter_context(self.accelerator.accumulate(self.model))
            self._in_micro_step = True
        return self.model(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # divides by gradient_accumulation_steps

    def step(self) -> torch.Tensor | None:
        norm = None
        if self.accelerator.sync_gradients:
            if self.clip > 0:
                norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.clip)
            else:
                if self.accelerator.scaler is not None:
                    self.accelerator.unscale_gradients()
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.detach().float()
        self.optimizer.step()  # a no-op between accumulation boundaries
        if self.accelerator.sync_gradients:
            if self.optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped the update
                self._skipped += 1
            elif self.scheduler is not None:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulating.close()
        self._in_micro_step = False
        return norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def loss_scale(self) -> float | None:
        scaler = self.accelerator.scaler
        return None if scaler is None else float(scaler.get_scale())

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(self.model)

    def save_checkpoint(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        folder = Path(ckpt_dir) / tag
        self.accelerator.save_state(str(folder))  # model, optimizer, scaler (+ Accelerate's own RNG files)
        if self.accelerator.is_main_process:
            extra = {"scheduler": self.scheduler.state_dict() if self.scheduler else None, "skipped": self._skipped}
            torch.save({"client_state": client_state, **extra}, folder / "trainer_state.pt")

    def load_checkpoint(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        folder = Path(ckpt_dir) / tag
        self.accelerator.load_state(str(folder))
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._skipped = state["skipped"]
        return state["client_state"]

    @property
    def skipped_steps(self) -> int:
        return self._skipped


# ---------------------------------------------------------------------------------- choosing

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


def init_processes(backend: str, timeout_s: float) -> None:
    """Join the process group the launcher set up (a world of one without a launcher)."""
    import datetime

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "deepspeed":
        import deepspeed

        ds_logger = logging.getLogger("DeepSpeed")
        ds_logger.setLevel(logging.WARNING)
        # DeepSpeed asks its scheduler for the lr once before the first step and warns about it.
        ds_logger.addFilter(lambda r: "before it has started" not in r.getMessage())
        deepspeed.init_distributed(timeout=timeout)
    else:
        from accelerate import PartialState

        PartialState(timeout=timeout)  # initialises torch.distributed from the launcher's environment


def build_backend(name: str, model: nn.Module, ds_config: dict[str, Any], warn: Any = print) -> Backend:
    if name == "deepspeed":
        return DeepSpeedBackend(model, ds_config)
    return AccelerateBackend(model, ds_config, warn)
