"""The benchmark scripts run and report consistent numbers (no speed thresholds here)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

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


def test_the_gpu_kit_refuses_an_unknown_part_before_running_any(tmp_path):
    done = run_bounded([str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run", "--parts",
                        "tests speedrun9"], ROOT, {**cli_env(tmp_path), "PYTHON": sys.executable}, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("gpu_check: unknown part speedrun9; the parts are: tests")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_gpu_kits_later_parts_carry_their_overrides(tmp_path, data):
    out = tmp_path / "out"
    done = run_bounded([str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--data", str(data), "--dry-run",
                        "--parts", "speedrun94_doctor resnet18_fast"], ROOT, {**cli_env(tmp_path), "PYTHON": sys.executable},
                       timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    doctor = json.loads((out / "speedrun94_doctor.json").read_text())
    assert doctor["trainer"]["n"] == 1 and doctor["config"].endswith("configs/speedrun94.json")
    assert "trainer.stability.enabled=true" in doctor["overrides"]
    fast = json.loads((out / "resnet18_fast.json").read_text())
    assert fast["config"].endswith("configs/resnet18_speedrun10.json") and fast["trainer"]["n"] == 1
    assert {"trainer.stability.enabled=false", "trainer.channels_last=true"} <= set(fast["overrides"])


@pytest.mark.slow
def test_bench_runs_seeds_in_one_process_and_reports_cis(tmp_path, data):
    import sys

    from tests.helpers import cli_env, run_bounded

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", str(ROOT / "configs" / "speedrun94.json"),
           "--seeds", "2", "--data-dir", str(data), "--json", str(out), "--set", "train_batch_size=40",
           "--set", "trainer.epochs=1", "--set", "trainer.data.download=false", "--set", "trainer.tta_level=1",
           "--warmup-images", "100"]
    done = run_bounded(cmd, ROOT, cli_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["trainer"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and report["trainer"]["n"] == 2
    assert report["tta_level"] == 1 and report["backend"] == "deepspeed" and report["train_images"] == 200
    assert report["warmup_train_images"] == 100  # the uncounted first run, on fewer images
    assert report["trainer"]["acc_mean"] == pytest.approx(sum(r["acc"] for r in runs) / 2)
    low, high = report["trainer"]["acc_ci95"]
    assert low <= report["trainer"]["acc_mean"] <= high
    assert all(r["time_s"] >= r["train_time_s"] > 0 for r in runs)  # + the whitening layer's computation
    assert "airbench" not in report
    assert "trainer    n=2  accuracy" in done.stdout

    # The rest of the seeds in another sitting, joined into one report of 3 seeds
    more = tmp_path / "more.json"
    cmd = cmd[:cmd.index("--json")] + ["--json", str(more)] + cmd[cmd.index("--json") + 2:] + ["--seeds", "1", "--first-seed",
                                                                                              "2", "--no-warmup"]
    done = run_bounded(cmd, ROOT, cli_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["seed"] for r in json.loads(more.read_text())["trainer"]["runs"]] == [2]
    joined = tmp_path / "joined.json"
    done = run_bounded([sys.executable, str(ROOT / "scripts" / "bench.py"), "--merge", str(out), str(more),
                        "--json", str(joined)], ROOT, cli_env(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = json.loads(joined.read_text())
    runs = runs + json.loads(more.read_text())["trainer"]["runs"]
    assert [r["seed"] for r in merged["trainer"]["runs"]] == [0, 1, 2] and merged["trainer"]["n"] == 3
    assert merged["trainer"]["acc_mean"] == pytest.approx(sum(r["acc"] for r in runs) / 3)
    assert merged["config"] == report["config"] and merged["merged_from"] == [str(out), str(more)]
    assert "trainer    n=3  accuracy" in done.stdout


def _report(tmp_path, name, seeds, airbench=True, **changes):
    runs = [{"seed": s, "acc": 0.93 + s / 1000, "time_s": 3.0 + s / 10} for s in seeds]
    report = {"config": "configs/speedrun94.json", "overrides": [], "backend": "deepspeed", "tta_level": 2,
              "device": "cuda", "train_images": 50000, "test_images": 10000, "trainer": {"runs": runs}, **changes}
    if airbench:
        report["airbench"] = {"runs": [{"seed": s, "acc": 0.94, "time_s": 4.0} for s in seeds]}
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def test_bench_merge_joins_parts_with_airbench_and_refuses_what_does_not_belong_together(tmp_path, capfd):
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import main

    a, b = _report(tmp_path, "a.json", [0, 1]), _report(tmp_path, "b.json", [2, 3])
    assert main(["--merge", str(a), str(b), "--json", str(tmp_path / "ab.json")]) == 0
    ab = json.loads((tmp_path / "ab.json").read_text())
    assert ab["trainer"]["n"] == ab["airbench"]["n"] == 4
    assert ab["trainer"]["time_mean_s"] == pytest.approx(3.15) and ab["airbench"]["time_mean_s"] == pytest.approx(4.0)
    assert ab["time_ratio"] == pytest.approx(3.15 / 4.0) and ab["acc_diff"] == pytest.approx(0.9315 - 0.94)
    capfd.readouterr()
    for other, message in [
        (a, "seeds repeat across the reports ([0, 0, 1, 1]): run the parts with --first-seed"),
        (_report(tmp_path, "c.json", [2], overrides=["trainer.compile=true"]), "differs in overrides"),
        (_report(tmp_path, "d.json", [2], airbench=False), "differs in having airbench runs"),
    ]:
        assert main(["--merge", str(a), str(other)]) == 2
        err = capfd.readouterr().err
        assert err.startswith("error: --merge: ") and message in err and err.count("\n") == 1
    assert main(["--merge", str(tmp_path / "missing.json")]) == 2
    assert "No such file" in capfd.readouterr().err


@pytest.mark.slow
def test_bench_vs_airbench_without_the_package_is_one_line(tmp_path, data):
    import importlib.util
    import sys

    from tests.helpers import cli_env, run_bounded

    if importlib.util.find_spec("airbench") is not None:
        pytest.skip("airbench is installed here")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--seeds", "1", "--data-dir", str(data), "--vs-airbench",
           "--set", "trainer.data.download=false"]
    done = run_bounded(cmd, ROOT, cli_env(tmp_path), timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: --vs-airbench needs the airbench package") and done.stderr.count("\n") == 1


def test_airbench_is_fed_the_trainers_images_in_its_format_and_order(tmp_path, data, monkeypatch):
    """bench.py --vs-airbench without a GPU: a stand-in airbench module records what it is given."""
    import argparse
    import types
    from pathlib import Path

    from cifar10ds.config import load_config
    from cifar10ds.data import load_cifar10
    from cifar10ds.errors import UserError
    from tests.helpers import tiny_dataset

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import Airbench

    seen = {}

    class CifarLoader:  # airbench 0.1.8's signature; it reads ./cifar10/train.pt
        def __init__(self, path, train, batch_size, aug, altflip):
            seen["loader"] = (Path.cwd(), train, batch_size, aug, altflip)
            seen["train"] = torch.load(Path(path) / "train.pt", weights_only=True)

    def train94(train_loader, epochs, tta_level, run, verbose):  # reads ./cifar10/test.pt, prints its table
        seen["test"] = torch.load("cifar10/test.pt", weights_only=True)
        seen["call"] = (epochs, tta_level, run, verbose)
        print("|  run  |  epoch  |  tta_val_acc  |  total_time_seconds  |")
        print("|       |   eval  |       0.9400  |              3.2100  |")

    monkeypatch.setitem(sys.modules, "airbench", types.SimpleNamespace(CifarLoader=CifarLoader, train94=train94))
    trainer = load_config(ROOT / "configs" / "speedrun94.json", ["trainer.data.download=false"]).trainer
    with pytest.raises(UserError, match="--vs-airbench: 200 training images are fewer than airbench94's one batch of 1024"):
        Airbench(argparse.Namespace(data_dir=str(data)), tmp_path / "small", trainer)

    big = tiny_dataset(tmp_path / "big", train_per_class=110, test_per_class=3)  # 1,100 images, sorted by class
    cwd = Path.cwd()
    rival = Airbench(argparse.Namespace(data_dir=str(big)), tmp_path / "scratch", trainer)
    assert rival.run(seed=3) == {"seed": 3, "acc": 0.94, "time_s": 3.21}
    assert Path.cwd() == cwd  # airbench's folder only while it runs: relative paths of ours still work
    assert seen["loader"] == (tmp_path / "scratch", True, 1024, {"flip": True, "translate": 2}, True)
    assert seen["call"] == (9.9, 2, 0, True)  # the preset's epochs and TTA level
    ours = load_cifar10(str(big), download=False, cache_dir=str(tmp_path / "cache"))
    train, test = seen["train"], seen["test"]
    assert train["images"].shape == (1100, 32, 32, 3) and train["images"].dtype == torch.uint8  # NHWC uint8
    assert train["labels"].dtype == torch.int64 and torch.equal(test["images"], ours.test_x.permute(0, 2, 3, 1))
    # the very same images and labels, in a shuffled order: the first 5,000 (here 500) that airbench whitens
    # with hold every class, where the decoded folder is sorted by class
    as_rows = {(bytes(x.numpy()), int(y)) for x, y in zip(train["images"], train["labels"])}
    assert as_rows == {(bytes(x.permute(1, 2, 0).contiguous().numpy()), int(y)) for x, y in zip(ours.train_x, ours.train_y)}
    assert torch.equal(ours.train_y[:500].unique(), torch.arange(5))  # sorted: 5 classes in the first 500
    assert len(train["labels"][:500].unique()) == 10


def test_parse_airbench_table_reads_its_own_final_row():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import parse_airbench_table

    printed = "\n".join([
        "-" * 40,
        "|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |",
        "-" * 40,
        "|       0  |      0  |      1.7000  |     0.4000  |   0.5000  |               |              0.4100  |",
        "|          |      9  |      0.9000  |     0.9500  |   0.9300  |               |              3.5000  |",
        "|          |   eval  |              |             |           |       0.9401  |              3.8300  |",
    ])
    assert parse_airbench_table(printed) == {"tta_val_acc": 0.9401, "total_time_seconds": 3.83}
    cut_short = printed.rsplit("\n", 1)[0] + "\nRuntimeError: CUDA out of memory"
    with pytest.raises(RuntimeError, match="airbench printed no final \\(eval\\) row(.|\n)*CUDA out of memory"):
        parse_airbench_table(cut_short)


@pytest.mark.slow
def test_bench_writes_its_report_after_every_seed_and_keeps_to_a_time_budget(tmp_path, data):
    """A GPU session ends at a hard time limit: what ran by then must be on disk, and a budget ends it cleanly."""
    import signal
    import subprocess
    import time

    base = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", str(ROOT / "configs" / "speedrun94.json"),
            "--data-dir", str(data), "--set", "train_batch_size=40", "--set", "trainer.epochs=1",
            "--set", "trainer.data.download=false", "--no-warmup"]
    killed = tmp_path / "killed.json"
    proc = subprocess.Popen(base + ["--seeds", "20", "--json", str(killed)], cwd=ROOT, env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not killed.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as a device time limit would
        proc.communicate()
    report = json.loads(killed.read_text())  # whole: written to a temporary name, then renamed
    assert 1 <= report["trainer"]["n"] == len(report["trainer"]["runs"]) < 20 and report["seeds_asked"] == 20

    budgeted = tmp_path / "budget.json"
    done = run_bounded(base + ["--seeds", "20", "--budget-s", "1", "--json", str(budgeted)], ROOT, cli_env(tmp_path),
                       timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(budgeted.read_text())
    assert report["trainer"]["n"] == 1 and "stopping after 1 seeds" in done.stdout  # a seed takes more than 1 s


@pytest.mark.slow
def test_the_gpu_kit_refuses_a_machine_without_cuda_and_rehearses_every_part_on_a_cpu(tmp_path, data):
    kit = [str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--data", str(data)]
    env = {**cli_env(tmp_path), "PYTHON": sys.executable}
    refused = run_bounded(kit, ROOT, env, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("gpu_check: no CUDA GPU here") and "--dry-run" in refused.stderr

    done = run_bounded(kit + ["--dry-run", "--budget-s", "400"], ROOT, env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    kit_report = json.loads((out / "kit.json").read_text())
    assert [(p["part"], p["status"]) for p in kit_report["parts"]] == [
        (name, "ok") for name in ("env", "data", "tests", "speedrun94", "resnet18", "bn_cnn", "resnet9")]
    assert json.loads((out / "env.json").read_text())["torch"] == torch.__version__
    assert "testsuite" in (out / "gpu-tests.xml").read_text()  # pytest -m gpu ran (and skipped: no CUDA)
    for name in ("speedrun94", "resnet18", "bn_cnn", "resnet9"):
        assert json.loads((out / f"{name}.json").read_text())["trainer"]["n"] == 1, name
