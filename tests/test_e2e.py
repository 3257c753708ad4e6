"""Real runs of cifar10_deepspeed.py as a user launches it, on small generated data."""

import json
import re
import sys
from pathlib import Path

import pytest

from tests.helpers import accuracy_in_one_process, deepspeed_launcher, free_port, run_cli

pytestmark = pytest.mark.slow

CONFIG = {
    "train_batch_size": 20,
    "train_micro_batch_size_per_gpu": "auto",
    "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_type": "linear"}},
    "gradient_clipping": 1.0,
    "steps_per_print": 1000,
    "trainer": {"model": "bn_cnn", "epochs": 3, "seed": 0, "warmup_fraction": 0.1,
                "data": {"download": False, "augmentation": {"crop_padding": 2, "flip": True, "cutout": 0}}},
}



def read_run(out):
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), metrics, steps, json.loads((out / "config.json").read_text())


def test_one_process_run_writes_its_outputs(tmp_path, data, config):
    out = tmp_path / "out"
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    summary, metrics, steps, resolved = read_run(out)
    # One line per epoch in the speedrun log's style.
    lines = re.findall(r"Epoch \[(\d)/3\] loss [\d.]+ val_acc [\d.]+% lr [\d.e-]+ grad_norm [\d.]+ [\d.]+s total [\d.]+s", r.stdout)
    assert lines == ["1", "2", "3"]
    # The resolved config is what DeepSpeed received: no "auto" left.
    assert resolved["train_micro_batch_size_per_gpu"] == 20 and resolved["gradient_accumulation_steps"] == 1
    assert resolved["scheduler"]["params"]["total_num_steps"] == 30  # 200 images / 20 x 3 epochs
    assert resolved["scheduler"]["params"]["warmup_num_steps"] == 3
    assert resolved["trainer"]["data"]["dir"] == str(data)
    # metrics.jsonl: one object per epoch with the documented fields.
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and [m["step"] for m in metrics] == [10, 20, 30]
    for m in metrics:
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "grad_norm", "epoch_time_s", "elapsed_s",
                "skipped_steps"} <= set(m)
        assert 0 <= m["val_acc"] <= 1 and m["grad_norm"] > 0 and m["skipped_steps"] == 0
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[-1]["val_acc"] >= 0.5  # learnable fixture: far above the 10% of chance
    # steps.jsonl: every step's loss and gradient norm.
    assert [s["step"] for s in steps] == list(range(1, 31)) and all(s["grad_norm"] > 0 for s in steps)
    # DeepSpeed's linear warmup (3 steps): lr 0 for the first two steps, then rising; the lr each step used.
    assert [s["lr"] for s in steps[:4]] == pytest.approx([0, 0, 0.05 / 3, 2 * 0.05 / 3])
    assert "loss_scale" not in steps[0]  # fp32
    assert summary["final_val_acc"] == metrics[-1]["val_acc"]
    assert summary["best_val_acc"] == max(m["val_acc"] for m in metrics)
    assert (summary["world_size"], summary["backend"], summary["precision"]) == (1, "deepspeed", "fp32")
    assert (summary["model"], summary["params"], summary["seed"]) == ("bn_cnn", 268_746, 0)
    assert (summary["train_images"], summary["test_images"], summary["epochs_run"]) == (200, 70, 3)
    assert summary["stopped_early"] is False and summary["stop_reason"] == "completed"
    assert summary["train_images_per_s"] == pytest.approx(600 / summary["train_time_s"])
    assert summary["device"].startswith("cpu") and summary["versions"]["deepspeed"]
    assert summary["cpu_keep_freed_memory"] is sys.platform.startswith("linux")  # glibc's mallopt, on by default
    assert summary["channels_last"] is True and resolved["trainer"]["channels_last"] is True  # "auto" on a CPU
    assert "git_commit" in summary and summary["total_time_s"] >= summary["train_time_s"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["world_size"] == 1 and manifest["device_count"] == 1
    assert manifest["versions"]["torch"] and len(manifest["config_sha256"]) == 64
    assert "--deepspeed_config" in manifest["command"] and "git_dirty" in manifest


def shm_buffers(port: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_two_ranks_under_the_deepspeed_launcher(tmp_path, data, config):
    out = tmp_path / "out"
    port = free_port()
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out)], tmp_path,
                timeout=300, launcher=deepspeed_launcher(2, port))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert shm_buffers(port) == []  # DeepSpeed leaves 64 MiB per rank in /dev/shm; the trainer removes them
    summary, metrics, steps, resolved = read_run(out)
    assert summary["world_size"] == 2
    assert resolved["train_micro_batch_size_per_gpu"] == 10  # 20 across 2 ranks
    assert [m["step"] for m in metrics] == [10, 20, 30]  # 100 images per rank / 10 per step
    assert len(steps) == 30
    assert r.stdout.count("Epoch [1/3]") == 1  # only rank 0 reports
    assert metrics[-1]["val_acc"] >= 0.5
    assert summary["test_images"] == 70
    # Sharded evaluation counts each test image once: the same weights score the same in one process.
    assert summary["final_val_acc"] == accuracy_in_one_process(out, data, "bn_cnn", tmp_path / "cache")


