"""The stability doctor: per-step checks, the non-finite policy, and the diagnosis.

The loop hands ``Monitor.observe_step`` the host values it already has at each optimizer step
(loss, gradient norm before clipping, lr, loss scale, whether the engine skipped the update) and
``observe_epoch`` the epoch's metrics; the monitor answers with what to do. The decision about a
non-finite step rests on the *global* gradient norm, which every rank computes from the same
all-reduced gradients, so all ranks decide alike without talking to each other.

``diagnose`` turns what was seen into one cause and the likely fixes in order, each pointing at
its section of docs/troubleshooting.md. It is a pure function of plain data, tested table-driven.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

GUIDE = "docs/troubleshooting.md"
ADAM_FAMILY = {"adam", "adamw", "fusedadam", "onebitadam", "zerooneadam", "lamb", "onebitlamb", "adagrad", "rmsprop"}

# Actions the monitor asks of the loop at an optimizer step.
CONTINUE, SKIP, STOP, ROLLBACK = "continue", "skip", "stop", "rollback"


@dataclass
class Context:
    """What the run is: the facts a diagnosis weighs (all plain values, from the resolved config)."""

    model: str
    has_normalization: bool
    precision: str  # fp32 | bf16 | fp16
    optimizer: str
    lr: float  # the configured peak lr
    gradient_clipping: float
    num_classes: int = 10
    models_available: tuple[str, ...] = ()
    min_loss_scale: float | None = None  # DeepSpeed's fp16 optimizers' floor (None without them)


@dataclass
class Seen:
    """Everything the monitor observed; rides in the checkpoint so a resumed run keeps it."""

    first_nonfinite_step: int | None = None
    first_nonfinite_layer: str | None = None
    nonfinite_steps: int = 0
    nonfinite_loss: bool = False  # the loss itself (the forward pass) was non-finite
    lr_at_event: float | None = None
    skipped_steps: int = 0  # updates not applied (ours or the engine's)
    consecutive_skips: int = 0
    max_consecutive_skips: int = 0
    loss_scale_history: list[list[float]] = field(default_factory=list)  # [step, scale] at each change
    loss_scale_floor: bool = False
    grad_norm_warnings: int = 0
    first_grad_norm_warning: list[float] | None = None  # [step, norm]
    max_grad_norm: float | None = None
    loss_spikes: int = 0
    first_loss_spike: list[float] | None = None  # [step, loss, running median]
    stuck_epochs: int = 0
    chance_acc: float | None = None
    applied_nonfinite: bool = False  # the engine applied a non-finite update (weights are suspect)
    rollbacks: int = 0
    lr_scale: float = 1.0
    stop: str | None = None  # why the doctor stopped the run: "nonfinite" or "stuck"


class Monitor:
    def __init__(self, cfg: Any, context: Context, warn: Any = print) -> None:
        self.cfg = cfg  # StabilityConfig
        self.context = context
        self.warn = warn
        self.seen = Seen(chance_acc=1.0 / context.num_classes)
        self._losses: deque[float] = deque(maxlen=cfg.loss_window)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": asdict(self.seen), "losses": list(self._losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = Seen(**state["seen"])
        self._losses = deque(state["losses"], maxlen=self.cfg.loss_window)

    # ------------------------------------------------------------------------------ per step

    def observe_step(self, step: int, loss: float, norm: float | None, lr: float, loss_scale: float | None,
                     skipped: bool, layer: str | None = None, engine_applied: bool = False) -> str:
        """One optimizer step. ``skipped``: the update was not applied. Returns the action for the loop.

        ``engine_applied``: the engine applied the update although the norm is non-finite (DeepSpeed
        ZeRO in fp32 checks nothing), so skipping is no longer possible.
        """
        s = self.seen
        previous_scale = s.loss_scale_history[-1][1] if s.loss_scale_history else None
        if loss_scale is not None and (not s.loss_scale_history or s.loss_scale_history[-1][1] != loss_scale):
            s.loss_scale_history.append([step, loss_scale])
            del s.loss_scale_history[:-20]  # the recent history tells the story
        nonfinite = norm is not None and not math.isfinite(norm)
        if not math.isfinite(loss):
            nonfinite = True
            s.nonfinite_loss = s.nonfinite_loss or s.first_nonfinite_step is None
        if nonfinite or skipped:
            s.skipped_steps += skipped
            s.consecutive_skips = s.consecutive_skips + 1 if skipped else 0
            s.max_consecutive_skips = max(s.max_consecutive_skips, s.consecutive_skips)
        else:
            s.consecutive_skips = 0
        floor = self.context.min_loss_scale
        if skipped and None not in (floor, loss_scale, previous_scale) and max(loss_scale, previous_scale) <= floor:
            # an overflow at the minimum scale: ZeRO's optimizers raise here, DeepSpeed's others clamp and go on skipping
            return self.loss_scale_floor(step, lr)
        if nonfinite:
            s.nonfinite_steps += 1
            if s.first_nonfinite_step is None:
                s.first_nonfinite_step, s.first_nonfinite_layer, s.lr_at_event = step, layer, lr
            s.applied_nonfinite = s.applied_nonfinite or engine_applied
            return self._on_nonfinite(step, loss, norm, skipped, engine_applied)
        if skipped:  # the engine skipped without a non-finite norm we could see (fp16 overflow)
            return self._too_many_skips(step)
        self._check_norm(step, norm)
        self._check_loss(step, loss)
        return CONTINUE

    def _on_nonfinite(self, step: int, loss: float, norm: float | None, skipped: bool, applied: bool) -> str:
        c = self.cfg
        if self.context.precision == "fp16" and skipped and not applied:
            # fp16 overflow is how the loss scaler finds its scale: normal, unless it never ends.
            return self._too_many_skips(step)
        if self.seen.nonfinite_steps == 1:
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            where = f" (first non-finite gradient: {self.seen.first_nonfinite_layer})" if self.seen.first_nonfinite_layer else ""
            self.warn(f"stability: non-finite {what} at step {step}{where}; "
                      f"trainer.stability.on_nonfinite={c.on_nonfinite} (see {GUIDE}#non-finite-loss-or-gradients)")
        if applied:  # the weights took the step: only a rollback (or stopping) helps now
            return self._rollback_or_stop()
        if c.on_nonfinite == "stop":
            self.seen.stop = "nonfinite"
            return STOP
        if c.on_nonfinite == "rollback":
            return self._rollback_or_stop()
        return self._too_many_skips(step)

    def _rollback_or_stop(self) -> str:
        if self.cfg.on_nonfinite == "rollback" and self.seen.rollbacks < self.cfg.max_rollbacks:
            return ROLLBACK
        self.seen.stop = "nonfinite"
        return STOP

    def _too_many_skips(self, step: int) -> str:
        if self.seen.consecutive_skips >= self.cfg.max_consecutive_skips:
            self.warn(f"stability: {self.seen.consecutive_skips} steps in a row skipped (up to step {step}); "
                      f"stopping instead of spinning (trainer.stability.max_consecutive_skips="
                      f"{self.cfg.max_consecutive_skips})")
            if self.cfg.on_nonfinite == "rollback" and self.seen.rollbacks < self.cfg.max_rollbacks:
                return ROLLBACK
            self.seen.stop = "nonfinite"
            return STOP
        return SKIP

    def loss_scale_floor(self, step: int, lr: float) -> str:
        """DeepSpeed raised "Current loss scale already at minimum": fp16 cannot represent these gradients."""
        s = self.seen
        s.loss_scale_floor = True
        if s.first_nonfinite_step is None:
            s.first_nonfinite_step, s.lr_at_event = step, lr
        s.nonfinite_steps += 1
        self.warn(f"stability: the fp16 loss scale is at its minimum at step {step} (DeepSpeed would exit here); "
                  f"see {GUIDE}#fp16-loss-scale-at-minimum")
        return self._rollback_or_stop()

    def _check_norm(self, step: int, norm: float | None) -> None:
        if norm is None:
            return
        s = self.seen
        s.max_grad_norm = norm if s.max_grad_norm is None else max(s.max_grad_norm, norm)
        limit = self.cfg.max_grad_norm_warn
        if limit is not None and norm > limit:
            s.grad_norm_warnings += 1
            if s.first_grad_norm_warning is None:
                s.first_grad_norm_warning = [step, norm]
                self.warn(f"stability: gradient norm {norm:.4g} at step {step} is above "
                          f"trainer.stability.max_grad_norm_warn={limit:g} (see {GUIDE}#exploding-gradients)")

    def _check_loss(self, step: int, loss: float) -> None:
        k = self.cfg.loss_spike_factor
        if k is not None and len(self._losses) >= min(20, self._losses.maxlen or 20):
            median = statistics.median(self._losses)
            if loss > k * median:
                s = self.seen
                s.loss_spikes += 1
                if s.first_loss_spike is None:
                    s.first_loss_spike = [step, loss, median]
                    self.warn(f"stability: loss {loss:.4g} at step {step} is {loss / median:.3g}x its running median "
                              f"{median:.4g} (see {GUIDE}#loss-spikes)")
        self._losses.append(loss)

    # ----------------------------------------------------------------------------- per epoch

    def observe_epoch(self, epoch: int, val_acc: float) -> str:
        s = self.seen
        near_chance = val_acc <= s.chance_acc + 0.02
        s.stuck_epochs = s.stuck_epochs + 1 if near_chance else 0
        n = self.cfg.stuck_epochs
        if n is not None and s.stuck_epochs == n:
            self.warn(f"stability: val_acc {100 * val_acc:.2f}% is at chance ({100 * s.chance_acc:.0f}%) for {n} "
                      f"epochs in a row (epoch {epoch}); see {GUIDE}#accuracy-stuck-at-chance")
            if self.cfg.on_stuck == "stop":
                s.stop = "stuck"
                return STOP
        return CONTINUE

    # ----------------------------------------------------------------------------- rollback

    def rolled_back(self, saved: dict[str, Any]) -> None:
        """The run went back to a checkpoint whose monitor state was ``saved``: what happened since stays on record,
        the lr goes down by ``rollback_lr_factor``, and the stuck count is the checkpoint's."""
        s = self.seen
        s.rollbacks += 1
        s.lr_scale *= self.cfg.rollback_lr_factor
        s.consecutive_skips, s.stuck_epochs = 0, saved.get("seen", {}).get("stuck_epochs", 0)

    def diagnosis(self) -> dict[str, Any] | None:
        return diagnose(asdict(self.seen), asdict(self.context), stuck_limit=self.cfg.stuck_epochs)


