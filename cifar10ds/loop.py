"""The training loop: the same for every launcher and engine.

Per step it only queues work on the device: the loss, accuracy and gradient norm stay tensors
until the end of the epoch, where one all-reduce turns them into the numbers every rank agrees
on. The only per-step collective is the stop flag (SIGTERM/SIGINT), on a CPU gloo group, so it
never waits for the GPU. Why the run stops is decided in one place, ``why_stop``.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cifar10ds import checkpoint as ckpt
from cifar10ds.averaging import Lookahead
from cifar10ds.batches import Augment, shard_indices
from cifar10ds.data import DeviceData
from cifar10ds.dist import DistInfo, StopSignal, broadcast_object, warn
from cifar10ds.early_stopping import describe_stop, should_stop
from cifar10ds.engines import Backend, LossScaleFloor
from cifar10ds.errors import DiskFullError
from cifar10ds.estimate import Estimate, StepTimer, announcement
from cifar10ds.evaluation import Clock, compile_evaluation, compiled_graphs, sync, sync_debug, timed_evaluate
from cifar10ds.faults import Fault
from cifar10ds.plan import RunPlan
from cifar10ds.stability import CONTINUE, GUIDE, ROLLBACK, STOP, Monitor, format_diagnosis, make_monitor
from cifar10ds.state import EpochSums, Progress, TrainingState
from cifar10ds.tracking import Reporter


def why_stop(signum: int = 0, doctor: str = CONTINUE, epoch_loss: float | None = None, checked: bool = True,
             early: str | None = None, stuck: bool = False, last_epoch: bool = False) -> str | None:
    """Why the run stops now ("signal", "nonfinite", an early-stopping reason, "stuck"), "rollback" to go back to
    the last checkpoint and on, or None to go on. In order: a signal; the doctor's verdict on a step; a non-finite
    epoch loss where no step was checked; then, unless the planned last epoch just ended, early stopping and a
    run stuck at chance."""
    if signum:
        return "signal"
    if doctor in (ROLLBACK, STOP):
        return "rollback" if doctor == ROLLBACK else "nonfinite"
    if not checked and epoch_loss is not None and not math.isfinite(epoch_loss):
        return "nonfinite"
    if last_epoch:
        return None
    return early or ("stuck" if stuck else None)


@dataclass
class Loop:
    """What the epoch and the step work with, built once per run by ``train``."""

    backend: Backend
    data: DeviceData
    plan: RunPlan
    info: DistInfo
    reporter: Reporter
    augment: Augment
    state: TrainingState
    checkpoints: ckpt.Checkpointer
    schedule: ckpt.SaveSchedule
    signals: StopSignal
    fault: Fault
    clock: Clock
    started: float  # this process's start of training (perf_counter)
    compile_pending: bool  # trainer.compile: the next step compiles and is timed apart
    timer: StepTimer  # times a few steps once, for the run's estimate
    graphs: int | None = None  # trainer.compile: graphs compiled when the first step's compiling ended
    estimate: Estimate | None = None  # seconds per step and per evaluation: the timer's, then the last epoch's

    @property
    def progress(self) -> Progress:
        return self.state.progress

    def elapsed(self) -> float:
        return self.progress.elapsed + time.perf_counter() - self.started

    def save(self, reason: str) -> str:
        return self.checkpoints.save(self.state, reason, self.elapsed())


def train(backend: Backend, data: DeviceData, plan: RunPlan, info: DistInfo, reporter: Reporter,
          ckpt_dir: Path, resume: ckpt.Found | None = None) -> dict[str, Any]:
    """Train for ``trainer.epochs`` (or until a stop); return the run's results."""
    loop = _start(backend, data, plan, info, reporter, ckpt_dir, resume)
    stop_reason, signum = loop.progress.finished or "completed", 0
    if loop.progress.finished:
        reporter.say(f"the checkpoint is from a run that had already stopped ({stop_reason}); nothing to train")
    error = None
    try:
        if loop.schedule.at_start(resumed=resume is not None):
            loop.save("start")  # something to roll back to before the first epoch ends
        while loop.progress.epoch < plan.epochs and not loop.progress.finished:
            steps, sums, signum, doctor = run_epoch(loop)
            reason = why_stop(signum=signum, doctor=doctor)
            if reason == "rollback":
                _roll_back(loop, ckpt_dir)
                continue
            if reason is not None:
                stop_reason = _stop_mid_epoch(loop, reason, signum, ckpt_dir)
                break
            reason = end_epoch(loop, steps, sums)
            if reason is not None:
                stop_reason = reason
                break
    except DiskFullError as e:  # every rank, together: a checkpoint found no room
        stop_reason, error = "disk_full", str(e)
    finally:
        loop.signals.restore()
    return {**_results(loop, stop_reason, signum, resume, ckpt_dir), "error": error}


