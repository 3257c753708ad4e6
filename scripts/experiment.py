"""Run a config for many seeds, sweep a key, compare two experiments: statistics instead of single runs.

    python scripts/experiment.py run --config configs/bn_cnn_stable.json --seeds 25 --out exp/base \
        [--set KEY=VALUE ...] [--target 0.94] [--launcher python|deepspeed|accelerate] [--nproc N] [--data-dir PATH]
    python scripts/experiment.py sweep --config CONFIG --seeds 5 --out exp/lr \
        --sweep optimizer.params.lr=0.02,0.04,0.08 [same options as run]
    python scripts/experiment.py compare exp/base exp/candidate
    python scripts/experiment.py report exp/base          # rewrite report.md and the plots

Re-running the same `run` skips seeds that already finished. See docs/experiments.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar10ds import experiments  # noqa: E402
from cifar10ds.errors import EXIT_USER_ERROR, UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "sweep"):
        q = sub.add_parser(name)
        q.add_argument("--config", required=True, type=Path)
        q.add_argument("--seeds", required=True, help="25 (seeds 0-24), 0-24, or 1,5,9")
        q.add_argument("--out", required=True, type=Path, help="the experiment folder")
        q.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
        q.add_argument("--target", type=float, default=None, help="accuracy for the success rate, e.g. 0.94")
        q.add_argument("--launcher", default="python", choices=("python", "deepspeed", "accelerate"))
        q.add_argument("--nproc", type=int, default=1)
        q.add_argument("--data-dir", default=None)
        if name == "sweep":
            q.add_argument("--sweep", required=True, metavar="KEY=V1,V2,...")
    q = sub.add_parser("compare")
    q.add_argument("dir_a", type=Path)
    q.add_argument("dir_b", type=Path)
    q = sub.add_parser("report")
    q.add_argument("dir", type=Path)
    q.add_argument("--target", type=float, default=None)
    args = p.parse_args(argv)
    try:
        if args.command == "compare":
            experiments.compare(args.dir_a, args.dir_b)
            return 0
        if args.command == "report":
            experiments.report(args.dir, args.target)
            return 0
        seeds = experiments.parse_seeds(args.seeds)
        common = dict(launcher=args.launcher, nproc=args.nproc, data_dir=args.data_dir, target=args.target)
        if args.command == "run":
            rows = experiments.run_experiment(args.config, seeds, args.out, args.sets, **common)
        else:
            key, sep, values = args.sweep.partition("=")
            if not sep or not values:
                raise experiments.ConfigError("--sweep KEY=V1,V2,...: e.g. --sweep optimizer.params.lr=0.02,0.04")
            table = experiments.run_sweep(args.config, key, values.split(","), seeds, args.out, args.sets, **common)
            rows = [{"status": "failed"}] * sum(t["failed"] for t in table)
    except UserError as e:
        print(e.report(), file=sys.stderr)
        return EXIT_USER_ERROR
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
