"""The training state a checkpoint carries besides the engine's own (weights, optimizer, scheduler).

``TrainingState`` is what a resumed run and a rollback both restore: the position and metric history
(``Progress``), Lookahead's average, and the stability doctor's record. ``EpochSums`` holds the epoch
under way on the device; it is the one place a per-epoch training metric is added.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cifar10ds.averaging import Lookahead
from cifar10ds.dist import all_reduce_sum
from cifar10ds.stability import Monitor


@dataclass
class Progress:
    epoch: int = 0  # the epoch under way (0-based)
    step_in_epoch: int = 0  # micro steps of it already done
    step: int = 0  # micro steps done in the whole run
    images: int = 0
    train_time: float = 0.0
    elapsed: float = 0.0  # wall time of earlier segments of this run (before a resume)
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, Any] | None = None  # this rank's sums of the interrupted epoch (EpochSums.to_plain)
    best_tag: str | None = None
    wandb_id: str | None = None
    compile_s: float | None = None  # the first step's time when trainer.compile is on (it compiles)
    finished: str | None = None  # why training ended ("target", "patience", ...); a resume does not train on


@dataclass
class TrainingState:
    progress: Progress
    lookahead: Lookahead | None = None
    monitor: Monitor | None = None

    def state_dict(self, elapsed: float) -> dict[str, Any]:
        """The checkpoint's client_state (rank 0's; the partial epoch sums are per rank and saved apart), with the
        run's wall time so far."""
        progress = {k: v for k, v in asdict(self.progress).items() if k != "partial"}
        state: dict[str, Any] = {"progress": {**progress, "elapsed": elapsed}}
        if self.monitor is not None:
            state["stability"] = self.monitor.state_dict()
        if self.lookahead is not None:
            state["lookahead"] = self.lookahead.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], partial: dict[str, Any] | None, rollback: bool = False) -> float:
        """Continue from ``state``: a resume takes the doctor's record from it too, a rollback keeps its own and lowers
        the lr. Returns the lr scale the checkpoint's param groups were saved with."""
        self.progress = Progress(**state["progress"], partial=partial)
        if self.lookahead is not None and "lookahead" in state:
            self.lookahead.load_state_dict(state["lookahead"])
        saved = state.get("stability")
        if self.monitor is not None and saved is not None and not rollback:
            self.monitor.load_state_dict(saved)
        elif self.monitor is not None and rollback:
            self.monitor.rolled_back(saved or {})
        return (saved or {}).get("seen", {}).get("lr_scale", 1.0)

    @property
    def lr_scale(self) -> float:
        return 1.0 if self.monitor is None else self.monitor.seen.lr_scale


class EpochSums:
    """The epoch's training sums, kept on the device and read back once at its end (``metrics``)."""

    def __init__(self, device: torch.device, partial: dict[str, Any] | None = None) -> None:
        p = partial or {"sums": [0.0, 0.0, 0.0], "losses": [], "norms": [], "time": 0.0}
        self.loss, self.correct, self.images = (torch.tensor(v, dtype=torch.float64, device=device) for v in p["sums"])
        self.step_losses: list[torch.Tensor] = [torch.tensor(v, device=device) for v in p["losses"]]
        self.updates: list[tuple[Any, ...]] = [tuple(n) for n in p["norms"]]  # see add_update
        self.time = p["time"]  # seconds of training

    def add_step(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, skipped: bool) -> None:
        """A micro step's loss; a skipped step trained nothing and stays out of the epoch's averages."""
        self.step_losses.append(loss)
        if not skipped:
            self.loss += loss * len(y)
            self.correct += (logits.detach().argmax(1) == y).sum()
            self.images += len(y)

    def add_update(self, step: int, norm: Any, lr: float, loss_scale: Any, skipped: bool) -> None:
        """An optimizer step: the norm (None where it was not measured) and the loss scale may be device scalars, read
        at the epoch's end."""
        self.updates.append((step, norm, lr, loss_scale, skipped))

    def host_updates(self) -> list[tuple[Any, ...]]:
        """The optimizer steps' (step, norm, lr, loss scale, skipped) in host numbers, read back in one copy."""
        norms = [u[1] for u in self.updates if u[1] is not None]
        scales = [u[3] for u in self.updates if u[3] is not None]
        values = iter(host_floats(norms + scales))
        norms_read = [None if u[1] is None else next(values) for u in self.updates]
        return [(s, n, lr, None if scale is None else next(values), *rest)
                for n, (s, _, lr, scale, *rest) in zip(norms_read, self.updates)]

    def metrics(self, world_size: int, first_step: int, epoch: int) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
        """Reduced across ranks (a collective): (the epoch's training metrics, images trained on, one row per step)."""
        loss_sum, correct, count = all_reduce_sum(torch.stack([self.loss, self.correct, self.images])).tolist()
        losses = all_reduce_sum(torch.stack(self.step_losses).double()) / world_size
        updates = self.host_updates()
        rows: list[dict[str, Any]] = []
        for i, v in enumerate(losses.tolist()):
            rows.append({"step": first_step + i, "epoch": epoch + 1, "loss": v if math.isfinite(v) else None})
        for s, n, lr, scale, *rest in updates:
            row = rows[s - first_step]
            if n is not None:
                row["grad_norm"] = n if math.isfinite(n) else None
            row["lr"] = lr
            if scale is not None:
                row["loss_scale"] = scale
            if rest and rest[0]:
                row["skipped"] = True
        finite = [n for _, n, *_ in updates if n is not None and math.isfinite(n)]
        metrics = {
            "train_loss": loss_sum / count if count else None,
            "train_acc": correct / count if count else None,
            "grad_norm": sum(finite) / len(finite) if finite else None,
            "grad_norm_max": max(finite) if finite else None,
        }
        return metrics, int(count), rows

    def to_plain(self) -> dict[str, Any]:
        """Plain numbers for a mid-epoch checkpoint (the constructor's ``partial``)."""
        return {"sums": torch.stack([self.loss, self.correct, self.images]).tolist(),
                "losses": host_floats(self.step_losses), "norms": self.host_updates(), "time": self.time}


def host_floats(values: list[Any]) -> list[float]:
    """Floats of a mix of numbers and device scalars, the device ones read back together (one copy, not one each)."""
    tensors = [v for v in values if torch.is_tensor(v)]
    read = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist() if tensors else [])
    return [next(read) if torch.is_tensor(v) else float(v) for v in values]
