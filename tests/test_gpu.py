"""The GPU paths, on a GPU: ``make gpu-test`` (``pytest -m gpu``); skipped where CUDA is absent.

Real data: ``$CIFAR10DS_DATA``, else ``data/cifar10-jpeg.tar.gz`` or ``data/`` in the checkout (copy the shared JPEG
archive there). ``CIFAR10DS_GPU_TESTS_ON_CPU=1`` rehearses on a CPU the tests that need no CUDA API (fp32 and bf16
only), to check them before a GPU is lent. ``CIFAR10DS_GPU_OUT=DIR`` keeps each run's summary there (the kit's
figures for docs/benchmarks.md and docs/troubleshooting.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, SCRIPT, accelerate_launcher, cli_env, deepspeed_launcher, free_port, run_bounded

ON_GPU = torch.cuda.is_available()
REHEARSAL = not ON_GPU and os.environ.get("CIFAR10DS_GPU_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not (ON_GPU or REHEARSAL), reason="needs CUDA: make gpu-test on a GPU machine")]
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs CUDA (it calls a CUDA API): make gpu-test on a GPU machine")


def real_data() -> Path:
    for candidate in (os.environ.get("CIFAR10DS_DATA"), ROOT / "data" / "cifar10-jpeg.tar.gz"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    pytest.skip("no CIFAR-10 here: set CIFAR10DS_DATA or copy the JPEG archive to data/cifar10-jpeg.tar.gz")


def env(tmp_path: Path) -> dict[str, str]:
    e = cli_env(tmp_path)
    e.pop("CUDA_VISIBLE_DEVICES")  # cli_env hides GPUs from the CPU tests
    e["CIFAR10DS_CACHE"] = os.environ.get("CIFAR10DS_CACHE", str(Path.home() / ".cache" / "cifar10-deepspeed"))
    return e


def keep(name: str, out: Path) -> None:
    """Copy a run's summary (and metrics) to $CIFAR10DS_GPU_OUT, where the kit collects its figures."""
    target = os.environ.get("CIFAR10DS_GPU_OUT")
    if target:
        Path(target, "runs", name).mkdir(parents=True, exist_ok=True)
        for f in ("summary.json", "metrics.jsonl"):
            if (out / f).exists():
                shutil.copy(out / f, Path(target, "runs", name, f))


def cli(tmp_path: Path, args: list[str], launcher: list[str] | None = None, timeout: float = 300,
        extra_env: dict[str, str] | None = None):
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), "--data-dir", str(real_data()), "--quiet", *args]
    return run_bounded(cmd, ROOT, {**env(tmp_path), **(extra_env or {})}, timeout)


STEPS = 200 if ON_GPU else 10  # a rehearsal on a CPU checks the plumbing, not the accuracy
SMALL = ["--set", f"trainer.data.train_limit={128 * STEPS}", "--set", "trainer.data.test_limit=2000",
         "--set", "trainer.checkpoint.every_epochs=null"]
