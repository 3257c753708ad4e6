"""Train a CIFAR-10 classifier with DeepSpeed (or Accelerate), steered by one ds_config.json.

Launch it the way you launch any training job:

    python cifar10_deepspeed.py                                  # one process (CPU or one GPU)
    deepspeed --num_gpus=2 cifar10_deepspeed.py                  # 2 GPUs (2 CPU ranks without GPUs)
    torchrun --nproc-per-node=2 cifar10_deepspeed.py
    accelerate launch --multi_gpu --num_processes 2 cifar10_deepspeed.py   # the Accelerate backend

Options:

    --deepspeed_config PATH   the config (default ds_config.json): DeepSpeed's keys + a "trainer" section
    --data-dir PATH           CIFAR-10 as a folder or .tar.gz (overrides trainer.data.dir)
    --output-dir DIR          where config.json, metrics.jsonl, summary.json go (default runs/<UTC time>-<model>)
    --set KEY=VALUE           override a config key by its dotted path, VALUE parsed as JSON when it can be:
                              --set trainer.epochs=3 --set optimizer.params.lr=0.05 --set bf16.enabled=true
    --backend NAME            auto (default), deepspeed or accelerate; auto picks accelerate under
                              `accelerate launch` or when DeepSpeed is not installed
    --quiet                   no per-epoch lines, no progress bar
    --list-models             print the registered models and their parameter counts

User mistakes (config, data, paths) stop every rank before any work with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

# The script's folder is on sys.path under every launcher, so `models` and `cifar10ds`
# import from the checkout; neither is installed into site-packages (see README).
import models
from cifar10ds.dist import release_shm_buffers
from cifar10ds.errors import DOCTOR_STOPS, EXIT_UNSTABLE, EXIT_USER_ERROR, DiskFullError, UserError, print_line

if TYPE_CHECKING:
    import torch.nn as nn

    from cifar10ds.data import Cifar10
    from cifar10ds.dist import DistInfo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None, metavar="PATH",
                   help="the config: DeepSpeed's keys + a \"trainer\" section (default: ./ds_config.json, "
                        "else the one next to this script)")
    p.add_argument("--data-dir", default=None, metavar="PATH",
                   help="CIFAR-10 as a folder or .tar.gz (official batches or train/<class>/ image folders)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where config.json, metrics.jsonl, summary.json, checkpoints/ go (default runs/<UTC time>-<model>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key by its dotted path; VALUE is parsed as JSON when it can be (repeatable)")
    p.add_argument("--backend", choices=("auto", "deepspeed", "accelerate"), default="auto",
                   help="auto: accelerate under `accelerate launch` or without DeepSpeed installed, else deepspeed")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: the newest committed checkpoint in the output dir (fresh start if none); "
                        "PATH: that checkpoint (or checkpoints folder), which must be intact")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines, no progress bar")
    p.add_argument("--list-models", action="store_true", help="print the registered models and their parameter counts")
    # DeepSpeed's examples pass --deepspeed (deepspeed.add_config_arguments): accepted; DeepSpeed is always the engine
    # unless --backend says otherwise.
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    # Added by the deepspeed launcher; rank comes from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import torch

    from cifar10ds import checkpoint, config, data, dist, engines, optim, plan, tracking
    from cifar10ds.loop import train

    started = time.perf_counter()
    cfg = config.load_config(args.deepspeed_config, args.overrides)  # every rank checks the same file alike
    if args.data_dir is not None:
        cfg.trainer.data.dir = args.data_dir
    t = cfg.trainer
    backend_name = engines.choose_backend(args.backend)
    info, malloc_tuned = dist.start_processes(backend_name, t.dist_timeout_s, t.cpu_keep_freed_memory)
    engines.check_config(backend_name, cfg.ds, cfg.path)  # every key DeepSpeed would refuse, before any work
    cfg.ds = plan.resolve_batch_sizes(cfg.ds, info.world_size)
    if args.resume == "auto" and not (args.output_dir or t.checkpoint.dir):
        raise config.ConfigError("--resume auto looks for checkpoints in the output dir: pass --output-dir DIR "
                                 "(the one the run to continue used), or --resume PATH")
    if dist.max_restarts() and not (args.output_dir or t.checkpoint.dir):
        raise config.ConfigError(f"torchrun --max-restarts={dist.max_restarts()} restarts this command as it is, and "
                                 "the default output dir (runs/<UTC time>-<model>) is new each time: pass --output-dir "
                                 "DIR so that a restarted attempt finds this run's checkpoints")
    out_dir = tracking.output_dir(args.output_dir, t.model, info)
    ds = data.load_for_run(t.data, info)
    torch.manual_seed(t.seed)
    model = models.create_model(t.model, num_classes=ds.num_classes)
    groups = optim.param_groups(model, t.param_groups, cfg.ds["optimizer"].get("params", {}),
                                models.hook(model, "freeze_after_epochs"))
    run_plan = plan.make_plan(cfg, model, groups, len(ds.train_y), info.world_size, backend_name,
                              torch.cuda.is_available())
    cfg = run_plan.config
    init_time = init_from_data(model, ds, t.data.subset_seed, info)
    for message in config.deepspeed_key_typos(cfg.ds):
        dist.warn(message)
    params = models.count_params(model)  # before the engine: ZeRO-3 partitions the parameters
    backend = engines.build_backend(backend_name, model, cfg.ds, warn=dist.warn, groups=groups,
                                    channels_last=cfg.trainer.channels_last, track_norm=t.stability.enabled)
    if t.compile:
        backend.compile(t.compile if isinstance(t.compile, str) else None, None if run_plan.even_batches else True)
    device_data = data.DeviceData.of(ds, backend.device)
    ckpt_dir = Path(t.checkpoint.dir) if t.checkpoint.dir else out_dir / "checkpoints"
    resume = checkpoint.prepare(args.resume, ckpt_dir, t.checkpoint, info, dist.torchrun_job(), dist.restart_count())
    reporter = tracking.open_reporter(cfg.to_json(), t.seed, out_dir, info, args.quiet, backend.device)
    reporter.say(
        f"{t.model} ({params:,} params) | {cfg.precision} | world size {info.world_size} on {backend.device} | "
        f"{run_plan.n_train} train / {len(ds.test_y)} test images | batch {cfg.ds['train_batch_size']} | out {out_dir}"
    )
    result = train(backend, device_data, run_plan, info, reporter, ckpt_dir, resume)
    if result["stop_reason"] != "disk_full":  # a disk that just refused a checkpoint would cut model.pt short
        tracking.save_weights(backend.model_state_dict(), out_dir / "model.pt", info.is_main)
    summary = {
        **result, "resumed_step": resume.meta.get("step") if resume else None, "steps_redone": reporter.steps_redone,
        "restarts": dist.restart_count(), "total_time_s": time.perf_counter() - started, "world_size": info.world_size,
        "backend": backend.name, "precision": cfg.precision, "model": t.model, "params": params, "seed": t.seed,
        "train_images": run_plan.n_train, "model_init_time_s": init_time, "tta_level": t.tta_level,
        "channels_last": cfg.trainer.channels_last, "cpu_keep_freed_memory": malloc_tuned,
        "test_images": len(ds.test_y), "device": tracking.device_name(backend.device),
        "versions": tracking.library_versions(), **tracking.git_commit(), "output_dir": str(out_dir),
        "signal_exit_zero": t.checkpoint.signal_exit_zero,
    }
    reporter.write_json("summary.json", summary, if_room=True)
    reporter.wandb.finish(summary)
    reporter.say(done_line(summary, out_dir))
    return summary


def init_from_data(model: nn.Module, ds: Cifar10, seed: int, info: DistInfo) -> float | None:
    """A model's data-dependent initialisation (airbench94's whitening) from this run's training images, computed
    where training runs, as airbench does; returns its seconds (None: the model has none)."""
    import torch

    from cifar10ds.batches import init_sample, normalize

    init = models.hook(model, "init_from_data")
    if init is None:
        return None
    start = time.perf_counter()
    where = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    init(normalize(ds.train_x[init_sample(len(ds.train_y), seed)].to(where)))
    return time.perf_counter() - start


def done_line(summary: dict, out_dir: Path) -> str:
    if summary["final_val_acc"] is None:  # stopped before the first epoch ended
        return f"done: no epoch finished ({summary['steps']} steps), {out_dir}/summary.json"
    return (f"done: final val_acc {100 * summary['final_val_acc']:.2f}% (best {100 * summary['best_val_acc']:.2f}% "
            f"at epoch {summary['best_epoch']}), train {summary['train_time_s']:.1f}s, {out_dir}/summary.json")


def rank_prefix() -> str:
    """``[rank N] `` before a line every rank prints, when there are several."""
    return f"[rank {os.environ.get('RANK', '0')}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.deepspeed_config is None:  # ./ds_config.json, else the one next to this script
        here = Path("ds_config.json")
        args.deepspeed_config = str(here if here.exists() else Path(__file__).resolve().parent / here)
    if args.list_models:
        for name in models.list_models():
            print(f"{name:<12} {models.count_params(models.create_model(name)):>12,} params")
        return 0
    import torch.distributed as torch_dist

    try:
        summary = run(args)
    except UserError as e:
        print_line(e.report(rank_prefix()))  # one write: a rank's lines never interleave with another's
        if torch_dist.is_initialized():
            # User errors after start-up are raised on every rank at the same point: meet once so
            # that each rank's line is out before the launcher kills the slower ones (a rank that
            # erred alone gives up after 10 s), then skip interpreter teardown, where gloo aborts
            # ("terminate called without an active exception") once a peer has left.
            sys.stdout.flush()
            threading.Timer(10, os._exit, args=(EXIT_USER_ERROR,)).start()
            try:
                torch_dist.barrier()
            except Exception:
                pass
            release_shm_buffers()  # os._exit skips the finally below
            os._exit(EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    finally:
        release_shm_buffers()  # every rank has mapped its peers' buffers at start-up: the names can go
    if torch_dist.is_initialized():
        torch_dist.barrier()  # rank 0 may still be writing summary.json
        torch_dist.destroy_process_group()
    if summary["stop_reason"] == "disk_full":  # every rank says why it stopped, as after a user error
        print_line(f"{rank_prefix()}{DiskFullError.kind}: {summary['error']}")
        return EXIT_USER_ERROR
    if summary["stop_reason"] == "signal" and not summary["signal_exit_zero"]:
        return 128 + signal.Signals[summary["signal"]].value  # the shell's convention: 143 = SIGTERM
    if summary["stop_reason"] in DOCTOR_STOPS:
        return EXIT_UNSTABLE  # a result no one should mistake for a finished run
    return 0


if __name__ == "__main__":
    sys.exit(main())
