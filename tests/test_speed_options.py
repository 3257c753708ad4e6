"""The speed preset's options, each on its own: parameter groups, the one-cycle schedule, alternating flips,
test-time augmentation, Lookahead; then the preset end to end on CPU."""

import json
import sys

import pytest
import torch
import torch.nn as nn

import models
from cifar10ds.averaging import Lookahead
from cifar10ds.batches import Augment
from cifar10ds.config import LookaheadConfig, ParamGroupRule, TrainerConfig
from cifar10ds.errors import ConfigError
from cifar10ds.evaluation import Clock, tta_logits
from cifar10ds.optim import param_groups
from cifar10ds.plan import check_own_weights, group_lrs, resolve_schedule
from cifar10ds.schedules import build_schedule
from tests.helpers import ROOT, run_cli

CONFIG = {  # a small ordinary run, for the options that any config can use
    "train_batch_size": 20,
    "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
    "gradient_clipping": 1.0,
    "trainer": {"model": "bn_cnn", "epochs": 1, "seed": 0, "data": {"download": False}},
}

def test_param_groups_first_match_wins_and_scale_lr_and_weight_decay():
    model = models.create_model("airbench94")
    rules = [ParamGroupRule(match=r"norm\d\.bias$", lr_scale=64.0, weight_decay_scale=1 / 64)]
    groups = param_groups(model, rules, {"lr": 1.5, "weight_decay": 0.0128})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    biases = [n for n in trainable if n.endswith(("norm1.bias", "norm2.bias"))]
    assert len(groups) == 2 and len(biases) == 6
    assert len(groups[0]["params"]) == len(trainable) - 6 and "lr" not in groups[0]  # the optimizer's own
    assert len(groups[1]["params"]) == 6
    assert groups[1]["lr"] == 96.0 and groups[1]["weight_decay"] == pytest.approx(0.0002)
    assert group_lrs(groups, {"lr": 1.5}) == [1.5, 96.0]
    assert not any(p is model.whiten.weight for g in groups for p in g["params"])  # frozen: left out
    with pytest.raises(ConfigError, match=r"trainer.param_groups\[0\].match='nothing' matches no trainable"):
        param_groups(model, [ParamGroupRule(match="nothing")], {"lr": 0.1})


def test_bad_param_group_regex_is_a_config_error():
    with pytest.raises(ValueError, match="not a regular expression"):
        TrainerConfig.model_validate({"param_groups": [{"match": "norm(("}]})


def test_one_cycle_auto_fills_steps_and_per_group_peaks_and_keeps_each_groups_ratio():
    ds = {"gradient_accumulation_steps": 1, "optimizer": {"type": "SGD", "params": {"lr": 1.5}},
          "scheduler": {"type": "OneCycleLR", "params": {"max_lr": "auto", "total_steps": "auto", "pct_start": 0.23,
                                                        "anneal_strategy": "linear", "div_factor": 5.0,
                                                        "final_div_factor": 0.2 / 0.07, "cycle_momentum": False}}}
    trainer = TrainerConfig.model_validate({"model": "bn_cnn", "epochs": 9.9})
    resolved = resolve_schedule(ds, trainer, 49, group_lrs=[1.5, 96.0])
    params = resolved["scheduler"]["params"]
    assert params["total_steps"] == 487 and params["max_lr"] == [1.5, 96.0]  # ceil(49 x 9.9) steps + 1
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 96.0}], lr=1.5, momentum=0.85, nesterov=True)
    sched = build_schedule(opt, "OneCycleLR", params)  # what DeepSpeed builds from the same name and params
    lrs = []  # lrs[i]: the lr of optimizer step i + 1; lrs[486]: after the last step (never used)
    for _ in range(486):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    lrs.append([g["lr"] for g in opt.param_groups])
    first, peak = lrs[0], max(lrs, key=lambda r: r[0])
    assert first == pytest.approx([0.3, 19.2])  # 0.2 x peak
    assert peak == pytest.approx([1.5, 96.0], rel=1e-3)  # the peak falls between two steps
    assert lrs.index(peak) == pytest.approx(0.23 * 486, abs=2)
    assert lrs[-1] == pytest.approx([0.105, 6.72])  # 0.07 x peak, not extrapolated past it
    assert lrs[-2] == pytest.approx([0.105 + 1.395 / 374, 6.72 + 89.28 / 374], rel=0.01)  # one decrement above, as airbench
    assert all(r[1] / r[0] == pytest.approx(64.0) for r in lrs)


