"""Checkpoints that are either complete or ignored, and when the trainer takes them.

The engine writes its files (model, optimizer, scheduler, the trainer's ``client_state``) into a
temporary tag folder; each rank adds its RNG states; then rank 0 fsyncs everything, renames the
folder to its final tag and writes ``COMMITTED.json`` last, listing every file with its size and
sha256. A checkpoint without that marker, or whose files no longer match it, is never resumed
from. Old checkpoints are deleted only after the new one is committed.

Before the engine loads a checkpoint, every file in it is checked for types outside the allow-list
(``unpickling``): a checkpoint from elsewhere, or one altered with its marker rewritten to match, runs nothing.

DeepSpeed alone writes in place and rewrites ``latest`` before every rank has finished, and
silently starts from scratch when ``latest`` is missing: the trainer never reads ``latest``.

``SaveSchedule`` decides when a checkpoint is due; ``Checkpointer`` writes and restores one through
the engine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cifar10ds.batches import Augment
from cifar10ds.config import CheckpointConfig
from cifar10ds.dist import DistInfo, all_gather, broadcast_object, on_main_then_share, warn
from cifar10ds.engines import Backend
from cifar10ds.errors import ConfigError, DiskFullError
from cifar10ds.plan import RunPlan
from cifar10ds.state import TrainingState
from cifar10ds.tracking import prepare_output_dir
from cifar10ds.unpickling import foreign_types, weights_only_loads

MARKER = "COMMITTED.json"
JOB_RECORD = ".torchrun-job"  # which torchrun job started in this folder: its restarts continue it
TMP_PREFIX = ".tmp-"
_TAG_RE = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def commit(ckpt_dir: Path, tmp_tag: str, tag: str, meta: dict[str, Any]) -> Path:
    """Rank 0, after every rank finished writing ``tmp_tag``: make it ``tag``, atomically."""
    tmp, final = ckpt_dir / tmp_tag, ckpt_dir / tag
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:
        _fsync_path(p)
    listing = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    if final.exists():  # an earlier, possibly half-written attempt at the same step
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_path(ckpt_dir)
    marker_tmp = final / (MARKER + ".tmp")
    marker_tmp.write_text(json.dumps({**meta, "tag": tag, "files": listing}, indent=1))
    _fsync_path(marker_tmp)
    marker_tmp.rename(final / MARKER)
    _fsync_path(final)
    return final


@dataclass
class Found:
    path: Path
    meta: dict[str, Any]


def read_marker(path: Path) -> dict[str, Any]:
    """The commit marker of checkpoint ``path`` (not yet checked against the files); ConfigError if it is missing,
    unreadable or lists no files."""
    marker = path / MARKER
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist")
    if not marker.is_file():
        raise ConfigError(f"checkpoint {path} is not committed ({MARKER} missing): it was interrupted while saving")
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, OSError, TypeError) as e:
        raise ConfigError(f"checkpoint {path}: unreadable {MARKER} ({e})") from None
    if not isinstance(files, dict) or not files:
        raise ConfigError(f"checkpoint {path}: its {MARKER} lists no files (not written by this trainer)")
    return meta


def verify(path: Path) -> dict[str, Any]:
    """The commit marker of checkpoint ``path`` if every file it lists is intact; else ConfigError."""
    meta = read_marker(path)
    for name, want in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise ConfigError(f"checkpoint {path}: {name} is missing")
        if f.stat().st_size != want["size"] or _sha256(f) != want["sha256"]:
            raise ConfigError(f"checkpoint {path}: {name} is corrupt (size or checksum differs from {MARKER})")
    return meta


def check_types(path: Path) -> None:
    """ConfigError unless every file of checkpoint ``path`` is its marker, safetensors (tensors only, by format), or a
    torch.save file of allowed types; read without unpickling anything."""
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        name = f.relative_to(path).as_posix()
        if name == MARKER or f.suffix == ".safetensors":
            continue
        try:
            foreign = foreign_types(f)
        except ValueError as e:
            raise ConfigError(f"checkpoint {path}: {name} is not a file torch.save writes ({e}): refused, nothing was "
                              "loaded; resume only checkpoints this trainer wrote") from None
        if foreign:
            raise ConfigError(
                f"checkpoint {path}: {name} would build {', '.join(foreign[:3])}, which no checkpoint of this trainer "
                f"holds (the file was made elsewhere or altered): refused, nothing was loaded; resume only checkpoints "
                f"this trainer wrote (to go on from the one before it, move {path.name} out of the folder)")


def committed(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoint folders in ``ckpt_dir``, oldest first (not yet verified)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and _TAG_RE.match(p.name) and (p / MARKER).is_file()]
    return sorted(tags, key=lambda p: int(_TAG_RE.match(p.name).group(1)))


def find_resume(ckpt_dir: Path, warn: Any = print) -> Found | None:
    """The newest committed checkpoint that verifies; corrupt or uncommitted newer ones are skipped with a warning."""
    steps = [p for p in ckpt_dir.iterdir() if p.is_dir() and _TAG_RE.match(p.name)] if ckpt_dir.is_dir() else []
    for path in sorted(steps, key=lambda p: int(_TAG_RE.match(p.name).group(1)), reverse=True):
        try:
            return Found(path, verify(path))
        except ConfigError as e:
            warn(f"warning: {e}; falling back to an older checkpoint")
    return None


def resolve_resume(arg: str, ckpt_dir: Path, warn: Any = print) -> Found | None:
    """``--resume auto`` (newest good one in ckpt_dir, or None) or ``--resume PATH`` (must be good)."""
    if arg == "auto":
        found = find_resume(ckpt_dir, warn)
        if found is None and committed(ckpt_dir):  # starting fresh would overwrite that run's files
            raise ConfigError(f"--resume auto: no committed checkpoint in {ckpt_dir} is intact (see the warnings "
                              "above); resume one with --resume PATH once repaired, or start over in another "
                              "--output-dir")
        return found
    path = Path(arg)
    if path.is_dir() and not (path / MARKER).exists() and committed(path):
        found = find_resume(path, warn)  # PATH is a checkpoints folder
        if found is None:
            raise ConfigError(f"--resume {path}: no intact committed checkpoint in it")
        return found
    return Found(path, verify(path))


def _readable(path: Path) -> bool:
    try:
        read_marker(path)
    except ConfigError:
        return False
    return True


def rotate(ckpt_dir: Path, keep_last: int, protect: set[str]) -> list[str]:
    """Delete committed checkpoints beyond the newest ``keep_last`` (never those in ``protect``),
    and leftovers of interrupted saves. Returns the deleted names."""
    deleted = []
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        if p.is_dir() and p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p.name)
    done = [p for p in committed(ckpt_dir) if _readable(p)]  # a foreign or broken marker is not a checkpoint
    for p in done[: max(0, len(done) - keep_last)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p.name)
    return deleted


def no_space_left(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means the disk (or the quota) is full.

    An OSError says so by its errno. torch's zip writer, given a path, reports a short write without one
    ("unexpected pos ..."), and so may other writers: then ``folder`` is asked to take one more MiB.
    """
    full = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, OSError):
        return error.errno in full
    probe = folder / f".space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno in full
    finally:
        probe.unlink(missing_ok=True)
    return False


