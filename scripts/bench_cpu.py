"""CPU throughput: the whole trainer against a hand-written loop and a tutorial DataLoader loop, side by side.

    python scripts/bench_cpu.py --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python scripts/bench_cpu.py --data-dir data --images 10000 --rounds 3 --json bench.json

Four contenders train the same model (same seed) on the same N training images for one epoch each,
one process, fp32, SGD lr 0.01 momentum 0.9, gradient clipping 1.0, random crop (pad 4) + flip:

* trainer:    ``python cifar10_deepspeed.py --deepspeed_config configs/bn_cnn_stable.json ...`` as a
              subprocess, exactly as a user runs it; its own ``train_images_per_s`` from summary.json;
* hand:       a plain PyTorch loop over pre-batched uint8 tensors, batch augmentation with tensor ops;
* hand_kept:  the same loop with the trainer's settings: in a process that keeps freed memory the way the
              trainer does on CPU (``cifar10ds.dist.keep_freed_memory``, the trainer's
              ``trainer.cpu_keep_freed_memory``) and in the trainer's memory format (channels_last, its default
              on CPU, unless ``--memory-format contiguous``): the like-for-like reference for the trainer's own
              overhead, reported without a target;
* dataloader: the tutorial pipeline: torchvision's ``CIFAR10`` dataset with ``RandomCrop(32, padding=4)``,
              ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (per image, on PIL images), in a
              ``DataLoader(batch_size, shuffle=True, num_workers=2)`` (the PyTorch tutorial's), rebuilt with
              Pillow step for step because torchvision cannot be imported on this CPU-only machine.

The trainer's N images are its ``trainer.data.train_limit`` subset (seeded, class-balanced); the others
use the very same images (``balanced_subset`` with the same seed). Each contender's epoch runs in a fresh
process (the trainer's cannot run otherwise; ``--in-process`` runs hand and dataloader here instead), after one
uncounted warm-up epoch of the hand loop. They run interleaved for ``--rounds`` rounds (the order
rotates each round) with the same thread count (``OMP_NUM_THREADS`` for the trainer, ``torch.set_num_threads``
for the others); the ratios compare the per-contender means. Each run also records how many cores other
processes kept busy meanwhile: on a shared machine the numbers mean little (with 2 threads on 2 cores and one
core taken, a run can be 50x slower). Speed claims come from this side-by-side run, never from timed tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import models  # noqa: E402
from cifar10ds.batches import MEAN, STD  # noqa: E402
from cifar10ds.data import balanced_subset, load_cifar10  # noqa: E402
from cifar10ds.dist import keep_freed_memory  # noqa: E402
from cifar10ds.errors import EXIT_USER_ERROR, DataError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAINER = ROOT / "cifar10_deepspeed.py"
CONFIG = ROOT / "configs" / "bn_cnn_stable.json"
CONTENDERS = ("trainer", "hand", "hand_kept", "dataloader")
TARGETS = {"trainer/hand": 0.9, "trainer/dataloader": 1.8}  # issue 6
LR, MOMENTUM, CLIP, PAD, SEED = 0.01, 0.9, 1.0, 4, 0
BUSY_CORES = 0.1  # other processes' average load above which a measurement is flagged
RETRIES = 2  # with --wait-quiet, a run disturbed by other processes is repeated up to this many times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ForeignLoad:
    """CPU time other processes used while a contender ran (from /proc/stat minus our own, children included).

    Each contender wants all cores; work from anyone else shows up here and makes that number unreliable.
    """

    def __init__(self) -> None:
        self.start = self._busy_s(), self._own_s(), time.perf_counter()

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        guest = sum(fields[8:10])  # already counted in user/nice
        return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float | None:
        """Average number of cores kept busy by other processes since construction."""
        busy0, own0, wall0 = self.start
        busy1 = self._busy_s()
        if busy0 is None or busy1 is None:
            return None
        wall = time.perf_counter() - wall0
        return max(0.0, (busy1 - busy0) - (self._own_s() - own0)) / wall if wall > 0 else None


def wait_quiet(limit_s: float, sample_s: float = 2.0) -> float | None:
    """Wait up to ``limit_s`` for a ``sample_s`` window in which other processes use under BUSY_CORES cores.

    Returns the last window's foreign load (None where /proc/stat is unreadable).
    """
    deadline = time.monotonic() + limit_s
    while True:
        load = ForeignLoad()
        time.sleep(sample_s)
        cores = load.cores()
        if cores is None or cores < BUSY_CORES or time.monotonic() >= deadline:
            return cores
        time.sleep(1.0)


def _fresh(model_name: str, num_classes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(SEED)  # the trainer seeds the same way before create_model (trainer.seed 0)
    model = models.create_model(model_name, num_classes=num_classes)
    return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


# ---------------------------------------------------------------------------------- contenders


def run_trainer(args: argparse.Namespace, n: int, threads: int) -> dict:
    """The real trainer as a subprocess; its own train_images_per_s (the epoch's loop, no eval)."""
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable, str(TRAINER), "--deepspeed_config", str(CONFIG), "--data-dir", args.data_dir,
            "--output-dir", str(out), "--quiet", "--backend", args.backend,
            "--set", "trainer.epochs=1",
            "--set", "trainer.warmup_epochs=0.2",  # the preset's 5 warmup epochs do not fit in one
            "--set", f"trainer.data.train_limit={n}",
            "--set", f"trainer.data.test_limit={args.test_limit}",
            "--set", "trainer.data.download=false",
            "--set", "trainer.checkpoint.every_epochs=null",
            "--set", f"trainer.model={args.model}",
            "--set", f"train_batch_size={args.batch}",
            "--set", f"trainer.channels_last={str(args.memory_format == 'channels_last').lower()}",
        ]
        if args.cache_dir:
            cmd += ["--set", f"trainer.data.cache_dir={args.cache_dir}"]
        # The trainer keeps torch's default (all cores) in one process; pin it to the same count as here.
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
            env.pop(key, None)
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the trainer failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        if summary["train_images"] != n:
            raise RuntimeError(f"the trainer trained on {summary['train_images']} images, expected {n}")
        if summary["channels_last"] != (args.memory_format == "channels_last"):
            raise RuntimeError(f"the trainer ran with channels_last={summary['channels_last']}, asked for {args.memory_format}")
        return {"images_per_s": summary["train_images_per_s"], "train_time_s": summary["train_time_s"],
                "train_loss": first["train_loss"], "command": cmd, "backend": summary["backend"]}


