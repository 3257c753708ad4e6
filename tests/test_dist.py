import pytest
import torch

from cifar10ds import dist


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


def test_single_process_defaults(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    dist.set_single_process_defaults()
    info = dist.env_info()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert 0 < int(dist.os.environ["MASTER_PORT"]) < 65536
