"""Everything a run reports: the per-epoch console line, the progress bar, and the output files
(config.json, metrics.jsonl, steps.jsonl, summary.json). Only the main rank reports."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cifar10ds.dist import DistInfo, on_main_then_share, warn
from cifar10ds.errors import ConfigError
from cifar10ds.estimate import duration

REPO = Path(__file__).resolve().parent.parent
PROGRESS = "progress.json"  # the last step trained, rewritten in place every step: what a resume has to redo


def default_output_dir(model: str) -> Path:
    return Path("runs") / f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{model}"


def output_dir(requested: str | None, model: str, info: DistInfo) -> Path:
    """The run's output folder (``--output-dir``, else runs/<UTC time>-<model>), made and checked once by rank 0."""
    path = Path(requested) if requested else default_output_dir(model)
    return Path(on_main_then_share(lambda: prepare_output_dir(path), info))


def open_reporter(config: dict[str, Any], seed: int, out_dir: Path, info: DistInfo, quiet: bool,
                  device: torch.device) -> Reporter:
    """The run's reporter (wandb started later, on the main rank), with config.json and manifest.json written."""
    wandb = WandbLogger(config.get("wandb"), info.is_main, out_dir, warn)
    reporter = Reporter(out_dir, info.is_main, quiet, wandb, run_config=config)
    reporter.write_json("config.json", config)
    reporter.write_json("manifest.json", manifest(config, device, info.world_size, seed))
    return reporter


def save_weights(weights: dict[str, torch.Tensor], path: Path, is_main: bool) -> None:
    """model.pt: fp32 whatever the training precision, so the file loads into a fresh model as is."""
    if is_main:
        torch.save({k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                    for k, v in weights.items()}, path)


def prepare_output_dir(path: Path) -> str:
    """Create ``path`` (or accept an existing one) and prove it is writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output dir {path} is not writable ({e.strerror}); pass --output-dir DIR") from None
    return str(path)


class Reporter:
    def __init__(self, out_dir: str | Path, is_main: bool, quiet: bool = False, wandb: WandbLogger | None = None,
                 run_config: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.is_main = is_main
        self.quiet = quiet
        self.wandb = wandb or WandbLogger(None, False, self.out_dir, warn)
        self.run_config = run_config or {}
        self.wandb_id: str | None = None
        self.bar: Any = None  # the epoch's progress bar while it is shown
        self.bar_desc = ""
        self.steps_redone: int | None = None  # after a resume: steps the stopped run had trained past its checkpoint
        self._progress: int | None = None  # PROGRESS's file descriptor (main rank)

    def start(self) -> None:
        """A fresh run: empty metric files."""
        if self.is_main:
            for name in ("metrics.jsonl", "steps.jsonl"):
                (self.out_dir / name).write_text("")
            self._open_progress()
        self.wandb_id = self.wandb.start(self.run_config, self.out_dir.name)

    def resume(self, history: list[dict[str, Any]], step: int, wandb_id: str | None = None) -> None:
        """A resumed run: the metric files hold exactly what the checkpoint had seen, no more."""
        self.wandb_id = self.wandb.start(self.run_config, self.out_dir.name, wandb_id)
        self.rewind(history, step)
        if self.is_main:
            try:
                reached = json.loads((self.out_dir / PROGRESS).read_text())["step"]
                self.steps_redone = max(0, reached - step)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # no record (an older run, or another output folder): unknown
            self._open_progress()

    def _open_progress(self) -> None:
        try:
            self._progress = os.open(self.out_dir / PROGRESS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError:
            self._progress = None

    def reached(self, step: int) -> None:
        """Record that ``step`` is done: one small write in place per step, no flush (it outlives a killed process)."""
        if self._progress is not None:
            with contextlib.suppress(OSError):  # a record only: never worth stopping the run for
                os.pwrite(self._progress, json.dumps({"step": step}).ljust(39).encode() + b"\n", 0)

    def rewind(self, history: list[dict[str, Any]], step: int) -> None:
        """Cut metrics.jsonl and steps.jsonl back to what a checkpoint at ``step`` had seen."""
        if not self.is_main:
            return
        (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        steps_file = self.out_dir / "steps.jsonl"
        kept = []
        if steps_file.is_file():
            for line in steps_file.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line torn by the kill that made this resume necessary
        steps_file.write_text("".join(line + "\n" for line in kept))

    def say(self, line: str) -> None:
        if self.is_main and not self.quiet:
            print(line, flush=True)

    def write_json(self, name: str, obj: Any, if_room: bool = False) -> None:
        """Write ``name`` atomically; ``if_room``: on a full disk, leave nothing and warn instead of raising."""
        if self.is_main:
            tmp = self.out_dir / f".{name}.tmp"
            try:
                tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
                tmp.replace(self.out_dir / name)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                if not (if_room and e.errno in (errno.ENOSPC, errno.EDQUOT)):
                    raise
                warn(f"warning: {name} not written: no space left in {self.out_dir}")

    def append_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self.is_main and rows:
            with open(self.out_dir / name, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    def progress(self, total: int, desc: str, initial: int = 0, left_s: float | None = None) -> Any | None:
        """A tqdm bar within the epoch, only on the main rank of an interactive terminal; ``left_s``: the run's
        estimated seconds left, shown after ``desc``."""
        self.bar = None
        if not self.is_main or self.quiet or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        self.bar_desc = desc
        self.bar = tqdm(total=total, initial=initial, desc=bar_text(desc, left_s), leave=False, dynamic_ncols=True,
                        file=sys.stderr)
        return self.bar

    def estimate(self, lines: list[str], left_s: float) -> None:
        """The run's estimate: its lines once on the console (above the bar), the time left in the bar under way."""
        if not self.is_main or self.quiet:
            return
        if self.bar is None:
            for line in lines:
                print(line, flush=True)
            return
        from tqdm import tqdm

        for line in lines:
            tqdm.write(line, file=sys.stdout)  # clears the bar, writes, draws it again
        self.bar.set_description(bar_text(self.bar_desc, left_s))

    def epoch(self, m: dict[str, Any], total_epochs: int, steps: list[dict[str, Any]]) -> None:
        self.append_jsonl("metrics.jsonl", [m])
        self.append_jsonl("steps.jsonl", steps)
        self.wandb.log(m, steps)
        gn = "n/a" if m["grad_norm"] is None else f"{m['grad_norm']:.3g}"
        loss = "n/a" if m["train_loss"] is None else f"{m['train_loss']:.4f}"
        self.say(
            f"Epoch [{m['epoch']}/{total_epochs}] loss {loss} val_acc {100 * m['val_acc']:.2f}% "
            f"lr {m['lr']:.4g} grad_norm {gn} {m['epoch_time_s']:.1f}s total {m['elapsed_s']:.1f}s"
        )


