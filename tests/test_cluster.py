"""Beyond one machine, on one machine: "nodes" started apart (torchrun agents, DeepSpeed's launcher node by node),
srun's tasks with no launcher, a rendezvous that never completes, and a rank that dies under torchrun --max-restarts.
Each node gets its own data cache, as a node-local disk would. Every run is bounded."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    CLUSTER_CONFIG,
    ROOT,
    SCRIPT,
    assert_same_training,
    cli_env,
    free_port,
    free_port_between,
    read_metrics,
    run_bounded,
    run_together,
    torchrun,
)

pytestmark = pytest.mark.slow

CONFIG = CLUSTER_CONFIG


def node_env(tmp_path, node, **extra):
    """Node ``node``'s environment: its own data cache; one thread per rank, as in the one-node run."""
    return {**cli_env(tmp_path), "CIFAR10DS_CACHE": str(tmp_path / f"cache-node{node}"), "OMP_NUM_THREADS": "1",
            **extra}


def args(config, data, out, *extra):
    return [str(SCRIPT), "--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), *extra]


def assert_one_run_of_two_ranks(out, reference, results, tmp_path, nodes=2):
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["stop_reason"]) == (2, "completed")
    # One writer: each epoch once in metrics.jsonl, each step once in steps.jsonl; only global rank 0 reports.
    assert len(read_metrics(out)) == 3 and len((out / "steps.jsonl").read_text().splitlines()) == 30
    assert results[0].stdout.count("Epoch [") == 3 and all("Epoch [" not in r.stdout for r in results[1:])
    # Each node decoded the images into its own cache (no rank read a cache its node does not have).
    for node in range(nodes):
        assert len(list((tmp_path / f"cache-node{node}").glob("cifar10-*.pt"))) == 1
    assert_same_training(out, reference)


def test_two_torchrun_agents_are_one_run_of_two_ranks(tmp_path, config, data, one_node_two_ranks):
    out, port = tmp_path / "out", free_port()
    results = run_together([
        (torchrun("--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1", "--master-addr=127.0.0.1",
                  f"--master-port={port}", *args(config, data, out)), node_env(tmp_path, node))
        for node in (0, 1)], ROOT, timeout=300)
    assert_one_run_of_two_ranks(out, one_node_two_ranks, results, tmp_path)


def test_deepspeed_launcher_node_by_node_is_one_run_of_two_ranks(tmp_path, config, data, one_node_two_ranks):
    """DeepSpeed 0.19.8 starts one node without ssh: the same hostfile everywhere, --no_ssh --node_rank on each."""
    hostfile, out, port = tmp_path / "hostfile", tmp_path / "out", free_port()
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    results = run_together([
        ([deepspeed, f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node}", "--master_addr=127.0.0.1",
          f"--master_port={port}", *args(config, data, out)], node_env(tmp_path, node))
        for node in (0, 1)], ROOT, timeout=300)
    assert_one_run_of_two_ranks(out, one_node_two_ranks, results, tmp_path)


