"""The training loop: the same for every launcher and engine.

Per step it only queues work on the device: the loss, accuracy and gradient norm stay tensors
until the end of the epoch, where one all-reduce turns them into the numbers every rank agrees
on. The only per-step collective is the stop flag (SIGTERM/SIGINT), on a CPU gloo group, so it
never waits for the GPU.

Everything a resumed run needs to continue exactly (position, the interrupted epoch's partial
sums, the metric history) lives in ``Progress`` and rides in the checkpoint's ``client_state``.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cifar10ds import checkpoint as ckpt
from cifar10ds.averaging import Lookahead
from cifar10ds.batches import Augment, batches_per_epoch, eval_shard, shard_indices
from cifar10ds.callbacks import EarlyStopping, describe_stop
from cifar10ds.config import Config, optimizer_steps, total_micro_steps
from cifar10ds.dist import DistInfo, all_reduce_sum, broadcast_object
from cifar10ds.engine import Backend, LossScaleFloor
from cifar10ds.errors import ConfigError
from cifar10ds.stability import CONTINUE, GUIDE, ROLLBACK, STOP, Context, Monitor, format_diagnosis
from cifar10ds.tracking import Reporter


@dataclass
class DeviceData:
    """The data set as tensors on the training device (uint8 images, int64 labels)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class Progress:
    epoch: int = 0  # the epoch under way (0-based)
    step_in_epoch: int = 0  # micro steps of it already done
    step: int = 0  # micro steps done in the whole run
    images: int = 0
    train_time: float = 0.0
    elapsed: float = 0.0  # wall time of earlier segments of this run (before a resume)
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, Any] | None = None  # accumulators of the interrupted epoch
    best_tag: str | None = None
    wandb_id: str | None = None
    compile_s: float | None = None  # the first step's time when trainer.compile is on (it compiles)
    finished: str | None = None  # why training ended ("target", "patience", ...); a resume does not train on

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


class EpochSums:
    """Per-epoch accumulators kept on the device; convertible to plain numbers for a checkpoint."""

    def __init__(self, device: torch.device, partial: dict[str, Any] | None = None) -> None:
        p = partial or {"sums": [0.0, 0.0, 0.0], "losses": [], "norms": [], "time": 0.0}
        self.sums = torch.tensor(p["sums"], dtype=torch.float64, device=device)  # loss x count, correct, count
        self.losses: list[torch.Tensor] = [torch.tensor(v, device=device) for v in p["losses"]]
        self.norms: list[tuple[int, Any]] = [tuple(n) for n in p["norms"]]
        self.time = p["time"]

    def host_norms(self) -> list[tuple[Any, ...]]:
        """The optimizer steps' (step, norm, lr, loss scale, skipped) in host numbers: the device scalars among the
        norms and fp16 loss scales read back in one copy."""
        scales = [e[3] for e in self.norms if e[3] is not None]
        values = _host_floats([e[1] for e in self.norms] + scales)
        read = iter(values[len(self.norms):])
        return [(s, n, lr, None if scale is None else next(read), *rest)
                for n, (s, _, lr, scale, *rest) in zip(values, self.norms)]

    def to_plain(self) -> dict[str, Any]:
        return {"sums": self.sums.tolist(), "losses": _host_floats(self.losses), "norms": self.host_norms(),
                "time": self.time}