PRECISIONS = {
    "fp32": [],
    "deepspeed_bf16": ["--set", "bf16.enabled=true"],
    "deepspeed_fp16": ["--set", "fp16.enabled=true"],
    "autocast_bf16": ["--set", 'torch_autocast={"enabled": true, "dtype": "bfloat16"}'],
    "autocast_fp16": ["--set", 'torch_autocast={"enabled": true, "dtype": "float16"}'],
}
TWO_MODELS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import cifar10_deepspeed as c
out = {}
for model in ("bn_cnn", "resnet9"):
    args = sys.argv[3:] + ["--set", f"trainer.model={model}", "--output-dir", f"{sys.argv[2]}/{model}"]
    out[model] = c.run(c.parse_args(args))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_trains_bn_cnn_and_resnet9(tmp_path, precision):
    """200 steps each (25,600 images at batch 128): finite losses, accuracy well above chance, the doctor on."""
    if "fp16" in precision and not ON_GPU:
        pytest.skip("fp16 needs a GPU")
    args = ["--deepspeed_config", str(ROOT / "ds_config.json"), "--data-dir", str(real_data()), "--quiet", *SMALL,
            "--set", "train_batch_size=128", "--set", "trainer.epochs=1", "--set", "optimizer.params.lr=0.05",
            "--set", "trainer.stability.enabled=true", *PRECISIONS[precision]]
    done = run_bounded([sys.executable, "-c", TWO_MODELS, str(ROOT), str(tmp_path), *args], ROOT, env(tmp_path), 600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.split("RESULT ")[-1])
    for model, summary in runs.items():
        keep(f"precision-{precision}-{model}", tmp_path / model)
        steps = [json.loads(line) for line in (tmp_path / model / "steps.jsonl").read_text().splitlines()]
        assert len(steps) == STEPS and all(s["loss"] is not None for s in steps), model
        assert summary["final_val_acc"] > (0.3 if ON_GPU else 0.0), (model, summary["final_val_acc"])
        if precision == "deepspeed_fp16":  # the scale is read from every DeepSpeed fp16 optimizer
            assert all(s.get("loss_scale", 0) >= 1 for s in steps), model


CHANNELS_LAST_PROBE = """
import json, torch
from cifar10ds import dist, engines
import models
dist.init_processes("deepspeed", 60)
out = {}
for opt in ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}, {"type": "Adam", "params": {"lr": 0.01}}):
    torch.manual_seed(0)
    model = models.create_model("bn_cnn").cuda()
    cfg = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1,
           "optimizer": opt, "gradient_clipping": 0.0}
    backend = engines.build_backend("deepspeed", model, cfg, channels_last=True)
    before = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    x = torch.randn(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    loss = torch.nn.functional.cross_entropy(backend.forward(x).float(), torch.randint(0, 10, (32,), device="cuda"))
    backend.backward(loss)
    backend.step()
    out[opt["type"]] = [n for n, p in backend.module.named_parameters() if torch.equal(p, before[n])]
print("UNCHANGED " + json.dumps(out))
"""


@needs_cuda
def test_deepspeeds_fused_optimizers_update_channels_last_weights_on_cuda(tmp_path):
    """The CPU Adam kernel's twin: on CUDA every weight stored channels_last must move."""
    e = {**env(tmp_path), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port())}
    done = run_bounded([sys.executable, "-c", CHANNELS_LAST_PROBE], ROOT, e, 300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.split("UNCHANGED ")[-1]) == {"SGD": [], "Adam": []}


SPEED = ["--deepspeed_config", str(ROOT / "configs" / "speedrun94.json"), "--set", "trainer.epochs=2",
         "--set", "trainer.data.train_limit=10240", "--set", "trainer.data.test_limit=2000"]
SYNC_WARNING = re.compile(r"called a synchronizing CUDA operation")


@needs_cuda
def test_the_speed_preset_steps_make_no_host_sync(tmp_path):
    """torch.cuda.set_sync_debug_mode("error") around every training step: any read or blocking copy stops the run."""
    done = cli(tmp_path, [*SPEED, "--output-dir", str(tmp_path / "out")], extra_env={"CIFAR10DS_SYNC_DEBUG": "error"})
    assert done.returncode == 0, done.stderr[-3000:]
    keep("speed-preset-no-sync", tmp_path / "out")


@needs_cuda
def test_with_the_doctor_on_each_step_reads_back_once(tmp_path):
    """The README's promise: the doctor's one read of loss and norm per step, nothing else."""
    launcher = [sys.executable, "-W", "always::UserWarning"]
    done = cli(tmp_path, [*SPEED, "--output-dir", str(tmp_path / "out"), "--set", "trainer.stability.enabled=true"],
               launcher=launcher, extra_env={"CIFAR10DS_SYNC_DEBUG": "warn"})
    assert done.returncode == 0, done.stderr[-3000:]
    steps = json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]
    assert len(SYNC_WARNING.findall(done.stderr)) == steps


