"""Process-group plumbing shared by every launcher.

Rank, world size and local rank come from the environment (set by ``deepspeed``, ``torchrun``
and ``accelerate launch``); with no launcher the defaults make a world of one. ``--local_rank``
on the command line is accepted and ignored.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cifar10ds.errors import ConfigError, DataError, UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def free_port() -> int:
    """A free local TCP port (for a launcher's master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_defaults() -> None:
    """Give a launcher-less run the environment of a one-process world (free local port)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main_then_share(fn: Callable[[], T], info: DistInfo) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or its user error, to every rank.

    Used for work that must happen once (download, decode, creating the output folder): other
    ranks wait for the answer instead of a barrier, so a failure on rank 0 ends every rank with
    the same one-line message instead of leaving them hanging.
    """
    outcome: tuple[str, Any]
    if info.is_main:
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome = (type(e).__name__, str(e))
        except BaseException as e:  # a bug: tell the others, then show the traceback here
            broadcast_object(("crashed", f"{type(e).__name__}: {e}"))
            raise
    else:
        outcome = ("pending", None)
    outcome = broadcast_object(outcome)
    kind, value = outcome
    if kind == "ok":
        return value
    if kind == "crashed":
        raise RuntimeError(f"rank 0 failed while preparing the run: {value}")
    raise {"ConfigError": ConfigError, "DataError": DataError}.get(kind, UserError)(value)


def local_world_size() -> int:
    """Processes on this machine (torchrun: LOCAL_WORLD_SIZE, the deepspeed launcher: LOCAL_SIZE)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def share_cpu_threads() -> int | None:
    """On CPU, give each local rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    N ranks each using every core oversubscribe the machine: 2 deepspeed ranks on 2 cores trained
    the BN-CNN 4.2x slower than with one thread each (docs/benchmarks.md). torchrun already sets
    OMP_NUM_THREADS=1; the deepspeed launcher does not.
    """
    n = local_world_size()
    if "OMP_NUM_THREADS" in os.environ or n <= 1:
        return None
    threads = max(1, (os.cpu_count() or 1) // n)
    torch.set_num_threads(threads)
    return threads


# glibc's mallopt parameters (malloc.h) and the values the trainer sets on CPU.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: blocks up to 32 MB come from the heap, not fresh mmaps
TRIM_THRESHOLD_BYTES = 1 << 30  # free memory at the top of the heap the process keeps instead of returning


def keep_freed_memory() -> bool:
    """On Linux with glibc, stop handing freed tensor memory back to the kernel after every step.

    PyTorch's CPU tensors come straight from malloc. glibc serves blocks of 128 KB and more (a
    batch's activations and gradients) from fresh mmaps or trims them off the heap when freed, so
    every training step faults the same megabytes in again: 100-3,200 page faults per step for
    the BN-CNN at batch 32 (most often over 700), a quarter or more of the step's time on the 2-core VM of
    docs/benchmarks.md. Raising both thresholds (what the ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` environment variables do at start-up) keeps those blocks in the
    process; the cost is up to 1 GB of freed memory that is not returned. Returns whether it was
    applied (False on other C libraries, which have no mallopt).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both or neither: setting the trim threshold alone turns off glibc's adaptive mmap threshold
    # and makes matters worse (8,000 faults per step in the measurement above).
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def release_shm_buffers() -> list[str]:
    """Remove this rank's /dev/shm file of DeepSpeed's CPU shared-memory all-reduce; returns what it removed.

    DeepSpeed (0.19.8, ops/csrc/cpu/comm/shm.cpp) creates deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>
    (64 MiB) per rank and never unlinks it: 160 two-rank runs had left 21 GB of RAM in /dev/shm on the dev
    machine, until everything slowed to a crawl. A peer that still has it mapped keeps its mapping.
    """
    addr, port, rank = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if not (addr and port and rank):
        return []
    removed = []
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            pass
    return removed
