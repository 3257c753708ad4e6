"""Fault injection for the reliability tests: ``CIFAR10DS_FAULT=kind@step[@rank]``."""

from __future__ import annotations

import errno
import io
import os
import signal
import time

import torch

SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigusr1": signal.SIGUSR1, "sigkill": signal.SIGKILL}


class Fault:
    """After micro step ``step`` on ``rank`` (default: every rank): ``sigterm``/``sigint``/``sigusr1``/``sigkill`` send
    that signal to this process, ``raise`` raises RuntimeError, ``hang`` sleeps for good, ``nospace`` fills the disk
    for this process (every later ``torch.save`` fails as on a full disk). ``nan``/``inf`` make the loss of micro step
    ``step`` non-finite before backward, once per process (a rollback replays the step without it).
    """

    def __init__(self, spec: str | None, rank: int) -> None:
        self.kind, self.step = None, -1
        if spec:
            kind, step, *who = spec.split("@")
            if not who or int(who[0]) == rank:
                self.kind, self.step = kind, int(step)

    @classmethod
    def from_env(cls, rank: int) -> Fault:
        """The fault ``CIFAR10DS_FAULT`` names; none in an attempt torchrun restarted (the fault happened once)."""
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
        return cls(None if restarted else os.environ.get("CIFAR10DS_FAULT"), rank)

    def poison(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step != self.step or self.kind not in ("nan", "inf"):
            return loss
        value, self.kind = float(self.kind), None
        return loss * value

    def maybe(self, step: int) -> None:
        if step != self.step:
            return
        if self.kind in SIGNALS:
            os.kill(os.getpid(), SIGNALS[self.kind])
        elif self.kind == "nospace":
            torch.save = _full_disk_save
        elif self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step}")
        elif self.kind == "hang":
            time.sleep(10**6)


_torch_save = torch.save


def _full_disk_save(obj: object, f: str | os.PathLike | io.IOBase, *args: object, **kwargs: object) -> None:
    """``torch.save`` on a full disk: the file gets part of its bytes, then the write fails with ENOSPC."""
    buf = io.BytesIO()
    _torch_save(obj, buf, *args, **kwargs)
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: buf.tell() // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
