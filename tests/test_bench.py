"""The benchmark scripts run and report consistent numbers (no speed thresholds here)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import ROOT, cli_env, run_bounded


@pytest.mark.slow
@pytest.mark.parametrize("memory_format", [None, "contiguous"])
def test_bench_cpu_reports_four_contenders(data, tmp_path, memory_format):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_cpu.py"), "--data-dir", str(data), "--images", "160",
           "--rounds", "1", "--test-limit", "20", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    cmd += ["--memory-format", memory_format] if memory_format else []
    channels_last = memory_format is None  # the default: the trainer's own on CPU
    done = run_bounded(cmd, ROOT, cli_env(tmp_path), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads(out.read_text())
    assert (report["model"], report["batch"], report["images"], report["rounds"]) == ("bn_cnn", 32, 160, 1)
    assert report["precision"] == "fp32" and report["processes"] == 1
    assert report["threads"] >= 1 and report["dataloader_workers"] == 2
    assert report["torch"] and report["cpu"]
    assert report["hand_loops_in_fresh_processes"] is True
    assert report["trainer_backend"] in ("deepspeed", "accelerate")
    assert "--deepspeed_config" in report["trainer_command"]
    assert "trainer.data.train_limit=160" in report["trainer_command"]
    assert report["memory_format"] == ("channels_last" if channels_last else "contiguous")
    assert f"trainer.channels_last={str(channels_last).lower()}" in report["trainer_command"]

    means = {}
    for name in ("trainer", "hand", "hand_kept", "dataloader"):
        c = report["contenders"][name]
        assert len(c["per_round_images_per_s"]) == 1
        assert c["per_round_images_per_s"][0] > 0
        assert c["mean_images_per_s"] == pytest.approx(sum(c["per_round_images_per_s"]))
        assert c["median_images_per_s"] == pytest.approx(c["mean_images_per_s"])  # one round
        assert 0 < c["train_loss_per_round"][0] < 10  # every contender really trained
        means[name] = c["mean_images_per_s"]
    ratios = report["ratios"]
    assert set(ratios) == {"trainer/hand", "trainer/hand_kept", "trainer/dataloader"}
    for name in ("hand", "hand_kept", "dataloader"):
        assert ratios[f"trainer/{name}"] == pytest.approx(means["trainer"] / means[name])
    assert report["targets"] == {"trainer/hand": 0.9, "trainer/dataloader": 1.8}
    assert report["pass"] == {k: ratios[k] >= report["targets"][k] for k in report["targets"]}

    # The printed table and verdicts carry the same numbers.
    assert "| trainer |" in done.stdout and "| hand_kept |" in done.stdout and "| dataloader |" in done.stdout
    for key, value in ratios.items():
        assert f"{key} = {value:.2f}" in done.stdout


def test_bench_cpu_without_data_fails_with_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_cpu.py"), "--data-dir", str(tmp_path / "nothing-here"),
           "--cache-dir", str(tmp_path / "cache")]
    done = run_bounded(cmd, ROOT, cli_env(tmp_path), timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("data error: ") and done.stderr.count("\n") == 1


def test_bench_memory_format_compares_both_formats_per_model(tmp_path):
    out = tmp_path / "formats.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_memory_format.py"), "--models", "bn_cnn", "simple_cnn",
           "--steps", "2", "--rounds", "1", "--threads", "1", "--json", str(out)]
    done = run_bounded(cmd, ROOT, cli_env(tmp_path), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and report["rounds"] == 1
    assert set(report["models"]) == {"bn_cnn", "simple_cnn"}
    for name, row in report["models"].items():
        assert (row["batch"], row["steps"]) == (32, 2)
        for key in ("train", "eval"):
            speeds = row[f"{key}_images_per_s"]
            assert speeds["contiguous"] > 0 and speeds["channels_last"] > 0
            assert row[f"{key}_ratio"] == pytest.approx(speeds["channels_last"] / speeds["contiguous"])
        assert f"{name:12s} batch   32" in done.stdout


def _bench_gpu(tmp_path, *args, bench_args=""):
    env = cli_env(tmp_path)
    env.update(PYTHON=sys.executable, BENCH_ARGS=bench_args)
    return run_bounded(["bash", str(ROOT / "scripts" / "bench_gpu.sh"), *args], ROOT, env, timeout=400)


def test_bench_gpu_refuses_an_unknown_part_before_running_any(tmp_path):
    done = _bench_gpu(tmp_path, "data", str(tmp_path / "out"), "env", "speedrun9")
    assert done.returncode == 2 and done.stderr.startswith("error: unknown part speedrun9; the parts are: env speedrun94")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_gpu_parts_write_their_reports_and_go_on_past_a_failure(tmp_path, data):
    """On CPU with 1 seed of 1 epoch (BENCH_ARGS): each part's report, with the part's own overrides."""
    import torch

    out = tmp_path / "out"
    small = "--seeds 1 --no-warmup --set trainer.epochs=1 --set train_batch_size=40 --set trainer.data.download=false"
    done = _bench_gpu(tmp_path, str(data), str(out), "env", "speedrun94", "speedrun94_doctor", "resnet18_fast",
                      bench_args=small)
    # speedrun94 needs airbench and a GPU (cli_env hides any GPU); the others ran
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"torch {torch.__version__}" in (out / "env.txt").read_text()
    assert not (out / "speedrun94.json").exists()
    log = (out / "log.txt").read_text()
    assert "== speedrun94: bench.py --seeds 10 --vs-airbench --seeds 1 --no-warmup" in log
    assert "== speedrun94 failed (exit " in log
    doctor = json.loads((out / "speedrun94_doctor.json").read_text())
    assert doctor["trainer"]["n"] == 1 and doctor["config"].endswith("configs/speedrun94.json")
    assert "trainer.stability.enabled=true" in doctor["overrides"]
    fast = json.loads((out / "resnet18_fast.json").read_text())
    assert fast["config"].endswith("configs/resnet18_speedrun10.json") and fast["trainer"]["n"] == 1
    assert {"trainer.stability.enabled=false", "trainer.channels_last=true"} <= set(fast["overrides"])
