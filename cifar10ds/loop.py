"""The training loop: the same for every launcher and engine.

Per step it only queues work on the device (no host sync): the loss, accuracy and gradient
norm stay tensors until the end of the epoch, where one all-reduce per epoch turns them into
the numbers that every rank agrees on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cifar10ds.batches import Augment, batches_per_epoch, eval_shard, shard_indices
from cifar10ds.callbacks import EarlyStopping, describe_stop
from cifar10ds.config import Config, total_micro_steps
from cifar10ds.dist import DistInfo, all_reduce_sum, broadcast_object
from cifar10ds.engine import Backend
from cifar10ds.tracking import Reporter


@dataclass
class DeviceData:
    """The data set as tensors on the training device (uint8 images, int64 labels)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(backend: Backend, data: DeviceData, augment: Augment, info: DistInfo, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole test set, each image counted once across ranks."""
    backend.train(False)
    idx, valid = eval_shard(len(data.test_y), info.world_size, info.rank)
    idx, valid = idx.to(backend.device), valid.to(backend.device)
    sums = torch.zeros(3, dtype=torch.float64, device=backend.device)  # loss, correct, count
    for i in range(0, len(idx), batch_size):
        bi, bv = idx[i : i + batch_size], valid[i : i + batch_size]
        y = data.test_y[bi]
        logits = backend.forward(augment.normalize(data.test_x[bi])).float()
        sums[0] += (F.cross_entropy(logits, y, reduction="none") * bv).sum()
        sums[1] += ((logits.argmax(1) == y) & bv).sum()
        sums[2] += bv.sum()
    loss_sum, correct, count = all_reduce_sum(sums).tolist()
    return loss_sum / count, correct / count


def train(backend: Backend, data: DeviceData, cfg: Config, info: DistInfo, reporter: Reporter) -> dict[str, Any]:
    """Train for ``trainer.epochs`` (or until early stopping); return the run's results."""
    t = cfg.trainer
    device = backend.device
    micro = cfg.ds["train_micro_batch_size_per_gpu"]
    n_train = len(data.train_y)
    per_epoch = batches_per_epoch(n_train, info.world_size, micro)
    total_micro = total_micro_steps(per_epoch, t.epochs)
    n_epochs = math.ceil(total_micro / per_epoch)
    aug_cfg = t.data.augmentation
    # Each rank draws its own augmentations; the seed fixes them all.
    augment = Augment(aug_cfg.crop_padding, aug_cfg.flip, aug_cfg.cutout, seed=t.seed * 1_000_003 + info.rank, device=device)
    stopper = EarlyStopping(t.early_stopping)

    start = time.perf_counter()
    train_time = 0.0
    images = 0
    step = 0
    history: list[dict[str, Any]] = []
    stop_reason = "completed"
    for epoch in range(n_epochs):
        steps = min(per_epoch, total_micro - epoch * per_epoch)
        shard = shard_indices(n_train, info.world_size, info.rank, epoch, t.seed).to(device)
        backend.train(True)
        bar = reporter.progress(steps, f"epoch {epoch + 1}/{n_epochs}")
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x count, correct, count
        step_losses: list[torch.Tensor] = []
        step_norms: list[tuple[int, torch.Tensor]] = []
        _sync(device)
        t0 = time.perf_counter()
        for b in range(steps):
            idx = shard[b * micro : (b + 1) * micro]
            y = data.train_y[idx]
            logits = backend.forward(augment(data.train_x[idx]))
            loss = F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing)
            backend.backward(loss)
            norm = backend.step()
            step += 1
            loss = loss.detach()
            step_losses.append(loss)
            if norm is not None:
                step_norms.append((step, norm))
            sums[0] += loss * len(y)
            sums[1] += (logits.detach().argmax(1) == y).sum()
            sums[2] += len(y)
            if bar is not None:
                bar.update()
                if b % 50 == 0:  # one host sync per 50 steps, for the eye only
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        _sync(device)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        if bar is not None:
            bar.close()

        loss_sum, correct, count = all_reduce_sum(sums).tolist()
        losses = all_reduce_sum(torch.stack(step_losses).double()) / info.world_size
        images += int(count)
        val_loss, val_acc = evaluate(backend, data, augment, info, t.data.eval_batch_size)
        norms = [float(n) for _, n in step_norms]
        first_step = step - steps + 1
        steps_rows = [{"step": first_step + i, "epoch": epoch + 1, "loss": float(v)} for i, v in enumerate(losses)]
        for s, n in step_norms:
            steps_rows[s - first_step]["grad_norm"] = float(n)
        m = {
            "epoch": epoch + 1,
            "epoch_fraction": steps / per_epoch,
            "step": step,
            "train_loss": loss_sum / count,
            "train_acc": correct / count,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": backend.lr(),
            "grad_norm": sum(norms) / len(norms) if norms else None,
            "grad_norm_max": max(norms) if norms else None,
            "epoch_time_s": epoch_time,
            "elapsed_s": time.perf_counter() - start,
            "skipped_steps": backend.skipped_steps,
        }
        history.append(m)
        reporter.epoch(m, n_epochs, steps_rows)
        # Metrics are identical on every rank after the all-reduce, but the clock is not:
        # rank 0 decides and every rank follows.
        stop, reason = broadcast_object(stopper.update(m, m["elapsed_s"]))
        if stop and epoch + 1 < n_epochs:
            stop_reason = reason
            reporter.say(describe_stop(reason, t.early_stopping, m, epoch + 1))
            break

    best = max(history, key=lambda h: h["val_acc"])
    return {
        "final_val_acc": history[-1]["val_acc"],
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "epochs_run": round(sum(h["epoch_fraction"] for h in history), 6),
        "steps": step,
        "stopped_early": stop_reason != "completed",
        "stop_reason": stop_reason,
        "train_time_s": train_time,
        "train_images_per_s": images / train_time if train_time > 0 else None,
    }