def test_bf16_and_fractional_epochs(tmp_path, data, config):
    out = tmp_path / "out"
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--quiet",
                 "--set", "bf16.enabled=true", "--set", "trainer.epochs=1.5"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Epoch" not in r.stdout  # --quiet
    summary, metrics, steps, _ = read_run(out)
    assert summary["precision"] == "bf16"
    assert summary["channels_last"] is False  # "auto": DeepSpeed's bf16 optimizer keeps master weights
    assert summary["epochs_run"] == 1.5 and [m["step"] for m in metrics] == [10, 15]
    assert metrics[1]["epoch_fraction"] == 0.5
    assert all(s["loss"] == s["loss"] and s["grad_norm"] > 0 for s in steps)  # finite


def test_adam_on_a_cpu_trains_every_weight(tmp_path, data, config):
    """DeepSpeed's fused Adam on a CPU would leave channels_last conv weights as initialised: "auto" keeps the
    model contiguous with it, and every weight moves."""
    import torch

    import models

    out = tmp_path / "out"
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--quiet",
                 "--set", 'optimizer={"type": "Adam", "params": {"lr": 0.001}}', "--set", "trainer.epochs=1"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary, _, _, resolved = read_run(out)
    assert summary["channels_last"] is False and resolved["trainer"]["channels_last"] is False
    torch.manual_seed(0)  # the run's seed: the weights it started from
    start = models.create_model("bn_cnn").state_dict()
    trained = torch.load(out / "model.pt", weights_only=True)
    moved = {k for k, v in start.items() if v.is_floating_point() and not torch.equal(v, trained[k])}
    assert {"conv1.weight", "conv2.weight", "fc1.weight"} <= moved


def test_torch_autocast_fp16_reports_unscaled_gradient_norms(tmp_path, data, config):
    """DeepSpeed's torch_autocast in fp16 scales the loss with torch's GradScaler: the doctor must see the
    gradients' true norm (about the bf16 run's), not one 65,536 times larger."""
    norms, scales = {}, {}
    for dtype in ("bfloat16", "float16"):
        out = tmp_path / dtype
        r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--quiet",
                     "--set", "trainer.model=simple_cnn", "--set", "trainer.epochs=1", "--set", "gradient_clipping=0",
                     "--set", "torch_autocast.enabled=true", "--set", f"torch_autocast.dtype={dtype}"], tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        summary, _, steps, _ = read_run(out)
        assert summary["precision"] == {"bfloat16": "bf16", "float16": "fp16"}[dtype]
        norms[dtype] = [s["grad_norm"] for s in steps]
        scales[dtype] = [s.get("loss_scale") for s in steps]
        assert "gradient norm" not in r.stderr  # no false "exploding gradients" warning
    assert norms["float16"][0] == pytest.approx(norms["bfloat16"][0], rel=0.05)
    assert all(0 < n < 100 for n in norms["float16"])
    assert scales["float16"][0] == 65536.0 and scales["bfloat16"][0] is None  # the scaler's scale, reported


