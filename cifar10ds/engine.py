"""One small interface over the training engine; the loop talks only to this.

``DeepSpeedBackend`` hands everything DeepSpeed owns to DeepSpeed: the optimizer and scheduler
built from the config, precision and loss scaling, gradient clipping, gradient averaging across
ranks, ZeRO. It only adds what the loop needs to read back (gradient norm, lr, skipped steps).
"""

from __future__ import annotations

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


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, model: nn.Module, ds_config: dict[str, Any]) -> None:
        import deepspeed

        check_precision(ds_config)
        try:
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        except deepspeed.runtime.config_utils.DeepSpeedConfigError as e:
            raise ConfigError(f"DeepSpeed rejected the config: {e}") from None
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

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)
