"""What the training loop needs from an engine; every backend implements this interface."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


class LossScaleFloor(Exception):
    """DeepSpeed's fp16 loss scaler reached its minimum ("Current loss scale already at minimum")."""


def total_norm(named: list[tuple[str, torch.Tensor]], device: torch.device
               ) -> tuple[torch.Tensor, tuple[list[str], torch.Tensor]]:
    """The global 2-norm of the gradients and each one's own norm (device tensors, no host sync)."""
    if not named:  # no gradient at all (every parameter frozen): a zero norm where the loss is
        return torch.zeros((), device=device), ([], torch.zeros(0, device=device))
    norms = torch.stack([n.float() for n in torch._foreach_norm([g for _, g in named])])
    return torch.linalg.vector_norm(norms), ([n for n, _ in named], norms)


def norm_and_clip(params: list[tuple[str, nn.Parameter]], device: torch.device, max_norm: float
                  ) -> tuple[torch.Tensor, tuple[list[str], torch.Tensor]]:
    """``total_norm`` of the parameters' gradients, clipping them to ``max_norm`` when it is > 0: what
    clip_grad_norm_ does, from the norm in hand and on the device only (no host read, no host-to-device copy)."""
    norm, per_param = total_norm([(n, p.grad) for n, p in params], device)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for _, p in params], max_norm, norm)
    return norm.detach(), per_param


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
    lr_scale: float = 1.0  # the doctor's rollbacks lower it (set_lr_scale)
    track_norm: bool = True  # measure the global gradient norm at every optimizer step (else only to clip)
    _pending: torch.Tensor | None = None  # this optimizer step's global gradient norm, once computed
    _param_norms: tuple[list[str], torch.Tensor] | None = None  # each gradient's norm, for nonfinite_layer()
    _held: list[dict[str, Any]] = []  # param groups held at lr 0 (start_epoch)

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
        if self._param_norms is None:
            return None
        names, values = self._param_norms
        bad = [name for name, v in zip(names, values.tolist()) if not math.isfinite(v)]
        return bad[-1].rsplit(".", 1)[0] if bad else None

    def start_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based): hold the param groups whose training ended (``freeze_after_epochs``) at
        lr 0, which leaves them exactly as they are whatever the optimizer (momentum, weight decay included)."""
        self._held = [g for g in self._param_groups() if g.get("freeze_after_epochs", epoch + 1) <= epoch]
        for group in self._held:
            group["lr"] = 0.0

    def set_lr_scale(self, scale: float, current: float) -> None:
        """From now on train at ``scale`` x the scheduled lr; the param groups hold ``current`` x it now."""
        for group in self._param_groups():
            group["lr"] *= scale / current
        self.lr_scale = scale

    def _param_groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _rescale_after_schedule(self) -> None:
        # Schedulers write the lr from their own formula at each step: put the scale and the holds back on top.
        if self.lr_scale != 1.0:
            for group in self._param_groups():
                group["lr"] *= self.lr_scale
        for group in self._held:
            group["lr"] = 0.0

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

    def compile(self, backend: str | None = None, dynamic: bool | None = None) -> None:
        """torch.compile the model (trainer.compile) with ``backend`` (None: torch's default); ``dynamic``: torch.compile's
        (True where the batch size changes within an epoch, so that the last batch does not compile again)."""
        raise NotImplementedError
