"""Time-to-accuracy benchmark: a preset for N seeds in one process, optionally against airbench94.

    python scripts/bench.py --config configs/speedrun94.json --seeds 10 --data-dir cifar10-jpeg.tar.gz
    python scripts/bench.py --config configs/speedrun94.json --seeds 10 --data-dir DATA --vs-airbench

Each seed is one ordinary trainer run (``cifar10_deepspeed.run``, the DeepSpeed engine unless
``--backend`` says otherwise) in this process, after one uncounted warm-up run, as airbench times
itself: the first run of a process pays for CUDA context, cuDNN autotuning and compilation. For long
recipes ``--warmup-images N`` trains that warm-up run on N images only.

Time per run, counted the way airbench counts its own: computing the whitening layer from data
(``model_init_time_s``) + the training steps (``train_time_s``: the device is synchronised at the start
and end of each epoch; data loading, the per-epoch evaluations and a compiling first step are not in it)
+ the final, test-time-augmented evaluation (its ``eval_time_s``). Accuracy: that final evaluation.

``--vs-airbench`` runs ``airbench.train94`` from the airbench package (pip install airbench; it needs
torchvision and a GPU) on the very same tensors: the trainer's decoded images, written in airbench's own
``cifar10/train.pt`` and ``test.pt`` format into a scratch folder it reads from, loaded once (the training
images in a fixed random order: airbench computes its whitening from the first 5,000, and a decoded archive
or image folder is sorted by class; the trainer draws its 5,000 at random too). Its time and
accuracy are the ones it prints itself (CUDA events around its whitening, its epochs and its TTA evaluation:
``total_time_seconds``, ``tta_val_acc``), at the preset's TTA level and number of epochs (the only settings
passed on: other ``--set`` overrides change the trainer's side alone). Runs alternate (ours, airbench, ours,
...) so that drifts of the machine hit both alike. The report: mean accuracy and time with 95% CIs for
each, the ratio of mean times and the accuracy difference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
AIRBENCH_BATCH = 1024  # airbench94's
sys.path.insert(0, str(ROOT))

import cifar10_deepspeed  # noqa: E402
from cifar10ds.errors import EXIT_USER_ERROR, UserError, print_line  # noqa: E402


def trainer_run(args: argparse.Namespace, seed: int, out: Path, extra: tuple[str, ...] = ()) -> dict:
    argv = ["--deepspeed_config", args.config, "--output-dir", str(out), "--quiet", "--backend", args.backend,
            "--set", f"trainer.seed={seed}", "--set", "trainer.checkpoint.every_epochs=null"]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    for item in (*args.overrides, *extra):
        argv += ["--set", item]
    s = cifar10_deepspeed.run(cifar10_deepspeed.parse_args(argv))
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"seed": seed, "acc": s["final_val_acc"],
            "time_s": (s["model_init_time_s"] or 0.0) + s["train_time_s"] + last["eval_time_s"],
            "train_time_s": s["train_time_s"], "compile_time_s": s["compile_time_s"], "tta_level": s["tta_level"],
            "train_images": s["train_images"], "test_images": s["test_images"], "device": s["device"],
            "versions": s["versions"]}


class Airbench:
    """airbench94 from the airbench package, fed the trainer's own tensors."""

    def __init__(self, args: argparse.Namespace, folder: Path, trainer: Any) -> None:
        import torch

        from cifar10ds.data import balanced_subset, load_cifar10

        try:
            import airbench
        except Exception as e:  # not installed, or its torchvision does not match this torch
            raise UserError(f"--vs-airbench needs the airbench package, which failed to import "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): pip install airbench") from None
        cfg = trainer.data
        data = load_cifar10(args.data_dir or cfg.dir, download=cfg.download, cache_dir=cfg.cache_dir)
        classes = [f"class{i}" for i in range(data.num_classes)]
        (folder / "cifar10").mkdir(parents=True, exist_ok=True)
        for name, x, y, limit in (("train", data.train_x, data.train_y, cfg.train_limit),
                                  ("test", data.test_x, data.test_y, cfg.test_limit)):
            idx = balanced_subset(y, limit, cfg.subset_seed)
            if idx is not None:
                x, y = x[idx], y[idx]
            if name == "train" and len(y) < AIRBENCH_BATCH:
                raise UserError(f"--vs-airbench: {len(y)} training images are fewer than airbench94's one batch of "
                                f"{AIRBENCH_BATCH} (it drops the last, partial batch): use more images")
            if name == "train":  # airbench whitens with its first 5,000 images: random in the official files,
                order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # one class in a sorted archive
                x, y = x[order], y[order]
            # airbench's format: uint8 NHWC images, int64 labels
            torch.save({"images": x.permute(0, 2, 3, 1).contiguous(), "labels": y, "classes": classes},
                       folder / "cifar10" / f"{name}.pt")
        self.airbench = airbench
        self.torch = torch
        self.folder = folder
        self.tta_level = trainer.tta_level
        self.epochs = trainer.epochs  # the preset's 9.9 = airbench94's; a --set of trainer.epochs reaches both
        # airbench94's own loader settings (batch 1024, flip + translate 2, alternating flip), built once
        with self._in_folder():
            self.train_loader = airbench.CifarLoader("cifar10", train=True, batch_size=AIRBENCH_BATCH,
                                                     aug={"flip": True, "translate": 2}, altflip=True)

    @contextlib.contextmanager
    def _in_folder(self) -> Iterator[None]:
        """airbench reads ./cifar10/train.pt (its loader) and ./cifar10/test.pt (each train94 call)."""
        here = Path.cwd()
        os.chdir(self.folder)
        try:
            yield
        finally:
            os.chdir(here)

    def run(self, seed: int) -> dict:
        self.torch.manual_seed(seed)
        printed = io.StringIO()
        with self._in_folder(), contextlib.redirect_stdout(printed):
            self.airbench.train94(train_loader=self.train_loader, epochs=self.epochs, tta_level=self.tta_level,
                                  run=0, verbose=True)  # run 0 prints the header
        final = parse_airbench_table(printed.getvalue())
        return {"seed": seed, "acc": final["tta_val_acc"], "time_s": final["total_time_seconds"]}


