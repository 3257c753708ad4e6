"""Contiguous (NCHW) vs channels_last on this machine, per model: the evidence behind ``trainer.channels_last: "auto"``.

    python scripts/bench_memory_format.py
    python scripts/bench_memory_format.py --models bn_cnn resnet18 --rounds 3 --json formats.json

Each measurement runs in a fresh process with the trainer's CPU malloc setting: a plain fp32 loop (SGD momentum
0.9, clipping 1.0) over random batches of the model's usual size, ``--steps`` timed steps after 10 untimed
ones, then one timed forward pass over 512 images in eval mode. The two formats alternate, ``--rounds`` times,
so drift of the machine's speed hits both alike; the ratio compares their means. Data values do not change
the speed of these kernels, so no data set is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = ("contiguous", "channels_last")
BATCH = {"resnet18": 128, "airbench94": 512}  # their presets' batch sizes (per step on one process); others 32
EVAL_IMAGES = 512


def measure(model_name: str, fmt: str, steps: int, batch: int) -> dict:
    """One format, this process: training and evaluation images per second."""
    from cifar10ds.dist import keep_freed_memory

    keep_freed_memory()
    import torch
    import torch.nn.functional as F

    import models

    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    model = models.create_model(model_name, num_classes=10)
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.randn(512, 3, 32, 32))
    model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xs = torch.randn(steps + 10, batch, 3, 32, 32)
    ys = torch.randint(0, 10, (steps + 10, batch))

    def step(i: int) -> None:
        loss = F.cross_entropy(model(xs[i].contiguous(memory_format=memory_format)), ys[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.train()
    for i in range(10):
        step(i)
    t0 = time.perf_counter()
    for i in range(10, steps + 10):
        step(i)
    train_s = time.perf_counter() - t0
    model.eval()
    x = torch.randn(EVAL_IMAGES, 3, 32, 32).contiguous(memory_format=memory_format)
    with torch.no_grad():
        model(x[:64])
        t0 = time.perf_counter()
        model(x)
        eval_s = time.perf_counter() - t0
    return {"train_images_per_s": steps * batch / train_s, "eval_images_per_s": EVAL_IMAGES / eval_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["simple_cnn", "cnn3", "bn_cnn", "resnet18", "airbench94"])
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default: 200; 16 for resnet18 "
                   "and airbench94, whose steps are large)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two formats (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "FORMAT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        model_name, fmt = args.one
        print(json.dumps(measure(model_name, fmt, args.steps or 200, BATCH.get(model_name, 32))))
        return 0

    import torch

    threads = args.threads or torch.get_num_threads()
    results: dict[str, dict] = {}
    print(f"{threads} threads, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    for name in args.models:
        steps = args.steps or (16 if name in BATCH else 200)
        runs: dict[str, list[dict]] = {fmt: [] for fmt in FORMATS}
        for _ in range(args.rounds):
            for fmt in FORMATS:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, fmt, "--steps", str(steps),
                       "--threads", str(threads)]
                done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"error: {name} {fmt} failed (exit {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
                    return 1
                runs[fmt].append(json.loads(done.stdout.strip().splitlines()[-1]))
        row: dict = {"batch": BATCH.get(name, 32), "steps": steps, "per_round": runs}
        for key in ("train_images_per_s", "eval_images_per_s"):
            mean = {fmt: sum(r[key] for r in runs[fmt]) / len(runs[fmt]) for fmt in FORMATS}
            row[key] = mean
            row[key.replace("_images_per_s", "_ratio")] = mean["channels_last"] / mean["contiguous"]
        results[name] = row
        print(f"{name:12s} batch {row['batch']:4d}  train {row['train_images_per_s']['contiguous']:8,.0f} -> "
              f"{row['train_images_per_s']['channels_last']:8,.0f} images/s ({row['train_ratio']:.2f}x)  eval "
              f"{row['eval_images_per_s']['contiguous']:8,.0f} -> {row['eval_images_per_s']['channels_last']:8,.0f} "
              f"({row['eval_ratio']:.2f}x)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": threads, "torch": torch.__version__, "rounds": args.rounds,
                                         "models": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
