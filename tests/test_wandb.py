"""wandb from DeepSpeed's own "wandb" block: offline runs hold the metrics; wandb is never required."""

import json
import os

import pytest

from cifar10ds.tracking import WandbLogger
from tests.helpers import ROOT, run_cli, wandb_records

CONFIG = {
    "train_batch_size": 20,
    "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
    "wandb": {"enabled": True, "project": "cifar-test", "group": "exp-1"},
    "trainer": {"model": "bn_cnn", "epochs": 2, "data": {"download": False}},
}



def run(tmp_path, config, data, out, *extra, env=None):
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--quiet",
                        *extra], tmp_path)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_offline_run_holds_config_metrics_and_summary(tmp_path, config, data):
    out = tmp_path / "out"
    r = run(tmp_path, config, data, out, env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-2000:]
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    kinds = [rec.WhichOneof("record_type") for rec in records]
    assert "run" in kinds and "history" in kinds
    run_rec = next(rec.run for rec in records if rec.WhichOneof("record_type") == "run")
    assert (run_rec.project, run_rec.run_group, run_rec.display_name) == ("cifar-test", "exp-1", "out")
    config_items = {i.key: json.loads(i.value_json) for i in run_rec.config.update}
    assert config_items["trainer"]["model"] == "bn_cnn" and config_items["train_micro_batch_size_per_gpu"] == 20
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
               for rec in records if rec.WhichOneof("record_type") == "history"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [h for h in history if "epoch/val_acc" in h]
    assert [h["epoch/val_acc"] for h in logged] == [m["val_acc"] for m in metrics]
    assert [h["epoch/grad_norm"] for h in logged] == [m["grad_norm"] for m in metrics]
    step_losses = [h["train/step_loss"] for h in history if "train/step_loss" in h]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert step_losses == [s["loss"] for s in steps] and len(step_losses) == 20
    summary = {i.key: json.loads(i.value_json) for rec in records if rec.WhichOneof("record_type") == "summary"
               for i in rec.summary.update}
    assert summary["final_val_acc"] == json.loads((out / "summary.json").read_text())["final_val_acc"]


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(tmp_path, config, data):
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "CIFAR10DS_FAULT": "sigterm@15"}
    assert run(tmp_path, config, data, out, env=env).returncode == 143
    first = {p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")}
    r = run(tmp_path, config, data, out, "--resume", "auto", env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-2000:]
    runs = {p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")}
    assert len(first) == 1 and runs == first  # the same run id, continued


@pytest.mark.slow
def test_failing_wandb_warns_once_and_training_goes_on(tmp_path, config, data):
    out = tmp_path / "out"
    # Online mode with no API key and no netrc: wandb refuses to start.
    r = run(tmp_path, config, data, out, env={"WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_API_KEY": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: wandb")]
    assert len(warnings) == 1 and "training continues without wandb" in warnings[0]
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2


@pytest.mark.slow
def test_disabled_wandb_is_never_imported(tmp_path, config, data):
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text("raise ImportError('wandb must not be imported')\n")
    cfg = json.loads(config.read_text())
    cfg["wandb"]["enabled"] = False
    config.write_text(json.dumps(cfg))
    r = run(tmp_path, config, data, tmp_path / "out", env={"PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_wandb_error_mid_run_disables_logging_with_one_warning(tmp_path):
    class Broken:
        calls = 0

        def log(self, *a, **k):
            Broken.calls += 1
            raise ConnectionError("network gone\nsecond line")

    warnings = []
    logger = WandbLogger({"enabled": True}, True, tmp_path, warnings.append)
    logger.run = Broken()
    for _ in range(3):
        logger.log({"step": 1, "val_acc": 0.5}, [{"step": 1, "loss": 2.0}])
    logger.finish({"final_val_acc": 0.5})
    assert Broken.calls == 1 and warnings == [
        "warning: wandb log failed (ConnectionError: network gone); training continues without wandb"
    ]