def parse_airbench_table(text: str) -> dict[str, float]:
    """The final row (epoch "eval") of the table airbench prints: its TTA accuracy and its total time."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    header = next((r for r in rows if "total_time_seconds" in r), None)
    final = header and next((r for r in reversed(rows) if len(r) == len(header) and r[header.index("epoch")] == "eval"),
                            None)
    if not final:
        raise RuntimeError("airbench printed no final (eval) row; the end of its output:\n" + text[-2000:])
    return {k: float(final[header.index(k)]) for k in ("tta_val_acc", "total_time_seconds")}


def say_now(line: str) -> None:
    print(line, flush=True)  # a run killed at a time limit keeps its output up to here


def describe(name: str, runs: list[dict], say: Any = say_now) -> dict:
    from cifar10ds.stats import summarize

    acc = summarize([r["acc"] for r in runs])
    t = summarize([r["time_s"] for r in runs])
    say(f"{name:<10} n={acc.n}  accuracy {100 * acc.mean:.2f}% ± {100 * acc.ci_half:.2f}  "
        f"time {t.mean:.2f}s ± {t.ci_half:.2f}  (95% CI; min/max acc {100 * acc.min:.2f}/{100 * acc.max:.2f}%)")
    return {"n": acc.n, "acc_mean": acc.mean, "acc_ci95": [acc.ci_low, acc.ci_high], "acc_std": acc.std,
            "time_mean_s": t.mean, "time_ci95_s": [t.ci_low, t.ci_high], "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "speedrun94.json"))
    p.add_argument("--seeds", type=int, default=10, help="counted runs (seeds K..K+N-1), after one warm-up run")
    p.add_argument("--first-seed", type=int, default=0, metavar="K",
                   help="the first seed (default 0): a run of N seeds split over sittings, e.g. --seeds 5 then "
                        "--seeds 5 --first-seed 5, joined with --merge")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="REPORT.json",
                   help="run nothing: join the runs of these --json reports (one preset, distinct seeds) into one "
                        "report, printed and written to --json")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 as any source the trainer accepts")
    p.add_argument("--backend", choices=("auto", "deepspeed", "accelerate"), default="deepspeed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--vs-airbench", action="store_true", help="also run airbench94 on the same data, interleaved")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--warmup-images", type=int, default=None, metavar="N",
                   help="train the trainer's warm-up run on N images (trainer.data.train_limit=N) instead of all: "
                        "for long recipes; the first-run costs (CUDA context, cuDNN autotuning, compiling) come from "
                        "the model and batch shapes, not the data size (pick N with the same last batch as the full "
                        "set, e.g. 5008 for 50,000 at batch 32 or 64)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json",
                   help="the report, rewritten after every seed (a run stopped early keeps the seeds it finished)")
    p.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help="start no seed that would end after S seconds of this run (judged by the longest seed so "
                        "far); the report says how many seeds ran")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.merge:
        return merge(args.merge, args.json)
    if args.warmup_images is not None and args.warmup_images < 2:
        p.error("--warmup-images must be >= 2")
    args.config = str(Path(args.config).resolve())
    if args.data_dir and Path(args.data_dir).expanduser().exists():
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))
    ours: list[dict] = []
    theirs: list[dict] = []
    report: dict[str, Any] = {}
    longest = 0.0
    try:
        from cifar10ds.config import load_config

        trainer = load_config(args.config, args.overrides).trainer
        tta = trainer.tta_level
        rival = Airbench(args, scratch / "airbench", trainer) if args.vs_airbench else None
        if args.warmup:
            limit = () if args.warmup_images is None else (f"trainer.data.train_limit={args.warmup_images}",)
            warmup = trainer_run(args, 10**6, scratch / "warmup", limit)
            if rival is not None:
                rival.run(10**6)
            print("warm-up runs done (not counted)", flush=True)
            report["warmup_train_images"] = warmup["train_images"]
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            elapsed = time.monotonic() - started
            if args.budget_s is not None and ours and elapsed + longest > args.budget_s:
                print(f"time budget: {elapsed:.0f}s of {args.budget_s:g}s used, a seed takes up to {longest:.0f}s: "
                      f"stopping after {len(ours)} seeds", flush=True)
                break
            r = trainer_run(args, seed, scratch / f"seed{seed}")
            ours.append(r)
            print(f"seed {seed}: trainer  {100 * r['acc']:.2f}% in {r['time_s']:.2f}s", flush=True)
            if rival is not None:
                a = rival.run(seed)
                theirs.append(a)
                print(f"seed {seed}: airbench {100 * a['acc']:.2f}% in {a['time_s']:.2f}s", flush=True)
            longest = max(longest, time.monotonic() - started - elapsed)
            report.update(config=args.config, overrides=args.overrides, backend=args.backend, tta_level=tta,
                          device=ours[0]["device"], versions=ours[0]["versions"], train_images=ours[0]["train_images"],
                          test_images=ours[0]["test_images"], seeds_asked=args.seeds)
            finish(report, ours, theirs, args.json, say=lambda line: None)  # kept if the run is stopped
    except UserError as e:
        print_line(e.report())
        return EXIT_USER_ERROR
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the runs' folders (results are in the report), the data copy
    print(flush=True)
    finish(report, ours, theirs, args.json)
    return 0


def finish(report: dict, ours: list[dict], theirs: list[dict], out: Path | None, say: Any = say_now) -> None:
    """Summarize the runs into the report (said), with the comparison when airbench ran; write it to ``out``."""
    report["trainer"] = describe("trainer", ours, say)
    if theirs:
        report["airbench"] = describe("airbench", theirs, say)
        ratio = report["trainer"]["time_mean_s"] / report["airbench"]["time_mean_s"]
        diff = report["trainer"]["acc_mean"] - report["airbench"]["acc_mean"]
        report["time_ratio"], report["acc_diff"] = ratio, diff
        say(f"trainer / airbench mean time = {ratio:.3f}; accuracy difference = {100 * diff:+.2f} points")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)  # a reader (or a kill) never sees half a report


def merge(paths: list[Path], out: Path | None) -> int:
    """One report from several reports of the same benchmark run in parts (--first-seed)."""
    try:
        reports = [json.loads(Path(path).read_text()) for path in paths]
    except (OSError, ValueError) as e:
        print_line(f"error: --merge: {e}")
        return EXIT_USER_ERROR
    same = ("config", "overrides", "backend", "tta_level", "device", "train_images", "test_images")
    for path, r in zip(paths[1:], reports[1:]):
        differ = [k for k in same if r.get(k) != reports[0].get(k)]
        if differ or ("airbench" in r) != ("airbench" in reports[0]):
            print_line(f"error: --merge: {path} is not a part of the same benchmark as {paths[0]} (it differs in "
                       f"{', '.join(differ) or 'having airbench runs'}): merge the parts of one preset and set-up")
            return EXIT_USER_ERROR
    ours = [run for r in reports for run in r["trainer"]["runs"]]
    seeds = [run["seed"] for run in ours]
    if len(set(seeds)) < len(seeds):
        print_line(f"error: --merge: seeds repeat across the reports ({sorted(seeds)}): run the parts with "
                   "--first-seed so that each seed runs once")
        return EXIT_USER_ERROR
    report = {k: v for k, v in reports[0].items() if k not in ("trainer", "airbench", "time_ratio", "acc_diff")}
    report["merged_from"] = [str(path) for path in paths]
    finish(report, ours, [run for r in reports for run in r.get("airbench", {}).get("runs", [])], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
