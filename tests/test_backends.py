import pytest
import torch

from cifar10ds import dist, engines
from cifar10ds.engines import choose_backend
from cifar10ds.engines.checks import check_accelerate_config
from cifar10ds.errors import ConfigError
from cifar10ds.optim import build_torch_optimizer


@pytest.mark.parametrize(
    "requested, env, installed, expected",
    [
        ("auto", {}, {"deepspeed", "accelerate"}, "deepspeed"),
        ("auto", {"ACCELERATE_MIXED_PRECISION": "no"}, {"deepspeed", "accelerate"}, "accelerate"),  # accelerate launch
        ("auto", {}, {"accelerate"}, "accelerate"),  # DeepSpeed not installed
        ("deepspeed", {"ACCELERATE_USE_CPU": "False"}, {"deepspeed", "accelerate"}, "deepspeed"),  # explicit wins
        ("accelerate", {}, {"deepspeed", "accelerate"}, "accelerate"),
    ],
)
def test_choose_backend(monkeypatch, requested, env, installed, expected):
    for key in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert choose_backend(requested) == expected


def test_missing_backend_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None if name == "deepspeed" else object())
    with pytest.raises(ConfigError, match="the deepspeed backend needs the deepspeed package: pip install deepspeed, or use --backend accelerate"):
        choose_backend("deepspeed")


