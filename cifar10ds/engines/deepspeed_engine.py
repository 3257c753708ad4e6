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

from cifar10ds.engines.base import Backend, LossScaleFloor, scaler_scale, total_norm
from cifar10ds.engines.checks import check_precision
from cifar10ds.errors import ConfigError
from cifar10ds.optim import check_deepspeed_optimizer


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
            self._pending, self._param_norms = total_norm(named, self.device)
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