def make_monitor(cfg: Any, module: Any, lr: float, num_classes: int, warn: Any) -> Monitor:
    """The doctor for a run of resolved config ``cfg`` (a Config) training ``module`` at peak ``lr``."""
    import models

    opt = cfg.ds["optimizer"]
    context = Context(
        model=cfg.trainer.model, has_normalization=models.has_normalization(module), precision=cfg.precision,
        optimizer=opt["type"], lr=float(opt.get("params", {}).get("lr", lr)),
        gradient_clipping=float(cfg.ds["gradient_clipping"]), num_classes=num_classes,
        models_available=tuple(models.list_models()),
        min_loss_scale=float(cfg.ds["fp16"].get("min_loss_scale", 1)) if cfg.precision == "fp16" and not cfg.autocast
        else None,
    )
    return Monitor(cfg.trainer.stability, context, warn)


# ---------------------------------------------------------------------------------- diagnosis

CAUSES = {
    "fp16_loss_scale_floor": ("the fp16 loss scale fell to its minimum: the gradients do not fit in fp16 at any scale",
                              "fp16-loss-scale-at-minimum"),
    "fp16_overflow": ("fp16 overflowed step after step: the loss scaler kept skipping updates", "skipped-steps"),
    "nonfinite_loss": ("the loss became non-finite: the forward pass overflowed (weights or activations blew up)",
                       "non-finite-loss-or-gradients"),
    "nonfinite_gradients": ("the gradients became non-finite (gradient explosion)", "non-finite-loss-or-gradients"),
    "diverged": ("training diverged: the loss or the gradients blew up, then the model collapsed to chance accuracy",
                 "accuracy-stuck-at-chance"),
    "stuck_at_chance": ("accuracy stayed at chance: the model is not learning", "accuracy-stuck-at-chance"),
    "exploding_gradients": ("the gradient norm ran far above normal (an explosion in the making)", "exploding-gradients"),
    "loss_spikes": ("the loss spiked far above its running median", "loss-spikes"),
}


