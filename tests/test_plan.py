"""The run plan: "auto" batch sizes and schedule lengths, the memory format and master-weights policy."""

import json

import pytest

from cifar10ds import plan
from cifar10ds.config import load_config
from cifar10ds.errors import ConfigError
from cifar10ds.plan import optimizer_steps, resolve_batch_sizes, resolve_schedule
from tests.test_config import BASE, write


@pytest.mark.parametrize(
    "total, micro, accum, world, expected",
    [
        (64, "auto", 1, 2, (64, 32, 1)),
        (64, "auto", "auto", 4, (64, 16, 1)),
        (64, "auto", 2, 2, (64, 16, 2)),
        ("auto", 16, 1, 2, (32, 16, 1)),
        ("auto", 16, 4, 2, (128, 16, 4)),
        (64, 16, "auto", 2, (64, 16, 2)),
        (64, 32, 1, 2, (64, 32, 1)),
    ],
)
def test_resolve_batch_sizes(total, micro, accum, world, expected):
    ds = resolve_batch_sizes(
        {"train_batch_size": total, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum}, world
    )
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == expected


@pytest.mark.parametrize(
    "total, micro, accum, world, message",
    [
        (100, "auto", 1, 3, "train_batch_size 100 is not divisible by world size 3 x gradient_accumulation_steps 1; use a multiple of 3"),
        (64, 32, 1, 4, "train_batch_size 64 != train_micro_batch_size_per_gpu 32 x gradient_accumulation_steps 1 x world size 4"),
        (64, 24, "auto", 2, "train_batch_size 64 != train_micro_batch_size_per_gpu 24"),
    ],
)
def test_impossible_batch_sizes(total, micro, accum, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_batch_sizes(
            {"train_batch_size": total, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum}, world
        )


def _trainer(tmp_path, **trainer):
    cfg = json.loads(json.dumps(BASE))
    cfg["trainer"].update(trainer)
    loaded = load_config(write(tmp_path, cfg))
    loaded.ds = resolve_batch_sizes(loaded.ds, 1)
    return loaded


@pytest.mark.parametrize(
    "trainer, per_epoch, total, warmup",
    [
        ({"epochs": 2, "warmup_epochs": 0.5}, 100, 200, 50),
        ({"epochs": 2.5, "warmup_fraction": 0.2}, 100, 250, 50),
        ({"epochs": 1}, 100, 100, 1),  # no warmup asked: DeepSpeed needs at least one step
        ({"epochs": 0.25, "warmup_epochs": 0.1}, 7, 2, 1),  # fractions of a short epoch round sensibly
    ],
)
def test_resolve_schedule_fills_auto_steps(tmp_path, trainer, per_epoch, total, warmup):
    cfg = _trainer(tmp_path, **trainer)
    params = resolve_schedule(cfg.ds, cfg.trainer, per_epoch)["scheduler"]["params"]
    assert (params["total_num_steps"], params["warmup_num_steps"]) == (total, warmup)


def test_gradient_accumulation_counts_optimizer_steps():
    assert optimizer_steps(micro_steps_per_epoch=100, epochs=2, accumulation=4) == 50
    assert optimizer_steps(micro_steps_per_epoch=10, epochs=1.5, accumulation=4) == 3


def test_warmup_not_shorter_than_run_is_an_error(tmp_path):
    cfg = _trainer(tmp_path, epochs=1, warmup_epochs=5)
    with pytest.raises(ConfigError, match=r"warmup_num_steps \(500\) must be smaller than total_num_steps \(100\)"):
        resolve_schedule(cfg.ds, cfg.trainer, 100)


def test_explicit_scheduler_steps_are_kept_and_checked(tmp_path):
    cfg = _trainer(tmp_path)
    cfg.ds["scheduler"]["params"].update(total_num_steps=1000, warmup_num_steps=10)
    assert resolve_schedule(cfg.ds, cfg.trainer, 100)["scheduler"]["params"]["total_num_steps"] == 1000
    cfg.ds["scheduler"]["params"]["warmup_num_steps"] = "ten"
    with pytest.raises(ConfigError, match='warmup_num_steps must be a positive integer or "auto"'):
        resolve_schedule(cfg.ds, cfg.trainer, 100)


def test_no_optimizer_step_is_an_error(tmp_path):
    cfg = _trainer(tmp_path, epochs=0.1)
    cfg.ds["gradient_accumulation_steps"] = 4
    with pytest.raises(ConfigError, match="the run has 1 micro steps, fewer than gradient_accumulation_steps 4"):
        resolve_schedule(cfg.ds, cfg.trainer, 10)


@pytest.mark.parametrize(
    "setting, on_gpu, half, master, expected",
    [
        ("auto", False, False, False, True),  # CPU, fp32: oneDNN's convolutions prefer it
        ("auto", True, False, False, False),  # GPU fp32: stays contiguous
        ("auto", True, True, False, True),  # GPU bf16/fp16 compute (torch_autocast, Accelerate mixed precision)
        ("auto", True, True, True, False),  # DeepSpeed bf16/fp16 optimizer: master weights would not see it
        ("auto", False, False, True, False),  # ZeRO on CPU
        (True, True, False, False, True),  # explicit wins (the master-weights refusal is check_own_weights')
        (False, False, False, False, False),
    ],
)
def test_channels_last_auto(setting, on_gpu, half, master, expected):
    assert plan.resolve_channels_last(setting, on_gpu, half, master) is expected


@pytest.mark.parametrize(
    "backend, opt, on_gpu, blind",
    [
        ("deepspeed", {"type": "Adam", "params": {"lr": 1e-3}}, False, "DeepSpeed's fused Adam on a CPU"),
        ("deepspeed", {"type": "AdamW"}, False, "DeepSpeed's fused AdamW on a CPU"),
        ("deepspeed", {"type": "adam"}, False, "DeepSpeed's fused adam on a CPU"),
        ("deepspeed", {"type": "Adam", "params": {"torch_adam": True}}, False, None),  # torch's Adam
        ("deepspeed", {"type": "Adam"}, True, None),  # the CUDA kernel takes channels_last weights
        ("deepspeed", {"type": "SGD"}, False, None),
        ("accelerate", {"type": "Adam"}, False, None),  # torch's Adam
    ],
)
def test_channels_last_stays_off_where_the_optimizer_would_not_update_it(backend, opt, on_gpu, blind):
    assert plan.channels_last_blind_optimizer(backend, opt, on_gpu) == blind
    if blind:
        assert plan.resolve_channels_last("auto", False, False, False, blind) is False
        assert plan.resolve_channels_last(False, False, False, False, blind) is False
        with pytest.raises(ConfigError, match="trainer.channels_last=true: DeepSpeed's fused .* does not update weights "
                                              "stored channels_last .* set optimizer.params.torch_adam=true"):
            plan.resolve_channels_last(True, False, False, False, blind)
