"""One small interface over the training engine (DeepSpeed or Accelerate); the loop talks only to this.

``DeepSpeedBackend`` hands everything DeepSpeed owns to DeepSpeed: the optimizer and scheduler
built from the config, precision and loss scaling, gradient clipping, gradient averaging across
ranks, ZeRO. It only adds what the loop needs to read back (gradient norm, lr, skipped steps).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cifar10ds.dist import env_info
from cifar10ds.errors import ConfigError


class LossScaleFloor(Exception):
    """DeepSpeed's fp16 loss scaler reached its minimum ("Current loss scale already at minimum")."""


def _total_norm(named: list[tuple[str, torch.Tensor]], device: torch.device
                ) -> tuple[torch.Tensor, tuple[list[str], torch.Tensor]]:
    """The global 2-norm of the gradients and each one's own norm (device tensors, no host sync)."""
    if not named:  # no gradient at all (every parameter frozen): a zero norm where the loss is
        return torch.zeros((), device=device), ([], torch.zeros(0, device=device))
    norms = torch.stack([n.float() for n in torch._foreach_norm([g for _, g in named])])
    return torch.linalg.vector_norm(norms), ([n for n, _ in named], norms)


def scaler_scale(scaler: Any) -> torch.Tensor | float:
    """A torch GradScaler's current scale with no host read: a copy of its device scalar (``update()`` changes the
    scalar in place). ``get_scale()`` is a host read, a GPU sync, and only the fallback (no scale on the device yet,
    or a torch without the private ``_get_scale_async``)."""
    scale = scaler._get_scale_async() if scaler.is_enabled() and hasattr(scaler, "_get_scale_async") else None
    return float(scaler.get_scale()) if scale is None else scale.detach().clone()


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

    def at_boundary(self) -> bool:
        """Whether the coming step() is an optimizer step (the end of an accumulation window)."""
        raise NotImplementedError

    def grad_norm(self) -> torch.Tensor | None:
        """At an optimizer step, before the update: the global gradient norm (pre-clip, the same on every
        rank), or None where the engine only computes it inside step(). May clip as a side effect."""
        return None

    def step(self, skip: bool = False) -> tuple[torch.Tensor | float | None, bool]:
        """Finish a micro step. At an optimizer step: (global gradient norm before clipping, whether the
        update was skipped: because ``skip`` asked for it or because the engine skipped it itself,
        e.g. on fp16 overflow). Between optimizer steps: (None, False)."""
        raise NotImplementedError

    def nonfinite_layer(self) -> str | None:
        """After grad_norm() saw a non-finite norm: the layer whose gradient went non-finite first.

        Backpropagation runs from the output to the input and a non-finite gradient spreads to every
        layer before it, so the first to go is the non-finite one nearest the output.
        """
        norms = getattr(self, "_param_norms", None)
        if norms is None:
            return None
        names, values = norms
        bad = [name for name, v in zip(names, values.tolist()) if not math.isfinite(v)]
        return bad[-1].rsplit(".", 1)[0] if bad else None

    def set_lr_scale(self, scale: float, current: float) -> None:
        """From now on train at ``scale`` x the scheduled lr; the param groups hold ``current`` x it now."""
        for group in self._param_groups():
            group["lr"] *= scale / current
        self.lr_scale = scale

    def _param_groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _rescale_after_schedule(self) -> None:
        # Schedulers write the lr from their own formula at each step: put the scale back on top.
        if getattr(self, "lr_scale", 1.0) != 1.0:
            for group in self._param_groups():
                group["lr"] *= self.lr_scale

    def lr(self) -> float:
        raise NotImplementedError

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model weights (a collective call: every rank must call it)."""
        raise NotImplementedError

    def loss_scale(self) -> torch.Tensor | float | None:
        """The fp16 dynamic loss scale (None without fp16): a number, or a device scalar that is read back when its
        value is needed (torch's GradScaler keeps it on the device; reading it each step would stall a GPU)."""
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

    def compile(self, backend: str | None = None) -> None:
        """torch.compile the model (trainer.compile) with ``backend`` (None: torch's default)."""
        raise NotImplementedError


def param_groups(model: nn.Module, rules: list[Any], opt_params: dict[str, Any]) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: every trainable parameter once, the first matching rule's group.

    The parameters no rule matches come first, with the optimizer's own lr and weight_decay (so the lr the
    trainer reports is theirs); each rule's group follows with its scaled lr and weight_decay. Frozen
    parameters (requires_grad False when the engine is built) are left out.
    """
    import re

    base_lr = float(opt_params.get("lr", 0.001))
    base_wd = float(opt_params.get("weight_decay", 0.0))
    buckets: list[list[nn.Parameter]] = [[] for _ in range(len(rules) + 1)]
    for name, p in model.named_parameters():
        if p.requires_grad:
            i = next((i for i, r in enumerate(rules) if re.search(r.match, name)), -1)
            buckets[i + 1].append(p)
    groups: list[dict[str, Any]] = [{"params": buckets[0]}] if buckets[0] else []
    for i, (rule, params) in enumerate(zip(rules, buckets[1:])):
        if not params:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            raise ConfigError(f"trainer.param_groups[{i}].match={rule.match!r} matches no trainable parameter (or an "
                              f"earlier rule took them all); this model's names look like {', '.join(names[:4])}, ...")
        groups.append({"params": params, "lr": base_lr * rule.lr_scale, "weight_decay": base_wd * rule.weight_decay_scale})
    return groups


def group_lrs(groups: list[dict[str, Any]], opt_params: dict[str, Any]) -> list[float]:
    return [float(g.get("lr", opt_params.get("lr", 0.001))) for g in groups]


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


def resolve_channels_last(setting: bool | str, on_gpu: bool, half_compute: bool, master_weights: bool,
                          blind_optimizer: str | None = None) -> bool:
    """trainer.channels_last as a bool: "auto" turns it on where it trains faster and the engine allows it.

    On a CPU every model here trained 1.12-1.45x faster in channels_last (oneDNN's convolutions prefer it); on a GPU
    its gain comes with bf16/fp16 tensor cores, so fp32 stays contiguous there. An engine with master weights
    (DeepSpeed's bf16/fp16 optimizers, ZeRO) would not see weights converted after it is built. ``blind_optimizer``
    names an optimizer that leaves channels_last weights unchanged (see ``channels_last_blind_optimizer``): "auto"
    stays contiguous with it and an explicit true is refused.
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


def check_scheduler(sched: dict[str, Any] | None) -> None:
    """What the scheduler's constructor would only find out inside the engine's start-up (a traceback): an unknown
    or missing parameter, or something else where it takes a number. Both backends take DeepSpeed's names."""
    if not sched:
        return
    kind, params = sched["type"], sched.get("params", {})
    if kind == "OneCycleLR":
        cls: Any = torch.optim.lr_scheduler.OneCycleLR
    else:
        try:
            from deepspeed.runtime import lr_schedules
        except ImportError:  # the Accelerate backend without DeepSpeed: its own classes check what they read
            return
        cls = getattr(lr_schedules, kind)
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


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], groups: list[dict[str, Any]] | None = None) -> None:
        import deepspeed

        check_precision(ds_config)
        # The trainer logs to wandb itself (rank 0, failures never fatal); DeepSpeed's monitor on the
        # same block would open a second run and can stop training when wandb fails.
        ds_config = {k: v for k, v in ds_config.items() if k != "wandb"}
        # DeepSpeed's throughput timer synchronises the GPU at every forward and every step by default,
        # which stops the host from queueing work ahead; the trainer measures throughput itself, so the
        # timer stays off unless the config asks for it ("timers": {"throughput": {...}}).
        ds_config.setdefault("timers", {"throughput": {"enabled": False}})
        check_deepspeed_optimizer(ds_config["optimizer"])
        from pydantic import ValidationError

        try:
            params = groups if groups is not None else [p for p in model.parameters() if p.requires_grad]
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
        except (deepspeed.DeepSpeedConfigError, ValidationError) as e:
            raise ConfigError(f"DeepSpeed rejected the config: {' '.join(str(e).split())[:400]}") from None
        except AssertionError as e:  # DeepSpeed asserts its ZeRO optimizer check
            if "zero_allow_untested_optimizer" not in str(e):
                raise
            raise ConfigError(f"zero_optimization.stage={ds_config['zero_optimization']['stage']} with optimizer "
                              f"{ds_config['optimizer']['type']}: DeepSpeed has not tested ZeRO with it; set "
                              "zero_allow_untested_optimizer=true to use it anyway, or use optimizer Adam or AdamW"
                              ) from None
        except ValueError as e:  # DeepSpeed's fused optimizers that have no kernel on this accelerator
            if "not been implemented" not in str(e):
                raise
            from deepspeed.accelerator import get_accelerator

            raise ConfigError(f"optimizer.type={ds_config['optimizer']['type']}: DeepSpeed has no kernel for it on "
                              f"this device ({get_accelerator().device_name()}); use Adam, AdamW, SGD or another torch.optim "
                              "class") from None
        self.engine = engine
        if engine.dp_world_size == 1 and not engine.zero_optimization():
            # Averaging the gradients over a world of one changes nothing, yet the engine still
            # flattens, all-reduces and copies them back every step (~0.1 ms on a CPU).
            engine.enable_backward_allreduce = False
        self.module = engine.module
        self.device = engine.device
        self.input_dtype = (
            torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
        )
        # DeepSpeed's own optimizers (fp16, bf16, ZeRO) compute the global norm while they
        # unscale/clip; a plain fp32 torch optimizer does not, so we take it from the grads,
        # which DeepSpeed has already averaged across ranks when backward() returns.
        self._engine_tracks_norm = bool(engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())
        # torch_autocast in fp16 without ZeRO: DeepSpeed scales the loss with torch's GradScaler and unscales the
        # gradients only inside step(); what backward() leaves are the scaled ones.
        self._grad_scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
        self._pending: torch.Tensor | None = None
        self._param_norms: tuple[list[str], torch.Tensor] | None = None
        self.lr_scale = 1.0

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x.to(self.input_dtype))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def at_boundary(self) -> bool:
        return bool(self.engine.is_gradient_accumulation_boundary())

    def grad_norm(self) -> torch.Tensor | None:
        if self._engine_tracks_norm or not self.at_boundary():
            return None
        if self._pending is None:
            named = [(n, p.grad) for n, p in self.module.named_parameters() if p.grad is not None]
            self._pending, self._param_norms = _total_norm(named, self.device)
            if self._grad_scaler is not None:  # an overflow stays inf: the scaler skips that step itself
                self._pending = self._pending / scaler_scale(self._grad_scaler)
        return self._pending

    def step(self, skip: bool = False) -> tuple[torch.Tensor | float | None, bool]:
        if not self.at_boundary():
            self.engine.step()
            return None, False
        norm = self.grad_norm()
        skipped_before = self.engine.skipped_steps
        optimizer = self.engine.optimizer
        if norm is not None:
            # DeepSpeed's own skip protocol (what its fp16/bf16 optimizers do on overflow): an optimizer
            # reporting ``overflow`` makes the engine count a skipped step and hold the scheduler.
            optimizer.overflow = skip
            if skip:
                optimizer.step = lambda *args, **kwargs: None  # this one step only: the update is not applied
        try:
            self.engine.step()
        except Exception as e:
            if "loss scale already at minimum" in str(e):
                raise LossScaleFloor(str(e)) from e
            raise
        finally:
            if skip:
                del optimizer.step
            self._pending = None
        skipped = self.engine.skipped_steps > skipped_before
        if not skipped:
            self._rescale_after_schedule()
        if norm is None:  # fp16/bf16/ZeRO: the engine measured it inside step()
            norm = self.engine.get_global_grad_norm()
        return norm, skipped

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def compile(self, backend: str | None = None) -> None:
        # DeepSpeed's own: compiles the module it wraps
        self.engine.compile(**({"backend": backend} if backend else {}))

    def _param_groups(self) -> list[dict[str, Any]]:
        return self.engine.optimizer.param_groups

    def loss_scale(self) -> torch.Tensor | float | None:
        if self._grad_scaler is not None:
            return scaler_scale(self._grad_scaler)
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
    "wall_clock_breakdown", "torch_autocast", "timers",
}
_DEEPSPEED_ONLY_OPTIMIZERS = {"lamb", "onebitadam", "zerooneadam", "onebitlamb", "muon", "lion", "adagrad_cpu"}