def _fix(anchor: str, text: str, sets: list[str] | None = None) -> dict[str, Any]:
    return {"fix": text, "set": sets or [], "doc": f"{GUIDE}#{anchor}"}


def diagnose(seen: dict[str, Any], ctx: dict[str, Any], stuck_limit: int | None = 3) -> dict[str, Any] | None:
    """One cause and the likely fixes in order, or None when nothing worth a diagnosis was seen."""
    stuck = stuck_limit is not None and seen["stuck_epochs"] >= stuck_limit
    if seen["loss_scale_floor"]:
        cause = "fp16_loss_scale_floor"
    elif ctx["precision"] == "fp16" and seen["stop"] == "nonfinite" and not seen["nonfinite_loss"]:
        cause = "fp16_overflow"
    elif seen["first_nonfinite_step"] is not None and seen["nonfinite_loss"]:
        cause = "nonfinite_loss"
    elif seen["first_nonfinite_step"] is not None and ctx["precision"] != "fp16":
        cause = "nonfinite_gradients"
    elif stuck and (seen["loss_spikes"] or seen["grad_norm_warnings"]):
        cause = "diverged"
    elif stuck:
        cause = "stuck_at_chance"
    elif seen["grad_norm_warnings"]:
        cause = "exploding_gradients"
    elif seen["loss_spikes"]:
        cause = "loss_spikes"
    else:
        return None
    summary, anchor = CAUSES[cause]
    return {
        "cause": cause,
        "summary": summary,
        "doc": f"{GUIDE}#{anchor}",
        "first_nonfinite_step": seen["first_nonfinite_step"],
        "first_nonfinite_layer": seen["first_nonfinite_layer"],
        "lr_at_event": seen["lr_at_event"],
        "loss_scale_history": seen["loss_scale_history"],
        "skipped_steps": seen["skipped_steps"],
        "nonfinite_steps": seen["nonfinite_steps"],
        "max_grad_norm": seen["max_grad_norm"],
        "first_grad_norm_warning": seen["first_grad_norm_warning"],
        "first_loss_spike": seen["first_loss_spike"],
        "stuck_epochs": seen["stuck_epochs"],
        "rollbacks": seen["rollbacks"],
        "lr_scale": seen["lr_scale"],
        "precision": ctx["precision"],
        "optimizer": ctx["optimizer"],
        "gradient_clipping": ctx["gradient_clipping"],
        "has_normalization": ctx["has_normalization"],
        "model": ctx["model"],
        "fixes": fixes_for(cause, ctx),
    }