def test_early_stopping_at_target(tmp_path, data, config):
    out = tmp_path / "out"
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out),
                 "--set", "trainer.early_stopping.target=0.01"], tmp_path)
    assert r.returncode == 0, r.stderr
    summary, metrics, _, _ = read_run(out)
    assert (summary["stopped_early"], summary["stop_reason"], summary["epochs_run"]) == (True, "target", 1)
    assert len(metrics) == 1 and "early stop: val_acc" in r.stdout
    # Resuming a run that stopped early does not train it further.
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out),
                 "--resume", "auto", "--set", "trainer.early_stopping.target=0.01"], tmp_path)
    assert r.returncode == 0 and "had already stopped (target); nothing to train" in r.stdout
    summary, metrics, _, _ = read_run(out)
    assert (summary["stop_reason"], len(metrics)) == ("target", 1)


def test_resume_auto_needs_to_know_where(tmp_path, data, config):
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--resume", "auto"], tmp_path)
    assert_user_error(r, "--resume auto looks for checkpoints in the output dir: pass --output-dir DIR")


def assert_user_error(r, message, ranks=1):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    hits = [line for line in r.stderr.splitlines() if message in line]
    assert len(hits) == ranks, r.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "trainer.epochs=0"], "config error: "),
        (["--set", "trainer.modle=bn_cnn"], "trainer.modle: unknown key; allowed keys: model, epochs"),
        (["--set", "fp16.enabled=true"], "fp16.enabled=true is not supported on this device (cpu); use bf16.enabled=true or fp32"),
        (["--set", "train_batch_size=7", "--set", "trainer.data.train_limit=22"], "BatchNorm cannot train on one"),
        (["--set", "train_batch_size=30", "--set", "trainer.data.train_limit=20", "--set", "trainer.data.drop_last=true"],
         "trainer.data.drop_last=true leaves no training batch: each rank holds 20 images per epoch, fewer than one "
         "micro batch of 30"),
        (["--data-dir", "/nonexistent/cifar"], "data error: no CIFAR-10 data in /nonexistent/cifar and trainer.data.download is false; pass --data-dir PATH"),
        (["--output-dir", "/proc/forbidden"], "output dir /proc/forbidden is not writable"),
        (["--set", "trainer.checkpoint.dir=/proc/ckpts"], "output dir /proc/ckpts is not writable"),
        (["--set", "optimizer.type=Shampoo"], "optimizer.type='Shampoo' is neither a DeepSpeed optimizer"),
        (["--set", "optimizer.params.betas=[0.9, 0.99]"], "optimizer.params for SGD: "),
        (["--set", "zero_optimization.stage=7"], "zero_optimization.stage must be 0, 1, 2 or 3"),
        (["--set", 'zero_optimization.reduce_bucket_size="big"'],
         "c.json: zero_optimization.reduce_bucket_size: Input should be a valid integer, unable to parse string as an "
         "integer (got 'big')"),
        (["--set", "wandb=true"], "wandb must be an object"),
        (["--set", "optimizer={\"type\": \"Adam\", \"params\": {\"lr\": 0.001}}", "--set", "trainer.channels_last=true"],
         "trainer.channels_last=true: DeepSpeed's fused Adam on a CPU does not update weights stored channels_last"),
        (["--set", "optimizer.params.lr=0.1O"], "optimizer.params.lr must be a number (got '0.1O')"),
        (["--set", "scheduler.params.bogus=1"], "scheduler.params.bogus: not a parameter of WarmupCosineLR; it takes "
                                                "total_num_steps, warmup_min_ratio"),
        (["--set", 'scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": "x"}}'],
         "scheduler.params.warmup_max_lr must be a number (got 'x')"),
        (["--set", 'scheduler={"type": "OneCycleLR", "params": {"max_lr": 0.1, "total_steps": 10}}'],
         "scheduler.params.total_steps=10: OneCycleLR stops the run with an error after that many steps, and this run "
         "takes 30 (+1 for its final lr)"),
        (["--set", "zero_optimization.stage=1"], "zero_optimization.stage=1 with optimizer SGD: DeepSpeed has not "
                                                 "tested ZeRO with it; set zero_allow_untested_optimizer=true"),
        (["--set", 'optimizer={"type": "Lamb", "params": {"lr": 0.01}}'],
         "optimizer.type=Lamb: DeepSpeed has no kernel for it on this device (cpu)"),
        (["--set", "gradient_accumulation_steps=2", "--set", "trainer.checkpoint.every_steps=3"],
         "every_steps (3) must be a multiple of gradient_accumulation_steps (2)"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, data, config, args, message):
    base = ["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(tmp_path / "out")]
    r = run_cli(base + args, tmp_path)
    assert_user_error(r, message)


def test_drop_last_trains_on_full_batches_only(tmp_path, data, config):
    """22 images in batches of 7: three full batches per epoch; the batch of one that BatchNorm refuses is gone."""
    out = tmp_path / "out"
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--quiet",
                 "--set", "train_batch_size=7", "--set", "trainer.data.train_limit=22", "--set", "trainer.epochs=2",
                 "--set", "trainer.data.drop_last=true"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary, metrics, _, _ = read_run(out)
    assert summary["steps"] == 6 and [m["step"] for m in metrics] == [3, 6]
    assert summary["train_images_per_s"] * summary["train_time_s"] == pytest.approx(2 * 21)  # 21 images an epoch


def test_user_error_on_every_rank(tmp_path, data, config):
    port = free_port()
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(tmp_path / "missing"), "--output-dir",
                 str(tmp_path / "out")], tmp_path, timeout=300, launcher=deepspeed_launcher(2, port))
    assert shm_buffers(port) == []
    # Rank 0 looked for the data; both ranks stop with its message instead of waiting forever.
    assert_user_error(r, "data error: no CIFAR-10 data in", ranks=2)
    assert "[rank 0]" in r.stderr and "[rank 1]" in r.stderr


