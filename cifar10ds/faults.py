"""Fault injection for the reliability tests: ``CIFAR10DS_FAULT=kind@step[@rank]``."""

from __future__ import annotations

import os
import signal
import time

import torch


class Fault:
    """After micro step ``step`` on ``rank`` (default: every rank): ``sigterm``/``sigint`` send that signal to this
    process, ``sigkill`` SIGKILL, ``raise`` raises RuntimeError, ``hang`` sleeps for good. ``nan``/``inf`` make the
    loss of micro step ``step`` non-finite before backward, once per process (a rollback replays the step without it).
    """

    def __init__(self, spec: str | None, rank: int) -> None:
        self.kind, self.step = None, -1
        if spec:
            kind, step, *who = spec.split("@")
            if not who or int(who[0]) == rank:
                self.kind, self.step = kind, int(step)

    @classmethod
    def from_env(cls, rank: int) -> Fault:
        return cls(os.environ.get("CIFAR10DS_FAULT"), rank)

    def poison(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step != self.step or self.kind not in ("nan", "inf"):
            return loss
        value, self.kind = float(self.kind), None
        return loss * value

    def maybe(self, step: int) -> None:
        if step != self.step:
            return
        if self.kind in ("sigterm", "sigint"):
            os.kill(os.getpid(), signal.SIGTERM if self.kind == "sigterm" else signal.SIGINT)
        elif self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step}")
        elif self.kind == "hang":
            time.sleep(10**6)
