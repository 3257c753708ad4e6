"""Faults as a user meets them: signals, dead or stuck ranks, broken checkpoints. Every run is bounded."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from cifar10ds.faults import SIGNALS
from tests.helpers import (
    CLUSTER_CONFIG,
    ROOT,
    SAME,
    SCRIPT,
    cli_env,
    deepspeed_launcher,
    free_port,
    processes_left,
    run_cli,
)

pytestmark = pytest.mark.slow

# the multi-node tests' run, one epoch longer, and ranks that give up on each other after 20 s
CONFIG = {**CLUSTER_CONFIG, "trainer": {**CLUSTER_CONFIG["trainer"], "epochs": 4, "dist_timeout_s": 20}}



def launch(tmp_path, config, data, out, *extra, fault=None, ranks=1, timeout=240):
    env_fault = {"CIFAR10DS_FAULT": fault} if fault else {}
    launcher = deepspeed_launcher(ranks, free_port()) if ranks > 1 else None
    args = ["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--quiet", *extra]
    os.environ.update(env_fault)
    try:
        return run_cli(args, tmp_path, timeout=timeout, launcher=launcher)
    finally:
        for k in env_fault:
            os.environ.pop(k, None)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, steps=40):
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) == 4
    for x, y in zip(ma, mb):
        assert {k: x[k] for k in SAME} == {k: y[k] for k in SAME}
    sa, sb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    steps_a, steps_b = (a / "steps.jsonl").read_text(), (b / "steps.jsonl").read_text()
    assert steps_a == steps_b and len(steps_a.splitlines()) == steps


GAS2 = ["--set", "gradient_accumulation_steps=2"]  # micro batch 10: 20 micro steps per epoch


@pytest.mark.parametrize("ranks, fault, extra, stop_step, in_epoch", [
    (1, "sigterm@25", [], 25, 5),  # mid-epoch 3
    (1, "sigterm@20", [], 20, 10),  # the last step of epoch 2, before its evaluation
    (2, "sigterm@25@1", [], 25, 5),  # only rank 1 gets the signal: both stop at the same step
    (2, "sigterm@25@1", ["--backend", "accelerate"], 25, 5),  # the same on the Accelerate backend
    (1, "sigterm@45", GAS2, 46, 6),  # mid-accumulation: the stop waits for the optimizer step
    (2, "sigusr1@25@1", [], 25, 5),  # SLURM's warning before the time limit (--signal=USR1@N), as SIGTERM
])
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, config, data, ranks, fault, extra, stop_step, in_epoch):
    straight = tmp_path / "straight"
    assert launch(tmp_path, config, data, straight, *extra, ranks=ranks).returncode == 0
    out = tmp_path / "interrupted"
    r = launch(tmp_path, config, data, out, *extra, fault=fault, ranks=ranks)
    sig = SIGNALS[fault.split("@")[0]]
    assert r.returncode == 128 + sig, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stop_reason"], summary["signal"], summary["steps"]) == ("signal", sig.name, stop_step)
    (tag,) = [p for p in (out / "checkpoints").iterdir() if p.name == f"step{stop_step:08d}"]
    meta = json.loads((tag / "COMMITTED.json").read_text())
    assert (meta["step_in_epoch"], meta["reason"], meta["world_size"]) == (in_epoch, "signal", ranks)
    assert {f"rng_rank{r}.pt" for r in range(ranks)} <= set(meta["files"])
    r = launch(tmp_path, config, data, out, "--resume", "auto", *extra, ranks=ranks)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["resumed_from"], summary["resumed_step"], summary["steps_redone"]) == (str(tag), stop_step, 0)
    assert_same_run(straight, out, steps=80 if extra == GAS2 else 40)


def test_epochs_that_end_inside_an_accumulation_window_still_get_their_checkpoints(tmp_path, config, data):
    """34 micro steps an epoch, 4 per optimizer step: epoch 1 ends mid-window, so its checkpoint is taken at the next
    optimizer step (36); epoch 2 ends on one (68); the last epoch ends mid-window and nothing follows (102). A run
    killed in epoch 2 resumes from step 36 and equals the uninterrupted run."""
    ga = ["--set", "train_batch_size=24", "--set", "gradient_accumulation_steps=4", "--set", "trainer.epochs=3",
          "--set", "trainer.checkpoint.keep_last=5"]
    straight = tmp_path / "straight"
    r = launch(tmp_path, config, data, straight, *ga)
    assert r.returncode == 0, r.stderr[-3000:]
    tags = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert tags == ["step00000036", "step00000068", "step00000102"]
    marker = json.loads((straight / "checkpoints" / "step00000036" / "COMMITTED.json").read_text())
    assert (marker["reason"], marker["step_in_epoch"]) == ("epoch", 2)
    r = launch(tmp_path, config, data, straight, "--resume", "auto", *ga)  # a finished run stays finished
    assert r.returncode == 0 and "starting fresh" not in r.stderr and len(metrics(straight)) == 3
    out = tmp_path / "interrupted"
    assert launch(tmp_path, config, data, out, *ga, fault="sigkill@50").returncode == -signal.SIGKILL
    r = launch(tmp_path, config, data, out, "--resume", "auto", *ga)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step00000036")
    for x, y in zip(metrics(straight), metrics(out), strict=True):
        assert {k: x[k] for k in SAME} == {k: y[k] for k in SAME}
    a, b = torch.load(straight / "model.pt", weights_only=True), torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lookahead_resumes_from_an_epoch_end_checkpoint_exactly(tmp_path, config, data):
    """An epoch ends between two Lookahead blends: its checkpoint holds the average (what was evaluated) and
    the weights training goes on from; a run killed in the next epoch and resumed equals an uninterrupted one."""
    la = ["--set", "trainer.lookahead.enabled=true", "--set", "trainer.lookahead.start_epoch=1",
          "--set", "trainer.lookahead.every_steps=3"]  # 10 steps an epoch: blends at 12, 15, 18, 21, ...
    straight = tmp_path / "straight"
    assert launch(tmp_path, config, data, straight, *la).returncode == 0
    out = tmp_path / "interrupted"
    r = launch(tmp_path, config, data, out, *la, fault="sigkill@25")
    assert r.returncode == -signal.SIGKILL
    r = launch(tmp_path, config, data, out, "--resume", "auto", *la)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step00000020")
    assert_same_run(straight, out)


def test_external_sigterm_saves_and_exits_143(tmp_path, config, data):
    """SIGTERM from outside, as a scheduler sends it, mid-run."""
    cfg = json.loads(config.read_text())
    cfg["trainer"]["epochs"] = 200
    config.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--deepspeed_config", str(config), "--data-dir", str(data),
                             "--output-dir", str(out)], cwd=ROOT, env=cli_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    watchdog = threading.Timer(180, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("Epoch [2/200]"):
                proc.send_signal(signal.SIGTERM)
                break
        stdout, stderr = proc.communicate()
    finally:
        watchdog.cancel()
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by signal SIGTERM" in stdout and "--resume auto" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "signal" and 20 <= summary["steps"] < 2000
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--resume", "auto",
                 "--quiet", "--set", "trainer.early_stopping.target=0.01"], tmp_path)
    assert r.returncode == 0 and json.loads((out / "summary.json").read_text())["resumed_from"]



@pytest.mark.parametrize("fault, expect", [
    ("raise@5@1", "RuntimeError: injected fault at step 5"),
    # Whichever the launcher sees first: rank 1's -9, or rank 0 failing on the closed connection.
    ("sigkill@5@1", "exits with return code = "),
    ("hang@5@1", "exits with return code"),  # rank 0 times out waiting for rank 1 (dist_timeout_s=20)
])
def test_a_failing_rank_ends_the_whole_job(tmp_path, config, data, fault, expect):
    start = time.monotonic()
    r = launch(tmp_path, config, data, tmp_path / "out", fault=fault, ranks=2, timeout=120)
    took = time.monotonic() - start
    assert r.returncode != 0
    assert took < 90  # launch + JIT-cached start-up + at most the 20 s timeout
    text = r.stdout + r.stderr
    assert expect in text
    assert "--local_rank=" in text  # the launcher names the rank that ended the job
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not processes_left(r.pgid)  # no rank left running


def test_resume_errors(tmp_path, config, data):
    out = tmp_path / "out"
    r = launch(tmp_path, config, data, out, "--resume", str(tmp_path / "missing"))
    assert r.returncode == 2 and "config error: checkpoint" in r.stderr and "missing does not exist" in r.stderr
    r = launch(tmp_path, config, data, out, "--resume", "auto", "--set", "trainer.epochs=2")
    assert r.returncode == 0 and "no committed checkpoint" in r.stderr
    # A fresh run never mixes its checkpoints with an earlier run's.
    r = launch(tmp_path, config, data, out, "--set", "trainer.epochs=2")
    assert r.returncode == 2 and "already holds checkpoints of an earlier run: continue it with --resume auto" in r.stderr
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step00000010", "step00000020"]
    newest = ckpts[-1] / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    r = launch(tmp_path, config, data, out, "--resume", str(ckpts[-1]), "--set", "trainer.epochs=2")
    assert r.returncode == 2 and "mp_rank_00_model_states.pt is corrupt" in r.stderr and "Traceback" not in r.stderr
    r = launch(tmp_path, config, data, out, "--resume", "auto", "--set", "trainer.epochs=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "falling back to an older checkpoint" in r.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step00000010")


def test_a_resume_that_changes_the_run_length_is_refused(tmp_path, config, data):
    """The lr schedule (torch's OneCycleLR keeps its length in its state) and Lookahead are planned for the run's
    optimizer steps: more epochs or another batch size under a checkpoint would crash or bend them, so it is
    refused; the same optimizer steps in another layout (accumulation) are not, nor is anything without a plan."""
    out = tmp_path / "out"
    assert launch(tmp_path, config, data, out, "--set", "trainer.epochs=1").returncode == 0
    for change, now in [("trainer.epochs=2", "20 (10 per epoch)"), ("train_batch_size=40", "5 (5 per epoch)")]:
        r = launch(tmp_path, config, data, out, "--resume", "auto", "--set", "trainer.epochs=1", "--set", change)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert (f"step00000010 belongs to a run of 10 optimizer steps (10 per epoch), which the lr schedule was "
                f"planned for; this run would take {now}: resume with the trainer.epochs, train_batch_size") in r.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 10  # nothing trained on
    # The same 10 optimizer steps as 20 micro steps of 10 images: the schedule fits, the finished run stays finished.
    r = launch(tmp_path, config, data, out, "--resume", "auto", "--set", "trainer.epochs=1", *GAS2)
    assert r.returncode == 0 and "nothing to train" not in r.stderr, r.stderr[-2000:]
    # Without a scheduler or Lookahead nothing holds the length: a finished run can be trained on.
    plain = tmp_path / "plain"
    assert launch(tmp_path, config, data, plain, "--set", "trainer.epochs=1", "--set", "scheduler=null").returncode == 0
    r = launch(tmp_path, config, data, plain, "--resume", "auto", "--set", "trainer.epochs=2", "--set", "scheduler=null")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((plain / "summary.json").read_text())["steps"] == 20


def test_an_end_of_epoch_checkpoint_resumes_on_another_number_of_ranks(tmp_path, config, data):
    """Same train_batch_size, micro batch "auto": the same optimizer steps, so the planned schedule fits."""
    out = tmp_path / "out"
    r = launch(tmp_path, config, data, out, "--set", "trainer.epochs=2", fault="sigkill@15")  # killed in epoch 2
    assert r.returncode != 0 and [p.name for p in (out / "checkpoints").iterdir()] == ["step00000010"]
    r = launch(tmp_path, config, data, out, "--resume", "auto", "--set", "trainer.epochs=2", ranks=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "saved with world size 1 on 2 ranks: training continues, but not bit-for-bit" in r.stderr  # also with --quiet
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["epochs_run"], summary["stop_reason"]) == (2, 2, "completed")


def test_bad_config_writes_no_checkpoint(tmp_path, config, data):
    out = tmp_path / "out"
    r = launch(tmp_path, config, data, out, "--set", "trainer.checkpoint.keep_last=0")
    assert r.returncode == 2 and "trainer.checkpoint.keep_last: Input should be greater than or equal to 1" in r.stderr
    assert not (out / "checkpoints").exists()


def test_sigterm_to_the_deepspeed_job_saves_on_every_rank(tmp_path, config, data):
    """What a scheduler or Ctrl-C does: signal the job's whole process group. Ranks get SIGTERM twice
    (from the group, then forwarded by the launcher); the second must not cut the save short."""
    cfg = json.loads(config.read_text())
    cfg["trainer"]["epochs"] = 200
    config.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    cmd = deepspeed_launcher(2, free_port()) + [str(SCRIPT), "--deepspeed_config", str(config), "--data-dir", str(data),
                                                "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    watchdog = threading.Timer(240, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("Epoch [2/200]"):
                os.killpg(proc.pid, signal.SIGTERM)
                break
        proc.communicate()
    finally:
        watchdog.cancel()
    assert not processes_left(proc.pid, wait_s=60)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stop_reason"], summary["world_size"]) == ("signal", 2)
    tag = out / "checkpoints" / f"step{summary['steps']:08d}"
    meta = json.loads((tag / "COMMITTED.json").read_text())
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(meta["files"]) and meta["reason"] == "signal"


@pytest.mark.parametrize("fault, extra, code", [
    ("sigint@5", [], 130),
    ("sigterm@5", ["--set", "trainer.checkpoint.signal_exit_zero=true"], 0),
])
def test_signal_exit_codes(tmp_path, config, data, fault, extra, code):
    out = tmp_path / "out"
    r = launch(tmp_path, config, data, out, *extra, fault=fault)
    assert r.returncode == code, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stop_reason"], summary["steps"]) == ("signal", 5)
    assert (out / "checkpoints" / "step00000005" / "COMMITTED.json").is_file()


def committed_tags(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".torchrun"))


@pytest.mark.parametrize("fault", ["nospace@15@0", "nospace@15@1"])
def test_a_full_disk_at_a_checkpoint_stops_every_rank_with_one_line(tmp_path, config, data, fault):
    """The disk fills up on one rank of two before the checkpoint of step 20 (rank 0 writes DeepSpeed's files and
    commits, rank 1 only its own file): every rank stops there with the same line, exit 2, no partial files, a
    summary; --resume auto continues from step 10 and ends as the uninterrupted run does."""
    out = tmp_path / "out"
    r = launch(tmp_path, config, data, out, fault=fault, ranks=2)
    assert r.returncode == 2, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stop_reason"], summary["steps"]) == ("disk_full", 20)
    assert summary["error"] == (
        f"no space left in {out / 'checkpoints'}: checkpoint step00000020 was not written and nothing of it is left; "
        "--resume auto will continue from step00000010 (step 10) once there is room (free space or raise the quota, "
        "or set trainer.checkpoint.dir elsewhere)")
    for rank in (0, 1):
        assert f"[rank {rank}] disk full: {summary['error']}\n" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert committed_tags(out) == ["step00000010"]  # no .tmp-step00000020, no uncommitted step00000020
    assert not (out / "model.pt").exists()
    r = launch(tmp_path, config, data, out, "--resume", "auto", ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["resumed_step"], summary["steps_redone"], summary["stop_reason"]) == (10, 10, "completed")
    straight = tmp_path / "straight"
    assert launch(tmp_path, config, data, straight, ranks=2).returncode == 0
    assert_same_run(straight, out)


def test_a_real_full_disk_at_a_checkpoint(tmp_path, config, data):
    """The output folder on a 4 MB tmpfs: the first checkpoint fits, the second does not (torch's zip writer reports
    that as "unexpected pos ...", without an errno). Needs the right to mount (root); CI runs the test above."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the injected full disk above covers this")
    try:
        out = disk / "out"
        r = launch(tmp_path, config, data, out)
        assert r.returncode == 2, r.stderr[-3000:]
        (line,) = [x for x in r.stderr.splitlines() if x.startswith("disk full:")]
        assert "checkpoint step00000020 was not written" in line and "continue from step00000010" in line
        assert "Traceback" not in r.stderr
        assert committed_tags(out) == ["step00000010"]
        assert json.loads((out / "summary.json").read_text())["stop_reason"] == "disk_full"
        assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".space-probe")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