def accelerate_precision(ds_config: dict[str, Any]) -> str:
    """Accelerate's mixed_precision (autocast over fp32 weights) for DeepSpeed's bf16, fp16 or torch_autocast."""
    from cifar10ds.config import precision_of

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

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], warn: Any = print,
                 groups: list[dict[str, Any]] | None = None) -> None:
        from accelerate import Accelerator

        from cifar10ds.schedules import build_schedule

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
        self.accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=self.accumulation,
                                       cpu=multi_process_cpu())
        params = groups if groups is not None else [p for p in model.parameters() if p.requires_grad]
        optimizer = build_torch_optimizer(params, ds_config["optimizer"])
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        sched = ds_config.get("scheduler")
        self.scheduler = build_schedule(optimizer, sched["type"], sched.get("params", {})) if sched else None
        self.module = self.accelerator.unwrap_model(self.model)
        self.device = self.accelerator.device
        self.input_dtype = torch.float32  # autocast casts inside the model
        self.clip = float(ds_config["gradient_clipping"])  # the resolved config always has it
        self._micro = 0
        self._skipped = 0
        self._accumulating = contextlib.ExitStack()
        self._in_micro_step = False
        self._pending: torch.Tensor | None = None
        self._param_norms: tuple[list[str], torch.Tensor] | None = None
        self.lr_scale = 1.0

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

    def at_boundary(self) -> bool:
        return bool(self.accelerator.sync_gradients)

    def grad_norm(self) -> torch.Tensor | None:
        if not self.at_boundary():
            return None
        if self._pending is None:
            if self.accelerator.scaler is not None:
                self.accelerator.unscale_gradients()  # once per step; the scaler remembers it did
            params = [(n, p) for n, p in self.module.named_parameters() if p.grad is not None]
            norm, self._param_norms = _total_norm([(n, p.grad) for n, p in params], self.device)
            if self.clip > 0:  # what clip_grad_norm_ does, with the norm already in hand (it takes parameters)
                torch.nn.utils.clip_grads_with_norm_([p for _, p in params], self.clip, norm)
            self._pending = norm.detach()
        return self._pending

    def step(self, skip: bool = False) -> tuple[torch.Tensor | float | None, bool]:
        norm, skipped = None, False
        if self.at_boundary():
            norm = self.grad_norm()
            if skip:
                skipped = True
                if self.accelerator.scaler is not None:
                    self.accelerator.scaler.update()  # the unscale above must be closed by an update
            else:
                self.optimizer.step()
                skipped = bool(self.optimizer.step_was_skipped)  # fp16 overflow: the scaler skipped it
            if skipped:
                self._skipped += 1
            elif self.scheduler is not None:
                self.scheduler.step()
                self._rescale_after_schedule()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = None
        self._accumulating.close()
        self._in_micro_step = False
        return norm, skipped

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def compile(self, backend: str | None = None) -> None:
        self.model = torch.compile(self.model, **({"backend": backend} if backend else {}))

    def _param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def loss_scale(self) -> torch.Tensor | float | None:
        scaler = self.accelerator.scaler
        return None if scaler is None else scaler_scale(scaler)

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