@needs_cuda
def test_the_clock_times_the_device_as_wall_time_does_around_synchronised_work():
    from cifar10ds.evaluation import Clock

    a = torch.randn(4096, 4096, device="cuda")
    clock = Clock(torch.device("cuda"))
    for _ in range(3):
        torch.cuda.synchronize()
        wall, start = time.perf_counter(), clock.mark()
        for _ in range(20):
            a = (a @ a).tanh_()
        measured = clock.since(start)
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    assert measured == pytest.approx(wall, rel=0.1, abs=0.005)


@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_one_gpu_under_each_launcher(tmp_path, launcher):
    launch = deepspeed_launcher(1, free_port()) if launcher == "deepspeed" else accelerate_launcher(1, free_port())
    if launcher == "accelerate":
        launch = [launch[0], "launch", "--num_processes=1", *launch[4:]]  # one process: no --multi_gpu
    out = tmp_path / "out"
    done = cli(tmp_path, ["--deepspeed_config", str(ROOT / "configs" / "bn_cnn_stable.json"), "--output-dir", str(out),
                          *SMALL, "--set", "trainer.epochs=2", "--set", "trainer.warmup_epochs=0.5"], launcher=launch)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == launcher and summary["world_size"] == 1
    assert summary["device"].startswith("NVIDIA" if ON_GPU else "cpu")
    assert summary["final_val_acc"] > (0.3 if ON_GPU else 0.0)


@needs_cuda
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_the_other_kind_of_device(tmp_path, first, then):
    """Stopped mid-epoch on one (SIGTERM, 100 steps an epoch), resumed and finished on the other."""
    out = tmp_path / "out"
    args = ["--deepspeed_config", str(ROOT / "configs" / "bn_cnn_stable.json"), "--output-dir", str(out),
            "--set", "trainer.data.train_limit=3200", "--set", "trainer.data.test_limit=2000",
            "--set", "trainer.epochs=2", "--set", "trainer.warmup_epochs=1"]
    hide = {"cpu": {"CUDA_VISIBLE_DEVICES": ""}, "cuda": {}}
    done = cli(tmp_path, args, extra_env={**hide[first], "CIFAR10DS_FAULT": "sigterm@130"})
    assert done.returncode == 143, done.stderr[-3000:]
    done = cli(tmp_path, [*args, "--resume", "auto"], extra_env=hide[then])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] and summary["steps"] == 200 and summary["final_val_acc"] > 0.2
    assert summary["device"].startswith("NVIDIA" if then == "cuda" else "cpu")


@needs_cuda
def test_compile_lands_no_compile_in_timed_training_or_evaluation(tmp_path):
    out = tmp_path / "out"
    done = cli(tmp_path, [*SPEED, "--output-dir", str(out), "--set", "trainer.compile=true"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    keep("speed-preset-compile", out)
    assert summary["recompiles"] == 0 and summary["compile_time_s"] > 0


@needs_cuda
def test_the_fp16_stability_demo(tmp_path):
    """The write-up's own run (cnn3, Adam 0.001, fp16): the doctor reads DeepSpeed's fp16 loss scale at every step
    (steps.jsonl) and, if it stops the run, names an fp16 or divergence cause (the kit keeps the figures for
    docs/troubleshooting.md's table)."""
    out = tmp_path / "out"
    done = cli(tmp_path, ["--deepspeed_config", str(ROOT / "configs" / "unstable_adam_nobn_fp16.json"),
                          "--output-dir", str(out), "--set", "trainer.data.train_limit=5000",
                          "--set", "trainer.data.test_limit=1000", "--set", "trainer.epochs=4"])
    keep("fp16-demo", out)
    assert done.returncode in (0, 3), done.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert steps and all("loss_scale" in s for s in steps)
    diagnosis = json.loads((out / "summary.json").read_text())["diagnosis"]
    if done.returncode == 3:
        assert diagnosis["cause"] in ("fp16_overflow", "fp16_loss_scale_floor", "diverged", "stuck_at_chance",
                                      "nonfinite_gradients")
