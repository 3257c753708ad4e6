"""Decisions taken at the end of an epoch. The decision is a pure function of the metric history
(table-tested); the callback around it only keeps the state that a resumed run needs."""

from __future__ import annotations

from typing import Any

from cifar10ds.config import EarlyStoppingConfig


def should_stop(history: list[dict[str, float]], cfg: EarlyStoppingConfig, elapsed_s: float) -> tuple[bool, str | None]:
    """(stop?, reason) after the last epoch in ``history`` (one dict of metrics per epoch).

    Reasons: ``"target"`` (monitored metric reached ``target``), ``"time_budget"`` (wall time
    reached ``time_budget_s``), ``"patience"`` (no improvement larger than ``min_delta`` over
    the best so far for ``patience`` epochs). Checked in that order.
    """
    if not history:
        return False, None
    values = [h[cfg.monitor] for h in history]
    sign = 1.0 if cfg.direction == "max" else -1.0
    if cfg.target is not None and sign * (values[-1] - cfg.target) >= 0:
        return True, "target"
    if cfg.time_budget_s is not None and elapsed_s >= cfg.time_budget_s:
        return True, "time_budget"
    if cfg.patience is not None:
        best, since_best = values[0], 0
        for v in values[1:]:
            if sign * (v - best) > cfg.min_delta:
                best, since_best = v, 0
            else:
                since_best += 1
        if since_best >= cfg.patience:
            return True, "patience"
    return False, None


def describe_stop(reason: str, cfg: EarlyStoppingConfig, last: dict[str, float], epochs_run: float) -> str:
    if reason == "target":
        return f"early stop: {cfg.monitor} {last[cfg.monitor]:.4f} reached target {cfg.target}"
    if reason == "time_budget":
        return f"early stop: time budget {cfg.time_budget_s}s reached after {epochs_run:g} epochs"
    return f"early stop: no {cfg.monitor} improvement > {cfg.min_delta} for {cfg.patience} epochs"


class EarlyStopping:
    """Thin wrapper: remembers the history and asks ``should_stop``."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.history: list[dict[str, float]] = []

    def update(self, metrics: dict[str, float], elapsed_s: float) -> tuple[bool, str | None]:
        self.history.append({k: metrics[k] for k in ("val_acc", "val_loss", "train_loss")})
        return should_stop(self.history, self.cfg, elapsed_s)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
