"""SLURM: its variables read by the trainer (always tested), and real jobs on a one-node cluster on localhost."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar10ds import slurm
from cifar10ds.errors import ConfigError
from tests.helpers import CLUSTER_CONFIG, ROOT, SCRIPT, assert_same_training, cli_env, read_metrics


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),  # no padding: the first number's width
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x[001-002],y,z[9]", ["x001", "x002", "y", "z9"]),
    ("n1.cluster.org,n2.cluster.org", ["n1.cluster.org", "n2.cluster.org"]),
])
def test_node_lists_expand_as_slurm_writes_them(text, hosts):
    assert slurm.expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-", "node]1", "node[a-b]", "node[3-1]", "n[[1]]", "a,,b", ""])
def test_a_node_list_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        slurm.expand_nodelist(text)


@pytest.mark.parametrize("text, counts", [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x2),1", [2, 2, 1]), ("1,3", [1, 3])])
def test_tasks_per_node(text, counts):
    assert slurm.expand_counts(text) == counts


TASK = {"SLURM_JOB_ID": "77", "SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "3", "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "a[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2,1",
        "SLURM_JOB_NODELIST": "a[1-4]"}


def test_an_srun_task_becomes_a_rank():
    assert slurm.world(TASK) == {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                 "MASTER_ADDR": "a1", "MASTER_PORT": "20077"}
    assert slurm.world({k: v for k, v in TASK.items() if k != "SLURM_STEP_NUM_TASKS"}) == {}  # a batch script


@pytest.mark.parametrize("change, message", [
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS=4 does not match the nodes: SLURM_STEP_TASKS_PER_NODE='2,1' puts 3 tasks "
                            "on 2 node(s), SLURM_STEP_NODELIST lists 2"),
    ({"SLURM_STEP_NODELIST": "a[1-3]"}, "SLURM_STEP_NODELIST lists 3"),
    ({"SLURM_STEP_NODELIST": "a[1-"}, "SLURM_STEP_NODELIST='a[1-': cannot read this node list"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x"}, "SLURM_STEP_TASKS_PER_NODE='2(x': cannot read the tasks per node"),
    ({"SLURM_LOCALID": "1"}, "SLURM_PROCID=2, SLURM_NODEID=1, SLURM_LOCALID=1 do not fit SLURM_NTASKS=3"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not a number"),
    ({"SLURM_PROCID": None}, "but SLURM_PROCID not: start the trainer with srun itself"),
])
def test_slurm_variables_that_contradict_each_other_are_one_line(change, message):
    env = {k: v for k, v in {**TASK, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        slurm.world(env)
    assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- a real SLURM on localhost

SBATCH = {  # each script of scripts/slurm/ shrunk to one node running 2 ranks on CPUs
    "srun.sbatch": ["--ntasks-per-node=2", "--cpus-per-task=1"],
    "deepspeed_slurm_launcher.sbatch": ["--ntasks-per-node=2", "--cpus-per-task=1"],
    "torchrun.sbatch": ["--ntasks-per-node=1", "--cpus-per-task=2"],
    "deepspeed.sbatch": ["--ntasks-per-node=1", "--cpus-per-task=2"],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The environment to submit jobs to a one-node SLURM that scripts/local_slurm.sh started (skipped without it)."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; apt-get install slurmctld slurmd "
                    "slurm-client munge)")
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(ROOT / "scripts" / "local_slurm.sh"), "start", str(folder)], capture_output=True,
                             text=True, timeout=120)
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no reason given"])[-1]
        pytest.skip(f"a local SLURM did not start ({reason})")
    yield {**os.environ, "SLURM_CONF": started.stdout.strip()}
    subprocess.run([str(ROOT / "scripts" / "local_slurm.sh"), "stop", str(folder)], timeout=60)


def submit(cluster, tmp_path, data, script, *trainer_args, signal=None):
    """Submit scripts/slurm/``script`` as a user would (trainer options after it); with ``signal`` ("USR1" to the
    steps, "B:USR1" to the batch script), send it once training is under way, as SLURM does before the time limit.
    Returns (the job's output, the run's folder) once the job has left the queue."""
    config, out = tmp_path / "c.json", tmp_path / "out"
    config.write_text(json.dumps(CLUSTER_CONFIG))
    (tmp_path / SCRIPT.name).symlink_to(SCRIPT)  # the scripts run ./cifar10_deepspeed.py and write runs/ here
    env = {**cli_env(tmp_path), "SLURM_CONF": cluster["SLURM_CONF"], "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "NPROC_PER_NODE": "2",
           "SLOTS_PER_NODE": "2"}
    cmd = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=15", f"--chdir={tmp_path}",
           f"--output={tmp_path}/job-%j.out", *SBATCH[script], str(ROOT / "scripts" / "slurm" / script),
           "--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), *trainer_args]
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    log = tmp_path / f"job-{job}.out"
    deadline, signalled = time.monotonic() + 600, signal is None
    try:
        while time.monotonic() < deadline:
            if not signalled and log.is_file() and "Epoch [2/" in log.read_text():
                where = ["--batch"] if signal.startswith("B:") else []
                subprocess.run(["scancel", *where, "--signal=USR1", job], env=env, check=True, timeout=30)
                signalled = True
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%t %r"], env=env, capture_output=True,
                                   text=True, timeout=30).stdout.split()
            if not state:
                return log.read_text(), out
            if state == ["PD", "BeginTime"]:  # a requeued job waits two minutes by default: start it now
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, timeout=30)
            time.sleep(1)
        raise AssertionError(f"job {job} still queued after 600 s:\n{log.read_text()[-3000:] if log.exists() else ''}")
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SBATCH))
def test_each_sbatch_script_trains_as_one_node_does(cluster, tmp_path, data, one_node_two_ranks, script):
    text, out = submit(cluster, tmp_path, data, script)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["stop_reason"]) == (2, "completed"), text[-3000:]
    assert text.count("Epoch [3/3]") == 1  # one rank reports
    assert_same_training(out, one_node_two_ranks)


@pytest.mark.slow
@pytest.mark.parametrize("script, signal, stopped_by", [
    ("srun.sbatch", "USR1", "SIGUSR1"),  # --signal=USR1@120: to every task
    ("torchrun.sbatch", "B:USR1", "SIGTERM"),  # --signal=B:USR1@120: to the script, which sends SIGTERM on
])
def test_the_time_limit_warning_checkpoints_requeues_and_the_job_finishes(cluster, tmp_path, data, script, signal,
                                                                        stopped_by):
    text, out = submit(cluster, tmp_path, data, script, "--set", "trainer.epochs=40", signal=signal)
    assert f"stopped by signal {stopped_by}" in text, text[-4000:]
    assert text.count("resumed from") == 1  # the requeued job continued the run
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stop_reason"], summary["steps_redone"]) == ("completed", 0), text[-3000:]
    assert summary["resumed_from"] and len(read_metrics(out)) == 40