def fixes_for(cause: str, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """The write-up's fixes, most likely to work alone first, keeping only those this run lacks.

    Measured on the write-up's network (docs/troubleshooting.md#try-it): a 10x lower lr fixes the
    divergence on its own, and so do BatchNorm + SGD + clipping together; each of those three alone
    does not. So: the lr first, then the write-up's stable recipe in one go, then the single fixes.
    """
    fp16 = ctx["precision"] == "fp16"
    adam = ctx["optimizer"].lower() in ADAM_FAMILY
    lr = ctx["lr"]
    available = set(ctx.get("models_available") or ())
    model = ctx["model"]
    bn_model = f"{model}_bn" if f"{model}_bn" in available else "bn_cnn"
    sgd = 'optimizer={"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}'
    fixes: list[dict[str, Any]] = []
    precision_fix = _fix("fp16-range", "train in bf16 (fp32's range, no loss scaling) or fp32",
                         ["fp16.enabled=false", "bf16.enabled=true"])
    if fp16 and cause.startswith("fp16"):
        fixes.append(precision_fix)
    if cause == "stuck_at_chance":
        fixes.append(_fix("learning-rate", f"the lr may be too high or too low (now {lr:g}): try {lr / 10:g}, then "
                          f"{lr * 3:g}", [f"optimizer.params.lr={lr / 10:g}"]))
    else:
        fixes.append(_fix("learning-rate", f"lower the lr 10x (now {lr:g})", [f"optimizer.params.lr={lr / 10:g}"]))
    recipe = [(not ctx["has_normalization"], f"trainer.model={bn_model}", "BatchNorm"),
              (adam, sgd, "SGD with momentum"), (not ctx["gradient_clipping"], "gradient_clipping=1.0", "clipping")]
    missing = [(setting, name) for lacking, setting, name in recipe if lacking]
    if len(missing) > 1:
        fixes.append(_fix("the-stable-recipe", "the write-up's stable recipe, all at once: "
                          + " + ".join(name for _, name in missing), [setting for setting, _ in missing]))
    if not ctx["has_normalization"]:
        fixes.append(_fix("batchnorm", f"add BatchNorm after every conv (model {bn_model})", [f"trainer.model={bn_model}"]))
    if adam:
        fixes.append(_fix("adam-vs-sgd", "use SGD with momentum instead of Adam (the write-up: lr 0.01, momentum 0.9)",
                          [sgd]))
    if not ctx["gradient_clipping"]:
        fixes.append(_fix("gradient-clipping", "clip the global gradient norm to 1.0", ["gradient_clipping=1.0"]))
    if fp16 and not cause.startswith("fp16"):
        fixes.append(precision_fix)
    if not ctx["has_normalization"] and f"{model}_fanin" in available:
        fixes.append(_fix("initialization", "conservative init (Kaiming fan_in, linear weights x 0.5)",
                          [f"trainer.model={model}_fanin"]))
    if cause in ("stuck_at_chance", "diverged"):
        fixes.append(_fix("data-and-labels", "check that the labels match the images (a run on shuffled labels "
                          "also sits at chance)"))
    return fixes


def format_diagnosis(d: dict[str, Any]) -> str:
    """The block printed when the doctor stops or warns."""
    facts = [f"{d['precision']}", d["optimizer"], "normalization" if d["has_normalization"] else "no normalization",
             f"gradient_clipping {d['gradient_clipping']:g}"]
    lines = [f"stability doctor: {d['summary']}", f"  run: {d['model']}, {', '.join(facts)}"]
    seen = []
    if d["first_nonfinite_step"] is not None:
        where = f" (first non-finite gradient in {d['first_nonfinite_layer']})" if d["first_nonfinite_layer"] else ""
        lr = f", lr {d['lr_at_event']:.4g}" if d["lr_at_event"] is not None else ""
        seen.append(f"first non-finite step {d['first_nonfinite_step']}{where}{lr}")
    if d["skipped_steps"]:
        seen.append(f"skipped steps: {d['skipped_steps']}")
    if d["loss_scale_history"]:
        seen.append("loss scale " + " -> ".join(f"{scale:g}@{int(step)}" for step, scale in d["loss_scale_history"][-6:]))
    if d["first_grad_norm_warning"]:
        step, norm = d["first_grad_norm_warning"]
        seen.append(f"gradient norm {norm:.4g} at step {int(step)} (max {d['max_grad_norm']:.4g})")
    if d["first_loss_spike"]:
        step, loss, median = d["first_loss_spike"]
        seen.append(f"loss {loss:.4g} at step {int(step)} ({loss / median:.3g}x the running median)")
    if d["stuck_epochs"]:
        seen.append(f"{d['stuck_epochs']} epochs at chance accuracy")
    if d["rollbacks"]:
        seen.append(f"{d['rollbacks']} rollbacks (lr x{d['lr_scale']:g})")
    if seen:
        lines.append("  seen: " + "; ".join(seen))
    lines.append("  likely fixes, in order:")
    for i, f in enumerate(d["fixes"], 1):
        sets = " ".join(f"--set '{s}'" if " " in s or '"' in s else f"--set {s}" for s in f["set"])
        lines.append(f"    {i}. {f['fix']}{': ' + sets if sets else ''}  ({f['doc']})")
    return "\n".join(lines)