# ------------------------------------------------------------------------------ RNG states


def rng_state(extra: dict[str, Any]) -> dict[str, Any]:
    """This rank's random states, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        **extra,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rng_rank{rank}.pt"


# ------------------------------------------------------------------------------ when to save


class SaveSchedule:
    """When checkpoints are due (``trainer.checkpoint``). Only between optimizer steps: the gradients of a
    half-done accumulation window are in no checkpoint, so an epoch that ends inside one is saved at the
    next optimizer step (or at once when nothing follows)."""

    def __init__(self, cfg: CheckpointConfig, accumulation: int, rollback: bool) -> None:
        self.cfg = cfg
        self.accumulation = accumulation
        self.rollback = rollback  # the doctor may roll back: it needs a checkpoint before the first epoch ends
        self.epoch_due = False  # an epoch's checkpoint that waits for the end of an accumulation window

    def at_start(self, resumed: bool) -> str | None:
        return "start" if self.rollback and not resumed else None

    def mid_epoch(self, step: int) -> str | None:
        """After micro step ``step``, not the epoch's last."""
        if step % self.accumulation:
            return None
        if self.epoch_due:
            self.epoch_due = False
            return "epoch"
        every = self.cfg.every_steps
        return "every_steps" if every and step % every == 0 else None

    def at_epoch_end(self, step: int, epochs_done: int, best: bool, last: bool) -> str | None:
        """After an epoch's evaluation; ``last``: no epoch follows (the run ends or stops)."""
        boundary = step % self.accumulation == 0
        if self.cfg.save_best and best and boundary:
            return "best"
        every = self.cfg.every_epochs
        if every and (epochs_done % every == 0 or last):
            if boundary or last:
                self.epoch_due = False
                return "epoch"
            self.epoch_due = True
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def prepare(resume_arg: str | None, ckpt_dir: Path, cfg: CheckpointConfig, info: DistInfo,
            job: str | None = None, restart: int = 0) -> Found | None:
    """Check the checkpoint folder on rank 0 (no earlier run's checkpoints unless resuming; writable when saving) and
    find what ``--resume`` names; every rank gets the answer, or the same one-line error.

    Under torchrun the folder records the job that started in it (``JOB_RECORD``). When torchrun restarts that job
    (``restart`` above 0), it continues from the job's newest checkpoint, as ``--resume auto`` would; before the job
    committed one, from what ``--resume PATH`` named, if anything. A restart of a job whose first attempt was refused
    here is refused again, never turned into a resume of an earlier run.
    """
    def check() -> str | None:
        record = ckpt_dir / JOB_RECORD
        arg = resume_arg
        if restart and job is not None and _read(record) == job and (arg is None or committed(ckpt_dir)):
            arg = "auto"
        if not arg and committed(ckpt_dir):
            raise ConfigError(
                f"{ckpt_dir} already holds checkpoints of an earlier run: continue it with --resume auto, "
                "or start this run in another --output-dir"
            )
        if cfg.every_epochs or cfg.every_steps or cfg.save_best:
            prepare_output_dir(ckpt_dir)
            if job is not None and not restart:
                record.write_text(job)
        return arg

    resume_arg = on_main_then_share(check, info)
    if not resume_arg:
        return None
    found = on_main_then_share(lambda: resolve_resume(resume_arg, ckpt_dir, warn), info)
    if found is None:
        warn(f"no committed checkpoint in {ckpt_dir}: starting fresh")
    return found


