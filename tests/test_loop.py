"""The loop's decisions, table-tested: why a run stops, and the state that resume and rollback restore."""

import math

import pytest
import torch

from cifar10ds.averaging import Lookahead
from cifar10ds.config import LookaheadConfig, StabilityConfig
from cifar10ds.loop import why_stop
from cifar10ds.stability import CONTINUE, ROLLBACK, SKIP, STOP, Context, Monitor
from cifar10ds.state import EpochSums, Progress, TrainingState

NAN = float("nan")


@pytest.mark.parametrize(
    "inputs, expected",
    [
        ({}, None),
        ({"doctor": SKIP}, None),  # a skipped step: the doctor goes on
        ({"signum": 15}, "signal"),
        ({"signum": 15, "doctor": ROLLBACK}, "signal"),  # a signal wins over the doctor: save and stop
        ({"signum": 2, "doctor": STOP}, "signal"),
        ({"doctor": ROLLBACK}, "rollback"),
        ({"doctor": STOP}, "nonfinite"),
        ({"epoch_loss": NAN, "checked": False}, "nonfinite"),  # no step was checked: the epoch's loss tells
        ({"epoch_loss": NAN, "checked": False, "last_epoch": True}, "nonfinite"),  # also after the last epoch
        ({"epoch_loss": NAN, "checked": True}, None),  # the doctor skipped what was not finite
        ({"epoch_loss": None, "checked": False}, None),  # every step skipped: no loss to judge
        ({"epoch_loss": math.inf, "checked": False, "early": "target"}, "nonfinite"),
        ({"early": "target"}, "target"),
        ({"early": "patience", "stuck": True}, "patience"),  # early stopping's reason first
        ({"stuck": True}, "stuck"),
        ({"early": "time_budget", "last_epoch": True}, None),  # the run ended anyway: completed, not stopped
        ({"stuck": True, "last_epoch": True}, None),
        ({"epoch_loss": 2.3, "checked": False, "early": "patience"}, "patience"),
    ],
)
def test_why_stop(inputs, expected):
    assert why_stop(**inputs) == expected


def _monitor(lr_scale=1.0):
    cfg = StabilityConfig(on_nonfinite="rollback", rollback_lr_factor=0.5)
    m = Monitor(cfg, Context(model="bn_cnn", has_normalization=True, precision="fp32", optimizer="SGD", lr=0.1,
                             gradient_clipping=1.0), warn=lambda line: None)
    m.seen.lr_scale = lr_scale
    return m


def test_resume_and_rollback_restore_the_same_state_but_the_doctors_record():
    module = torch.nn.Linear(2, 2)
    saved_state = TrainingState(Progress(epoch=3, step=30, history=[{"val_acc": 0.5}], wandb_id="abc"),
                                Lookahead(LookaheadConfig(enabled=True), module, 100, 10), _monitor(lr_scale=0.5))
    saved_state.lookahead.after_step(5)  # an average exists
    saved_state.monitor.seen.stuck_epochs, saved_state.monitor.seen.nonfinite_steps = 1, 2
    client = saved_state.state_dict(elapsed=12.5)
    assert client["progress"]["elapsed"] == 12.5 and "partial" not in client["progress"]

    resumed = TrainingState(Progress(), Lookahead(LookaheadConfig(enabled=True), module, 100, 10), _monitor())
    assert resumed.load_state_dict(client, {"sums": [1.0, 2.0, 3.0]}) == 0.5  # the scale the lrs were saved at
    assert (resumed.progress.epoch, resumed.progress.step, resumed.progress.elapsed) == (3, 30, 12.5)
    assert resumed.progress.partial == {"sums": [1.0, 2.0, 3.0]} and resumed.progress.history == [{"val_acc": 0.5}]
    assert resumed.lookahead.avg is not None
    assert resumed.monitor.seen.nonfinite_steps == 2 and resumed.lr_scale == 0.5  # the record comes back

    live = _monitor(lr_scale=0.5)
    live.seen.nonfinite_steps, live.seen.stuck_epochs, live.seen.consecutive_skips = 7, 4, 3
    rolled = TrainingState(Progress(step=55), Lookahead(LookaheadConfig(enabled=True), module, 100, 10), live)
    assert rolled.load_state_dict(client, None, rollback=True) == 0.5
    assert rolled.progress.step == 30 and rolled.lookahead.avg is not None
    seen = rolled.monitor.seen
    assert (seen.nonfinite_steps, seen.rollbacks, seen.lr_scale) == (7, 1, 0.25)  # keeps what it saw, lr halved
    assert (seen.stuck_epochs, seen.consecutive_skips) == (1, 0)  # the checkpoint's stuck count, no skips in a row


def test_a_state_without_a_doctor_restores_at_the_unscaled_lr():
    state = TrainingState(Progress())
    assert state.load_state_dict(TrainingState(Progress(step=4)).state_dict(1.0), None) == 1.0
    assert state.progress.step == 4 and state.lr_scale == 1.0


def test_epoch_sums_name_their_metrics_and_survive_a_checkpoint():
    sums = EpochSums(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    sums.add_step(torch.tensor(0.5), logits, torch.tensor([0, 1, 1]), skipped=False)
    sums.add_update(1, torch.tensor(2.0), 0.1, None, False)
    sums.add_step(torch.tensor(9.0), logits, torch.tensor([1, 1, 1]), skipped=True)  # trained nothing
    sums.add_update(2, torch.tensor(math.inf), 0.1, None, True)
    again = EpochSums(torch.device("cpu"), sums.to_plain())
    for s in (sums, again):
        metrics, images, rows = s.metrics(world_size=1, first_step=1, epoch=0)
        assert metrics == {"train_loss": 0.5, "train_acc": 2 / 3, "grad_norm": 2.0, "grad_norm_max": 2.0}
        assert images == 3
        assert rows == [{"step": 1, "epoch": 1, "loss": 0.5, "grad_norm": 2.0, "lr": 0.1},
                        {"step": 2, "epoch": 1, "loss": 9.0, "grad_norm": None, "lr": 0.1, "skipped": True}]


@pytest.mark.parametrize("doctor", [CONTINUE, SKIP])
def test_the_doctors_ordinary_actions_do_not_stop_an_epoch(doctor):
    assert why_stop(doctor=doctor) is None