def test_alternating_flip_flips_every_image_the_other_way_each_epoch():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    idx = torch.tensor([3, 0, 7, 1, 2, 6, 5, 4])
    aug = Augment(0, "alternate", 0, seed=1, device="cpu", n_images=8, flip_seed=0)
    plain = Augment(0, False, 0, seed=1, device="cpu").normalize(x)
    e0, e1, e2 = (aug(x, idx, epoch) for epoch in (0, 1, 2))
    flipped0 = [torch.equal(e0[i], plain[i].flip(-1)) for i in range(8)]
    assert 0 < sum(flipped0) < 8  # a random half (or so) in the first epoch
    assert all(torch.equal(e1[i], plain[i] if flipped0[i] else plain[i].flip(-1)) for i in range(8))
    assert torch.equal(e2, e0)
    again = Augment(0, "alternate", 0, seed=99, device="cpu", n_images=8, flip_seed=0)
    assert torch.equal(again(x, idx, 0), e0)  # the seed of the run, not the rank's augmentation seed


def test_tta_levels():
    calls = []

    def forward(x):
        calls.append(x.clone())
        return x.mean(dim=(2, 3))  # 3 "logits": the channel means

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(tta_logits(forward, x, 0), x.mean(dim=(2, 3)))
    calls.clear()
    assert torch.allclose(tta_logits(forward, x, 1), x.mean(dim=(2, 3)))  # mirroring keeps channel means
    assert len(calls) == 2 and torch.equal(calls[1], x.flip(-1))
    calls.clear()
    tta_logits(forward, x, 2)
    assert len(calls) == 6
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    assert torch.equal(calls[2], padded[..., :4, :4]) and torch.equal(calls[4], padded[..., 2:, 2:])


def test_lookahead_blends_towards_the_weights_and_ends_on_the_average():
    lin = nn.Linear(1, 1, bias=False)
    cfg = LookaheadConfig(enabled=True, every_steps=2, decay=0.5, power=1.0, start_epoch=1.0)
    la = Lookahead(cfg, lin, total_steps=8, steps_per_epoch=4)
    with torch.no_grad():
        for step, w in enumerate([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0], start=1):
            lin.weight.fill_(w)
            la.after_step(step)
            if step == 4:
                assert la.avg is not None and float(la.avg[0]) == 4.0  # the average starts at epoch 1
            if step == 6:  # decay 0.5 x (6/8) = 0.375: 0.375 x 4 + 0.625 x 20
                assert lin.weight.item() == pytest.approx(14.0) and float(la.avg[0]) == pytest.approx(14.0)
    lin.weight.data.fill_(40.0)
    la.end_epoch()  # step 8 blended at decay 0.5: 0.5 x 14 + 0.5 x 40 = 27, and the model takes it
    assert lin.weight.item() == pytest.approx(27.0)
    restored = Lookahead(cfg, lin, total_steps=8, steps_per_epoch=4)
    restored.load_state_dict(la.state_dict())
    assert float(restored.avg[0]) == pytest.approx(27.0)