def crop_flip_batch(x: torch.Tensor, g: torch.Generator, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, per-image random crop (reflect pad) + flip, normalized."""
    x = x.float()
    n, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
    dy = torch.randint(0, 2 * PAD + 1, (n, 1), generator=g)
    dx = torch.randint(0, 2 * PAD + 1, (n, 1), generator=g)
    rows = (dy + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * PAD)
    x = padded.gather(2, rows)
    cols = (dx + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
    x = x.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return (x - mean) / std


def run_hand(x_all: torch.Tensor, y_all: torch.Tensor, args: argparse.Namespace, num_classes: int, rnd: int,
             channels_last: bool = False) -> dict:
    """A plain loop over pre-batched tensors; only the loop is timed."""
    model, opt = _fresh(args.model, num_classes)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    g = torch.Generator().manual_seed(SEED * 1000 + rnd)
    perm = torch.randperm(len(y_all), generator=g)
    xs, ys = x_all[perm].split(args.batch), y_all[perm].split(args.batch)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    loss_sum = torch.zeros((), dtype=torch.float64)
    model.train()
    t0 = time.perf_counter()
    for xb, yb in zip(xs, ys):
        logits = model(crop_flip_batch(xb, g, mean, std).contiguous(memory_format=fmt))
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        loss_sum += loss.detach() * len(yb)
    seconds = time.perf_counter() - t0
    return {"images_per_s": len(y_all) / seconds, "train_time_s": seconds, "train_loss": loss_sum.item() / len(y_all)}


class TutorialDataset(Dataset):
    """The tutorials' pipeline, step for step as torchvision runs it, without torchvision (unusable on CPU here).

    ``torchvision.datasets.CIFAR10`` keeps the images as one HWC uint8 array and turns each into a PIL image
    in ``__getitem__``; the usual transforms then run per image: ``RandomCrop(32, padding=4)`` (zero padding,
    PIL ``expand`` + ``crop``), ``RandomHorizontalFlip()`` (PIL ``transpose``), ``ToTensor()`` (to a CHW float
    tensor in [0, 1]) and ``Normalize(mean, std)``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = x.permute(0, 2, 3, 1).contiguous().numpy()  # HWC, as torchvision stores CIFAR-10
        self.y = y.tolist()
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.x[i])
        w, h = img.size
        img = ImageOps.expand(img, border=PAD, fill=0)
        top, left = torch.randint(0, 2 * PAD + 1, (2,)).tolist()
        img = img.crop((left, top, left + w, top + h))
        if torch.rand(1).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
        return t.sub_(self.mean).div_(self.std), self.y[i]