def test_malformed_config_file(tmp_path, data):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 32,\n "trainer": {"epochs": 3,}}')
    assert_user_error(run_cli(["--deepspeed_config", str(bad)], tmp_path), "bad.json: invalid JSON at line 2 column 26")


def test_list_models(tmp_path):
    r = run_cli(["--list-models"], tmp_path, timeout=60)
    assert r.returncode == 0
    rows = dict(line.split(None, 1) for line in r.stdout.strip().splitlines())
    assert list(rows) == ["airbench94", "bn_cnn", "cnn3", "cnn3_bn", "cnn3_fanin", "resnet18", "resnet9", "simple_cnn", "simple_cnn_bn"]
    assert rows["resnet18"].strip() == "11,173,962 params"


def test_default_output_dir_and_deepspeeds_flags(tmp_path, data, config):
    r = run_cli(["--deepspeed", "--deepspeed_config", str(config), "--data-dir", str(data), "--local_rank=0", "--quiet",
                 "--set", "trainer.epochs=0.2"], tmp_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{8}T\d{6}Z-bn_cnn", runs[0].name)
    assert (runs[0] / "summary.json").is_file()


def test_two_ranks_under_torchrun(tmp_path, data, config):
    out = tmp_path / "out"
    torchrun = [str(__import__("pathlib").Path(__import__("sys").executable).parent / "torchrun"),
                "--nproc-per-node=2", f"--master-port={free_port()}"]
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--quiet"],
                tmp_path, timeout=300, launcher=torchrun)
    assert r.returncode == 0, r.stderr[-3000:]
    summary, metrics, _, _ = read_run(out)
    assert summary["world_size"] == 2 and [m["step"] for m in metrics] == [10, 20, 30]


def test_progress_bar_only_on_a_terminal(tmp_path, data, config):
    """stderr on a pseudo-terminal gets a tqdm bar; a pipe (all the runs above) gets none."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from tests.helpers import SCRIPT, cli_env

    master, slave = pty.openpty()
    # A real terminal has a size; tqdm draws nothing into a 0x0 one.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--deepspeed_config", str(config), "--data-dir", str(data),
                             "--output-dir", str(tmp_path / "out"), "--set", "trainer.epochs=1"],
                            env=cli_env(tmp_path), stdout=subprocess.DEVNULL, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert "epoch 1/1" in screen and "/10 [" in screen  # tqdm may skip repainting the last step
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(tmp_path / "o2"),
                 "--set", "trainer.epochs=1"], tmp_path)
    assert "epoch 1/1" not in r.stderr and "/10 [" not in r.stderr
