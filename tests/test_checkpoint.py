import json
import random

import numpy as np
import pytest
import torch

from cifar10ds import checkpoint as ckpt
from cifar10ds.errors import ConfigError


def fake_save(d, step, payload=b"weights"):
    """What an engine + the trainer write, then the commit."""
    tmp = d / (ckpt.TMP_PREFIX + ckpt.tag_for(step))
    tmp.mkdir(parents=True)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(payload * 100)
    (tmp / "rng_rank0.pt").write_bytes(b"rng")
    return ckpt.commit(d, tmp.name, ckpt.tag_for(step), {"step": step, "world_size": 1})


def test_commit_renames_and_writes_the_marker_last(tmp_path):
    path = fake_save(tmp_path, 30)
    assert path.name == "step00000030" and not (tmp_path / ".tmp-step00000030").exists()
    meta = json.loads((path / ckpt.MARKER).read_text())
    assert meta["step"] == 30 and set(meta["files"]) == {"mp_rank_00_model_states.pt", "rng_rank0.pt"}
    assert meta["files"]["rng_rank0.pt"]["size"] == 3
    assert ckpt.verify(path)["tag"] == "step00000030"


def test_newest_intact_checkpoint_wins_and_a_corrupt_one_is_skipped(tmp_path):
    fake_save(tmp_path, 10)
    fake_save(tmp_path, 20)
    newest = fake_save(tmp_path, 30)
    assert ckpt.find_resume(tmp_path).path.name == "step00000030"
    blob = newest / "mp_rank_00_model_states.pt"
    blob.write_bytes(blob.read_bytes()[:50])  # truncated
    warnings = []
    found = ckpt.find_resume(tmp_path, warn=warnings.append)
    assert found.path.name == "step00000020"
    assert "mp_rank_00_model_states.pt is corrupt" in warnings[0] and "falling back" in warnings[0]
    with pytest.raises(ConfigError, match=r"step00000030: mp_rank_00_model_states.pt is corrupt"):
        ckpt.resolve_resume(str(newest), tmp_path)


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path):
    path = fake_save(tmp_path, 10)
    (path / "rng_rank0.pt").write_bytes(b"RNG")
    with pytest.raises(ConfigError, match="rng_rank0.pt is corrupt"):
        ckpt.verify(path)