def run_dataloader(x_all: torch.Tensor, y_all: torch.Tensor, args: argparse.Namespace, num_classes: int,
                   rnd: int) -> dict:
    """The tutorial pipeline; the timed loop includes starting the workers, as every epoch does."""
    model, opt = _fresh(args.model, num_classes)
    loader = DataLoader(TutorialDataset(x_all, y_all), batch_size=args.batch, shuffle=True,
                        num_workers=args.workers, generator=torch.Generator().manual_seed(SEED * 1000 + rnd))
    loss_sum, images = 0.0, 0
    model.train()
    t0 = time.perf_counter()
    for xb, yb in loader:
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        loss_sum += loss.item() * len(yb)
        images += len(yb)
    seconds = time.perf_counter() - t0
    return {"images_per_s": images / seconds, "train_time_s": seconds, "train_loss": loss_sum / images}


# --------------------------------------------------------------------------------------- main


def summarize(rounds: list[dict[str, dict]]) -> dict:
    per = {name: [r[name]["images_per_s"] for r in rounds] for name in CONTENDERS}
    mean = {name: sum(v) / len(v) for name, v in per.items()}
    median = {name: statistics.median(v) for name, v in per.items()}
    ratios = {f"trainer/{name}": mean["trainer"] / mean[name] for name in CONTENDERS[1:]}
    return {
        "contenders": {name: {"mean_images_per_s": mean[name], "median_images_per_s": median[name],
                              "per_round_images_per_s": per[name],
                              "train_loss_per_round": [r[name]["train_loss"] for r in rounds],
                              "train_time_s_per_round": [r[name]["train_time_s"] for r in rounds],
                              "foreign_cores_per_round": [r[name]["foreign_cores"] for r in rounds]}
                       for name in CONTENDERS},
        "ratios": ratios,
        "median_ratios": {f"trainer/{name}": median["trainer"] / median[name] for name in CONTENDERS[1:]},
        "targets": TARGETS,
        "pass": {k: ratios[k] >= TARGETS[k] for k in TARGETS},
    }


def table(result: dict) -> str:
    rounds = len(result["contenders"]["trainer"]["per_round_images_per_s"])
    head = ("| contender | " + " | ".join(f"round {i + 1}" for i in range(rounds))
            + " | mean images/s | trainer / this | median images/s | trainer / this (medians) |")
    lines = [head, "|---" * (rounds + 5) + "|"]
    for name in CONTENDERS:
        c = result["contenders"][name]
        ratio = "1.00" if name == "trainer" else f"{result['ratios'][f'trainer/{name}']:.2f}"
        mratio = "1.00" if name == "trainer" else f"{result['median_ratios'][f'trainer/{name}']:.2f}"
        cells = " | ".join(f"{v:,.0f}" for v in c["per_round_images_per_s"])
        lines.append(f"| {name} | {cells} | {c['mean_images_per_s']:,.0f} | {ratio} | {c['median_images_per_s']:,.0f} | {mratio} |")
    return "\n".join(lines)


