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
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

# The script's folder is on sys.path under every launcher, so `models` and `cifar10ds`
# import from the checkout; neither is installed into site-packages (see README).
import models
from cifar10ds.dist import release_shm_buffers
from cifar10ds.errors import DOCTOR_STOPS, EXIT_UNSTABLE, EXIT_USER_ERROR, UserError, print_line


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

    from cifar10ds import checkpoint, dist, engine, tracking
    from cifar10ds import config as config_mod
    from cifar10ds import data as data_mod
    from cifar10ds.averaging import check_own_weights
    from cifar10ds.batches import batches_per_epoch, init_sample, last_batch_size, normalize
    from cifar10ds.loop import DeviceData, train

    started = time.perf_counter()
    # 1. Config: every rank reads and validates the same file, so every rank fails alike.
    cfg = config_mod.load_config(args.deepspeed_config, args.overrides)
    t = cfg.trainer
    if args.data_dir is not None:
        t.data.dir = args.data_dir

    # 2. Processes: one world for every launcher (a world of one without a launcher).
    backend_name = engine.choose_backend(args.backend)
    dist.set_single_process_defaults()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        dist.share_cpu_threads()
        malloc_tuned = t.cpu_keep_freed_memory and dist.keep_freed_memory()
    else:
        malloc_tuned = False
    info = dist.env_info()
    if torch.cuda.is_available():  # before the first collective: NCCL needs each rank on its own GPU
        torch.cuda.set_device(info.local_rank)
        # Every step has the same shapes: let cuDNN time its kernels once and keep the fastest (airbench does
        # the same; it also sets this for the whole process when imported, e.g. by bench.py --vs-airbench).
        torch.backends.cudnn.benchmark = True
    engine.init_processes(backend_name, t.dist_timeout_s)
    cfg.ds = config_mod.resolve_batch_sizes(cfg.ds, info.world_size)

    if args.resume == "auto" and not (args.output_dir or t.checkpoint.dir):
        raise config_mod.ConfigError("--resume auto looks for checkpoints in the output dir: pass --output-dir DIR "
                                     "(the one the run to continue used), or --resume PATH")

    # 3. Output folder and data: prepared once on rank 0, the outcome shared with all ranks.
    out_dir = Path(args.output_dir) if args.output_dir else tracking.default_output_dir(t.model)
    out_dir = Path(dist.on_main_then_share(lambda: tracking.prepare_output_dir(out_dir), info))

    def load() -> data_mod.Cifar10:
        return data_mod.load_cifar10(t.data.dir, t.data.download, t.data.cache_dir)

    loaded: list[data_mod.Cifar10] = []
    dist.on_main_then_share(lambda: loaded.append(load()), info)  # download/decode/cache once
    ds = loaded[0] if loaded else load()  # the other ranks read rank 0's cache
    train_idx = data_mod.balanced_subset(ds.train_y, t.data.train_limit, t.data.subset_seed)
    test_idx = data_mod.balanced_subset(ds.test_y, t.data.test_limit, t.data.subset_seed)

    # 4. Steps: "auto" schedule lengths follow from the data size and the world size.
    n_train = len(ds.train_y) if train_idx is None else len(train_idx)
    micro = cfg.ds["train_micro_batch_size_per_gpu"]
    torch.manual_seed(t.seed)
    model = models.create_model(t.model, num_classes=ds.num_classes)
    per_epoch = batches_per_epoch(n_train, info.world_size, micro, t.data.drop_last)
    if per_epoch == 0:
        raise config_mod.ConfigError(
            f"trainer.data.drop_last=true leaves no training batch: each rank holds {math.ceil(n_train / info.world_size)} "
            f"images per epoch, fewer than one micro batch of {micro}; set trainer.data.drop_last=false or use more images"
        )
    if models.has_batchnorm(model) and last_batch_size(n_train, info.world_size, micro, t.data.drop_last) == 1:
        raise config_mod.ConfigError(
            f"each rank's last training batch would hold 1 image ({n_train} images, world size {info.world_size}, "
            f"micro batch {micro}) and BatchNorm cannot train on one; change trainer.data.train_limit or the batch size"
        )
    init_time = None
    if hasattr(model, "init_from_data"):  # e.g. airbench94's whitening filters, from this run's training images
        init_start = time.perf_counter()
        sample = init_sample(n_train if train_idx is None else train_idx, t.data.subset_seed)
        # Computed where training runs, as airbench does (0.47-0.49 s on 2 CPU cores; not yet timed on a GPU);
        # the filters are copied back into the model on the host, which waits for the device.
        where = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        model.init_from_data(normalize(ds.train_x[sample].to(where)))
        init_time = time.perf_counter() - init_start
    groups = engine.param_groups(model, t.param_groups, cfg.ds["optimizer"].get("params", {}))
    cfg.ds = config_mod.resolve_schedule(cfg.ds, t, per_epoch,
                                         engine.group_lrs(groups, cfg.ds["optimizer"].get("params", {})))
    master_weights = backend_name == "deepspeed" and (
        (cfg.precision != "fp32" and not cfg.autocast) or bool(cfg.ds.get("zero_optimization", {}).get("stage")))
    blind = engine.channels_last_blind_optimizer(backend_name, cfg.ds["optimizer"], torch.cuda.is_available())
    t.channels_last = engine.resolve_channels_last(t.channels_last, torch.cuda.is_available(), cfg.precision != "fp32",
                                                   master_weights, blind)
    check_own_weights(master_weights, t.lookahead.enabled, t.channels_last)

    # 5. Engine: optimizer, scheduler and precision are built from the resolved config.
    def warn_main(message: str) -> None:
        if info.is_main:
            print(message, file=sys.stderr, flush=True)

    for message in config_mod.deepspeed_key_typos(cfg.ds):
        warn_main(message)
    params = models.count_params(model)  # before the engine: ZeRO-3 partitions the parameters
    backend = engine.build_backend(backend_name, model, cfg.ds, warn=warn_main, groups=groups,
                                   channels_last=t.channels_last)
    if t.compile:
        backend.compile(t.compile if isinstance(t.compile, str) else None)
    device = backend.device

    def on_device(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return (x if idx is None else x[idx]).to(device)

    data = DeviceData(
        on_device(ds.train_x, train_idx), on_device(ds.train_y, train_idx),
        on_device(ds.test_x, test_idx), on_device(ds.test_y, test_idx),
    )
    ckpt_dir = Path(t.checkpoint.dir) if t.checkpoint.dir else out_dir / "checkpoints"

    def check_checkpoint_dir() -> None:
        if not args.resume and checkpoint.committed(ckpt_dir):
            raise config_mod.ConfigError(
                f"{ckpt_dir} already holds checkpoints of an earlier run: continue it with --resume auto, "
                "or start this run in another --output-dir"
            )
        if t.checkpoint.every_epochs or t.checkpoint.every_steps or t.checkpoint.save_best:
            tracking.prepare_output_dir(ckpt_dir)

    dist.on_main_then_share(check_checkpoint_dir, info)
    resume = None
    if args.resume:
        resume = dist.on_main_then_share(lambda: checkpoint.resolve_resume(args.resume, ckpt_dir, warn_main), info)
        if resume is None and info.is_main:
            print(f"no committed checkpoint in {ckpt_dir}: starting fresh", file=sys.stderr)
    wandb = tracking.WandbLogger(cfg.ds.get("wandb"), info.is_main, out_dir, warn_main)
    reporter = tracking.Reporter(out_dir, info.is_main, args.quiet, wandb, run_config=cfg.to_json())
    reporter.write_json("config.json", cfg.to_json())
    reporter.write_json("manifest.json", tracking.manifest(cfg.to_json(), device, info.world_size, t.seed))
    reporter.say(
        f"{t.model} ({params:,} params) | {cfg.precision} | world size {info.world_size} on {device} | "
        f"{n_train} train / {len(data.test_y)} test images | batch {cfg.ds['train_batch_size']} | out {out_dir}"
    )

    # 6. Train, then report.
    result = train(backend, data, cfg, info, reporter, ckpt_dir, resume)
    weights = backend.model_state_dict()
    if info.is_main:
        # fp32 whatever the training precision, so the file loads into a fresh model as is
        torch.save({k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                    for k, v in weights.items()}, out_dir / "model.pt")
    summary = {
        **result,
        "total_time_s": time.perf_counter() - started,
        "world_size": info.world_size,
        "backend": backend.name,
        "precision": cfg.precision,
        "model": t.model,
        "params": params,
        "seed": t.seed,
        "train_images": n_train,
        "model_init_time_s": init_time,
        "tta_level": t.tta_level,
        "channels_last": t.channels_last,
        "cpu_keep_freed_memory": malloc_tuned,
        "test_images": len(data.test_y),
        "device": tracking.device_name(device),
        "versions": tracking.library_versions(),
        **tracking.git_commit(),
        "output_dir": str(out_dir),
        "signal_exit_zero": t.checkpoint.signal_exit_zero,
    }
    reporter.write_json("summary.json", summary)
    wandb.finish(summary)
    if summary["final_val_acc"] is None:  # stopped before the first epoch ended
        reporter.say(f"done: no epoch finished ({summary['steps']} steps), {out_dir}/summary.json")
    else:
        reporter.say(
            f"done: final val_acc {100 * summary['final_val_acc']:.2f}% (best {100 * summary['best_val_acc']:.2f}% "
            f"at epoch {summary['best_epoch']}), train {summary['train_time_s']:.1f}s, {out_dir}/summary.json"
        )
    return summary


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
        rank = os.environ.get("RANK", "0")
        prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print_line(f"{prefix}{e.kind}: {e}")
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
    if summary["stop_reason"] == "signal" and not summary["signal_exit_zero"]:
        return 128 + signal.Signals[summary["signal"]].value  # the shell's convention: 143 = SIGTERM
    if summary["stop_reason"] in DOCTOR_STOPS:
        return EXIT_UNSTABLE  # a result no one should mistake for a finished run
    return 0


if __name__ == "__main__":
    sys.exit(main())