def _start(backend: Backend, data: DeviceData, plan: RunPlan, info: DistInfo, reporter: Reporter, ckpt_dir: Path,
           resume: ckpt.Found | None) -> Loop:
    t = plan.config.trainer
    aug = t.data.augmentation
    # Each rank draws its own augmentations; the seed fixes them all.
    augment = Augment(aug.crop_padding, aug.flip, aug.cutout, seed=t.seed * 1_000_003 + info.rank,
                      device=backend.device, n_images=plan.n_train, flip_seed=t.seed, channels_last=t.channels_last)
    lookahead = Lookahead(t.lookahead, backend.module, plan.optimizer_steps, plan.optimizer_steps_per_epoch
                          ) if t.lookahead.enabled else None
    monitor = _monitor(plan, backend, data) if t.stability.enabled else None
    checkpoints = ckpt.Checkpointer(plan, ckpt_dir, backend, info, augment)
    state = TrainingState(Progress(), lookahead, monitor)
    if resume is not None:
        _restore(backend, state, checkpoints.restore(resume))
        reporter.resume(state.progress.history, state.progress.step, state.progress.wandb_id)
        reporter.say(f"resumed from {resume.path} (epoch {state.progress.epoch + 1}, step {state.progress.step})")
    else:
        reporter.start()
    state.progress.wandb_id = reporter.wandb_id
    schedule = ckpt.SaveSchedule(t.checkpoint, plan.accumulation, rollback=monitor is not None and
                                 t.stability.on_nonfinite == "rollback")
    clock = Clock(backend.device)
    return Loop(backend, data, plan, info, reporter, augment, state, checkpoints, schedule,
                StopSignal(info, t.dist_timeout_s), Fault.from_env(info.rank), clock,
                started=time.perf_counter(), compile_pending=bool(t.compile) and state.progress.step == 0,
                timer=StepTimer(clock, plan.accumulation))


def _monitor(plan: RunPlan, backend: Backend, data: DeviceData) -> Monitor:
    num_classes = max(int(data.train_y.max()) + 1, 2) if len(data.train_y) else 10
    return make_monitor(plan.config, backend.module, backend.lr(), num_classes, warn)


def _restore(backend: Backend, state: TrainingState, restored: tuple[dict[str, Any], dict[str, Any] | None],
             rollback: bool = False) -> None:
    """Continue from a checkpoint's (client_state, partial epoch sums): resume and rollback alike."""
    saved_scale = state.load_state_dict(*restored, rollback=rollback)
    backend.set_lr_scale(state.lr_scale, current=saved_scale)


def _roll_back(loop: Loop, ckpt_dir: Path) -> None:
    """Reload the newest committed checkpoint and go on at a lower lr (every rank, together)."""
    found = broadcast_object(ckpt.find_resume(ckpt_dir, warn) if loop.info.is_main else None)
    if found is None:
        raise RuntimeError(f"no committed checkpoint in {ckpt_dir} to roll back to")
    wandb_id = loop.progress.wandb_id
    _restore(loop.backend, loop.state, loop.checkpoints.restore(found), rollback=True)
    loop.progress.wandb_id = wandb_id
    loop.reporter.rewind(loop.progress.history, loop.progress.step)
    seen, cfg = loop.state.monitor.seen, loop.plan.config.trainer.stability
    warn(f"stability: rolled back to {found.path.name} (step {loop.progress.step}); training on at "
         f"lr x{seen.lr_scale:g} (rollback {seen.rollbacks} of {cfg.max_rollbacks})")


