"""Process-group plumbing shared by every launcher.

Rank, world size and local rank come from the environment (set by ``deepspeed``, ``torchrun``
and ``accelerate launch``, or translated from an ``srun`` task's SLURM variables); with no launcher
the defaults make a world of one. ``--local_rank`` on the command line is accepted and ignored.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cifar10ds import slurm
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


def warn(line: str) -> None:
    """A warning for the user: on the main rank's stderr, also with --quiet (the one way the trainer warns)."""
    if env_info().is_main:
        print(line, file=sys.stderr, flush=True)


def free_port() -> int:
    """A free local TCP port (for a launcher's master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_world_environment() -> None:
    """Set the variables torch reads for this process's world: a launcher's own (RANK, WORLD_SIZE) win, then an srun
    task's (``slurm.world``), else a world of one on a free local port. ConfigError for contradictory SLURM ones."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(slurm.world(os.environ))
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if slurm.allocated_tasks(os.environ) > 1:
        warn(f"warning: SLURM allocated {slurm.allocated_tasks(os.environ)} tasks but this process is not an srun "
             "task: it trains alone (start it with srun to train on all of them)")


def restart_count() -> int:
    """How often torchrun restarted this job's processes (0: the first attempt, or not under torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def torchrun_job() -> str | None:
    """This torchrun job, named the same in every attempt and differently in any other job (None when not under
    torchrun): its rendezvous id, and the host and pid of the agent that started this process."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return f"{os.environ['TORCHELASTIC_RUN_ID']} {socket.gethostname()} {os.getppid()}"


def max_restarts() -> int:
    """How often torchrun may restart this job's processes (``--max-restarts``; 0 when not under torchrun)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))


def start_processes(backend: str, timeout_s: float, keep_freed: bool) -> tuple[DistInfo, bool]:
    """Join the launcher's world (a world of one without a launcher) on this rank's device; returns the world and
    whether freed CPU memory is kept (``keep_freed_memory``)."""
    fill_world_environment()
    kept = False
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        share_cpu_threads()
        kept = keep_freed and keep_freed_memory()
    info = env_info()
    if torch.cuda.is_available():  # before the first collective: NCCL needs each rank on its own GPU
        torch.cuda.set_device(info.local_rank)
        # Every step has the same shapes: let cuDNN time its kernels once and keep the fastest (as airbench does).
        torch.backends.cudnn.benchmark = True
    init_processes(backend, timeout_s)
    return info, kept


def multi_process_cpu() -> bool:
    """Several processes and no GPU: Accelerate's ``cpu=True`` case (a gloo world)."""
    return not torch.cuda.is_available() and env_info().world_size > 1


