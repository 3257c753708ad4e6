"""The default schedule as DeepSpeed builds it from the resolved config: linear warmup, cosine decay."""

import json
import math

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR

from cifar10ds.config import load_config
from cifar10ds.plan import resolve_batch_sizes, resolve_schedule
from tests.helpers import ROOT


@pytest.mark.parametrize("config, per_epoch", [("ds_config.json", 98), ("configs/bn_cnn_stable.json", 1563)])
def test_warmup_then_cosine(config, per_epoch):
    cfg = load_config(ROOT / config)
    cfg.ds = resolve_schedule(resolve_batch_sizes(cfg.ds, 1), cfg.trainer, per_epoch)
    params = dict(cfg.ds["scheduler"]["params"])
    peak = cfg.ds["optimizer"]["params"]["lr"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = WarmupCosineLR(opt, **params)
    lrs = []
    for _ in range(params["total_num_steps"]):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    warm = params["warmup_num_steps"]
    assert params["total_num_steps"] == round(cfg.trainer.epochs * per_epoch)
    assert warm == round((cfg.trainer.warmup_epochs or 0) * per_epoch) or warm == round(
        (cfg.trainer.warmup_fraction or 0) * params["total_num_steps"])
    # DeepSpeed's scheduler yields lr 0 before its first step and at iteration 0, then rises
    # linearly: step i (counting from 0) trains at peak * (i - 1) / warmup.
    assert lrs[0] == lrs[1] == 0
    rise = lrs[1 : warm + 1]
    assert all(b > a for a, b in zip(rise, rise[1:]))  # strictly rising
    for i in (2, warm // 2, warm):
        assert lrs[i] == pytest.approx(peak * (i - 1) / warm)  # linearly
    assert max(lrs) == pytest.approx(peak, rel=2 / warm)
    fall = lrs[warm + 1 :]
    assert all(b <= a for a, b in zip(fall, fall[1:]))
    mid = warm + (len(lrs) - warm) // 2  # half way through the decay: cosine is at half height
    floor = peak * params["cos_min_ratio"]
    assert lrs[mid] == pytest.approx(floor + (peak - floor) * (1 + math.cos(math.pi * 0.5)) / 2, rel=0.02)
    assert lrs[-1] < peak * 0.01


def test_default_config_keeps_scheduler_keys_deepspeed_knows():
    raw = json.loads((ROOT / "ds_config.json").read_text())
    assert raw["scheduler"]["type"] == "WarmupCosineLR"
    assert raw["scheduler"]["params"]["warmup_type"] == "linear"  # DeepSpeed's own default is "log"
