"""Unpickling files the trainer may not have written (checkpoints, CIFAR-10 batches) without running code from them.

A pickle can name any importable callable and have it called (``os.system`` included). Checkpoints and the official
batches are pickles, and DeepSpeed 0.19.8 loads checkpoints with ``torch.load(weights_only=False)``. So such a file
may build only the types listed here (and nowhere else): a checkpoint's files are checked before any of them is
unpickled, and a batch is unpickled by an unpickler that refuses any other type. docs/reliability.md ("Security")
says what is trusted.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# What a numpy array pickles to: numpy 1.x names its functions numpy.core.*, numpy 2.x numpy._core.*; protocol 5
# rebuilds arrays with _frombuffer; _codecs.encode is how Python 3 writes bytes in protocol 2.
NUMPY_ARRAY_TYPES = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy._core.numeric._frombuffer",
    "numpy.core.numeric._frombuffer", "numpy.ndarray", "numpy.dtype", "_codecs.encode",
})

# Types a checkpoint of this trainer holds beyond what torch.load(weights_only=True) accepts by itself (tensors,
# storages, dtypes, OrderedDict, torch.Size, ...).
CHECKPOINT_TYPES = NUMPY_ARRAY_TYPES | {
    "numpy.dtypes.UInt32DType",  # numpy's RNG state in Accelerate's random_states_<rank>.pkl (on Accelerate's own list)
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1-3 optimizer states (zero_pp_rank_*_optim_states.pt)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same with fp16 on a GPU (dynamic loss scaling)
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO 1-3 optimizer states
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1-2 and bf16 optimizer states (param_slice_mappings)
}

# What an official-format CIFAR-10 batch holds besides dicts, lists, bytes, str and ints (which need no type).
BATCH_TYPES = NUMPY_ARRAY_TYPES


class ForbiddenType(pickle.UnpicklingError):
    """A pickle that would build a type outside the allow-list; ``name`` is the type, as module.qualname."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    with warnings.catch_warnings():  # numpy 2 warns about its numpy.core alias
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(importlib.import_module(module), attr)


def foreign_types(path: Path) -> list[str]:
    """The types in ``torch.save`` file ``path`` beyond CHECKPOINT_TYPES, read from its pickle without unpickling it.
    Raises ValueError when the file is not a torch.save file, or its pickle holds anything torch.save does not write."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a zip, no data.pkl, a truncated file, an opcode torch.save never writes
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return sorted(set(found) - CHECKPOINT_TYPES)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside builds only CHECKPOINT_TYPES, even where the caller asks for weights_only=False
    (DeepSpeed does): a file changed between ``foreign_types`` and the engine's load still runs nothing."""
    allowed = []
    for name in sorted(CHECKPOINT_TYPES):
        if name.split(".")[0] not in sys.modules:  # DeepSpeed's types, where DeepSpeed was never imported, go unused
            continue
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append((_resolve(name), name))
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in BATCH_TYPES:
            raise ForbiddenType(full)
        return _resolve(full)


def load_batch(blob: bytes) -> Any:
    """Unpickle a CIFAR-10 batch that is not an official file: dicts, lists, bytes, str, ints and numpy arrays only
    (Python 2's str read as bytes, as the official files need); ForbiddenType for anything else."""
    return _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
