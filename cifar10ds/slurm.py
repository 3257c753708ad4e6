"""SLURM's task variables as the launcher variables torch reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).

``srun python cifar10_deepspeed.py`` starts one task per rank with no launcher in between: SLURM names the task
(SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID) and its step (SLURM_NTASKS, SLURM_STEP_TASKS_PER_NODE,
SLURM_STEP_NODELIST), while torch, DeepSpeed and Accelerate read RANK, WORLD_SIZE and MASTER_ADDR. Only srun sets
SLURM_STEP_NUM_TASKS: a batch script also has SLURM_PROCID=0 and the allocation's SLURM_NTASKS, and a plain
``python`` there trains alone instead of waiting for peers that were never started.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cifar10ds.errors import ConfigError

PORT_BASE, PORT_SPAN = 20000, 10000  # the master port SLURM_JOB_ID picks when MASTER_PORT is unset
_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
_COUNT_RE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top(text: str) -> list[str]:
    """``a[1-2],b3`` -> ['a[1-2]', 'b3']: commas inside brackets belong to the bracket."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError("nested or unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced brackets")
    return parts + [text[start:]]


def _expand_range(body: str) -> list[str]:
    """``01-03,07`` -> ['01', '02', '03', '07'] (the first number's width is kept, as SLURM does)."""
    out = []
    for item in body.split(","):
        m = _RANGE_RE.match(item)
        if not m:
            raise ValueError(f"bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"bad range {item!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(text: str) -> list[str]:
    """SLURM's host list (``node[01-04,07]``, ``a[1-2],b3``, ``rack[1-2]-n[1-2]``) as host names, in order;
    ValueError if it is not one."""
    hosts: list[str] = []
    for part in _split_top(text.strip()):
        pieces = re.split(r"(\[[^\]]*\])", part)  # literals and [ranges], alternating
        if not part or any(("[" in p or "]" in p) and not (p.startswith("[") and p.endswith("]")) for p in pieces):
            raise ValueError(f"bad host {part!r}")
        names = [""]
        for p in pieces:
            choices = _expand_range(p[1:-1]) if p.startswith("[") else [p]
            names = [n + c for n in names for c in choices]
        hosts += names
    return hosts


def expand_counts(text: str) -> list[int]:
    """SLURM's tasks per node, ``2(x3),1`` -> [2, 2, 2, 1]; ValueError if malformed."""
    counts: list[int] = []
    for item in text.split(","):
        m = _COUNT_RE.match(item.strip())
        if not m:
            raise ValueError(f"bad count {item!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def in_step(env: Mapping[str, str]) -> bool:
    """Whether this process is a task that srun started (a batch script is not)."""
    return "SLURM_STEP_NUM_TASKS" in env


def allocated_tasks(env: Mapping[str, str]) -> int:
    """The tasks of the allocation this process runs in (1 outside SLURM)."""
    try:
        return int(env.get("SLURM_NTASKS", 1))
    except ValueError:
        return 1


def world(env: Mapping[str, str]) -> dict[str, str]:
    """The launcher variables of this srun task (empty outside an srun step). ConfigError, naming the variable, when
    SLURM's variables contradict each other (a task count that does not match the nodes, an unparsable node list)."""
    if not in_step(env):
        return {}
    nodelist_key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if k in env), None)
    counts_key = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if k in env), None)
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID") if k not in env]
    missing += [] if nodelist_key else ["SLURM_STEP_NODELIST"]
    missing += [] if counts_key else ["SLURM_STEP_TASKS_PER_NODE"]
    if missing:
        raise ConfigError(f"this is an srun task (SLURM_STEP_NUM_TASKS is set) but {', '.join(missing)} "
                          "not: start the trainer with srun itself, or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                          "and MASTER_PORT")
    ints = {}
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID"):
        try:
            ints[key] = int(env[key])
        except ValueError:
            raise ConfigError(f"{key}={env[key]!r} is not a number: start the trainer with srun itself") from None
    try:
        hosts = expand_nodelist(env[nodelist_key])
    except ValueError as e:
        raise ConfigError(f"{nodelist_key}={env[nodelist_key]!r}: cannot read this node list ({e}); SLURM writes "
                          "e.g. node[01-04,07] or a[1-2],b3: set MASTER_ADDR to the first node to go on") from None
    try:
        counts = expand_counts(env[counts_key])
    except ValueError as e:
        raise ConfigError(f"{counts_key}={env[counts_key]!r}: cannot read the tasks per node ({e}); SLURM writes "
                          "e.g. 2(x3),1") from None
    rank, ntasks, local, node = (ints[k] for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID"))
    if len(counts) != len(hosts) or sum(counts) != ntasks:
        raise ConfigError(f"SLURM_NTASKS={ntasks} does not match the nodes: {counts_key}={env[counts_key]!r} puts "
                          f"{sum(counts)} tasks on {len(counts)} node(s), {nodelist_key} lists {len(hosts)}; "
                          "start the trainer with srun itself, without overriding SLURM's variables")
    if not (0 <= rank < ntasks and 0 <= node < len(counts) and 0 <= local < counts[node]):
        raise ConfigError(f"SLURM_PROCID={rank}, SLURM_NODEID={node}, SLURM_LOCALID={local} do not fit "
                          f"SLURM_NTASKS={ntasks} on {len(counts)} node(s) ({counts_key}={env[counts_key]!r}): "
                          "start the trainer with srun itself")
    job = re.sub(r"\D", "", env.get("SLURM_JOB_ID", "")) or "0"
    port = env.get("MASTER_PORT") or str(PORT_BASE + int(job) % PORT_SPAN)
    return {"RANK": str(rank), "WORLD_SIZE": str(ntasks), "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(counts[node]), "MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0],
            "MASTER_PORT": port}
