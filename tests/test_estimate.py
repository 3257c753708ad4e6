"""The run's estimate: its arithmetic, when the step timer reads the device clock, what the console and the progress
bar say (the bar through a pseudo-terminal), and a real run's line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from cifar10ds import estimate
from cifar10ds.estimate import CPU_HINT, Estimate, StepTimer, announcement, duration
from tests.helpers import ROOT, run_cli


@pytest.mark.parametrize("seconds, text", [
    (0.2, "1 s"), (44.6, "45 s"), (89, "89 s"), (90, "2 min"), (12 * 60 + 1, "13 min"), (59 * 60, "59 min"),
    (60 * 60, "1 h 0 min"), (4 * 3600 + 45 * 60 + 30, "4 h 46 min"),
])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_the_estimate_counts_steps_evaluations_and_the_last_ones_test_time_views():
    # 24 epochs of 98 steps at 7 s; an evaluation of 10,000 test images at a third of a trained image's cost
    est = Estimate.from_steps(7.0, micro=512, test_per_rank=10_000)
    assert est.eval_s == pytest.approx(7.0 / 512 * 10_000 / 3)
    assert est.left_s(24 * 98, 24, tta_level=0) == pytest.approx(24 * 98 * 7.0 + 24 * est.eval_s)
    # TTA level 2 evaluates 6 views of each image in the last evaluation: 5 more evaluations' worth
    assert est.left_s(10, 1, tta_level=2) == pytest.approx(10 * 7.0 + 6 * est.eval_s)
    assert est.left_s(0, 0, tta_level=2) == 0


def test_a_long_run_on_a_cpu_names_the_preset_that_takes_minutes():
    long_run = Estimate(step_s=7.0, eval_s=40.0)
    lines = announcement(long_run, steps_left=2351, evals_left=24, tta_level=0, on_cpu=True)
    assert lines[0] == ("estimate: 4 h 51 min to the end of the run (2,351 steps x 7 s + 24 evaluations x ~40 s)")
    assert lines[1:] == [CPU_HINT] and "--deepspeed_config configs/speedrun94.json" in CPU_HINT
    assert (ROOT / estimate.CPU_PRESET).is_file()
    assert announcement(long_run, 2351, 24, 0, on_cpu=False)[1:] == []  # a GPU: no hint
    preset = announcement(long_run, 2351, 24, 0, on_cpu=True, config_path="/x/configs/speedrun94.json")
    assert preset[1:] == []  # the preset itself (on a CPU slower than the hint assumes): no hint
    short = announcement(Estimate(0.5, 2.0), 100, 2, 0, on_cpu=True)  # minutes already: no hint
    assert short == ["estimate: 54 s to the end of the run (100 steps x 0.5 s + 2 evaluations x ~2 s)"]


class FakeClock:
    """A device clock whose reads (``since``: the one that waits for a GPU) are counted."""

    def __init__(self, now):
        self.now, self.reads = now, 0

    def mark(self):
        return self.now[0]

    def since(self, start):
        self.reads += 1
        return self.now[0] - start


def run_timer(timer, clock, now, step_s, host_s, steps, epoch_end=None):
    """Feed ``steps`` steps of ``step_s`` device and ``host_s`` host seconds; returns (step number, result) pairs."""
    out = []
    for i in range(1, steps + 1):
        now[0] += step_s
        now[1] += host_s
        result = timer.step(last_in_epoch=i == epoch_end)
        if result is not None:
            out.append((i, result))
    return out


@pytest.fixture
def clocks(monkeypatch):
    now = [0.0, 0.0]  # device seconds, host seconds
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: now[1])
    return now, FakeClock(now)


@pytest.mark.parametrize("step_s, host_s, accumulation, expected_at", [
    (7.0, 7.0, 1, 1 + 3),  # a CPU: after the warm-up step, 3 steps cover the 2 host seconds
    (0.1, 0.1, 1, 1 + 20),  # fast steps: the window grows until it covers 2 host seconds
    (0.01, 0.001, 1, 1 + 50),  # a GPU whose host runs ahead: 50 steps at most
    (3.0, 3.0, 4, 4 + 3 * 4),  # accumulation: the warm-up is one optimizer step, the window whole optimizer steps
])
def test_the_timer_times_a_window_after_the_warm_up_and_reads_the_clock_once(clocks, step_s, host_s, accumulation,
                                                                              expected_at):
    now, clock = clocks
    timer = StepTimer(clock, accumulation)
    results = run_timer(timer, clock, now, step_s, host_s, steps=200)
    assert results == [(expected_at, pytest.approx(step_s))]
    assert clock.reads == 1 and timer.done


def test_the_epochs_end_closes_the_window_and_a_restart_drops_what_came_before(clocks):
    now, clock = clocks
    timer = StepTimer(clock)
    assert run_timer(timer, clock, now, 0.1, 0.1, steps=3, epoch_end=3) == [(3, pytest.approx(0.1))]
    timer = StepTimer(clock)
    assert run_timer(timer, clock, now, 0.1, 0.1, steps=1, epoch_end=1) == []  # the warm-up step alone: nothing
    run_timer(timer, clock, now, 0.1, 0.1, steps=5)
    now[0] += 100.0  # a checkpoint's seconds ...
    timer.restart()  # ... are not in the window
    assert run_timer(timer, clock, now, 0.5, 0.5, steps=5) == [(5, pytest.approx(0.5))]
    assert clock.reads == 2  # one per timer


BAR = """
import sys
from cifar10ds.tracking import Reporter
r = Reporter(sys.argv[1], is_main=True)
bar = r.progress(10, "epoch 1/24")
bar.update(3)
r.estimate(["estimate: 4 h 51 min to the end of the run (...)"], 4 * 3600 + 50 * 60 + 30)
bar.update(1)
bar.close()
bar = r.progress(10, "epoch 2/24", left_s=3 * 3600 + 5)
bar.close()
"""


def test_the_progress_bar_shows_the_runs_time_left_on_a_terminal(tmp_path):
    """stdout and stderr on a pseudo-terminal, as in an interactive shell: the estimate's line above the bar, the time
    left in the bar's text from then on."""
    import fcntl
    import struct
    import termios

    main, child = os.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # a window: tqdm sizes the bar to it
    proc = subprocess.Popen([sys.executable, "-c", BAR, str(tmp_path)], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=child, stderr=child)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    assert text.count("estimate: 4 h 51 min to the end of the run") == 1
    assert re.search(r"epoch 1/24 \(run: 4 h 51 min left\): +30%", text), text
    assert "epoch 2/24 (run: 3 h 1 min left)" in text
    assert text.index("epoch 1/24:") < text.index("estimate:") < text.index("epoch 1/24 (run")