def run_epoch(loop: Loop) -> tuple[int, EpochSums, int, str]:
    """Train the epoch under way from where it stands: (its micro steps, its sums, the agreed signal, the doctor's
    last action). A signal or the doctor's verdict ends it early, its sums kept in ``progress.partial``."""
    p, plan, clock = loop.progress, loop.plan, loop.clock
    epoch, steps = p.epoch, plan.steps_in_epoch(p.epoch)
    shard = shard_indices(plan.n_train, loop.info.world_size, loop.info.rank, epoch, plan.config.trainer.seed)
    shard = shard.to(loop.backend.device)
    sums = EpochSums(loop.backend.device, p.partial)
    loop.backend.train(True)
    if loop.state.lookahead is not None:
        loop.state.lookahead.start_epoch()  # back from the average the last epoch ended on to the training weights
    loop.backend.start_epoch(epoch)
    bar = loop.reporter.progress(steps, f"epoch {epoch + 1}/{plan.epochs}", initial=p.step_in_epoch,
                                 left_s=_left_s(loop))
    loop.timer.restart()  # the window never spans an evaluation
    signum, doctor, stopping = 0, CONTINUE, False
    sync(loop.backend.device)
    t0 = clock.mark()
    for b in range(p.step_in_epoch, steps):
        first = clock.mark() if loop.compile_pending else None
        with sync_debug(loop.backend.device):
            loss, doctor = train_step(loop, sums, shard[b * plan.micro : (b + 1) * plan.micro], epoch)
        if first is not None:  # the first step compiles, and the evaluation with it: timed apart, not as training
            t = plan.config.trainer
            compile_evaluation(loop.backend, loop.data, loop.augment, loop.info, t.data.eval_batch_size, t.tta_level)
            p.compile_s, loop.compile_pending, loop.graphs = clock.since(first), False, compiled_graphs()
            t0 = clock.mark()
        p.step_in_epoch = b + 1
        loop.reporter.reached(p.step)
        if not loop.timer.done:
            _estimate_run(loop, b + 1 == steps)
        if bar is not None:
            bar.update()
            if b % 50 == 0:  # one host sync per 50 steps, for the eye only
                bar.set_postfix(loss=f"{loss.item():.3f}")
        signum = loop.signals.agreed() if p.step % plan.accumulation == 0 else 0
        stopping = why_stop(signum=signum, doctor=doctor) is not None
        due = None if stopping or b + 1 == steps else loop.schedule.mid_epoch(p.step)
        if stopping or due:
            _bank_time(loop, sums, t0)
            p.partial = sums.to_plain()
            if stopping:
                break
            loop.save(due)
            t0 = clock.mark()  # time spent saving is not training time
            loop.timer.restart()
    if bar is not None:
        bar.close()
    if not stopping:
        _bank_time(loop, sums, t0)
    return steps, sums, signum, doctor


def _estimate_run(loop: Loop, last_in_epoch: bool) -> None:
    """Once the timer's window closes: the estimate for the run, said once and shown in the progress bar."""
    step_s = loop.timer.step(last_in_epoch)
    if step_s is None:
        return
    p, plan = loop.progress, loop.plan
    loop.estimate = Estimate.from_steps(step_s, plan.micro, math.ceil(len(loop.data.test_y) / loop.info.world_size))
    lines = announcement(loop.estimate, plan.total_micro - p.step, plan.epochs - p.epoch, plan.config.trainer.tta_level,
                         on_cpu=loop.backend.device.type == "cpu", config_path=plan.config.path)
    loop.reporter.estimate(lines, _left_s(loop))


def _left_s(loop: Loop) -> float | None:
    """The run's estimated seconds left (None before the first estimate)."""
    p, plan, est = loop.progress, loop.plan, loop.estimate
    return None if est is None else est.left_s(plan.total_micro - p.step, plan.epochs - p.epoch,
                                               plan.config.trainer.tta_level)


def _bank_time(loop: Loop, sums: EpochSums, t0: Any) -> None:
    seconds = loop.clock.since(t0)
    sums.time += seconds
    loop.progress.train_time += seconds


