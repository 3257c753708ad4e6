"""DeepSpeed's own config schema: every key it refuses named on a line of its own with what to do, before any work;
a user error with several problems printed as several lines in one write per rank."""

from __future__ import annotations

import json
import re

import pytest

from cifar10ds.engines.checks import deepspeed_schema_problems, explain_validation_error
from cifar10ds.errors import ConfigError, DataError
from tests.helpers import ROOT, deepspeed_launcher, free_port, run_cli

FP16_KEYS = {"loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 15}


@pytest.mark.parametrize("ds, refused, deprecated", [
    # the shape of DeepSpeedExamples' training/cifar/ds_config.json: fp16's loss-scale keys in the bf16 block
    ({"bf16": {"enabled": True, **FP16_KEYS}, "zero_optimization": {"stage": 0, "cpu_offload": False}},
     [f"bf16.{k}: not a bf16 key (fp16 only): remove it" for k in FP16_KEYS],
     ["zero_optimization.cpu_offload: deprecated (now offload_optimizer); false asks for nothing: remove it"]),
    ({"bfloat16": {"enabled": True, "loss_scale": 0}}, ["bfloat16.loss_scale: not a bfloat16 key (fp16 only): remove it"],
     []),
    ({"fp16": {"enabled": False, "immediate_grad_update": True}},
     ["fp16.immediate_grad_update: not an fp16 key (bf16 only): remove it"], []),
    ({"bf16": {"enabld": True}}, ["bf16.enabld: not a DeepSpeed key (did you mean bf16.enabled?)"], []),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}, "cpu_offload": True}},
     ["zero_optimization.offload_optimizer.device: Input should be 'none', 'cpu' or 'nvme' (got 'gpu')"],
     ['zero_optimization.cpu_offload: deprecated (now offload_optimizer): replace it with "offload_optimizer": '
      '{"device": "cpu"}']),
    ({"zero_optimization": {"reduce_bucket_size": "big"}},
     ["zero_optimization.reduce_bucket_size: Input should be a valid integer, unable to parse string as an integer "
      "(got 'big')"], []),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "fp16": {"enabled": "auto"}}, [], []),  # "auto"
    ({"zero_optimization": {"stage": 1, "cpu_offload": False}}, [], [  # DeepSpeed only warns: so does it alone
        "zero_optimization.cpu_offload: deprecated (now offload_optimizer); false asks for nothing: remove it"]),
])
def test_each_refused_key_gets_a_line_with_what_to_do(ds, refused, deprecated):
    assert deepspeed_schema_problems(ds) == (refused, deprecated)


def test_an_unknown_key_lists_the_sections_keys():
    refused, _ = deepspeed_schema_problems({"zero_optimization": {"offload_param": {"device": "cpu", "x": 1}}})
    assert len(refused) == 1
    assert re.fullmatch(r"zero_optimization\.offload_param\.x: not a key of DeepSpeed [\d.]+'s "
                        r"zero_optimization\.offload_param \(it has device, nvme_path, .*\): remove it", refused[0])


@pytest.mark.parametrize("path", [ROOT / "ds_config.json", *sorted((ROOT / "configs").rglob("*.json"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_passes_deepspeeds_schema(path):
    assert deepspeed_schema_problems(json.loads(path.read_text())) == ([], [])


def test_a_section_read_only_by_deepspeed_itself_is_explained_the_same_way():
    """Sections not read ahead (the monitors) fail inside deepspeed.initialize; the engine explains that error."""
    from deepspeed.monitor.config import DeepSpeedMonitorConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        DeepSpeedMonitorConfig(tensorboard={"enabled": True, "output_pth": "tb"})
    assert explain_validation_error(e.value, None, DeepSpeedMonitorConfig) == [
        "tensorboard.output_pth: not a DeepSpeed key (did you mean tensorboard.output_path?)"]


def test_a_user_error_is_one_line_per_problem():
    one = ConfigError("a key:\n  what   to do")
    assert str(one) == "a key: what to do" and one.report() == "config error: a key: what to do"
    two = ConfigError("bf16.loss_scale: remove it", "zero_optimization.cpu_offload:\nremove it")
    assert two.problems == ["bf16.loss_scale: remove it", "zero_optimization.cpu_offload: remove it"]
    assert two.report("[rank 1] ") == ("[rank 1] config error: bf16.loss_scale: remove it\n"
                                       "[rank 1] config error: zero_optimization.cpu_offload: remove it")
    assert DataError().report() == "data error: data error"


BROUGHT = {  # DeepSpeedExamples' training/cifar/ds_config.json, key for key: no "trainer" section, DeepSpeed's keys only
    "train_batch_size": 16,
    "steps_per_print": 250,
    "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000}},
    "gradient_clipping": 1.0,
    "prescale_gradients": False,
    "bf16": {"enabled": True, "bf16_master_weights_and_grads": False, **FP16_KEYS},
    "fp16": {"enabled": False, "fp16_master_weights_and_grads": False, **FP16_KEYS},
    "wall_clock_breakdown": False,
    "zero_optimization": {"stage": 0, "allgather_partitions": True, "reduce_scatter": True,
                          "allgather_bucket_size": 50000000, "reduce_bucket_size": 50000000, "overlap_comm": True,
                          "contiguous_gradients": True, "cpu_offload": False},
}


@pytest.mark.slow
def test_a_config_brought_from_deepspeeds_example_stops_every_rank_with_a_line_per_key(tmp_path):
    """2 ranks: each prints its 6 lines in one write (the blocks never interleave), exit 2, no traceback, and before
    the data is even looked for (the data dir does not exist)."""
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps(BROUGHT))
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(tmp_path / "no-data"), "--output-dir",
                 str(tmp_path / "out")], tmp_path, timeout=300, launcher=deepspeed_launcher(2, free_port()))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "data error" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "config error:" in line]
    expected = [f"config error: {config}: bf16.{k}: not a bf16 key (fp16 only): remove it" for k in FP16_KEYS]
    expected.append(f"config error: {config}: zero_optimization.cpu_offload: deprecated (now offload_optimizer); false "
                    "asks for nothing: remove it")
    assert len(lines) == 12, r.stderr[-3000:]
    blocks = [lines[:6], lines[6:]]
    assert sorted(b[0][:8] for b in blocks) == ["[rank 0]", "[rank 1]"]
    for block in blocks:
        rank = block[0][:9]
        assert block == [rank + line for line in expected]


@pytest.mark.slow
def test_deepspeeds_example_config_trains_on_two_ranks_once_its_lines_are_followed(tmp_path, data):
    """Each line's fix applied (the five loss-scale keys out of bf16, cpu_offload out of zero_optimization), the
    example's config trains as it is otherwise: bf16, its Adam and WarmupLR, clipping 1.0, batch 16 over 2 ranks."""
    fixed = json.loads(json.dumps(BROUGHT))
    for key in FP16_KEYS:
        del fixed["bf16"][key]
    del fixed["zero_optimization"]["cpu_offload"]
    assert deepspeed_schema_problems(fixed) == ([], [])
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps(fixed))
    out = tmp_path / "out"
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out),
                 "--set", "trainer.model=bn_cnn", "--set", "trainer.epochs=1", "--set", "trainer.data.download=false"],
                tmp_path, timeout=300, launcher=deepspeed_launcher(2, free_port()))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["precision"], summary["world_size"], summary["stop_reason"]) == ("bf16", 2, "completed")
    assert summary["final_val_acc"] is not None
