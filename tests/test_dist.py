import os
import subprocess
import sys

import pytest
import torch

from cifar10ds import dist
from tests.helpers import ROOT


@pytest.mark.parametrize("env, cpus, expected", [
    ({"LOCAL_SIZE": "2"}, 2, 1),  # the deepspeed launcher
    ({"LOCAL_WORLD_SIZE": "2"}, 16, 8),  # torchrun
    ({"LOCAL_SIZE": "4"}, 2, 1),  # never below one
    ({}, 2, None),  # one process: all cores
    ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "2"}, 2, None),  # the user's choice wins
])
def test_cpu_threads_are_shared_between_local_ranks(monkeypatch, env, cpus, expected):
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist.os, "cpu_count", lambda: cpus)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert dist.share_cpu_threads() == expected
    assert calls == ([] if expected is None else [expected])


WORLD_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def clear_world(monkeypatch):
    for key in [*WORLD_KEYS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.delenv(key, raising=False)


def test_single_process_defaults(monkeypatch):
    clear_world(monkeypatch)
    dist.fill_world_environment()
    info = dist.env_info()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert 0 < int(dist.os.environ["MASTER_PORT"]) < 65536


SRUN_TASK = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]",
             "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


@pytest.mark.parametrize("env, expected", [
    # an srun task with nothing in between: SLURM's variables, the first node as master, the port from the job id
    (SRUN_TASK, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "gpu07", "MASTER_PORT": "21234"}),
    # srun torchrun ...: the launcher's own variables win
    ({**SRUN_TASK, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "29500"},
     {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "29500"}),
    # a MASTER_PORT (or MASTER_ADDR) the user exported wins over the derived one
    ({**SRUN_TASK, "MASTER_PORT": "12345"}, {"RANK": "3", "MASTER_ADDR": "gpu07", "MASTER_PORT": "12345"}),
    # python in the batch script of a 4-task allocation: SLURM_PROCID=0 and SLURM_NTASKS=4 there too, but it is no
    # srun task: a world of one, not a rank waiting for three peers
    ({k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"},
     {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
])
def test_the_world_comes_from_the_launcher_then_srun_then_a_world_of_one(monkeypatch, capsys, env, expected):
    clear_world(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist.fill_world_environment()
    assert {k: dist.os.environ.get(k) for k in expected} == expected
    alone = "SLURM_STEP_NUM_TASKS" not in env
    assert ("SLURM allocated 4 tasks but this process is not an srun task: it trains alone" in capsys.readouterr().err
            ) is alone


FAULTS_PER_STEP = """
import resource, sys
import torch, torch.nn.functional as F
import models
from cifar10ds.dist import keep_freed_memory
torch.set_num_threads(1)
applied = keep_freed_memory() if sys.argv[1] == "kept" else False
torch.manual_seed(0)
model = models.create_model("bn_cnn", num_classes=10)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(20):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_stops_page_faults_every_step(tmp_path):
    """The BN-CNN's training step faults its activations in again every step unless freed memory is kept."""
    faults = {}
    for mode in ("default", "kept"):
        done = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-2000:]
        applied, per_step = done.stdout.split()
        assert applied == str(mode == "kept")
        faults[mode] = float(per_step)
    # Measured on the 2-core VM: 0-13 per step kept, 700-3,200 by default (the gradients alone are 256 pages).
    assert faults["kept"] < 50, faults
    assert faults["default"] > 5 * faults["kept"], faults
