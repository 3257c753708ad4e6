"""Evaluation (exact across ranks, with optional test-time augmentation) and the device clock that times it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cifar10ds.batches import Augment, eval_shard
from cifar10ds.data import DeviceData
from cifar10ds.dist import DistInfo, all_reduce_sum
from cifar10ds.engines import Backend


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def sync_debug(device: torch.device) -> Iterator[None]:
    """``CIFAR10DS_SYNC_DEBUG=warn|error`` on a GPU: torch.cuda's sync debug mode around what it wraps (the training
    steps), so that every host read or blocking copy in them warns or raises (docs/troubleshooting.md)."""
    mode = os.environ.get("CIFAR10DS_SYNC_DEBUG")
    if not mode or device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


class Clock:
    """Seconds of device work between two marks: CUDA events on a GPU (how airbench times itself), the host
    clock elsewhere. ``mark()`` after a sync starts at an idle device; ``since()`` waits for the device.

    What is not training (data preparation before the epoch, the first step's compile, evaluation,
    checkpoints) lies outside the marks.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def since(self, start: Any) -> float:
        if not self.cuda:
            return time.perf_counter() - start
        end = self.mark()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


def tta_logits(forward: Any, x: torch.Tensor, level: int) -> torch.Tensor:
    """Logits with test-time augmentation: 0 none; 1 the mean over the image and its mirror image;
    2 half that, plus a quarter each of the same for the image shifted one pixel up-left and down-right."""
    if level == 0:
        return forward(x).float()

    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (forward(v).float() + forward(v.flip(-1)).float())

    logits = mirrored(x)
    if level == 1:
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    # the shifted views laid out like x (a compiled model would compile again for a view's strides)
    layout = torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    up_left, down_right = (v.contiguous(memory_format=layout) for v in (padded[..., :h, :w], padded[..., 2:, 2:]))
    shifted = 0.5 * (mirrored(up_left) + mirrored(down_right))
    return 0.5 * logits + 0.5 * shifted


@torch.no_grad()
def evaluate(backend: Backend, data: DeviceData, augment: Augment, info: DistInfo, batch_size: int,
             tta_level: int = 0) -> dict[str, float]:
    """The test set's metrics (mean loss, accuracy), each image counted once across ranks."""
    if info.world_size > 1:
        # BatchNorm running statistics are per rank under DeepSpeed. Evaluate one model, rank 0's
        # (DDP's convention, and what model.pt and the checkpoints hold), on every rank.
        for buf in backend.module.buffers():
            dist.broadcast(buf, src=0)
    backend.train(False)
    idx, valid = eval_shard(len(data.test_y), info.world_size, info.rank)
    idx, valid = idx.to(backend.device), valid.to(backend.device)
    sums = torch.zeros(3, dtype=torch.float64, device=backend.device)  # loss, correct, count
    for i in range(0, len(idx), batch_size):
        bi, bv = idx[i : i + batch_size], valid[i : i + batch_size]
        y = data.test_y[bi]
        logits = tta_logits(backend.forward, augment.normalize(data.test_x[bi]), tta_level)
        sums[0] += (F.cross_entropy(logits, y, reduction="none") * bv).sum()
        sums[1] += ((logits.argmax(1) == y) & bv).sum()
        sums[2] += bv.sum()
    loss_sum, correct, count = all_reduce_sum(sums).tolist()
    return {"val_loss": loss_sum / count, "val_acc": correct / count}


@torch.no_grad()
def compile_evaluation(backend: Backend, data: DeviceData, augment: Augment, info: DistInfo, batch_size: int,
                       tta_level: int) -> None:
    """trainer.compile: run the evaluation's forward passes once (eval mode, its batch sizes, the test-time
    augmentation's views) so that their graphs compile now, not inside a timed evaluation."""
    per_rank = len(eval_shard(len(data.test_y), info.world_size, info.rank)[0])
    backend.train(False)
    for size in sorted({min(batch_size, per_rank), per_rank % batch_size or min(batch_size, per_rank)}):
        tta_logits(backend.forward, augment.normalize(data.test_x[:size]), tta_level)
    backend.train(True)


def compiled_graphs() -> int:
    """Graphs TorchDynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def timed_evaluate(backend: Backend, data: DeviceData, augment: Augment, info: DistInfo, batch_size: int,
                   tta_level: int = 0) -> tuple[dict[str, float], float]:
    """``evaluate`` and the device seconds it took."""
    clock = Clock(backend.device)
    sync(backend.device)
    start = clock.mark()
    metrics = evaluate(backend, data, augment, info, batch_size, tta_level)
    return metrics, clock.since(start)
