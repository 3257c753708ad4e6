"""How long the whole run takes, estimated from its first training steps: said once on the console (with, on a CPU,
the preset that gives a result in minutes there) and kept in the progress bar.

The steps are timed on the loop's device clock (CUDA events on a GPU): one mark where the window starts, which does
not wait, and one read where it ends, the only wait the estimate adds to a run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

# Optimizer steps: the first allocates, autotunes (cuDNN) or compiles, and is not timed ...
WARMUP_STEPS = 1
MIN_STEPS = 3  # ... the timed window holds at least this many ...
MIN_HOST_S = 2.0  # ... and host seconds it covers at least, unless it reaches MAX_STEPS or the epoch's end first
MAX_STEPS = 50
# An evaluated image costs about a third of a trained one: a forward pass, no backward pass, no update.
EVAL_COST = 1 / 3
TTA_VIEWS = {0: 1, 1: 2, 2: 6}  # forward passes per test image at each trainer.tta_level (evaluation.tta_logits)
# On a CPU, a run estimated longer than this gets the hint below (once).
HINT_ABOVE_S = 15 * 60
CPU_PRESET = "configs/speedrun94.json"
CPU_HINT = (f"for a result in minutes on a CPU: python cifar10_deepspeed.py --deepspeed_config {CPU_PRESET} "
            "--set trainer.data.train_limit=10000 (airbench94's recipe on a fifth of the training set; its CPU time "
            "and accuracy: docs/benchmarks.md)")


@dataclass(frozen=True)
class Estimate:
    """Seconds per training micro step and per evaluation (without test-time augmentation)."""

    step_s: float
    eval_s: float

    @classmethod
    def from_steps(cls, step_s: float, micro: int, test_per_rank: int) -> Estimate:
        """Before the first evaluation: an evaluation costs its images at EVAL_COST of a trained image each."""
        return cls(step_s, step_s / micro * test_per_rank * EVAL_COST)

    def left_s(self, steps_left: int, evals_left: int, tta_level: int) -> float:
        """Seconds until the run ends: its steps, its evaluations, the last one with its test-time views."""
        extra = TTA_VIEWS[tta_level] - 1 if evals_left else 0
        return steps_left * self.step_s + (evals_left + extra) * self.eval_s


class StepTimer:
    """Times one window of optimizer steps after the first, once per run; ``step`` (after every micro step) returns
    seconds per micro step when the window closes, None before and after."""

    def __init__(self, clock: Any, accumulation: int = 1) -> None:
        self.clock = clock
        self.accumulation = accumulation  # micro steps per optimizer step: the window holds whole optimizer steps
        self.seen = 0  # micro steps since the timer (re)started
        self.start: Any = None
        self.host_start = 0.0
        self.done = False

    def restart(self) -> None:
        """Work that is not training (an evaluation, a checkpoint) would fall in the window: start it again."""
        self.seen, self.start = 0, None

    def step(self, last_in_epoch: bool) -> float | None:
        if self.done:
            return None
        self.seen += 1
        warmup = WARMUP_STEPS * self.accumulation
        if self.seen == warmup:
            self.start, self.host_start = self.clock.mark(), time.perf_counter()
            return None
        timed = self.seen - warmup
        if self.start is None or timed < 1 or (timed % self.accumulation and not last_in_epoch):
            return None
        optimizer_steps = timed / self.accumulation
        long_enough = optimizer_steps >= MIN_STEPS and time.perf_counter() - self.host_start >= MIN_HOST_S
        if not (long_enough or optimizer_steps >= MAX_STEPS or last_in_epoch):
            return None
        self.done = True
        return self.clock.since(self.start) / timed


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``4 h 46 min``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def announcement(est: Estimate, steps_left: int, evals_left: int, tta_level: int, on_cpu: bool,
                 config_path: str = "") -> list[str]:
    """The console lines: the estimate, and on a CPU, when the run is long and not already the preset's, the preset
    that takes minutes."""
    total = est.left_s(steps_left, evals_left, tta_level)
    lines = [f"estimate: {duration(total)} to the end of the run ({steps_left:,} steps x {est.step_s:.3g} s + "
             f"{evals_left} evaluations x ~{est.eval_s:.3g} s)"]
    if on_cpu and total > HINT_ABOVE_S and not config_path.endswith(CPU_PRESET):
        lines.append(CPU_HINT)
    return lines
