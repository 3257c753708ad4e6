"""Small CIFAR-10 look-alikes written in every accepted format, and a bounded CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cifar10ds.dist import free_port  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cifar10_deepspeed.py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(per_class: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: each class has its own colour and stripe direction, plus noise.

    Returns uint8 (N, 32, 32, 3) in class-interleaved order, and int64 labels.
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    yy, xx = np.mgrid[0:32, 0:32]
    for _ in range(per_class):
        for c in range(classes):
            colour = np.array([(37 * c) % 256, (91 * c + 40) % 256, (173 * c + 80) % 256], dtype=np.float64)
            stripes = np.sin((xx * np.cos(c) + yy * np.sin(c)) * 0.8)[..., None] * 40
            img = colour * 0.6 + 50 + stripes + rng.normal(0, 20, (32, 32, 3))
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def write_batches(folder: Path, train: tuple, test: tuple) -> Path:
    """The official python layout: cifar-10-batches-py/data_batch_1..5 and test_batch (pickles)."""
    out = folder / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        blob = {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), b"filenames": [b"x.png"] * len(x)}
        (out / name).write_bytes(pickle.dumps(blob, protocol=2))

    x, y = train
    for i, (xs, ys) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5))):
        dump(f"data_batch_{i + 1}", xs, ys)
    dump("test_batch", *test)
    (out / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))
    return out


def write_folder(root: Path, train: tuple, test: tuple, ext: str = "png") -> Path:
    """An image-folder tree: root/train/<class>/NNNN.ext and root/test/<class>/NNNN.ext."""
    for split, (x, y) in (("train", train), ("test", test)):
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.{ext}", quality=95)
    return root


def write_targz(path: Path, folder: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return path


def tiny_dataset(tmp: Path, train_per_class: int = 20, test_per_class: int = 7, fmt: str = "folder") -> Path:
    """A data dir in one of the formats: 'folder' (png tree), 'batches', 'targz' (png tree in .tar.gz)."""
    train, test = make_images(train_per_class, seed=1), make_images(test_per_class, seed=2)
    if fmt == "batches":
        write_batches(tmp / "data", train, test)
        return tmp / "data"
    root = write_folder(tmp / "tree", train, test)
    if fmt == "targz":
        return write_targz(tmp / "tiny.tar.gz", root, "tiny")
    return root


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def cli_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(CIFAR10DS_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.setdefault("WANDB_MODE", "offline")  # never the network, unless a test asks otherwise
    return env


def run_bounded(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}") from None
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    done.pgid = proc.pid  # the session's process group: empty once everything it started is gone
    return done


def run_together(runs: list[tuple[list[str], dict[str, str]]], cwd: Path, timeout: float
                 ) -> list[subprocess.CompletedProcess]:
    """Start every ``(cmd, env)`` at once (each in its own process group), as the nodes of one job; on timeout kill
    them all and fail."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for cmd, env in runs]
    import time

    deadline, done = time.monotonic() + timeout, []
    try:
        for (cmd, _), proc in zip(runs, procs):
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        texts = []
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            texts.append(f"{out[-2000:]}\n{err[-2000:]}")
        raise AssertionError(f"timed out after {timeout}s:\n" + "\n----\n".join(texts)) from None
    return done


def processes_left(pgid: int, wait_s: float = 10) -> bool:
    """Whether any process of group ``pgid`` is still alive after ``wait_s`` seconds."""
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


def run_cli(args: list[str], tmp: Path, timeout: float = 180, launcher: list[str] | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python cifar10_deepspeed.py ARGS`` (or under ``launcher``), from the repo root by default."""
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    return run_bounded(cmd, cwd, cli_env(tmp), timeout)


def deepspeed_launcher(n: int, port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), f"--num_gpus={n}", f"--master_port={port}"]


def accuracy_in_one_process(out: Path, data_dir: Path, model: str, cache: Path) -> float:
    """Score a run's saved model.pt on the whole test set in this one process."""
    import torch

    import models
    from cifar10ds.batches import Augment
    from cifar10ds.data import load_cifar10

    data = load_cifar10(data_dir, download=False, cache_dir=cache)
    net = models.create_model(model, num_classes=data.num_classes)
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    net.eval()
    with torch.no_grad():
        pred = net(Augment(0, False, 0, seed=0, device="cpu").normalize(data.test_x)).argmax(1)
    return (pred == data.test_y).double().mean().item()


def accelerate_launcher(n: int, port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", f"--num_processes={n}",
            f"--main_process_port={port}"]


def wandb_records(run_file: Path, timeout: float = 60.0) -> list:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file, once the run's ``exit`` record is in it.

    wandb's own service process writes the file and may still be writing it after ``finish()`` returned (seen once
    in a full suite on a loaded machine: a file with its header and no records yet): wait for the run to be
    complete, up to ``timeout`` seconds, then return what is there.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_file_records(run_file.read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _wandb_file_records(data: bytes) -> list:
    """A ``.wandb`` file is a 7-byte ``:W&B`` header followed by LevelDB-log records (32 KiB blocks; each chunk
    has a 4-byte checksum, a 2-byte length and a 1-byte type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


# The run every multi-node test repeats and compares with one node's: 2 ranks, fp32, 3 epochs of 10 steps
# (test_reliability.py runs it one epoch longer). A rank waits up to 120 s for the others: a first DeepSpeed run
# compiles an op before it listens.
CLUSTER_CONFIG = {
    "train_batch_size": 20,
    "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_type": "linear"}},
    "trainer": {"model": "bn_cnn", "epochs": 3, "warmup_fraction": 0.1, "dist_timeout_s": 120,
                "data": {"download": False, "augmentation": {"crop_padding": 2, "flip": True, "cutout": 4}}},
}
SAME = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "grad_norm", "grad_norm_max")


def read_metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(out: Path, reference: Path) -> None:
    """Two runs trained alike: the same per-epoch metrics and the same final weights, to the bit."""
    import torch

    got, want = read_metrics(out), read_metrics(reference)
    assert [{k: m[k] for k in SAME} for m in got] == [{k: m[k] for k in SAME} for m in want]
    a, b = torch.load(out / "model.pt", weights_only=True), torch.load(reference / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def free_port_between(low: int, high: int) -> int:
    """A free local TCP port in [low, high)."""
    import random
    import socket

    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.randrange(low, high)))
            except OSError:
                continue
            return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), *args]