class StopSignal:
    """SIGTERM/SIGINT set a flag; ``agreed()`` tells every rank whether any rank got one."""

    def __init__(self, info: DistInfo, timeout_s: float) -> None:
        self.signum = 0
        # A CPU group: agreeing on the flag never waits for the GPU. Its timeout turns a rank
        # that stopped answering into an error here instead of a hang.
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if info.world_size > 1 else None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum
        # A second Ctrl-C acts as usual. SIGTERM often comes twice (the job's process group, then
        # the launcher forwarding it): it only ever sets the flag, so the save is not cut short.
        if signum == signal.SIGINT:
            signal.signal(signum, self._old[signum])

    def agreed(self) -> int:
        if self.group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Checkpointer:
    """Saves through the engine, adds each rank's RNG states, commits atomically, rotates."""

    def __init__(self, cfg: Config, ckpt_dir: Path, backend: Backend, info: DistInfo, augment: Augment, warn: Any):
        self.cfg = cfg.trainer.checkpoint
        self.dir = ckpt_dir
        self.backend = backend
        self.info = info
        self.augment = augment
        self.warn = warn
        # What must match for a checkpoint to be loadable at all, and for a mid-epoch one to continue.
        self.identity = {"backend": backend.name, "model": cfg.trainer.model}
        self.epoch_identity = {"train_images": None, "micro_batch": cfg.ds["train_micro_batch_size_per_gpu"],
                               "seed": cfg.trainer.seed}
        # The optimizer steps the lr schedule and Lookahead were planned for (set by train()): a resume must keep
        # them (torch's OneCycleLR even keeps its length in the checkpoint and fails past it).
        self.plan = {"optimizer_steps_per_epoch": None, "optimizer_steps": None}
        self.planned_by: list[str] = []

    def _barrier(self) -> None:
        if self.info.world_size > 1:
            dist.barrier()

    def save(self, progress: Progress, client_state: dict[str, Any], reason: str) -> str:
        tag = ckpt.tag_for(progress.step)
        tmp = ckpt.TMP_PREFIX + tag
        if self.info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir / tmp, ignore_errors=True)  # left by a save that crashed at this step
        self._barrier()
        self.backend.save_checkpoint(self.dir, tmp, client_state)
        (self.dir / tmp).mkdir(parents=True, exist_ok=True)
        # Per-rank state goes to a per-rank file: engines save client_state from rank 0 only.
        own = {"augment": self.augment.state_dict(), "partial": progress.partial,
               "buffers": {k: v.detach().cpu() for k, v in self.backend.module.named_buffers()}}
        torch.save(ckpt.rng_state(own), ckpt.rng_file(self.dir / tmp, self.info.rank))
        self._barrier()  # every rank's files are written before rank 0 commits
        if self.info.is_main:
            meta = {**self.epoch_identity, **self.plan, "step": progress.step, "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
                    "world_size": self.info.world_size, "reason": reason, **self.identity}
            ckpt.commit(self.dir, tmp, tag, meta)
            protect = {progress.best_tag} if progress.best_tag else set()
            ckpt.rotate(self.dir, self.cfg.keep_last, protect | {tag})
        self._barrier()
        return tag

    def restore(self, found: ckpt.Found) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(client_state, this rank's partial epoch sums) of checkpoint ``found``."""
        for key, value in self.identity.items():
            if key in found.meta and found.meta[key] != value:
                raise ConfigError(f"checkpoint {found.path} was saved with {key} {found.meta[key]!r}, this run uses "
                                  f"{value!r}; resume it with the same {key}")
        if found.meta.get("step_in_epoch"):
            for key, value in self.epoch_identity.items():
                if key in found.meta and found.meta[key] != value:
                    raise ConfigError(f"checkpoint {found.path} was saved mid-epoch with {key} {found.meta[key]!r}; "
                                      f"this run has {value!r}, so the epoch cannot continue: keep {key} as it was")
        saved_world = found.meta.get("world_size")
        if saved_world != self.info.world_size and found.meta.get("step_in_epoch"):
            raise ConfigError(
                f"checkpoint {found.path} was saved mid-epoch by {saved_world} ranks and cannot continue on "
                f"{self.info.world_size}; resume it with {saved_world} ranks, or from an end-of-epoch checkpoint"
            )
        saved = {key: found.meta.get(key, value) for key, value in self.plan.items()}  # older checkpoints lack it
        if self.planned_by and saved != self.plan:
            raise ConfigError(
                f"checkpoint {found.path} belongs to a run of {saved['optimizer_steps']} optimizer steps "
                f"({saved['optimizer_steps_per_epoch']:g} per epoch), which {' and '.join(self.planned_by)} "
                f"{'were' if len(self.planned_by) > 1 else 'was'} planned for; this run would take "
                f"{self.plan['optimizer_steps']} ({self.plan['optimizer_steps_per_epoch']:g} per epoch): resume with "
                "the trainer.epochs, train_batch_size, trainer.data.drop_last and training data it was saved with, "
                "or start a new run in another --output-dir")
        client_state = self.backend.load_checkpoint(found.path.parent, found.path.name)
        if saved_world != self.info.world_size:
            self.warn(f"warning: resuming {found.path.name} saved with world size {saved_world} on "
                     f"{self.info.world_size} ranks: training continues, but not bit-for-bit as it would have")
            return client_state, None
        state = torch.load(ckpt.rng_file(found.path, self.info.rank), weights_only=True)
        ckpt.set_rng_state(state)
        self.augment.load_state_dict(state["augment"])
        with torch.no_grad():  # this rank's own BatchNorm statistics, not rank 0's from the engine's file
            for name, buf in self.backend.module.named_buffers():
                buf.copy_(state["buffers"][name])
        return client_state, state["partial"]


class Fault:
    """Fault injection for the reliability tests: ``CIFAR10DS_FAULT=kind@step[@rank]``.

    After micro step ``step`` on ``rank`` (default: every rank): ``sigterm``/``sigint`` send that
    signal to this process, ``sigkill`` SIGKILL, ``raise`` raises RuntimeError, ``hang`` sleeps for good.
    ``nan``/``inf`` make the loss of micro step ``step`` non-finite before backward, once per process
    (a rollback replays the step without it).
    """

    def __init__(self, spec: str | None, rank: int) -> None:
        self.kind, self.step = None, -1
        if spec:
            kind, step, *who = spec.split("@")
            if not who or int(who[0]) == rank:
                self.kind, self.step = kind, int(step)

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


def make_monitor(cfg: Config, backend: Backend, info: DistInfo, data: DeviceData) -> Monitor:
    import models

    def warn(line: str) -> None:
        if info.is_main:
            print(line, file=sys.stderr, flush=True)

    opt = cfg.ds["optimizer"]
    context = Context(
        model=cfg.trainer.model, has_normalization=models.has_normalization(backend.module), precision=cfg.precision,
        optimizer=opt["type"], lr=float(opt.get("params", {}).get("lr", backend.lr())),
        gradient_clipping=float(cfg.ds["gradient_clipping"]),
        num_classes=max(int(data.train_y.max()) + 1, 2) if len(data.train_y) else 10,
        models_available=tuple(models.list_models()),
    )
    return Monitor(cfg.trainer.stability, context, warn)


def checked_step(backend: Backend, monitor: Monitor, loss: torch.Tensor, lr: float, step: int
                 ) -> tuple[float | None, bool, str]:
    """backend.step() with the doctor's checks: (norm, skipped, action) with host values.

    Where the engine leaves the update to us, a non-finite global norm skips it (on every rank
    alike: the norm comes from the all-reduced gradients). One device-to-host read per optimizer
    step carries both the loss and the norm.
    """
    if not backend.at_boundary():
        backend.step()
        return None, False, CONTINUE
    pre, layer, skip = backend.grad_norm(), None, False
    if pre is not None:
        loss_v, norm_v = torch.stack([loss.detach().float(), pre.float()]).tolist()
        skip = not math.isfinite(norm_v)
        layer = backend.nonfinite_layer() if skip else None
    try:
        norm, skipped = backend.step(skip=skip)
    except LossScaleFloor:
        return None, True, monitor.loss_scale_floor(step, lr)
    if pre is None:  # the engine measured it inside step() (and has already synchronised to do so)
        values = [loss.detach().float()] + ([] if norm is None else [torch.as_tensor(norm).float().to(loss.device)])
        loss_v, *rest = torch.stack(values).tolist()
        norm_v = rest[0] if rest else None
    applied = not skipped and norm_v is not None and not math.isfinite(norm_v)
    scale = backend.loss_scale()
    scale = None if scale is None else float(scale)  # the doctor's host read (it has synchronised anyway)
    action = monitor.observe_step(step, loss_v, norm_v, lr, scale, skipped, layer, applied)
    return norm_v, skipped, action


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    shifted = 0.5 * (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:, 2:]))
    return 0.5 * logits + 0.5 * shifted


