"""The non-finite policies in real runs: a NaN injected into one rank's loss (CIFAR10DS_FAULT=nan@STEP@RANK)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import accuracy_in_one_process
from tests.test_reliability import CONFIG as RELIABILITY_CONFIG
from tests.test_reliability import launch, metrics

pytestmark = pytest.mark.slow

CONFIG = {**RELIABILITY_CONFIG,  # the reliability tests' run, shorter, with a checkpoint at every step
          "trainer": {**RELIABILITY_CONFIG["trainer"], "epochs": 2, "warmup_fraction": 0.5,
                      "checkpoint": {"every_steps": 1, "keep_last": 50}}}


def steps(out):
    return {r["step"]: r for r in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}


def weights(out, step, backend="deepspeed"):
    """The parameters (not the BatchNorm buffers, which every forward pass moves) in checkpoint ``step``."""
    folder = out / "checkpoints" / f"step{step:08d}"
    if backend == "deepspeed":
        state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    else:
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
    return {k: v for k, v in state.items() if not k.split(".")[-1].startswith(("running_", "num_batches"))}


@pytest.mark.parametrize("ranks, backend", [(2, "deepspeed"), (1, "accelerate")])
def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path, config, data, ranks, backend):
    out = tmp_path / "out"
    r = launch(tmp_path, config, data, out, "--backend", backend, fault=f"nan@3@{ranks - 1}", ranks=ranks)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == ranks and summary["stop_reason"] == "completed"
    assert summary["skipped_steps"] == 1 and summary["stability"]["nonfinite_steps"] == 1
    rows = steps(out)
    assert rows[3]["skipped"] is True and rows[3]["grad_norm"] is None
    assert not any(r.get("skipped") for s, r in rows.items() if s != 3)
    # the scheduler held: step 4 trains at step 3's lr, where every other warmup step moves it
    assert rows[2]["lr"] < rows[3]["lr"] == rows[4]["lr"] < rows[5]["lr"]
    # the skipped step left the weights exactly as step 2 did; step 4 moved them again
    w2, w3, w4 = (weights(out, s, backend) for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert any(not torch.equal(w3[k], w4[k]) for k in w3 if w3[k].is_floating_point())
    # every rank skipped: had one applied the NaN step, the ranks' weights would differ (and be NaN)
    assert all(torch.isfinite(v).all() for v in torch.load(out / "model.pt", weights_only=True).values())
    if ranks > 1:
        one = accuracy_in_one_process(out, data, "bn_cnn", tmp_path / "cache")
        assert summary["final_val_acc"] == pytest.approx(one, abs=1e-9)
    # rank 0 reports: with 2 ranks its own loss was finite and the all-reduced gradients were not
    what, cause = ("gradient norm", "nonfinite_gradients") if ranks > 1 else ("loss", "nonfinite_loss")
    d = summary["diagnosis"]
    assert d["cause"] == cause and d["first_nonfinite_step"] == 3
    assert d["first_nonfinite_layer"] == "fc2"  # the layer nearest the loss: where backprop met the NaN first
    assert f"stability: non-finite {what} at step 3 (first non-finite gradient: fc2)" in r.stderr


def test_stop_policy_keeps_the_last_finite_weights(tmp_path, config, data):
    out = tmp_path / "out"
    r = launch(tmp_path, config, data, out, "--set", "trainer.stability.on_nonfinite=stop", fault="nan@4@1", ranks=2)
    assert r.returncode == 3, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "nonfinite" and summary["steps"] == 4 and summary["final_val_acc"] is None
    d = summary["diagnosis"]
    assert (d["cause"], d["first_nonfinite_step"], d["precision"], d["optimizer"]) == ("nonfinite_gradients", 4, "fp32", "SGD")
    assert d["has_normalization"] is True and 0 < d["lr_at_event"] < 0.05  # in the warmup
    assert [f["doc"].split("#")[1] for f in d["fixes"]] == ["learning-rate"]  # BN, SGD and clipping are in place
    marker = json.loads((out / "checkpoints" / "step00000004" / "COMMITTED.json").read_text())
    assert marker["reason"] == "nonfinite"
    w3, w4 = weights(out, 3), weights(out, 4)
    assert all(torch.equal(w3[k], w4[k]) for k in w3)
    assert r.stderr.count("stability doctor:") == 1  # rank 0 only


def test_rollback_reloads_and_lowers_the_lr(tmp_path, config, data):
    clean, rolled = tmp_path / "clean", tmp_path / "rolled"
    assert launch(tmp_path, config, data, clean).returncode == 0
    r = launch(tmp_path, config, data, rolled, "--set", "trainer.stability.on_nonfinite=rollback",
               "--set", "trainer.checkpoint.every_steps=null", fault="nan@15")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((rolled / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["stability"]["rollbacks"] == 1
    assert summary["stability"]["lr_scale"] == 0.5
    assert "rolled back to step00000010 (step 10)" in r.stderr + r.stdout  # the end of epoch 1
    a, b = steps(clean), steps(rolled)
    assert sorted(b) == sorted(a) == list(range(1, 21))  # epoch 2 re-ran from its start, no step twice
    assert all(b[s]["lr"] == a[s]["lr"] for s in range(1, 11))
    assert all(b[s]["lr"] == pytest.approx(0.5 * a[s]["lr"], rel=1e-12) for s in range(11, 21))
    assert [m["epoch"] for m in metrics(rolled)] == [1, 2]


def test_without_the_per_step_checks_a_nonfinite_epoch_still_stops_the_run(tmp_path, config, data):
    """trainer.stability.enabled=false (the speed preset's setting): nothing is skipped, but the epoch's loss
    gives the NaN away and the run stops with the doctor's exit code instead of training on."""
    out = tmp_path / "out"
    r = launch(tmp_path, config, data, out, "--set", "trainer.stability.enabled=false", fault="nan@3")
    assert r.returncode == 3, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "nonfinite" and summary["stability"] is None
    assert summary["epochs_run"] == 1 and summary["steps"] == len(steps(out))  # stopped after the first epoch
    assert "stability: the training loss of epoch 1 is not finite" in r.stderr
    assert r.stderr.count("stability: the training loss") == 1