def srun_task(tmp_path, rank, node=0, nodes="localhost", per_node="2", **extra):
    """The variables srun gives task ``rank`` of a 2-task step (and none of a launcher's)."""
    env = {k: v for k, v in node_env(tmp_path, node).items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    return {**env, "SLURM_JOB_ID": str(free_port() % 10000), "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_NODEID": str(node),
            "SLURM_LOCALID": str(rank if per_node == "2" else 0), "SLURM_STEP_NODELIST": nodes,
            "SLURM_JOB_NODELIST": nodes, "SLURM_STEP_TASKS_PER_NODE": per_node, **extra}


def test_srun_tasks_train_as_one_run_with_nothing_in_between(tmp_path, config, data, one_node_two_ranks):
    """`srun python cifar10_deepspeed.py`: two tasks with SLURM's variables only, on one node."""
    out = tmp_path / "out"
    port = free_port_between(20000, 30000)  # the master port comes from the job id: a job whose port is free
    results = run_together([([sys.executable, *args(config, data, out)],
                             {**srun_task(tmp_path, rank), "SLURM_JOB_ID": str(100000 + port - 20000)})
                            for rank in (0, 1)], ROOT, timeout=300)
    assert_one_run_of_two_ranks(out, one_node_two_ranks, results, tmp_path, nodes=1)


def test_a_node_without_the_data_stops_every_rank_with_one_line(tmp_path, config, data):
    """Two srun tasks on two "nodes"; the second node has no data at the path: both ranks say so, exit 2."""
    out, port = tmp_path / "out", str(free_port())
    missing = tmp_path / "not-mounted"
    runs = [([sys.executable, *args(config, data if node == 0 else missing, out)],
             srun_task(tmp_path, node, node=node, nodes="n[0-1]", per_node="1(x2)", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)) for node in (0, 1)]
    results = run_together(runs, ROOT, timeout=180)
    for rank, r in enumerate(results):
        assert r.returncode == 2, r.stderr[-3000:]
        line = f"[rank {rank}] data error: no CIFAR-10 data in {missing} and trainer.data.download is false"
        assert line in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("alone", [0, 1])
def test_a_world_that_never_forms_ends_with_one_line(tmp_path, config, data, alone):
    """Only one task of two ever starts: it gives up after trainer.dist_timeout_s with one line, exit 2."""
    r = run_bounded([sys.executable, *args(config, data, tmp_path / "out", "--set", "trainer.dist_timeout_s=10")],
                    ROOT, srun_task(tmp_path, alone, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
                    timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = r.stderr.strip().splitlines()  # nothing but the one line
    assert line.startswith(f"[rank {alone}] config error: the 2 processes did not all meet at 127.0.0.1:"), line
    assert f"(rank {alone}: " in line and "within trainer.dist_timeout_s=10 s of each other" in line


def test_a_killed_rank_under_torchrun_restarts_and_finishes_as_if_never_killed(tmp_path, config, data,
                                                                                one_node_two_ranks):
    """torchrun --max-restarts=1: rank 1 is SIGKILLed after step 15; the agent restarts both ranks, which resume from
    the newest checkpoint (every_steps=4: step 12) and end with the uninterrupted run's metrics and weights."""
    out = tmp_path / "out"
    env = {**cli_env(tmp_path), "OMP_NUM_THREADS": "1", "CIFAR10DS_FAULT": "sigkill@15@1"}
    r = run_bounded(torchrun("--nproc-per-node=2", "--max-restarts=1",
                             *args(config, data, out, "--set", "trainer.checkpoint.every_steps=4")), ROOT, env, 400)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stdout and "step00000012" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == str(out / "checkpoints" / "step00000012")
    assert (summary["restarts"], summary["resumed_step"], summary["steps_redone"]) == (1, 12, 3)
    assert (summary["stop_reason"], summary["world_size"]) == ("completed", 2)
    assert_same_training(out, one_node_two_ranks)


def test_torchrun_restarts_need_a_fixed_output_dir_and_never_resume_an_earlier_run(tmp_path, config, data,
                                                                                    one_node_two_ranks):
    env = {**cli_env(tmp_path), "OMP_NUM_THREADS": "1"}
    common = ["--nproc-per-node=1", "--max-restarts=1", str(SCRIPT), "--deepspeed_config", str(config),
              "--data-dir", str(data), "--quiet"]
    r = run_bounded(torchrun(*common), ROOT, env, 300)
    assert r.returncode != 0
    assert ("config error: torchrun --max-restarts=1 restarts this command as it is, and the default output dir "
            "(runs/<UTC time>-<model>) is new each time: pass --output-dir DIR") in r.stderr
    # A folder holding an earlier run: the first attempt is refused, and so is the restart (no resume of that run).
    import shutil

    earlier = tmp_path / "earlier"
    shutil.copytree(one_node_two_ranks, earlier)
    before = (earlier / "summary.json").read_text()
    r = run_bounded(torchrun(*common, "--output-dir", str(earlier)), ROOT, env, 300)
    assert r.returncode != 0
    refused = "already holds checkpoints of an earlier run: continue it with --resume auto"
    assert r.stderr.count(refused) == 2, r.stderr[-4000:]  # both attempts
    assert "resumed from" not in r.stdout and (earlier / "summary.json").read_text() == before