def test_lookahead_evaluates_the_average_but_trains_on_from_its_own_weights():
    """Between two blends the weights move on; an epoch's end shows the average without throwing them away
    (airbench94 trains through its epochs untouched), and a checkpoint taken then carries them."""
    lin = nn.Linear(1, 1, bias=False)
    cfg = LookaheadConfig(enabled=True, every_steps=5, decay=0.5, power=1.0, start_epoch=0.0)
    la = Lookahead(cfg, lin, total_steps=20, steps_per_epoch=7)
    with torch.no_grad():
        for step in range(1, 8):  # epoch 1: steps 1-7, the average taken at step 5
            lin.weight.fill_(float(step))
            la.after_step(step)
    assert float(la.avg[0]) == 5.0 and lin.weight.item() == 7.0  # steps 6 and 7 moved on from the average
    la.end_epoch()
    assert lin.weight.item() == 5.0  # evaluated and saved: the average
    saved = la.state_dict()
    la.start_epoch()
    assert lin.weight.item() == 7.0 and la.fast is None  # epoch 2 trains on from step 7's weights
    la.end_epoch()
    resumed = Lookahead(cfg, lin, total_steps=20, steps_per_epoch=7)  # a resume from the epoch-end checkpoint
    resumed.load_state_dict(saved)
    resumed.start_epoch()
    assert lin.weight.item() == 7.0 and float(resumed.avg[0]) == 5.0


def test_lookahead_and_channels_last_refuse_deepspeed_master_weights():
    check_own_weights(False, True, True)
    with pytest.raises(ConfigError, match="trainer.lookahead.enabled=true needs .*torch_autocast"):
        check_own_weights(True, True, False)
    with pytest.raises(ConfigError, match="trainer.channels_last=true"):
        check_own_weights(True, False, True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "accelerate"])
def test_speedrun_preset_runs_end_to_end_on_cpu(tmp_path, data, backend):
    out = tmp_path / "out"
    r = run_cli(["--deepspeed_config", str(ROOT / "configs" / "speedrun94.json"), "--data-dir", str(data),
                 "--output-dir", str(out), "--backend", backend, "--set", "train_batch_size=48", "--set", "trainer.epochs=8",
                 "--set", "trainer.lookahead.start_epoch=1", "--set", "trainer.data.download=false",
                 "--set", "trainer.checkpoint.every_epochs=1",
                 "--set", f"trainer.cpu_keep_freed_memory={str(backend == 'deepspeed').lower()}"], tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resolved = json.loads((out / "config.json").read_text())
    assert (summary["model"], summary["precision"], summary["tta_level"], summary["backend"]) == ("airbench94", "bf16", 2, backend)
    assert summary["model_init_time_s"] > 0  # the whitening layer was computed from the data
    assert summary["cpu_keep_freed_memory"] is (backend == "deepspeed" and sys.platform.startswith("linux"))
    assert [m["tta_level"] for m in metrics] == [0] * 7 + [2]  # TTA on the last evaluation only
    # drop_last: 4 full batches of 48 per epoch (the last 8 images wait for another shuffle), x 8 epochs
    assert summary["steps"] == 32 and resolved["scheduler"]["params"]["total_steps"] == 33  # OneCycleLR's + 1
    assert summary["stability"] is None  # the preset reads nothing back per step
    assert min(m["lr"] for m in metrics) > 0
    # the weights, the biases, and the whitening bias in a group of its own (held at lr 0 after its epochs)
    assert resolved["scheduler"]["params"]["max_lr"] == [1.5, 96.0, 1.5]
    assert metrics[-1]["val_acc"] >= 0.6 and metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    state = torch.load(next((out / "checkpoints").glob("step*/**/mp_rank_00_model_states.pt"), None)
                       or next((out / "checkpoints").glob("step*/trainer_state.pt")), weights_only=True)
    lookahead = state["client_state"]["lookahead"] if "client_state" in state else state["lookahead"]
    assert lookahead["avg"] is not None  # the average rides in the checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "accelerate"])
def test_compile_goes_through_the_engine_and_its_first_step_is_timed_apart(tmp_path, data, config, backend):
    # "eager": TorchDynamo traces the model and runs the graph as is: the compile path, without a C++ toolchain
    # Batches of 30 leave a last one of 20; evaluation batches of 32 over 70 test images leave one of 6; TTA level 2
    # evaluates shifted views: each compiles once, with the first step (compile_time_s), never in a timed region.
    out = tmp_path / "out"
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--quiet",
                 "--backend", backend, "--set", "trainer.compile=\"eager\"", "--set", "trainer.epochs=2",
                 "--set", "train_batch_size=30", "--set", "trainer.data.eval_batch_size=32",
                 "--set", "trainer.tta_level=2"], tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compile_time_s"] > 0 and summary["train_time_s"] > 0
    assert summary["recompiles"] == 0
    assert summary["final_val_acc"] > 0.1
    plain = tmp_path / "plain"
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(plain), "--quiet",
                 "--backend", backend, "--set", "trainer.epochs=1"], tmp_path, timeout=300)
    assert json.loads((plain / "summary.json").read_text())["compile_time_s"] is None