def bar_text(desc: str, left_s: float | None) -> str:
    """The progress bar's description: the epoch, and the run's time left once estimated."""
    return desc if left_s is None else f"{desc} (run: {duration(left_s)} left)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"git_commit": commit, "git_dirty": dirty}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "numpy", "pydantic", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


class WandbLogger:
    """wandb on the main rank, configured by DeepSpeed's own ``"wandb"`` block
    (``enabled``, ``project``, ``group``, ``team``).

    Never required for a run to succeed: with ``enabled: false`` wandb is not even imported; any
    failure (no API key, no network, a crash inside wandb) prints one warning and logging stops,
    while training goes on. ``WANDB_MODE=offline`` works without an account.
    """

    def __init__(self, block: dict[str, Any] | None, is_main: bool, out_dir: Path, warn: Any) -> None:
        self.block = block or {}
        self.enabled = bool(is_main and self.block.get("enabled"))
        self.out_dir = out_dir
        self.warn = warn
        self.run: Any = None

    def _fail(self, what: str, error: BaseException) -> None:
        self.warn(f"warning: wandb {what} failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                  "training continues without wandb")
        self.run = None
        self.enabled = False

    def start(self, config: dict[str, Any], name: str, run_id: str | None = None) -> str | None:
        """Start (or, with ``run_id``, continue) the run; return its id for the checkpoint."""
        if not self.enabled:
            return None
        try:
            import wandb

            self.run = wandb.init(
                project=self.block.get("project") or "cifar10-deepspeed",
                group=self.block.get("group"),
                entity=self.block.get("team"),
                name=name,
                id=run_id,
                resume="allow" if run_id else None,
                dir=str(self.out_dir),
                config=config,
            )
            return self.run.id
        except Exception as e:  # wandb raises many kinds; none may stop training
            self._fail("init", e)
            return None

    def log(self, epoch_row: dict[str, Any], step_rows: list[dict[str, Any]]) -> None:
        if self.run is None:
            return
        try:
            for row in step_rows:
                data = {"train/step_loss": row["loss"]}
                for key in ("grad_norm", "lr", "loss_scale"):
                    if key in row:
                        data[f"train/{key}"] = row[key]
                self.run.log(data, step=row["step"])
            self.run.log({f"epoch/{k}": v for k, v in epoch_row.items() if isinstance(v, (int, float))},
                         step=epoch_row["step"])
        except Exception as e:
            self._fail("log", e)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
            self.run.finish()
        except Exception as e:
            self._fail("finish", e)


def manifest(config: dict[str, Any], device: torch.device, world_size: int, seed: int | None) -> dict[str, Any]:
    """What a figure needs to be reproduced: versions, hardware, code and config identity, command line."""
    import hashlib

    info: dict[str, Any] = {
        "versions": library_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_name(device),
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 1,
        "world_size": world_size,
        **git_commit(),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "seed": seed,
        "command": [sys.executable, *sys.argv],
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    return info
