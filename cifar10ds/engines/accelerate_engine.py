"""The same loop on Hugging Face Accelerate, reading the same ds_config.json (no DeepSpeed needed)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cifar10ds.dist import multi_process_cpu
from cifar10ds.engines.base import Backend, norm_and_clip, scaler_scale
from cifar10ds.engines.checks import accelerate_precision, check_accelerate_config
from cifar10ds.errors import ConfigError
from cifar10ds.optim import build_torch_optimizer
from cifar10ds.schedules import build_schedule


class AccelerateBackend(Backend):
    """The same loop on Hugging Face Accelerate, reading the same ds_config.json.

    Data is sharded by the trainer, so no data loader goes through ``prepare`` (Accelerate
    would shard it a second time); the scheduler is stepped here once per optimizer step, as
    DeepSpeed does (a prepared scheduler would step once per process).
    """

    name = "accelerate"

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], warn: Any = print,
                 groups: list[dict[str, Any]] | None = None, track_norm: bool = True) -> None:
        from accelerate import Accelerator

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
        self.track_norm = track_norm
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

    def at_boundary(self) -> bool:
        return bool(self.accelerator.sync_gradients)

    def grad_norm(self) -> torch.Tensor | None:
        if not self.at_boundary() or not (self.track_norm or self.clip > 0):
            return None
        if self._pending is None:
            if self.accelerator.scaler is not None:
                self.accelerator.unscale_gradients()  # once per step; the scaler remembers it did
            params = [(n, p) for n, p in self.module.named_parameters() if p.grad is not None]
            self._pending, self._param_norms = norm_and_clip(params, self.device, self.clip)
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

    def compile(self, backend: str | None = None, dynamic: bool | None = None) -> None:
        self.model = torch.compile(self.model, dynamic=dynamic, **({"backend": backend} if backend else {}))

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
