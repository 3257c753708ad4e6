"""Checkpoints that are either complete or ignored.

The engine writes its files (model, optimizer, scheduler, the trainer's ``client_state``) into a
temporary tag folder; each rank adds its RNG states; then rank 0 fsyncs everything, renames the
folder to its final tag and writes ``COMMITTED.json`` last, listing every file with its size and
sha256. A checkpoint without that marker, or whose files no longer match it, is never resumed
from. Old checkpoints are deleted only after the new one is committed.

DeepSpeed alone writes in place and rewrites ``latest`` before every rank has finished, and
silently starts from scratch when ``latest`` is missing: the trainer never reads ``latest``.
"""

from __future__ import annotations

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

from cifar10ds.errors import ConfigError

MARKER = "COMMITTED.json"
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