def multi_process_cpu() -> bool:
    """Several processes and no GPU: Accelerate's ``cpu=True`` case (a gloo world)."""
    return not torch.cuda.is_available() and env_info().world_size > 1


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

        # Initialises torch.distributed from the launcher's environment. With no GPU, Accelerate only
        # forms a multi-process (gloo) world when told it runs on the CPU; otherwise every process
        # would train on its own, its gradients never averaged. One process stays out of
        # DistributedDataParallel, which would only add work to a world of one.
        PartialState(cpu=multi_process_cpu(), timeout=timeout)
    world = env_info().world_size
    joined = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if joined != world:
        raise RuntimeError(f"the launcher started {world} processes but {backend} joined a world of {joined}")


def build_backend(name: str, model: nn.Module, ds_config: dict[str, Any], warn: Any = print,
                  groups: list[dict[str, Any]] | None = None, channels_last: bool = False) -> Backend:
    """The engine for ``name``, its model in channels_last memory format when asked.

    DeepSpeed gets the model as built (its start-up broadcast needs contiguous weights) and the module is
    converted after; Accelerate's DistributedDataParallel gets it converted, so its gradient buckets follow
    the weights' layout from the start.
    """
    check_scheduler(ds_config.get("scheduler"))
    if name == "deepspeed":
        backend: Backend = DeepSpeedBackend(model, ds_config, groups)
        if channels_last:
            backend.module.to(memory_format=torch.channels_last)
        return backend
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return AccelerateBackend(model, ds_config, warn, groups)