def params():
    return [torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize(
    "cfg, cls, defaults",
    [
        ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}, torch.optim.SGD, {"nesterov": True}),
        ({"type": "sgd", "params": {"lr": 0.1}}, torch.optim.SGD, {"lr": 0.1}),
        ({"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.01}}, torch.optim.AdamW, {"weight_decay": 0.01}),  # DeepSpeed's Adam is AdamW...
        ({"type": "AdamW", "params": {"lr": 1e-3}}, torch.optim.AdamW, {"weight_decay": 0.0}),  # DeepSpeed's default, not torch's 0.01
        ({"type": "Adam", "params": {"lr": 1e-3, "adam_w_mode": False}}, torch.optim.Adam, {"lr": 1e-3}),  # ...unless adam_w_mode is off
        ({"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, torch.optim.AdamW, {"lr": 1e-3}),
        ({"type": "RMSprop", "params": {"lr": 1e-3}}, torch.optim.RMSprop, {"lr": 1e-3}),
    ],
)
def test_optimizer_follows_deepspeed_naming(cfg, cls, defaults):
    opt = build_torch_optimizer(params(), cfg)
    assert type(opt) is cls
    assert {k: opt.defaults[k] for k in defaults} == defaults


@pytest.mark.parametrize("cfg, message", [
    ({"type": "Shampoo", "params": {}}, "optimizer.type='Shampoo' is not a torch.optim optimizer"),
    ({"type": "SGD", "params": {"lr": 0.1, "betas": [0.9, 0.99]}}, "optimizer.params for SGD: "),
])
def test_bad_optimizer(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_torch_optimizer(params(), cfg)


BASE = {"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "gradient_clipping": 1.0}


@pytest.mark.parametrize("extra, message", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2 needs the DeepSpeed backend"),
    ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type=Lamb is a DeepSpeed optimizer"),
])
def test_accelerate_refuses_what_it_cannot_honour(extra, message):
    with pytest.raises(ConfigError, match=message):
        check_accelerate_config({**BASE, **extra})


def test_accelerate_names_what_it_ignores():
    cfg = {**BASE, "zero_optimization": {"stage": 0}, "activation_checkpointing": {}, "fp16": {"enabled": False, "initial_scale_power": 12}}
    assert check_accelerate_config(cfg) == [
        "the accelerate backend ignores DeepSpeed key(s) activation_checkpointing, fp16.initial_scale_power"
    ]
    assert check_accelerate_config(BASE) == []


class _FakeEngine:
    """Just what DeepSpeedBackend.step touches, for an fp16 engine whose loss scaler hit its floor."""

    skipped_steps = 0
    optimizer = None

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")


def test_deepspeed_loss_scale_floor_becomes_its_own_exception():
    from cifar10ds.engines import DeepSpeedBackend, LossScaleFloor

    backend = object.__new__(DeepSpeedBackend)
    backend.engine, backend._engine_tracks_norm, backend._pending, backend.lr_scale = _FakeEngine(), True, None, 1.0
    with pytest.raises(LossScaleFloor, match="already at minimum"):
        backend.step()


def test_nonfinite_layer_is_the_one_nearest_the_output():
    import torch

    from cifar10ds.engines import Backend

    backend = object.__new__(Backend)
    backend._param_norms = (["conv1.weight", "conv1.bias", "fc1.weight", "fc2.weight", "fc2.bias"],
                            torch.tensor([float("nan"), 1.0, float("inf"), 2.0, 3.0]))
    assert backend.nonfinite_layer() == "fc1"
    backend._param_norms = (["a.weight"], torch.tensor([1.0]))
    assert backend.nonfinite_layer() is None


def test_a_launched_world_the_engine_did_not_join_is_a_bug(monkeypatch):
    """Every process training on its own looks like a working run; it must fail at start instead."""
    import accelerate

    monkeypatch.setattr(accelerate, "PartialState", lambda **kwargs: None)  # joins nothing
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="the launcher started 2 processes but accelerate joined a world of 1"):
        dist.init_processes("accelerate", 60)


def test_deepspeeds_cpu_adam_leaves_channels_last_weights_as_they_were():
    """Why the rule above exists (DeepSpeed 0.19.8's CPU op updates a contiguous copy). If this starts failing,
    DeepSpeed fixed it and ``channels_last_blind_optimizer`` can go."""
    from deepspeed.ops.adam import FusedAdam

    weights = {}
    for fmt in (torch.channels_last, torch.contiguous_format):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=fmt))
        before = w.detach().clone()
        w.grad = torch.ones_like(w)
        FusedAdam([w], lr=0.1).step()
        weights[fmt] = (w.detach() - before).abs().max().item()
    assert weights[torch.channels_last] == 0.0
    assert weights[torch.contiguous_format] == pytest.approx(0.1)


TIMER_PROBE = """
import json, sys, torch
from cifar10ds import dist, engines
dist.init_processes("deepspeed", 60)
model = torch.nn.Linear(4, 2)
cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
       "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "gradient_clipping": 0.0, **json.loads(sys.argv[1])}
backend = engines.DeepSpeedBackend(model, cfg)
print(json.dumps(backend.engine.tput_timer.config.enabled))
"""


@pytest.mark.parametrize("extra, enabled", [({}, False), ({"timers": {"throughput": {"enabled": True}}}, True)])
def test_deepspeed_throughput_timer_is_off_unless_asked_for(tmp_path, extra, enabled):
    """DeepSpeed's throughput timer synchronises a GPU twice per step; the trainer keeps it off by default."""
    import json
    import sys

    from tests.helpers import ROOT, cli_env, free_port, run_bounded

    env = {**cli_env(tmp_path), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    done = run_bounded([sys.executable, "-c", TIMER_PROBE, json.dumps(extra)], ROOT, env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) is enabled


CLIP_PROBE = """
import json, torch
from deepspeed.runtime.utils import clip_grad_norm_
from cifar10ds import dist
from cifar10ds.engines.base import norm_and_clip
dist.init_processes("deepspeed", 60)
torch.manual_seed(0)
a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 10))
b = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 10))
b.load_state_dict(a.state_dict())
out = []
for max_norm, scale in ((1.0, 1.0), (0.01, 1.0), (1e6, 1.0), (1.0, 1e3)):
    x = torch.randn(16, 3, 32, 32) * scale
    for m in (a, b):
        m.zero_grad()
        m(x).square().mean().backward()
    theirs = float(clip_grad_norm_(a.parameters(), max_norm))
    ours, _ = norm_and_clip(list(b.named_parameters()), torch.device("cpu"), max_norm)
    diff = max(float(((pa.grad - pb.grad).abs() / pa.grad.abs().clamp_min(1e-30)).max())
               for pa, pb in zip(a.parameters(), b.parameters()))
    out.append([theirs, float(ours), diff])
print(json.dumps(out))
"""


def test_the_backends_clipping_is_deepspeeds_to_fp32_rounding(tmp_path):
    """DeepSpeed's fp32 clip_grad_norm_ builds tensors from Python floats on the device every step (host-to-device
    copies that wait for a GPU); the backend clips with the same formula from the norm it already has."""
    import json
    import sys

    from tests.helpers import ROOT, cli_env, free_port, run_bounded

    env = {**cli_env(tmp_path), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    done = run_bounded([sys.executable, "-c", CLIP_PROBE], ROOT, env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for theirs, ours, worst_relative_diff in json.loads(done.stdout.strip().splitlines()[-1]):
        assert ours == pytest.approx(theirs, rel=1e-6)
        assert worst_relative_diff < 1e-5  # every gradient clipped alike, to fp32 rounding


@pytest.mark.parametrize("config, takes_over", [
    ({}, True),  # fp32
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, True),
    ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, False),  # GradScaler: DeepSpeed unscales, then clips
    ({"bf16": {"enabled": True}}, False),  # DeepSpeed's bf16 optimizer clips as it unscales
    ({"zero_optimization": {"stage": 1}}, False),
])
def test_the_backend_clips_where_deepspeed_would_use_clip_grad_norm(config, takes_over):
    from cifar10ds.engines.deepspeed_engine import clips_fp32_gradients

    assert clips_fp32_gradients({"gradient_clipping": 1.0, **config}) is takes_over


FP16_PROBE = """
import json, torch
from cifar10ds import dist, engines
from cifar10ds.engines import deepspeed_engine
deepspeed_engine.check_precision = lambda cfg: None  # the trainer refuses fp16 on a CPU; the engine runs it here
dist.init_processes("deepspeed", 60)
out = {}
for precision in ("fp32", "fp16"):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "gradient_clipping": 0.0,
           "fp16": {"enabled": precision == "fp16"}}
    backend = engines.DeepSpeedBackend(model, cfg)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    deltas = []
    for _ in range(3):
        before = backend.module.weight.detach().float().clone()
        loss = torch.nn.functional.cross_entropy(backend.forward(x).float(), y)
        backend.backward(loss)
        backend.step()
        deltas.append(float((backend.module.weight.float() - before).abs().max()))
    out[precision] = {"deltas": deltas, "scale": backend.loss_scale(), "skipped": backend.skipped_steps}
print(json.dumps(out))
"""


def test_deepspeed_fp16_without_zero_trains_and_reports_its_loss_scale(tmp_path):
    """DeepSpeed 0.19.8's engine.backward() leaves the loss unscaled for its fp16 optimizer without ZeRO, whose
    step() divides by the scale (65,536x too small an update). Runs where DeepSpeed offers fp16 on this CPU."""
    import json
    import sys

    from deepspeed.accelerator import get_accelerator

    from tests.helpers import ROOT, cli_env, free_port, run_bounded

    if not get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed runs no fp16 on this CPU (it needs AVX512-FP16); the GPU suite covers it")
    env = {**cli_env(tmp_path), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    done = run_bounded([sys.executable, "-c", FP16_PROBE], ROOT, env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["fp16"]["scale"] == 65536.0 and out["fp16"]["skipped"] == 0 and out["fp32"]["scale"] is None
    for fp16, fp32 in zip(out["fp16"]["deltas"], out["fp32"]["deltas"]):
        assert fp16 == pytest.approx(fp32, rel=0.02)  # the same update, to fp16's precision (not 65,536x smaller)