@torch.no_grad()
def evaluate(backend: Backend, data: DeviceData, augment: Augment, info: DistInfo, batch_size: int,
             tta_level: int = 0) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole test set, each image counted once across ranks."""
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
    return loss_sum / count, correct / count


def train(backend: Backend, data: DeviceData, cfg: Config, info: DistInfo, reporter: Reporter,
          ckpt_dir: Path, resume: ckpt.Found | None = None) -> dict[str, Any]:
    """Train for ``trainer.epochs`` (or until early stopping or a signal); return the run's results."""
    t = cfg.trainer
    device = backend.device
    clock = Clock(device)
    micro = cfg.ds["train_micro_batch_size_per_gpu"]
    accumulation = cfg.ds["gradient_accumulation_steps"]
    n_train = len(data.train_y)
    per_epoch = batches_per_epoch(n_train, info.world_size, micro, t.data.drop_last)
    total_micro = total_micro_steps(per_epoch, t.epochs)
    n_epochs = math.ceil(total_micro / per_epoch)
    aug_cfg = t.data.augmentation
    # Each rank draws its own augmentations; the seed fixes them all.
    augment = Augment(aug_cfg.crop_padding, aug_cfg.flip, aug_cfg.cutout, seed=t.seed * 1_000_003 + info.rank, device=device,
                      n_images=n_train, flip_seed=t.seed, channels_last=t.channels_last)
    opt_steps, opt_per_epoch = optimizer_steps(per_epoch, t.epochs, accumulation), per_epoch / accumulation
    lookahead = None
    if t.lookahead.enabled:
        lookahead = Lookahead(t.lookahead, backend.module, opt_steps, opt_per_epoch)
    stopper = EarlyStopping(t.early_stopping)
    checkpointer = Checkpointer(cfg, ckpt_dir, backend, info, augment, reporter.warn)
    checkpointer.epoch_identity["train_images"] = n_train
    checkpointer.plan.update(optimizer_steps_per_epoch=round(opt_per_epoch, 6), optimizer_steps=opt_steps)
    checkpointer.planned_by = (["the lr schedule"] if cfg.ds.get("scheduler") else []) + (
        ["Lookahead"] if t.lookahead.enabled else [])
    monitor = make_monitor(cfg, backend, info, data) if t.stability.enabled else None
    progress = Progress()
    if resume is not None:
        state, partial = checkpointer.restore(resume)
        progress = Progress(**state["progress"], partial=partial)
        stopper.load_state_dict(state["early_stopping"])
        if lookahead is not None and "lookahead" in state:
            lookahead.load_state_dict(state["lookahead"])
        if monitor is not None and "stability" in state:
            monitor.load_state_dict(state["stability"])
            backend.set_lr_scale(monitor.seen.lr_scale, current=monitor.seen.lr_scale)
        reporter.resume(progress.history, progress.step, progress.wandb_id)
        reporter.say(f"resumed from {resume.path} (epoch {progress.epoch + 1}, step {progress.step})")
    else:
        reporter.start()
    progress.wandb_id = reporter.wandb_id
    signals = StopSignal(info, t.dist_timeout_s)
    fault = Fault(os.environ.get("CIFAR10DS_FAULT"), info.rank)
    start = time.perf_counter()
    compile_pending = t.compile and progress.step == 0

    def elapsed() -> float:
        return progress.elapsed + time.perf_counter() - start

    def save(reason: str) -> str:
        before = progress.elapsed
        progress.elapsed = elapsed()  # what the checkpoint records; this process keeps counting from start
        shared = {k: v for k, v in progress.state_dict().items() if k != "partial"}  # partial is per rank
        client_state = {"progress": shared, "early_stopping": stopper.state_dict()}
        if monitor is not None:
            client_state["stability"] = monitor.state_dict()
        if lookahead is not None:
            client_state["lookahead"] = lookahead.state_dict()
        tag = checkpointer.save(progress, client_state, reason)
        progress.elapsed = before
        return tag

    def rollback() -> None:
        """Reload the newest committed checkpoint and go on at a lower lr (every rank, together)."""
        nonlocal progress
        assert monitor is not None
        found = broadcast_object(ckpt.find_resume(ckpt_dir, reporter.warn) if info.is_main else None)
        if found is None:
            raise RuntimeError(f"no committed checkpoint in {ckpt_dir} to roll back to")
        seen = monitor.seen
        scale = seen.lr_scale * t.stability.rollback_lr_factor
        state, partial = checkpointer.restore(found)
        progress = Progress(**{**state["progress"], "wandb_id": progress.wandb_id}, partial=partial)
        stopper.load_state_dict(state["early_stopping"])
        if lookahead is not None and "lookahead" in state:
            lookahead.load_state_dict(state["lookahead"])
        saved = state.get("stability", {}).get("seen", {})
        backend.set_lr_scale(scale, current=saved.get("lr_scale", 1.0))
        seen.rollbacks += 1
        seen.lr_scale, seen.consecutive_skips, seen.stuck_epochs = scale, 0, saved.get("stuck_epochs", 0)
        reporter.rewind(progress.history, progress.step)
        monitor.warn(f"stability: rolled back to {found.path.name} (step {progress.step}); training on at "
                     f"lr x{scale:g} (rollback {seen.rollbacks} of {t.stability.max_rollbacks})")

    stop_reason, signum = "completed", 0
    epoch_save_due = False  # an epoch's checkpoint that waits for the end of an accumulation window
    if monitor is not None and t.stability.on_nonfinite == "rollback" and resume is None:
        save("start")  # something to roll back to before the first epoch ends
    try:
        if progress.finished:
            stop_reason = progress.finished
            reporter.say(f"the checkpoint is from a run that had already stopped ({stop_reason}); nothing to train")
        while progress.epoch < n_epochs and not progress.finished:
            epoch = progress.epoch
            steps = min(per_epoch, total_micro - epoch * per_epoch)
            shard = shard_indices(n_train, info.world_size, info.rank, epoch, t.seed).to(device)
            acc = EpochSums(device, progress.partial)
            doctor = CONTINUE
            first_step = progress.step - progress.step_in_epoch + 1
            backend.train(True)
            if lookahead is not None:
                lookahead.start_epoch()  # back from the average the last epoch ended on to the training weights
            on_epoch_start = getattr(backend.module, "on_epoch_start", None)
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            bar = reporter.progress(steps, f"epoch {epoch + 1}/{n_epochs}", initial=progress.step_in_epoch)
            _sync(device)
            t0 = clock.mark()
            for b in range(progress.step_in_epoch, steps):
                idx = shard[b * micro : (b + 1) * micro]
                y = data.train_y[idx]
                if compile_pending:
                    t_first = clock.mark()
                logits = backend.forward(augment(data.train_x[idx], idx, epoch))
                loss = fault.poison(progress.step + 1, F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing))
                backend.backward(loss)
                lr = backend.lr()  # the lr this step uses (the engine's scheduler moves on inside step())
                if monitor is None:
                    norm, skipped = backend.step()
                else:
                    norm, skipped, doctor = checked_step(backend, monitor, loss, lr, progress.step + 1)
                progress.step += 1
                if lookahead is not None and progress.step % accumulation == 0:
                    lookahead.after_step(progress.step // accumulation)
                if compile_pending:  # the first step compiles: timed on its own, not as training
                    progress.compile_s = clock.since(t_first)
                    t0 = clock.mark()  # the epoch's training time starts after it
                    compile_pending = False
                fault.maybe(progress.step)
                progress.step_in_epoch = b + 1
                loss = loss.detach()
                acc.losses.append(loss)
                if norm is not None:  # an optimizer step: norm and loss scale may be device scalars, read at the end
                    acc.norms.append((progress.step, norm, lr, backend.loss_scale(), skipped))
                if not skipped:  # a skipped step trained nothing: keep it out of the epoch's averages
                    acc.sums[0] += loss * len(y)
                    acc.sums[1] += (logits.detach().argmax(1) == y).sum()
                    acc.sums[2] += len(y)
                if bar is not None:
                    bar.update()
                    if b % 50 == 0:  # one host sync per 50 steps, for the eye only
                        bar.set_postfix(loss=f"{loss.item():.3f}")
                # Stop and save only between optimizer steps: gradients of a half-done accumulation
                # window are not in any checkpoint.
                signum = signals.agreed() if progress.step % accumulation == 0 else 0
                every = t.checkpoint.every_steps
                stopping = signum or doctor in (STOP, ROLLBACK)
                epoch_save_now = epoch_save_due and progress.step % accumulation == 0
                if stopping or (((every and progress.step % every == 0) or epoch_save_now) and b + 1 < steps):
                    seconds = clock.since(t0)
                    acc.time += seconds
                    progress.train_time += seconds
                    progress.partial = acc.to_plain()
                    if stopping:
                        break
                    save("epoch" if epoch_save_now else "every_steps")
                    epoch_save_due = False
                    t0 = clock.mark()  # time spent saving is not training time
            if bar is not None:
                bar.close()
            if doctor == ROLLBACK and not signum:
                doctor = CONTINUE
                rollback()
                continue
            if doctor == STOP and not signum:
                stop_reason = "nonfinite"
                if monitor is not None and not monitor.seen.applied_nonfinite:  # never save non-finite weights
                    tag = save("nonfinite")
                    reporter.say(f"stopped at step {progress.step}; checkpoint {ckpt_dir / tag} holds the last "
                                 "finite weights")
                break
            if signum:
                tag = save("signal")
                reporter.say(f"stopped by signal {signal.Signals(signum).name} at step {progress.step}; "
                             f"checkpoint {ckpt_dir / tag}; resume with --resume auto --output-dir {reporter.out_dir}")
                stop_reason = "signal"
                break
            seconds = clock.since(t0)
            acc.time += seconds
            progress.train_time += seconds
            if lookahead is not None:
                lookahead.end_epoch()  # the model holds the average: it is what is evaluated and saved
            tta = t.tta_level if epoch + 1 == n_epochs else 0
            m = _finish_epoch(backend, data, cfg, info, augment, acc, progress, epoch, steps, per_epoch, first_step,
                              acc.time, elapsed, tta)
            reporter.epoch(m, n_epochs, m.pop("_steps"))
            progress.history.append(m)
            progress.epoch, progress.step_in_epoch, progress.partial = epoch + 1, 0, None
            if monitor is None and not math.isfinite(m["train_loss"]):
                # The per-step checks are off (no host read per step); the epoch's loss, already on the
                # host, still tells: stop instead of training on (and reporting) non-finite weights.
                stop_reason = "nonfinite"
                if info.is_main:
                    print(f"stability: the training loss of epoch {epoch + 1} is not finite; with the per-step checks "
                          "off (trainer.stability.enabled=false) no step was skipped, so the run stops here. Turn "
                          f"them on to skip or roll back such steps and to learn where it started ({GUIDE})",
                          file=sys.stderr, flush=True)
                break
            # Metrics are identical on every rank after the all-reduce, but the clock is not:
            # rank 0 decides and every rank follows.
            stop, reason = broadcast_object(stopper.update(m, m["elapsed_s"]))
            if monitor is not None and monitor.observe_epoch(epoch + 1, m["val_acc"]) == STOP and not stop:
                stop, reason = True, "stuck"
            stop = stop and progress.epoch < n_epochs
            if stop:
                progress.finished = reason
            best = max(h["val_acc"] for h in progress.history) == m["val_acc"]
            every = t.checkpoint.every_epochs
            if t.checkpoint.save_best and best and progress.step % accumulation == 0:
                progress.best_tag = ckpt.tag_for(progress.step)
                save("best")
            elif every and (progress.epoch % every == 0 or stop or progress.epoch == n_epochs):
                # Mid-window (the epoch's micro steps are not a multiple of the accumulation), a checkpoint could
                # not continue the window: it is taken at the next optimizer step, or now when nothing follows.
                if progress.step % accumulation == 0 or stop or progress.epoch == n_epochs:
                    save("epoch")
                    epoch_save_due = False
                else:
                    epoch_save_due = True
            if stop:
                stop_reason = reason
                if reason != "stuck":
                    reporter.say(describe_stop(reason, t.early_stopping, m, progress.epoch))
                break
    finally:
        signals.restore()

    history = progress.history
    best = max(history, key=lambda h: h["val_acc"]) if history else None
    diagnosis = monitor.diagnosis() if monitor is not None else None
    if diagnosis is not None and info.is_main:
        print(format_diagnosis(diagnosis), file=sys.stderr, flush=True)
    return {
        "final_val_acc": history[-1]["val_acc"] if history else None,
        "best_val_acc": best["val_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "epochs_run": round(sum(h["epoch_fraction"] for h in history), 6),
        "steps": progress.step,
        "stopped_early": stop_reason != "completed",
        "stop_reason": stop_reason,
        "signal": signal.Signals(signum).name if signum else None,
        "train_time_s": progress.train_time,
        "compile_time_s": progress.compile_s,
        "train_images_per_s": progress.images / progress.train_time if progress.train_time > 0 and progress.images else None,
        "resumed_from": str(resume.path) if resume else None,
        "best_checkpoint": str(ckpt_dir / progress.best_tag) if progress.best_tag else None,
        # the engine's own counter restarts from a checkpoint at a rollback; the monitor's does not
        "skipped_steps": backend.skipped_steps if monitor is None else max(monitor.seen.skipped_steps, backend.skipped_steps),
        "stability": None if monitor is None else {
            k: getattr(monitor.seen, k) for k in ("nonfinite_steps", "grad_norm_warnings", "loss_spikes", "rollbacks",
                                                   "lr_scale", "max_grad_norm")},
        "diagnosis": diagnosis,
    }


def _host_floats(values: list[Any]) -> list[float]:
    """Floats of a mix of numbers and device scalars, the device ones read back together (one copy, not one each)."""
    tensors = [v for v in values if torch.is_tensor(v)]
    read = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist() if tensors else [])
    return [next(read) if torch.is_tensor(v) else float(v) for v in values]


def _finish_epoch(backend: Backend, data: DeviceData, cfg: Config, info: DistInfo, augment: Augment, acc: EpochSums,
                  progress: Progress, epoch: int, steps: int, per_epoch: int, first_step: int, epoch_time: float,
                  elapsed: Any, tta_level: int = 0) -> dict[str, Any]:
    """Reduce the epoch's sums across ranks, evaluate, and build its metrics row (+ its step rows)."""
    loss_sum, correct, count = all_reduce_sum(acc.sums).tolist()
    losses = all_reduce_sum(torch.stack(acc.losses).double()) / info.world_size
    progress.images += int(count)
    clock = Clock(backend.device)
    _sync(backend.device)
    t0 = clock.mark()
    val_loss, val_acc = evaluate(backend, data, augment, info, cfg.trainer.data.eval_batch_size, tta_level)
    eval_time = clock.since(t0)
    stepped = acc.host_norms()  # (step, norm, lr, loss scale, skipped) of each optimizer step
    finite = [n for _, n, *_ in stepped if math.isfinite(n)]
    rows: list[dict[str, Any]] = []
    for i, v in enumerate(losses.tolist()):
        rows.append({"step": first_step + i, "epoch": epoch + 1, "loss": v if math.isfinite(v) else None})
    for s, n, lr, scale, *rest in stepped:
        row = rows[s - first_step]
        row.update(grad_norm=n if math.isfinite(n) else None, lr=lr)
        if scale is not None:
            row["loss_scale"] = scale
        if rest and rest[0]:
            row["skipped"] = True
    return {
        "epoch": epoch + 1,
        "epoch_fraction": steps / per_epoch,
        "step": progress.step,
        "train_loss": loss_sum / count if count else None,
        "train_acc": correct / count if count else None,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": backend.lr(),
        "grad_norm": sum(finite) / len(finite) if finite else None,
        "grad_norm_max": max(finite) if finite else None,
        "epoch_time_s": epoch_time,
        "eval_time_s": eval_time,
        "tta_level": tta_level,
        "elapsed_s": elapsed(),
        "skipped_steps": backend.skipped_steps,
        "_steps": rows,
    }