def test_clock_times_the_device_with_cuda_events_on_a_gpu(monkeypatch):
    """On a GPU the training time is the CUDA events' (as airbench counts it), read after the end event completes."""
    recorded_ms = iter([1000.0, 3500.0])
    made = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.ms, self.done = None, False
            made.append(self)

        def record(self) -> None:
            self.ms = next(recorded_ms)

        def synchronize(self) -> None:
            self.done = True

        def elapsed_time(self, end) -> float:
            assert end.done, "read before the end event completed"
            return end.ms - self.ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    clock = Clock(torch.device("cuda", 0))
    start = clock.mark()
    assert clock.since(start) == pytest.approx(2.5)
    assert len(made) == 2


def test_clock_uses_the_host_clock_on_cpu(monkeypatch):
    now = iter([10.0, 10.75])
    monkeypatch.setattr("cifar10ds.evaluation.time.perf_counter", lambda: next(now))
    clock = Clock(torch.device("cpu"))
    assert clock.since(clock.mark()) == pytest.approx(0.75)


def test_epoch_end_reads_the_step_norms_back_in_one_copy_with_the_same_values(monkeypatch):
    from cifar10ds.state import host_floats

    values = [torch.tensor(1.1), 2.5, torch.tensor(0.3, dtype=torch.float64), torch.tensor(float("inf")),
              torch.tensor(3.3, dtype=torch.bfloat16)]
    expected = [float(v) for v in values]
    reads = []
    for name in ("tolist", "item", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: reads.append(_n) or _o(t, *a))
    assert host_floats(values) == expected
    assert reads == ["tolist"]  # one device-to-host copy for all of the epoch's norms (a GPU sync each, else)
    assert host_floats([]) == [] and host_floats([1.0, 2.0]) == [1.0, 2.0]


def test_the_fp16_loss_scale_is_kept_per_step_on_the_device_and_read_with_the_norms(monkeypatch):
    """torch's GradScaler keeps its scale on the device and halves it in place after an overflow: each step's
    record must be a copy (not the live scalar), and reading it must wait for the epoch's one copy."""
    from cifar10ds.engines.base import scaler_scale
    from cifar10ds.state import EpochSums

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert scaler_scale(scaler) == 8.0  # nothing scaled yet: no scale on the device, the initial one
    acc = EpochSums(torch.device("cpu"))
    reads = []
    for name in ("tolist", "item", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: reads.append(_n) or _o(t, *a))
    for step, grad in enumerate((1.0, float("inf"), 1.0), start=1):
        scaler.scale((w * grad).sum()).backward()
        scaler.step(opt)  # torch's own read of its inf flag
        scaler.update()
        opt.zero_grad()
        acc.add_update(step, torch.tensor(float(step)), 0.1, scaler_scale(scaler), False)
    reads.clear()
    plain = acc.host_updates()
    assert reads == ["tolist"]
    assert [(s, n, scale) for s, n, _, scale, _ in plain] == [(1, 1.0, 8.0), (2, 2.0, 4.0), (3, 3.0, 4.0)]
    assert acc.to_plain()["norms"] == plain  # a mid-epoch checkpoint holds numbers, not tensors
    assert scaler_scale(torch.amp.GradScaler("cpu", enabled=False)) == 1.0