def train_step(loop: Loop, sums: EpochSums, idx: torch.Tensor, epoch: int) -> tuple[torch.Tensor, str]:
    """One micro step on the images ``idx``: (its loss, the doctor's action)."""
    backend, p, state = loop.backend, loop.progress, loop.state
    y = loop.data.train_y[idx]
    logits = backend.forward(loop.augment(loop.data.train_x[idx], idx, epoch))
    loss = F.cross_entropy(logits.float(), y, label_smoothing=loop.plan.config.trainer.label_smoothing)
    loss = loop.fault.poison(p.step + 1, loss)
    backend.backward(loss)
    lr = backend.lr()  # the lr this step uses (the engine's scheduler moves on inside step())
    boundary = backend.at_boundary()  # an optimizer step
    if state.monitor is None:
        (norm, skipped), doctor = backend.step(), CONTINUE
    else:
        norm, skipped, doctor = checked_step(backend, state.monitor, loss, lr, p.step + 1)
    p.step += 1
    if state.lookahead is not None and p.step % loop.plan.accumulation == 0:
        state.lookahead.after_step(p.step // loop.plan.accumulation)
    loop.fault.maybe(p.step)
    loss = loss.detach()
    sums.add_step(loss, logits, y, skipped)
    if boundary:
        sums.add_update(p.step, norm, lr, backend.loss_scale(), skipped)
    return loss, doctor


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


def _stop_mid_epoch(loop: Loop, reason: str, signum: int, ckpt_dir: Path) -> str:
    """A signal or the doctor stopped the epoch: save what can be resumed, and say so."""
    p = loop.progress
    if reason == "signal":
        tag = loop.save("signal")
        loop.reporter.say(f"stopped by signal {signal.Signals(signum).name} at step {p.step}; checkpoint "
                          f"{ckpt_dir / tag}; resume with --resume auto --output-dir {loop.reporter.out_dir}")
    elif not loop.state.monitor.seen.applied_nonfinite:  # never save non-finite weights
        tag = loop.save("nonfinite")
        loop.reporter.say(f"stopped at step {p.step}; checkpoint {ckpt_dir / tag} holds the last finite weights")
    return reason


def end_epoch(loop: Loop, steps: int, sums: EpochSums) -> str | None:
    """Evaluate the finished epoch, report it, decide whether the run stops, checkpoint; returns why it stops."""
    p, plan, t = loop.progress, loop.plan, loop.plan.config.trainer
    epoch, first_step = p.epoch, p.step - steps + 1
    if loop.state.lookahead is not None:
        loop.state.lookahead.end_epoch()  # the model holds the average: it is what is evaluated and saved
    train_metrics, images, step_rows = sums.metrics(loop.info.world_size, first_step, epoch)
    p.images += images
    tta = t.tta_level if epoch + 1 == plan.epochs else 0
    val_metrics, eval_time = timed_evaluate(loop.backend, loop.data, loop.augment, loop.info, t.data.eval_batch_size,
                                            tta)
    if sums.time > 0 and not tta:  # the next bars' time left: this epoch's pace
        loop.estimate = Estimate(sums.time / steps, eval_time)
    m = {"epoch": epoch + 1, "epoch_fraction": steps / plan.per_epoch, "step": p.step, **train_metrics,
         **val_metrics, "lr": loop.backend.lr(), "epoch_time_s": sums.time,
         "eval_time_s": eval_time, "tta_level": tta, "elapsed_s": loop.elapsed(),
         "skipped_steps": loop.backend.skipped_steps}
    loop.reporter.epoch(m, plan.epochs, step_rows)
    p.history.append(m)
    p.epoch, p.step_in_epoch, p.partial = epoch + 1, 0, None
    # Metrics are identical on every rank after the all-reduce, but the clock is not: rank 0 decides.
    _, early = broadcast_object(should_stop(p.history, t.early_stopping, m["elapsed_s"]))
    monitor = loop.state.monitor
    stuck = monitor is not None and monitor.observe_epoch(epoch + 1, m["val_acc"]) == STOP
    reason = why_stop(epoch_loss=m["train_loss"], checked=monitor is not None, early=early, stuck=stuck,
                      last_epoch=p.epoch >= plan.epochs)
    if reason == "nonfinite":
        warn(f"stability: the training loss of epoch {epoch + 1} is not finite; with the per-step checks off "
             "(trainer.stability.enabled=false) no step was skipped, so the run stops here. Turn them on to skip "
             f"or roll back such steps and to learn where it started ({GUIDE})")
        return reason
    p.finished = reason
    best = max(h["val_acc"] for h in p.history) == m["val_acc"]
    due = loop.schedule.at_epoch_end(p.step, p.epoch, best, last=reason is not None or p.epoch == plan.epochs)
    if due == "best":
        p.best_tag = ckpt.tag_for(p.step)
    if due:
        loop.save(due)
    if reason is not None and reason != "stuck":
        loop.reporter.say(describe_stop(reason, t.early_stopping, m, p.epoch))
    return reason


def _results(loop: Loop, stop_reason: str, signum: int, resume: ckpt.Found | None, ckpt_dir: Path) -> dict[str, Any]:
    p, monitor, backend = loop.progress, loop.state.monitor, loop.backend
    history = p.history
    best = max(history, key=lambda h: h["val_acc"]) if history else None
    diagnosis = monitor.diagnosis() if monitor is not None else None
    if diagnosis is not None:
        warn(format_diagnosis(diagnosis))
    return {
        "final_val_acc": history[-1]["val_acc"] if history else None,
        "best_val_acc": best["val_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "epochs_run": round(sum(h["epoch_fraction"] for h in history), 6),
        "steps": p.step,
        "stopped_early": stop_reason != "completed",
        "stop_reason": stop_reason,
        "signal": signal.Signals(signum).name if signum else None,
        "train_time_s": p.train_time,
        "compile_time_s": p.compile_s,
        # compiles that landed in timed training or evaluation (after the first step's)
        "recompiles": None if loop.graphs is None else compiled_graphs() - loop.graphs,
        "train_images_per_s": p.images / p.train_time if p.train_time > 0 and p.images else None,
        "resumed_from": str(resume.path) if resume else None,
        "best_checkpoint": str(ckpt_dir / p.best_tag) if p.best_tag else None,
        # the engine's own counter restarts from a checkpoint at a rollback; the monitor's does not
        "skipped_steps": backend.skipped_steps if monitor is None else max(monitor.seen.skipped_steps,
                                                                           backend.skipped_steps),
        "stability": None if monitor is None else {
            k: getattr(monitor.seen, k) for k in ("nonfinite_steps", "grad_norm_warnings", "loss_spikes", "rollbacks",
                                                   "lr_scale", "max_grad_norm")},
        "diagnosis": diagnosis,
    }
