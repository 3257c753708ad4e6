"""The Accelerate path's schedules give DeepSpeed's learning rate at every step, to the bit."""

import pytest
import torch
from deepspeed.runtime import lr_schedules as ds

from cifar10ds.errors import ConfigError
from cifar10ds.schedules import DeepSpeedStyleSchedule


def opt(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize(
    "kind, params",
    [
        ("WarmupCosineLR", {"total_num_steps": 200, "warmup_num_steps": 20, "warmup_type": "linear", "cos_min_ratio": 0.0}),
        ("WarmupCosineLR", {"total_num_steps": 50, "warmup_num_steps": 1, "warmup_type": "linear"}),
        ("WarmupCosineLR", {"total_num_steps": 100, "warmup_num_steps": 30, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01}),
        ("WarmupLR", {"warmup_num_steps": 30, "warmup_type": "linear"}),
        ("WarmupLR", {"warmup_num_steps": 30, "warmup_min_lr": 0.01, "warmup_max_lr": 0.5}),
        ("WarmupDecayLR", {"total_num_steps": 120, "warmup_num_steps": 10, "warmup_max_lr": 0.2, "warmup_type": "linear"}),
        ("WarmupDecayLR", {"total_num_steps": 120, "warmup_num_steps": 10}),
    ],
)
def test_matches_deepspeed_exactly(kind, params):
    a, b = opt(), opt()
    theirs = getattr(ds, kind)(a, **params)
    ours = DeepSpeedStyleSchedule(b, kind, params)
    for _ in range(params.get("total_num_steps", 60) + 5):
        assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]
        theirs.step()
        ours.step()


def test_state_round_trip():
    a = opt()
    s = DeepSpeedStyleSchedule(a, "WarmupCosineLR", {"total_num_steps": 100, "warmup_num_steps": 10})
    for _ in range(37):
        s.step()
    b = opt()
    r = DeepSpeedStyleSchedule(b, "WarmupCosineLR", {"total_num_steps": 100, "warmup_num_steps": 10})
    r.load_state_dict(s.state_dict())
    assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"]


@pytest.mark.parametrize("kind, params, message", [
    ("OneCycle", {}, "scheduler.type=OneCycle is not available with the accelerate backend"),
    ("WarmupCosineLR", {"total_num_steps": 10, "warmup_num_step": 2}, "scheduler.params.warmup_num_step is not a WarmupCosineLR parameter"),
])
def test_unsupported(kind, params, message):
    with pytest.raises(ConfigError, match=message):
        DeepSpeedStyleSchedule(opt(), kind, params)


def test_the_registry_names_deepspeeds_own_parameters():
    """The Accelerate implementations take exactly what DeepSpeed's classes take (one registry, checked here)."""
    import inspect

    from cifar10ds.schedules import SCHEDULES

    for name, schedule in SCHEDULES.items():
        theirs = set(inspect.signature(getattr(ds, name, None) or getattr(torch.optim.lr_scheduler, name)).parameters)
        assert set(schedule.auto) <= theirs, name
        if schedule.accelerate == "deepspeed_style":
            assert set(schedule.params) == theirs - {"optimizer", "last_batch_iteration"}, name