def init_processes(backend: str, timeout_s: float) -> None:
    """Join the process group the launcher set up (a world of one without a launcher); ConfigError when the world
    does not form within ``timeout_s``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        wait_for_master(timeout_s)
        store = attempt_store(timeout)
        if store is not None:  # the engines below take the group as it is
            info = env_info()
            dist.init_process_group(comm_backend(backend), store=store, rank=info.rank, world_size=info.world_size,
                                    timeout=timeout)
        _init_engine_processes(backend, timeout)
    except (dist.DistError, TimeoutError) as e:
        info = env_info()
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"the {info.world_size} processes did not all meet at {where} (rank {info.rank}: {type(e).__name__}: "
            f"{detail}): start every node or task of the job within trainer.dist_timeout_s={timeout_s:g} s of each "
            "other, on a free port that every node can reach on the first node"
        ) from None
    world = env_info().world_size
    joined = dist.get_world_size() if dist.is_initialized() else 1
    if joined != world:
        raise RuntimeError(f"the launcher started {world} processes but {backend} joined a world of {joined}")


def wait_for_master(timeout_s: float) -> None:
    """On a rank other than 0 without torchrun (whose store is up before any rank starts): wait until rank 0 listens
    at MASTER_ADDR:MASTER_PORT, or raise TimeoutError after ``timeout_s``. torch would wait too, but prints a C++
    stack trace for every retry."""
    info, addr, port = env_info(), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if info.rank == 0 or info.world_size == 1 or "TORCHELASTIC_USE_AGENT_STORE" in os.environ or not (addr and port):
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listened at {addr}:{port} for {timeout_s:g} s") from None
            time.sleep(0.5)


def attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, its store with this attempt's keys apart from earlier attempts' (None elsewhere).

    torchrun keeps one store for the whole job and hands it to every restarted attempt as it is
    (TORCHELASTIC_USE_AGENT_STORE), so each process group of a restarted attempt would find the dead attempt's
    addresses under its keys and fail to connect ("Gloo connectFullMesh failed ... Connection refused").
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env_info().world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"cifar10ds/attempt{restart_count()}", store)


def comm_backend(backend: str) -> str:
    """The torch.distributed backend the engine would pick for itself."""
    if backend == "deepspeed":
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().communication_backend_name()
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_engine_processes(backend: str, timeout: datetime.timedelta) -> None:
    if backend == "deepspeed":
        import deepspeed

        ds_logger = logging.getLogger("DeepSpeed")
        ds_logger.setLevel(logging.WARNING)
        # DeepSpeed asks its scheduler for the lr once before the first step and warns about it.
        ds_logger.addFilter(lambda r: "before it has started" not in r.getMessage())
        deepspeed.init_distributed(timeout=timeout)
    else:
        from accelerate import PartialState

        # Initialises torch.distributed from the launcher's environment. With no GPU, Accelerate only
        # forms a multi-process (gloo) world when told it runs on the CPU; otherwise every process
        # would train on its own, its gradients never averaged. One process stays out of
        # DistributedDataParallel, which would only add work to a world of one.
        PartialState(cpu=multi_process_cpu(), timeout=timeout)


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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SIGUSR1: SLURM's warning (--signal) before a kill


def on_each_node_then_share(fn: Callable[[], T], info: DistInfo) -> T | None:
    """Run ``fn`` on the first local rank of every node; every rank learns whether it worked everywhere. Returns
    ``fn``'s result there, None on the other ranks.

    For work each node does for itself (decoding into a node-local cache, which its other ranks then read): a node
    that fails ends every rank with its one-line message instead of leaving the others waiting.
    """
    outcome: tuple[str, Any] = ("ok", None)
    result = None
    if info.local_rank == 0:
        try:
            result = fn()
        except UserError as e:
            outcome = (type(e).__name__, str(e))
        except BaseException as e:  # a bug: tell the others, then show the traceback here
            all_gather(("crashed", f"rank {info.rank}: {type(e).__name__}: {e}"))
            raise
    for kind, value in all_gather(outcome):
        if kind == "crashed":
            raise RuntimeError(f"a node failed while preparing the run: {value}")
        if kind != "ok":
            raise {"ConfigError": ConfigError, "DataError": DataError}.get(kind, UserError)(value)
    return result


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class StopSignal:
    """SIGTERM, SIGINT or SIGUSR1 set a flag; ``agreed()`` tells every rank whether any rank got one."""

    def __init__(self, info: DistInfo, timeout_s: float) -> None:
        self.signum = 0
        # A CPU group: agreeing on the flag never waits for the GPU. Its timeout turns a rank
        # that stopped answering into an error here instead of a hang.
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if info.world_size > 1 else None
        self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum
        # A second Ctrl-C acts as usual. SIGTERM often comes twice (the job's process group, then
        # the launcher forwarding it): it, like SIGUSR1, only ever sets the flag, so the save is not cut short.
        if signum == signal.SIGINT:
            signal.signal(signum, self._old[signum])

    def agreed(self) -> int:
        if self.group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def local_world_size() -> int:
    """Processes on this machine (torchrun: LOCAL_WORLD_SIZE, the deepspeed launcher: LOCAL_SIZE)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def share_cpu_threads() -> int | None:
    """On CPU, give each local rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    N ranks each using every core oversubscribe the machine (docs/benchmarks.md). torchrun already sets
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

    PyTorch's CPU tensors come straight from malloc. glibc serves blocks of 128 KB and more (a batch's
    activations and gradients) from fresh mmaps or trims them off the heap when freed, so every training
    step faults the same megabytes in again (docs/benchmarks.md counts them). Raising both thresholds (what
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do at start-up) keeps those blocks in the
    process, at the cost of up to 1 GB of freed memory kept. Returns whether it was applied (False on other
    C libraries, which have no mallopt).
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
    # and makes matters worse.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def release_shm_buffers() -> list[str]:
    """Remove this rank's /dev/shm file of DeepSpeed's CPU shared-memory all-reduce; returns what it removed.

    DeepSpeed (0.19.8, ops/csrc/cpu/comm/shm.cpp) creates deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>
    (64 MiB) per rank and never unlinks it, so /dev/shm fills up run after run. A peer that still has it mapped
    keeps its mapping.
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