COUNT_READS = """
import collections, json, os, runpy, sys, torch, deepspeed
counts = collections.Counter()
homes = {"torch": os.path.dirname(torch.__file__), "deepspeed": os.path.dirname(deepspeed.__file__)}
for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
    def counted(t, *a, _o=getattr(torch.Tensor, name), _n=name, **k):
        caller = sys._getframe(1).f_code.co_filename
        counts[_n + " by " + next((h for h, d in homes.items() if caller.startswith(d)), "us")] += 1
        return _o(t, *a, **k)
    setattr(torch.Tensor, name, counted)
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("READS " + json.dumps(counts))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype, fused, theirs", [
    ("bfloat16", False, {}),  # the preset as it is
    # a GPU without bf16 (T4, V100): torch's GradScaler reads its inf flag in step() (torch's own, one per step);
    # the loss scale the loop records stays on the device until the epoch ends
    ("float16", False, {"item by torch": 10}),
    # ... unless the optimizer unscales and skips by itself (torch's fused SGD): the README's advice
    ("float16", True, {}),
])
def test_the_speed_preset_reads_nothing_back_from_the_device_per_step(tmp_path, data, dtype, fused, theirs):
    """Each host read of a tensor's value is a GPU sync: the host stops running ahead. Counted on CPU: a run of 2
    epochs minus a run of 1 leaves one epoch's reads (10 steps), counted by who reads."""
    import sys

    from tests.helpers import SCRIPT, cli_env, run_bounded

    reads = []
    for epochs in (1, 2):
        cmd = [sys.executable, "-c", COUNT_READS, str(SCRIPT), "--deepspeed_config", str(ROOT / "configs" / "speedrun94.json"),
               "--data-dir", str(data), "--output-dir", str(tmp_path / f"e{epochs}"), "--quiet",
               "--set", f"trainer.epochs={epochs}", "--set", "train_batch_size=20", "--set", "trainer.data.download=false",
               "--set", f"torch_autocast.dtype={dtype}", *(["--set", "optimizer.params.fused=true"] if fused else [])]
        if dtype == "float16":  # the reads are the scaler's; airbench94's fp16 convolution backward takes seconds per
            # call on CPUs with AVX512-FP16 (Xeon): the small BN-CNN, at an lr it trains at
            cmd += ["--set", "trainer.model=bn_cnn", "--set", "trainer.param_groups=[]", "--set", "optimizer.params.lr=0.05"]
        done = run_bounded(cmd, ROOT, cli_env(tmp_path), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        reads.append(json.loads(done.stdout.split("READS ")[-1]))
    per_epoch = {k: reads[1].get(k, 0) - reads[0].get(k, 0) for k in reads[1]}
    # ours: the epoch's sums, its per-step losses, the evaluation's sums, and in fp16 the per-step loss scales (one
    # copy each); no gradient norm is measured (the doctor is off, nothing is clipped)
    assert {k: v for k, v in per_epoch.items() if v} == {"tolist by us": 3 + (dtype == "float16"), **theirs}
    steps = [json.loads(line) for line in (tmp_path / "e2" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 20 and all("grad_norm" not in s and s["lr"] > 0 for s in steps)
    if dtype == "float16":  # the scales still reach steps.jsonl
        assert all(s["loss_scale"] == 65536.0 for s in steps)


def test_a_parameter_frozen_after_some_epochs_gets_a_group_of_its_own_held_at_lr_0_then():
    from cifar10ds.engines.base import Backend

    model = models.create_model("airbench94")
    rules = [ParamGroupRule(match=r"norm\d\.bias$", lr_scale=64.0, weight_decay_scale=0.015625)]
    groups = param_groups(model, rules, {"lr": 1.5, "weight_decay": 0.0128}, {"whiten.bias": 3})
    assert [g.get("freeze_after_epochs") for g in groups] == [None, None, 3]
    assert groups[2]["params"] == [model.whiten.bias] and (groups[2]["lr"], groups[2]["weight_decay"]) == (1.5, 0.0128)
    assert all(model.whiten.bias is not p for g in groups[:2] for p in g["params"])

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.1, "freeze_after_epochs": 1}], momentum=0.9, weight_decay=0.1)
    backend = object.__new__(Backend)
    backend._param_groups = lambda: opt.param_groups
    for epoch in range(3):
        backend.start_epoch(epoch)
        before = w.detach().clone()
        w.grad = torch.ones(3)
        opt.step()
        backend._rescale_after_schedule()
        assert w.equal(before) == (epoch >= 1)  # trains in epoch 0; then no momentum, no weight decay moves it
