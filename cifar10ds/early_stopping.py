"""Early stopping (``trainer.early_stopping``): a pure function of the metric history, table-tested.

The history is the run's own (``Progress.history``), so a resumed run decides as the uninterrupted
one would; the loop has rank 0 decide (its clock) and every rank follow.
"""

from __future__ import annotations

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
