"""The DeepSpeed engine behind the trainer's Backend interface.

Everything DeepSpeed owns goes to DeepSpeed: the optimizer and scheduler built from the config, precision and
loss scaling, gradient clipping, gradient averaging across ranks, ZeRO, checkpoints. The backend only adds what
the loop reads back (gradient norm, lr, loss scale, skipped steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cifar10ds.config import precision_of
from cifar10ds.engines.base import Backend, LossScaleFloor, norm_and_clip, scaler_scale
from cifar10ds.engines.checks import check_precision, explain_validation_error, section_of
from cifar10ds.errors import ConfigError
from cifar10ds.optim import check_deepspeed_optimizer


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], groups: list[dict[str, Any]] | None = None,
                 track_norm: bool = True) -> None:
        import deepspeed

        check_precision(ds_config)
        # The trainer logs to wandb itself (rank 0, failures never fatal); DeepSpeed's monitor on the
        # same block would open a second run and can stop training when wandb fails.
        ds_config = {k: v for k, v in ds_config.items() if k != "wandb"}
        # Where DeepSpeed would clip fp32 gradients with its clip_grad_norm_ (no fp16/bf16 optimizer, no ZeRO, no
        # GradScaler), the backend clips instead, with the same formula: DeepSpeed's builds two tensors from Python
        # floats on the device every step, host-to-device copies that wait for the GPU.
        self.clip = float(ds_config["gradient_clipping"]) if clips_fp32_gradients(ds_config) else 0.0
        if self.clip:
            ds_config["gradient_clipping"] = 0.0
        # DeepSpeed's throughput timer synchronises the GPU at every forward and every step by default,
        # which stops the host from queueing work ahead; the trainer measures throughput itself, so the
        # timer stays off unless the config asks for it ("timers": {"throughput": {...}}).
        ds_config.setdefault("timers", {"throughput": {"enabled": False}})
        check_deepspeed_optimizer(ds_config["optimizer"])
        from pydantic import ValidationError

        try:
            params = groups if groups is not None else [p for p in model.parameters() if p.requires_grad]
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
        except ValidationError as e:  # a section check_config does not read ahead
            raise ConfigError(*explain_validation_error(e, section_of(e.title))) from None
        except deepspeed.DeepSpeedConfigError as e:
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
            # flattens, all-reduces and copies them back every step.
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
        self.track_norm = track_norm
        # fp16 without ZeRO: DeepSpeed 0.19.8's engine.backward() does not apply the loss scale that its fp16
        # optimizer's step() divides by (DeepSpeed PR #8393). Found out at the first backward (None until then).
        self._scales_loss: bool | None = None if engine.fp16_enabled() and not engine.zero_optimization() else False

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x.to(self.input_dtype))

    def backward(self, loss: torch.Tensor) -> None:
        if self._scales_loss:
            loss = loss.float() * self.engine.optimizer.loss_scale
        elif self._scales_loss is None:
            self._scales_loss = self._first_backward(loss)
            return
        self.engine.backward(loss)

    def _first_backward(self, loss: torch.Tensor) -> bool:
        """engine.backward(loss), finding out whether the engine applied the fp16 loss scale: the gradient reaching
        ``loss`` is the factor it multiplied the loss by (over the accumulation steps). One host read, once. Where
        it did not, this step's gradients are scaled now and every later loss before backward."""
        reached: list[torch.Tensor] = []
        loss.register_hook(reached.append)
        self.engine.backward(loss)
        applied = float(reached[0]) * self.engine.gradient_accumulation_steps()
        scale = float(self.engine.optimizer.loss_scale)
        if scale == 1.0 or abs(applied - 1.0) > 0.5:
            return False
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        return True

    def at_boundary(self) -> bool:
        return bool(self.engine.is_gradient_accumulation_boundary())

    def grad_norm(self) -> torch.Tensor | None:
        if self._engine_tracks_norm or not self.at_boundary() or not (self.track_norm or self.clip > 0):
            return None
        if self._pending is None:
            params = [(n, p) for n, p in self.module.named_parameters() if p.grad is not None]
            self._pending, self._param_norms = norm_and_clip(params, self.device, self.clip)
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

    def compile(self, backend: str | None = None, dynamic: bool | None = None) -> None:
        # DeepSpeed's own: compiles the module it wraps
        self.engine.compile(**({"backend": backend} if backend else {}), compile_kwargs={"dynamic": dynamic})

    def _param_groups(self) -> list[dict[str, Any]]:
        return self.engine.optimizer.param_groups

    def loss_scale(self) -> torch.Tensor | float | None:
        if self._grad_scaler is not None:
            return scaler_scale(self._grad_scaler)
        # every fp16 optimizer DeepSpeed builds (FP16_Optimizer, FP16_UnfusedOptimizer, ZeRO 1-3) has loss_scale
        scale = getattr(self.engine.optimizer, "loss_scale", None) if self.engine.fp16_enabled() else None
        return None if scale is None else float(scale)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.engine.zero_optimization_partition_weights():  # ZeRO-3: gather the shards
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()

    def save_checkpoint(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        # A write that fails (a full disk) is raised once DeepSpeed's save is over: raised inside it, it would skip
        # the barriers that follow the writes on this rank alone and leave the other ranks waiting there.
        writer = self.engine.checkpoint_engine
        save, failed = writer.save, []

        def deferred(state_dict: Any, path: str) -> None:
            if failed:  # the disk is full: the later files would fail too
                return
            try:
                save(state_dict, path)
            except Exception as e:
                failed.append(e)

        writer.save = deferred
        try:
            # save_latest=False: the trainer's commit marker, not DeepSpeed's "latest", says what is complete.
            self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        finally:
            del writer.save
        if failed:
            raise failed[0]

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


def clips_fp32_gradients(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed would clip with its fp32 clip_grad_norm_: no fp16/bf16 optimizer, no ZeRO, no GradScaler
    (torch_autocast in bf16 or none)."""
    zero = bool(ds_config.get("zero_optimization", {}).get("stage"))
    autocast = bool(ds_config.get("torch_autocast", {}).get("enabled"))
    precision = precision_of(ds_config)
    return not zero and (precision == "fp32" or (autocast and precision == "bf16"))
