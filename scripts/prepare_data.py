"""Find, download if allowed, decode and cache CIFAR-10 once, and say what was found.

    python scripts/prepare_data.py --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python scripts/prepare_data.py --data-dir data            # downloads the official archive if absent

Run it on every node before a multi-node job so that no rank decodes while others wait.
Exit code 2 with one line when the data cannot be used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar10ds.data import cache_path, default_cache_dir, load_cifar10  # noqa: E402
from cifar10ds.errors import EXIT_USER_ERROR, DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data", help="folder or .tar.gz (default: data)")
    p.add_argument("--no-download", action="store_true", help="never download the official archive")
    p.add_argument("--cache-dir", default=None, help=f"cache folder (default: {default_cache_dir()})")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        data = load_cifar10(args.data_dir, download=not args.no_download, cache_dir=args.cache_dir)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    x = data.train_x.float() / 255
    mean = ", ".join(f"{v:.4f}" for v in x.mean((0, 2, 3)).tolist())
    std = ", ".join(f"{v:.4f}" for v in x.std((0, 2, 3)).tolist())
    print(f"source: {data.source}")
    print(f"cache:  {cache_path(args.data_dir, args.cache_dir)}")
    print(f"train:  {len(data.train_y)} images, per class {data.train_y.bincount().tolist()}")
    print(f"test:   {len(data.test_y)} images, per class {data.test_y.bincount().tolist()}")
    print(f"classes: {', '.join(data.classes)}")
    print(f"train mean (RGB, 0-1): {mean}; std: {std}")
    print(f"ready in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