def test_no_terminal_no_bar_but_the_estimate_line_and_quiet_says_nothing(tmp_path, capsys):
    from cifar10ds.tracking import Reporter

    r = Reporter(tmp_path, is_main=True)
    assert r.progress(10, "epoch 1/2") is None  # pytest's captured stderr is no terminal
    r.estimate(["estimate: 1 h 0 min to the end of the run"], 3600)
    Reporter(tmp_path, is_main=True, quiet=True).estimate(["quiet"], 1)
    Reporter(tmp_path, is_main=False).estimate(["rank 1"], 1)
    assert capsys.readouterr().out == "estimate: 1 h 0 min to the end of the run\n"


@pytest.mark.slow
def test_a_run_says_its_estimate_once_after_its_first_steps(tmp_path, data, config):
    """3 epochs of 10 steps (200 images, batch 20): the estimate comes once, within the first epoch, before its
    line, and counts what is left of the run."""
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(tmp_path / "out")],
                tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.findall(r"estimate: .+ to the end of the run \(([\d,]+) steps x [\d.e-]+ s \+ (\d) evaluations", r.stdout)
    assert len(found) == 1, r.stdout
    steps_left, evals_left = int(found[0][0]), int(found[0][1])
    assert 20 <= steps_left <= 26 and evals_left == 3  # after the warm-up step and 3 to 9 timed ones
    assert r.stdout.index("estimate:") < r.stdout.index("Epoch [1/3]")
    assert "for a result in minutes on a CPU" not in r.stdout  # seconds, not hours
    quiet = run_cli(["--deepspeed_config", str(config), "--data-dir", str(data), "--output-dir", str(tmp_path / "q"),
                     "--quiet"], tmp_path)
    assert quiet.returncode == 0 and "estimate" not in quiet.stdout + quiet.stderr


CONFIG = {
    "train_batch_size": 20,
    "train_micro_batch_size_per_gpu": "auto",
    "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
    "gradient_clipping": 1.0,
    "trainer": {"model": "bn_cnn", "epochs": 3, "data": {"download": False}},
}