# ------------------------------------------------------------------------- saving through the engine


class Checkpointer:
    """Saves through the engine, adds each rank's RNG states, commits atomically, rotates."""

    def __init__(self, plan: RunPlan, ckpt_dir: Path, backend: Backend, info: DistInfo, augment: Augment) -> None:
        t = plan.config.trainer
        self.cfg = t.checkpoint
        self.dir = ckpt_dir
        self.backend = backend
        self.info = info
        self.augment = augment
        # What must match for a checkpoint to be loadable at all, and for a mid-epoch one to continue.
        self.identity = {"backend": backend.name, "model": t.model}
        self.epoch_identity = {"train_images": plan.n_train, "micro_batch": plan.micro, "seed": t.seed}
        # The optimizer steps the lr schedule and Lookahead were planned for: a resume must keep them (torch's
        # OneCycleLR even keeps its length in the checkpoint and fails past it).
        self.plan = {"optimizer_steps_per_epoch": round(plan.optimizer_steps_per_epoch, 6),
                     "optimizer_steps": plan.optimizer_steps}
        self.planned_by = (["the lr schedule"] if plan.config.ds.get("scheduler") else []) + (
            ["Lookahead"] if t.lookahead.enabled else [])

    def _barrier(self) -> None:
        if self.info.world_size > 1:
            dist.barrier()

    def save(self, state: TrainingState, reason: str, elapsed: float) -> str:
        progress = state.progress
        tag = tag_for(progress.step)
        tmp = TMP_PREFIX + tag
        if self.info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir / tmp, ignore_errors=True)  # left by a save that crashed at this step
        self._barrier()
        full = False
        try:
            self.backend.save_checkpoint(self.dir, tmp, state.state_dict(elapsed))
            (self.dir / tmp).mkdir(parents=True, exist_ok=True)
            # Per-rank state goes to a per-rank file: engines save client_state from rank 0 only.
            own = {"augment": self.augment.state_dict(), "partial": progress.partial,
                   "buffers": {k: v.detach().cpu() for k, v in self.backend.module.named_buffers()}}
            torch.save(rng_state(own), rng_file(self.dir / tmp, self.info.rank))
        except Exception as e:
            if not no_space_left(e, self.dir):
                raise
            full = True
        # Every rank's files are written (or a rank ran out of space) before rank 0 commits.
        full = any(all_gather(full))
        if self.info.is_main and not full:
            meta = {**self.epoch_identity, **self.plan, "step": progress.step, "epoch": progress.epoch,
                    "step_in_epoch": progress.step_in_epoch, "world_size": self.info.world_size, "reason": reason,
                    **self.identity}
            try:
                commit(self.dir, tmp, tag, meta)
            except OSError as e:
                if not no_space_left(e, self.dir):
                    raise
                full = True
            else:
                protect = {progress.best_tag} if progress.best_tag else set()
                rotate(self.dir, self.cfg.keep_last, protect | {tag})
        if broadcast_object(full):
            raise DiskFullError(broadcast_object(self._discard(tag) if self.info.is_main else None))
        return tag

    def _discard(self, tag: str) -> str:
        """Rank 0, after a save ran out of space: remove what it left; the line every rank stops with."""
        shutil.rmtree(self.dir / (TMP_PREFIX + tag), ignore_errors=True)
        if not (self.dir / tag / MARKER).is_file():  # renamed before the marker could be written
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        found = find_resume(self.dir, warn)
        then = (f"--resume auto will continue from {found.path.name} (step {found.meta['step']})" if found else
                "no checkpoint is committed yet, so --resume auto would start over")
        return (f"no space left in {self.dir}: checkpoint {tag} was not written and nothing of it is left; {then} "
                "once there is room (free space or raise the quota, or set trainer.checkpoint.dir elsewhere)")

    def restore(self, found: Found) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(client_state, this rank's partial epoch sums) of checkpoint ``found``."""
        self._check_compatible(found)
        saved_world = found.meta.get("world_size")
        on_main_then_share(lambda: check_types(found.path), self.info)  # every rank refuses alike, none hangs
        with weights_only_loads():
            client_state = self.backend.load_checkpoint(found.path.parent, found.path.name)
        if saved_world != self.info.world_size:
            warn(f"warning: resuming {found.path.name} saved with world size {saved_world} on "
                 f"{self.info.world_size} ranks: training continues, but not bit-for-bit as it would have")
            return client_state, None
        state = torch.load(rng_file(found.path, self.info.rank), weights_only=True)
        set_rng_state(state)
        if not self.augment.load_state_dict(state["augment"]):
            warn(f"warning: {found.path.name} was saved on another kind of device: training continues, but its "
                 "augmentations are not the ones an uninterrupted run would have drawn")
        with torch.no_grad():  # this rank's own BatchNorm statistics, not rank 0's from the engine's file
            for name, buf in self.backend.module.named_buffers():
                buf.copy_(state["buffers"][name])
        return client_state, state["partial"]

    def _check_compatible(self, found: Found) -> None:
        for key, value in self.identity.items():
            if key in found.meta and found.meta[key] != value:
                raise ConfigError(f"checkpoint {found.path} was saved with {key} {found.meta[key]!r}, this run uses "
                                  f"{value!r}; resume it with the same {key}")
        if found.meta.get("step_in_epoch"):
            for key, value in self.epoch_identity.items():
                if key in found.meta and found.meta[key] != value:
                    raise ConfigError(f"checkpoint {found.path} was saved mid-epoch with {key} {found.meta[key]!r}; "
                                      f"this run has {value!r}, so the epoch cannot continue: keep {key} as it was")
        saved_world = found.meta.get("world_size")
        if saved_world != self.info.world_size and found.meta.get("step_in_epoch"):
            raise ConfigError(
                f"checkpoint {found.path} was saved mid-epoch by {saved_world} ranks and cannot continue on "
                f"{self.info.world_size}; resume it with {saved_world} ranks, or from an end-of-epoch checkpoint"
            )
        saved = {key: found.meta.get(key, value) for key, value in self.plan.items()}  # older checkpoints lack it
        if self.planned_by and saved != self.plan:
            raise ConfigError(
                f"checkpoint {found.path} belongs to a run of {saved['optimizer_steps']} optimizer steps "
                f"({saved['optimizer_steps_per_epoch']:g} per epoch), which {' and '.join(self.planned_by)} "
                f"{'were' if len(self.planned_by) > 1 else 'was'} planned for; this run would take "
                f"{self.plan['optimizer_steps']} ({self.plan['optimizer_steps_per_epoch']:g} per epoch): resume with "
                "the trainer.epochs, train_batch_size, trainer.data.drop_last and training data it was saved with, "
                "or start a new run in another --output-dir")