@functools.cache
def load_subset(data_dir: str, images: int, cache_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The trainer's train_limit subset (seeded, class-balanced, subset_seed 0) and the number of classes."""
    data = load_cifar10(data_dir, download=False, cache_dir=cache_dir)
    idx = balanced_subset(data.train_y, images, seed=0)
    if idx is None:
        return data.train_x, data.train_y, data.num_classes
    return data.train_x[idx].contiguous(), data.train_y[idx], data.num_classes


def run_hand_contender(args: argparse.Namespace, name: str, rnd: int, threads: int) -> dict:
    """A contender other than the trainer: in this process (--in-process), else in a fresh one, as cold as the trainer.

    ``hand_kept`` always runs in a fresh process: its malloc setting would stay with this one.
    """
    if args.in_process and name != "hand_kept":
        x_all, y_all, num_classes = load_subset(args.data_dir, args.images, args.cache_dir)
        run = run_dataloader if name == "dataloader" else run_hand
        return run(x_all, y_all, args, num_classes, rnd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--data-dir", args.data_dir, "--images", str(args.images),
           "--batch", str(args.batch), "--model", args.model, "--workers", str(args.workers), "--threads", str(threads),
           "--in-process", "--one", name, "--round", str(rnd)]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    cmd += ["--memory-format", args.memory_format]
    done = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {name} contender failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(args: argparse.Namespace, n: int, threads: int) -> tuple[list[dict[str, dict]], list[str], str | None]:
    """The warm-up, then the three contenders interleaved for args.rounds rounds; prints a line per run."""
    if args.warmup and args.wait_quiet:
        wait_quiet(args.wait_quiet)
    if args.warmup:  # so that no contender is the first run on a machine that was idle a moment ago
        warm = run_hand_contender(args, "hand", -1, threads)
        print(f"warm-up    hand       {warm['images_per_s']:8,.0f} images/s (not counted)", flush=True)
    rounds: list[dict[str, dict]] = []
    trainer_cmd: list[str] = []
    trainer_backend = None
    for r in range(args.rounds):
        k = r % len(CONTENDERS)
        order = CONTENDERS[k:] + CONTENDERS[:k]  # rotate, so no contender always runs first
        result: dict[str, dict] = {}
        for name in order:
            for attempt in range(1 + (RETRIES if args.wait_quiet else 0)):
                if args.wait_quiet:
                    cores = wait_quiet(args.wait_quiet)
                    if cores is not None and cores >= BUSY_CORES:
                        print(f"still busy after {args.wait_quiet:g}s ({cores:.2f} cores used by others); "
                              "measuring anyway", flush=True)
                load = ForeignLoad()
                if name == "trainer":
                    run = run_trainer(args, n, threads)
                    trainer_cmd = run.pop("command")
                    trainer_backend = run.pop("backend")
                else:
                    run = run_hand_contender(args, name, r, threads)
                run["foreign_cores"] = foreign = load.cores()
                busy = f", other processes used {foreign:.2f} cores" if foreign is not None else ""
                print(f"round {r + 1}/{args.rounds} {name:<10} {run['images_per_s']:8,.0f} images/s "
                      f"({run['train_time_s']:.1f}s, train_loss {run['train_loss']:.3f}{busy})", flush=True)
                result[name] = run
                if foreign is None or foreign < BUSY_CORES or attempt == RETRIES:
                    break
                print("  disturbed by other processes: not counted, running it again", flush=True)
        rounds.append(result)
    return rounds, trainer_cmd, trainer_backend


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 as a folder or .tar.gz (anything the trainer accepts)")
    p.add_argument("--images", type=int, default=10_000, help="training images per epoch (default 10000)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three contenders (default 3)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model", default="bn_cnn")
    p.add_argument("--workers", type=int, default=2, help="DataLoader num_workers (default 2, the PyTorch tutorial's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for all three (default: torch's, all cores)")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                   help="the trainer's (trainer.channels_last) and hand_kept's; default channels_last, the trainer's "
                        "default on CPU (hand and dataloader stay contiguous, as users write them)")
    p.add_argument("--backend", choices=("auto", "deepspeed", "accelerate"), default="auto",
                   help="the trainer's --backend (default auto: deepspeed when installed)")
    p.add_argument("--test-limit", type=int, default=500, help="the trainer's end-of-epoch evaluation images (untimed)")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default: the trainer's)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write the numbers here")
    p.add_argument("--in-process", action="store_true",
                   help="run the hand and DataLoader loops in this process (hand_kept always runs in a fresh one; default: each run in a fresh process, "
                        "started like the trainer's, so no contender profits from another's warm-up)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the uncounted hand-loop epoch that runs before the rounds")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each run, wait up to this long until other processes leave the CPU alone, and repeat "
                        f"a run they disturbed (up to {RETRIES} times); default 0: neither")
    p.add_argument("--one", choices=CONTENDERS[1:], default=None, help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.images < 2 or args.rounds < 1 or args.batch < 1:
        p.error("--images must be >= 2, --rounds and --batch >= 1")
    if Path(args.data_dir).expanduser().exists():  # the trainer runs from the repo root
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.one:  # one contender for a parent bench process: one JSON line on stdout
        x_all, y_all, num_classes = load_subset(args.data_dir, args.images, args.cache_dir)
        if args.one == "hand_kept" and not keep_freed_memory():
            print("error: this C library has no mallopt; run without the hand_kept contender", file=sys.stderr)
            return 1
        if args.one == "dataloader":
            result = run_dataloader(x_all, y_all, args, num_classes, args.round)
        else:
            channels_last = args.one == "hand_kept" and args.memory_format == "channels_last"
            result = run_hand(x_all, y_all, args, num_classes, args.round, channels_last)
        print(json.dumps(result))
        return 0
    try:
        # decode and cache once, before any contender starts
        _, y_all, _ = load_subset(args.data_dir, args.images, args.cache_dir)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    n = args.images = len(y_all)
    mode = "the same process" if args.in_process else "fresh processes"
    layout = f", trainer and hand_kept {args.memory_format}"
    print(f"{args.model}, batch {args.batch}, fp32{layout}, {n} images x {args.rounds} rounds, {threads} threads, "
          f"DataLoader num_workers={args.workers}, hand loops in {mode}; {cpu_model()}, torch {torch.__version__}",
          flush=True)

    try:
        rounds, trainer_cmd, trainer_backend = run_rounds(args, n, threads)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = summarize(rounds)
    print()
    print(table(out))
    print(f"\n(trainer backend: {trainer_backend}; DataLoader num_workers={args.workers}; {threads} threads)\n")
    for key, target in TARGETS.items():
        verdict = "PASS" if out["pass"][key] else "FAIL"
        print(f"{verdict}: {key} = {out['ratios'][key]:.2f} (target >= {target})")
    print(f"info: trainer/hand_kept = {out['ratios']['trainer/hand_kept']:.2f} (no target: the hand loop with the "
          "trainer's settings, i.e. the trainer's own overhead)")
    busiest = max((c for r in rounds for c in (v["foreign_cores"] for v in r.values()) if c is not None), default=None)
    if busiest is not None and busiest > BUSY_CORES:
        print(f"warning: other processes kept up to {busiest:.2f} cores busy during a measurement; "
              "these numbers are not from a quiet machine")
    if args.json:
        report = {
            **out,
            "model": args.model, "batch": args.batch, "images": n, "rounds": args.rounds, "precision": "fp32",
            "memory_format": args.memory_format,
            "threads": threads, "dataloader_workers": args.workers, "processes": 1,
            "hand_loops_in_fresh_processes": not args.in_process, "warmup": args.warmup,
            "wait_quiet_s": args.wait_quiet,
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "data_dir": args.data_dir, "trainer_command": trainer_cmd,
            "trainer_backend": trainer_backend, "max_foreign_cores": busiest,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
