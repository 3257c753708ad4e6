"""The stability doctor's decisions and diagnosis, as plain functions (no training)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from cifar10ds.config import StabilityConfig
from cifar10ds.stability import (
    CONTINUE,
    ROLLBACK,
    SKIP,
    STOP,
    Context,
    Monitor,
    Seen,
    diagnose,
    fixes_for,
    format_diagnosis,
)

ROOT = Path(__file__).resolve().parent.parent
NAN, INF = math.nan, math.inf
MODELS = ("bn_cnn", "cnn3", "cnn3_bn", "cnn3_fanin", "resnet9")


def ctx(**kw) -> Context:
    base = dict(model="cnn3", has_normalization=False, precision="fp32", optimizer="Adam", lr=0.05,
                gradient_clipping=0.0, models_available=MODELS)
    return Context(**{**base, **kw})


def monitor(warnings: list[str] | None = None, context: Context | None = None, **cfg) -> Monitor:
    return Monitor(StabilityConfig(**cfg), context or ctx(), (warnings if warnings is not None else []).append)


def test_finite_steps_continue_and_count_nothing():
    m = monitor()
    for step in range(1, 30):
        assert m.observe_step(step, 2.3, 1.0, 0.1, None, skipped=False) == CONTINUE
    assert m.diagnosis() is None
    assert m.seen.skipped_steps == 0 and m.seen.max_grad_norm == 1.0


@pytest.mark.parametrize("policy, expected", [("skip", SKIP), ("stop", STOP), ("rollback", ROLLBACK)])
@pytest.mark.parametrize("loss, norm", [(2.3, NAN), (2.3, INF), (NAN, NAN), (INF, 1.0)])
def test_nonfinite_step_follows_the_policy(policy, expected, loss, norm):
    warnings: list[str] = []
    m = monitor(warnings, on_nonfinite=policy)
    m.observe_step(1, 2.3, 1.0, 0.1, None, skipped=False)
    assert m.observe_step(2, loss, norm, 0.05, None, skipped=True, layer="fc2") == expected
    s = m.seen
    assert (s.first_nonfinite_step, s.first_nonfinite_layer, s.lr_at_event) == (2, "fc2", 0.05)
    assert s.skipped_steps == 1 and s.nonfinite_loss == (not math.isfinite(loss))
    assert s.stop == ("nonfinite" if policy == "stop" else None)
    assert len(warnings) == 1 and "non-finite" in warnings[0] and f"on_nonfinite={policy}" in warnings[0]


def test_skip_stops_after_max_consecutive_skips_and_a_finite_step_resets_the_count():
    m = monitor(max_consecutive_skips=3)
    assert [m.observe_step(s, 2.3, NAN, 0.1, None, True) for s in (1, 2)] == [SKIP, SKIP]
    assert m.observe_step(3, 2.3, 1.0, 0.1, None, False) == CONTINUE  # the streak ends
    actions = [m.observe_step(s, 2.3, INF, 0.1, None, True) for s in (4, 5, 6)]
    assert actions == [SKIP, SKIP, STOP]
    assert m.seen.stop == "nonfinite" and m.seen.skipped_steps == 5 and m.seen.max_consecutive_skips == 3
    assert m.seen.first_nonfinite_step == 1


def test_rollbacks_are_bounded():
    m = monitor(on_nonfinite="rollback", max_rollbacks=2)
    assert m.observe_step(1, 2.3, NAN, 0.1, None, True) == ROLLBACK
    m.seen.rollbacks = 2  # what the loop records after two rollbacks
    assert m.observe_step(2, 2.3, NAN, 0.1, None, True) == STOP
    assert m.seen.stop == "nonfinite"


def test_an_update_the_engine_applied_cannot_be_skipped():
    # DeepSpeed ZeRO in fp32 checks nothing: the weights took a non-finite step; skipping is too late
    m = monitor(on_nonfinite="skip")
    assert m.observe_step(1, 2.3, INF, 0.1, None, skipped=False, engine_applied=True) == STOP
    assert m.seen.applied_nonfinite


def test_fp16_overflow_skips_are_the_loss_scaler_at_work_until_they_never_end():
    m = monitor(context=ctx(precision="fp16"), on_nonfinite="stop", max_consecutive_skips=4)
    scales = [65536.0, 32768.0, 16384.0, 8192.0]
    actions = [m.observe_step(s, 2.3, INF, 1e-3, scale, skipped=True) for s, scale in enumerate(scales, 1)]
    assert actions == [SKIP, SKIP, SKIP, STOP]  # "stop" does not fire on the first overflow in fp16
    assert m.seen.loss_scale_history == [[1, 65536.0], [2, 32768.0], [3, 16384.0], [4, 8192.0]]
    d = m.diagnosis()
    assert d["cause"] == "fp16_overflow" and d["fixes"][0]["set"] == ["fp16.enabled=false", "bf16.enabled=true"]


def test_loss_scale_floor():
    warnings: list[str] = []
    m = monitor(warnings, context=ctx(precision="fp16"))
    assert m.loss_scale_floor(40, 1e-3) == STOP
    d = m.diagnosis()
    assert d["cause"] == "fp16_loss_scale_floor" and d["first_nonfinite_step"] == 40
    assert d["doc"].endswith("#fp16-loss-scale-at-minimum") and "minimum" in warnings[0]


def test_grad_norm_warning_and_loss_spike_are_reported_once_and_counted():
    warnings: list[str] = []
    m = monitor(warnings, max_grad_norm_warn=10.0, loss_spike_factor=4.0, loss_window=20)
    for step in range(1, 21):
        m.observe_step(step, 2.0, 1.0, 0.1, None, False)
    m.observe_step(21, 9.0, 50.0, 0.1, None, False)  # 4.5x the median, norm 50
    m.observe_step(22, 9.0, 60.0, 0.1, None, False)
    s = m.seen
    assert s.grad_norm_warnings == 2 and s.first_grad_norm_warning == [21, 50.0] and s.max_grad_norm == 60.0
    assert s.loss_spikes == 2 and s.first_loss_spike == [21, 9.0, 2.0]
    assert len(warnings) == 2
    assert "gradient norm 50 at step 21" in warnings[0] and "#exploding-gradients" in warnings[0]
    assert "4.5x its running median 2" in warnings[1]
    assert m.diagnosis()["cause"] == "exploding_gradients"


def test_no_spike_check_before_the_window_has_data():
    m = monitor(loss_spike_factor=2.0)
    m.observe_step(1, 2.3, 1.0, 0.1, None, False)
    m.observe_step(2, 50.0, 1.0, 0.1, None, False)
    assert m.seen.loss_spikes == 0


@pytest.mark.parametrize("on_stuck, expected", [("stop", STOP), ("warn", CONTINUE)])
def test_stuck_at_chance(on_stuck, expected):
    m = monitor(stuck_epochs=3, on_stuck=on_stuck)
    assert [m.observe_epoch(e, a) for e, a in ((1, 0.10), (2, 0.115))] == [CONTINUE, CONTINUE]
    assert m.observe_epoch(3, 0.09) == expected
    assert m.seen.stop == ("stuck" if on_stuck == "stop" else None)
    assert m.diagnosis()["cause"] == "stuck_at_chance"


def test_learning_resets_the_stuck_count():
    m = monitor(stuck_epochs=2)
    assert [m.observe_epoch(e, a) for e, a in ((1, 0.1), (2, 0.4), (3, 0.1))] == [CONTINUE] * 3
    assert m.seen.stuck_epochs == 1


def test_state_round_trip():
    m = monitor()
    for step in range(1, 25):
        m.observe_step(step, 2.0 + step / 100, 1.0, 0.1, None, False)
    m.observe_step(25, 2.0, NAN, 0.1, None, True, layer="fc1")
    other = monitor()
    other.load_state_dict(m.state_dict())
    assert asdict(other.seen) == asdict(m.seen) and list(other._losses) == list(m._losses)


def seen(**kw) -> dict:
    return {**asdict(Seen(chance_acc=0.1)), **kw}


@pytest.mark.parametrize("observed, context, cause", [
    (dict(loss_scale_floor=True, first_nonfinite_step=9), dict(precision="fp16"), "fp16_loss_scale_floor"),
    (dict(stop="nonfinite", first_nonfinite_step=3), dict(precision="fp16"), "fp16_overflow"),
    (dict(first_nonfinite_step=3, nonfinite_loss=True), {}, "nonfinite_loss"),
    (dict(first_nonfinite_step=3), {}, "nonfinite_gradients"),
    (dict(first_nonfinite_step=3), dict(precision="bf16"), "nonfinite_gradients"),
    (dict(stuck_epochs=3, loss_spikes=1), {}, "diverged"),
    (dict(stuck_epochs=3), {}, "stuck_at_chance"),
    (dict(stuck_epochs=2), {}, None),  # not yet
    (dict(grad_norm_warnings=4), {}, "exploding_gradients"),
    (dict(loss_spikes=1), {}, "loss_spikes"),
    ({}, {}, None),
    # fp16 overflows the scaler handled, in a run that went on: nothing to diagnose
    (dict(first_nonfinite_step=1, skipped_steps=3), dict(precision="fp16"), None),
])
def test_diagnose_names_the_cause(observed, context, cause):
    d = diagnose(seen(**observed), asdict(ctx(**context)), stuck_limit=3)
    assert (d and d["cause"]) == cause


def anchors(fixes: list[dict]) -> list[str]:
    return [f["doc"].split("#")[1] for f in fixes]


@pytest.mark.parametrize("cause, context, expected", [
    # the write-up's unstable run: everything is wrong; what works alone first, then the recipe, then the parts
    ("nonfinite_gradients", {}, ["learning-rate", "the-stable-recipe", "batchnorm", "adam-vs-sgd",
                                 "gradient-clipping", "initialization"]),
    ("fp16_loss_scale_floor", dict(precision="fp16"),
     ["fp16-range", "learning-rate", "the-stable-recipe", "batchnorm", "adam-vs-sgd", "gradient-clipping",
      "initialization"]),
    ("nonfinite_loss", dict(precision="fp16"),
     ["learning-rate", "the-stable-recipe", "batchnorm", "adam-vs-sgd", "gradient-clipping", "fp16-range",
      "initialization"]),
    # one part of the recipe missing: no combined entry
    ("nonfinite_gradients", dict(has_normalization=True, optimizer="SGD", model="bn_cnn"),
     ["learning-rate", "gradient-clipping"]),
    # the fixed recipe already has BN, SGD and clipping: only the lr is left
    ("nonfinite_gradients", dict(model="bn_cnn", has_normalization=True, optimizer="SGD", gradient_clipping=1.0),
     ["learning-rate"]),
    ("stuck_at_chance", dict(model="bn_cnn", has_normalization=True, optimizer="SGD", gradient_clipping=1.0),
     ["learning-rate", "data-and-labels"]),
    ("diverged", dict(model="resnet9", optimizer="AdamW"),
     ["learning-rate", "the-stable-recipe", "batchnorm", "adam-vs-sgd", "gradient-clipping", "data-and-labels"]),
])
def test_fixes_in_order(cause, context, expected):
    fixes = fixes_for(cause, asdict(ctx(**context)))
    assert anchors(fixes) == expected


def test_fixes_name_settings_that_exist():
    fixes = fixes_for("nonfinite_gradients", asdict(ctx(lr=0.05)))
    sets = [s for f in fixes for s in f["set"]]
    sgd = 'optimizer={"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}'
    assert sets == ["optimizer.params.lr=0.005", "trainer.model=cnn3_bn", sgd, "gradient_clipping=1.0",
                    "trainer.model=cnn3_bn", sgd, "gradient_clipping=1.0", "trainer.model=cnn3_fanin"]
    # a model without a _bn twin is pointed at bn_cnn
    assert fixes_for("nonfinite_gradients", asdict(ctx(model="simple_cnn")))[2]["set"] == ["trainer.model=bn_cnn"]


def test_every_fix_and_cause_points_at_a_section_of_the_guide():
    guide = (ROOT / "docs" / "troubleshooting.md").read_text()
    # GitHub's anchors: lower case, punctuation dropped, spaces to dashes
    have = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", guide, flags=re.M)}
    used = set()
    for cause in ("fp16_loss_scale_floor", "nonfinite_gradients", "stuck_at_chance", "diverged"):
        for precision in ("fp16", "fp32"):
            d = diagnose(seen(first_nonfinite_step=1, loss_scale_floor=cause.startswith("fp16"), stuck_epochs=3),
                         asdict(ctx(precision=precision)))
            used.add(d["doc"].split("#")[1])
            used |= set(anchors(fixes_for(cause, asdict(ctx(precision=precision)))))
    from cifar10ds.stability import CAUSES

    used |= {anchor for _, anchor in CAUSES.values()}
    used |= {"exploding-gradients", "loss-spikes", "non-finite-loss-or-gradients", "accuracy-stuck-at-chance"}
    assert used - have == set()


def test_format_diagnosis_reads_as_a_short_block():
    d = diagnose(seen(first_nonfinite_step=22, first_nonfinite_layer="fc2", lr_at_event=0.0256, skipped_steps=1,
                      first_grad_norm_warning=[1, 110.9], max_grad_norm=4.9e10), asdict(ctx()))
    text = format_diagnosis(d)
    lines = text.splitlines()
    assert lines[0] == "stability doctor: the gradients became non-finite (gradient explosion)"
    assert "first non-finite step 22 (first non-finite gradient in fc2), lr 0.0256" in text
    assert lines[-6] == "    1. lower the lr 10x (now 0.05): --set optimizer.params.lr=0.005  (docs/troubleshooting.md#learning-rate)"
    assert lines[-5].startswith("    2. the write-up's stable recipe, all at once: BatchNorm + SGD with momentum + clipping: "
                                "--set trainer.model=cnn3_bn --set 'optimizer=")
    assert "--set 'optimizer={\"type\": \"SGD\", \"params\": {\"lr\": 0.01, \"momentum\": 0.9}}'" in text
    assert len(lines) <= 12, text


def test_loss_scale_floor_without_zero_is_an_overflow_at_the_minimum_scale():
    """DeepSpeed's fp16 optimizers without ZeRO clamp the scale at min_loss_scale and go on skipping; ZeRO's raise."""
    m = monitor(context=ctx(precision="fp16", min_loss_scale=1.0), on_nonfinite="stop", max_consecutive_skips=50)
    steps = [(4.0, True), (2.0, True), (1.0, True), (1.0, False), (1.0, False), (1.0, True)]
    actions = [m.observe_step(s, 2.3, INF if skip else 1.0, 1e-3, scale, skipped=skip)
               for s, (scale, skip) in enumerate(steps, 1)]
    assert actions == [SKIP, SKIP, SKIP, CONTINUE, CONTINUE, STOP]  # reaching the floor is not yet at it
    assert m.seen.loss_scale_floor and m.diagnosis()["cause"] == "fp16_loss_scale_floor"
    no_floor = monitor(context=ctx(precision="fp16"), max_consecutive_skips=50)  # torch's GradScaler: no minimum
    assert [no_floor.observe_step(s, 2.3, INF, 1e-3, 1.0, skipped=True) for s in (1, 2)] == [SKIP, SKIP]