def test_uncommitted_and_missing(tmp_path):
    half = tmp_path / "step00000040"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert ckpt.find_resume(tmp_path) is None  # never a candidate
    with pytest.raises(ConfigError, match=r"step00000040 is not committed \(COMMITTED.json missing\)"):
        ckpt.resolve_resume(str(half), tmp_path)
    with pytest.raises(ConfigError, match="checkpoint .*nope does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    assert ckpt.resolve_resume("auto", tmp_path / "empty") is None


def test_resume_auto_never_starts_over_a_run_whose_checkpoints_are_all_damaged(tmp_path):
    for step in (10, 20):
        blob = fake_save(tmp_path, step) / "mp_rank_00_model_states.pt"
        blob.write_bytes(b"x")
    warnings = []
    with pytest.raises(ConfigError, match=r"--resume auto: no committed checkpoint in .* is intact \(see the warnings "
                                          r"above\); resume one with --resume PATH once repaired, or start over"):
        ckpt.resolve_resume("auto", tmp_path, warn=warnings.append)
    assert [w.split(":")[0] for w in warnings] == ["warning", "warning"] and "step00000020" in warnings[0]


def test_foreign_markers_and_uncommitted_folders(tmp_path):
    for step in (10, 20):
        fake_save(tmp_path, step)
    for step, marker in ((30, {"files": {}}), (40, {})):  # markers this trainer never writes
        (tmp_path / ckpt.tag_for(step)).mkdir()
        (tmp_path / ckpt.tag_for(step) / ckpt.MARKER).write_text(json.dumps(marker))
    uncommitted = tmp_path / ckpt.tag_for(50)
    uncommitted.mkdir()
    warnings = []
    assert ckpt.find_resume(tmp_path, warn=warnings.append).path.name == "step00000020"
    assert [w.split(": ", 2)[1].split("/")[-1] for w in warnings] == ["step00000050 is not committed (COMMITTED.json "
                                                                       "missing)", "step00000040", "step00000030"]
    assert "lists no files" in warnings[2]
    assert ckpt.rotate(tmp_path, keep_last=2, protect=set()) == []  # the two real ones are kept


def test_resume_path_may_be_the_checkpoints_folder(tmp_path):
    fake_save(tmp_path, 10)
    fake_save(tmp_path, 20)
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere").path.name == "step00000020"


def test_rotation_keeps_the_newest_and_the_protected(tmp_path):
    for step in (10, 20, 30, 40):
        fake_save(tmp_path, step)
    (tmp_path / ".tmp-step00000050").mkdir()  # an interrupted save
    deleted = ckpt.rotate(tmp_path, keep_last=2, protect={"step00000010"})
    assert sorted(deleted) == [".tmp-step00000050", "step00000020"]
    assert [p.name for p in ckpt.committed(tmp_path)] == ["step00000010", "step00000030", "step00000040"]


def test_rng_state_round_trip_loads_with_weights_only(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.save(ckpt.rng_state({"augment": {"generator": torch.Generator().manual_seed(4).get_state()}}), tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.rand(5), np.random.rand(5), random.random()
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_resume_drops_a_torn_last_line_of_steps_jsonl(tmp_path):
    from cifar10ds.tracking import Reporter

    (tmp_path / "steps.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    Reporter(tmp_path, is_main=True).resume([{"epoch": 1}], step=2)
    assert (tmp_path / "steps.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def _schedule(accumulation=1, rollback=False, **cfg):
    from cifar10ds.checkpoint import SaveSchedule
    from cifar10ds.config import CheckpointConfig

    return SaveSchedule(CheckpointConfig(**cfg), accumulation, rollback)


@pytest.mark.parametrize(
    "cfg, accumulation, steps, expected",
    [
        ({"every_steps": 4}, 1, [1, 2, 3, 4, 8], [None, None, None, "every_steps", "every_steps"]),
        ({"every_steps": 4}, 2, [3, 4], [None, "every_steps"]),  # between optimizer steps only
        ({"every_steps": None}, 1, [4, 8], [None, None]),
    ],
)
def test_save_schedule_mid_epoch(cfg, accumulation, steps, expected):
    schedule = _schedule(accumulation, **cfg)
    assert [schedule.mid_epoch(s) for s in steps] == expected


@pytest.mark.parametrize(
    "cfg, accumulation, calls, expected",
    [
        ({}, 1, [(10, 1, False, False), (20, 2, True, False)], ["epoch", "epoch"]),  # every epoch by default
        ({"every_epochs": 2}, 1, [(10, 1, False, False), (20, 2, False, False)], [None, "epoch"]),
        ({"every_epochs": 2}, 1, [(10, 1, False, True)], ["epoch"]),  # the last epoch is always saved
        ({"every_epochs": None}, 1, [(10, 1, False, True)], [None]),
        ({"save_best": True}, 1, [(10, 1, True, False), (20, 2, False, False)], ["best", "epoch"]),
        ({"save_best": True}, 4, [(10, 1, True, False)], [None]),  # inside a window: waits (below)
        ({}, 4, [(10, 1, False, True)], ["epoch"]),  # nothing follows: saved at once
    ],
)
def test_save_schedule_at_epoch_end(cfg, accumulation, calls, expected):
    schedule = _schedule(accumulation, **cfg)
    assert [schedule.at_epoch_end(*c) for c in calls] == expected


def test_an_epoch_that_ends_inside_an_accumulation_window_is_saved_at_the_next_optimizer_step():
    schedule = _schedule(accumulation=4)
    assert schedule.at_epoch_end(10, 1, False, False) is None  # step 10: mid-window
    assert [schedule.mid_epoch(s) for s in (11, 12, 16)] == [None, "epoch", None]


def test_save_schedule_at_start_only_for_a_fresh_run_that_may_roll_back():
    assert _schedule(rollback=True).at_start(resumed=False) == "start"
    assert _schedule(rollback=True).at_start(resumed=True) is None
    assert _schedule(rollback=False).at_start(resumed=False) is None
