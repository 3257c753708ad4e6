"""Many seeds, sweeps and comparisons: the experiment runner behind scripts/experiment.py.

An experiment folder holds one run folder per seed (``runs/seed-0003/``, each a normal trainer
output folder), ``results.csv`` (one row per run), ``report.md``, ``experiment.json`` and PNG plots.
Seeds already finished are skipped, so re-running the same command resumes an experiment; a seed
that fails is reported with its exit code and last error line, and the others still run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cifar10ds.config import apply_override, load_config, read_json
from cifar10ds.dist import free_port
from cifar10ds.errors import DOCTOR_STOPS, EXIT_UNSTABLE, ConfigError
from cifar10ds.stats import success_rate, summarize, verdict, welch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cifar10_deepspeed.py"
FIELDS = ["seed", "status", "exit_code", "final_val_acc", "best_val_acc", "train_time_s", "total_time_s",
          "epochs_run", "stop_reason", "output_dir", "error"]


def parse_seeds(text: str) -> list[int]:
    """``25`` -> 0..24; ``10-14`` -> 10..14; ``1,5,9`` -> those."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",")]
        if "-" in text:
            lo, hi = (int(s) for s in text.split("-"))
            return list(range(lo, hi + 1))
        return list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a count (25), a range (0-24) or a list (1,5,9)") from None


def launcher_command(launcher: str, nproc: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if launcher == "python":
        if nproc != 1:
            raise ConfigError("--launcher python runs one process; use deepspeed or accelerate for --nproc > 1")
        return [sys.executable]
    if launcher == "deepspeed":
        return [str(bin_dir / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={free_port()}"]
    if launcher == "accelerate":
        multi = ["--multi_gpu"] if nproc > 1 else []
        return [str(bin_dir / "accelerate"), "launch", *multi, f"--num_processes={nproc}",
                f"--main_process_port={free_port()}"]
    raise ConfigError(f"--launcher {launcher!r}: choose python, deepspeed or accelerate")


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "Error" in line]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_seed(config: Path, seed: int, run_dir: Path, sets: list[str], launcher: list[str],
             data_dir: str | None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One seed as a normal trainer run (from the caller's working directory, so relative paths in the
    config and the options mean what they mean to a user running the trainer there); its results.csv row."""
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if summary.get("stop_reason") != "signal":
            return _row(seed, summary, run_dir, skipped=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [*launcher, str(SCRIPT), "--deepspeed_config", str(config), "--output-dir", str(run_dir), "--quiet",
           "--resume", "auto", "--set", f"trainer.seed={seed}"]
    for item in sets:
        cmd += ["--set", item]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    log = run_dir / "log.txt"
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, **(env or {})})
    if done.returncode in (0, EXIT_UNSTABLE) and summary_file.is_file():
        return _row(seed, json.loads(summary_file.read_text()), run_dir)
    return {**{k: "" for k in FIELDS}, "seed": seed, "status": "failed", "exit_code": done.returncode,
            "output_dir": str(run_dir), "error": _last_error(log)}


def _row(seed: int, summary: dict[str, Any], run_dir: Path, skipped: bool = False) -> dict[str, Any]:
    """A finished run's row; one the stability doctor stopped (exit code 3) stays a failure when read again."""
    row = {k: "" if summary.get(k) is None else summary[k] for k in FIELDS}
    row.update(seed=seed, status="ok", exit_code=0, output_dir=str(run_dir), error="")
    if summary.get("stop_reason") in DOCTOR_STOPS:
        cause = (summary.get("diagnosis") or {}).get("cause") or summary["stop_reason"]
        row.update(status="failed", exit_code=EXIT_UNSTABLE,
                   error=f"stopped by the stability doctor: {cause} (summary.json has the diagnosis)")
    row["skipped"] = skipped
    return row


def run_experiment(config: Path, seeds: list[int], out: Path, sets: list[str], launcher: str = "python",
                   nproc: int = 1, data_dir: str | None = None, target: float | None = None,
                   say: Any = print) -> list[dict[str, Any]]:
    """Run every seed (skipping finished ones), then write results.csv, report.md and the plots."""
    load_config(config, sets)  # a malformed or invalid config stops here once, before any run
    raw = read_json(config)
    for item in sets:
        apply_override(raw, item)
    # What the runs are: an experiment folder holds runs of one configuration, or resuming it would mix two.
    what = {"config": raw, "launcher": launcher, "nproc": nproc,
            "data_dir": str(Path(data_dir).resolve()) if data_dir else None}
    _check_same_experiment(out, what)
    if raw.get("wandb", {}).get("enabled") and not any(s.startswith("wandb.group=") for s in sets):
        sets = [*sets, f"wandb.group={out.name}"]  # the runs of one experiment share a wandb group
    prefix = launcher_command(launcher, nproc)
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, raw, nproc)
    (out / "experiment.json").write_text(json.dumps({
        "config": str(config.resolve()), "sets": sets, "seeds": seeds, "launcher": launcher, "nproc": nproc,
        "data_dir": data_dir, "target": target, "command": [sys.executable, *sys.argv], "runs": what,
    }, indent=2) + "\n")
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        row = run_seed(config, seed, out / "runs" / f"seed-{seed:04d}", sets, prefix, data_dir)
        rows.append(row)
        if row["status"] == "ok":
            note = "already done" if row.get("skipped") else f"{time.perf_counter() - start:.1f}s"
            say(f"seed {seed}: final val_acc {_percent(row['final_val_acc'])} ({note})")
        else:
            say(f"seed {seed}: FAILED (exit {row['exit_code']}): {row['error']}")
    write_results(out, rows)
    report(out, target, say)
    return rows


def _check_same_experiment(out: Path, what: dict[str, Any]) -> None:
    meta_file = out / "experiment.json"
    before = json.loads(meta_file.read_text()).get("runs") if meta_file.is_file() else None
    if before is None or before == what:
        return
    changed = _differences(before, what)
    raise ConfigError(f"{out} holds runs of another configuration ({'; '.join(changed[:3])}"
                      f"{'; ...' if len(changed) > 3 else ''}): give this one its own --out (the same command "
                      "resumes an experiment; more seeds may be added to it)")


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    """``key: old -> new`` for each dotted key whose value differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k, "(absent)"), new.get(k, "(absent)"), f"{key}.{k}" if key else k)]
    return [] if old == new else [f"{key.removeprefix('config.')}: {json.dumps(old)} -> {json.dumps(new)}"]


def _write_manifest(out: Path, config: dict[str, Any], nproc: int) -> None:
    import torch

    from cifar10ds.tracking import manifest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    (out / "manifest.json").write_text(json.dumps(manifest(config, device, nproc, None), indent=2) + "\n")


def config_diff(config: Path, sets: list[str]) -> list[str]:
    """Each override as ``key: base value -> new value`` against the base config file."""
    base = read_json(config)
    lines = []
    for item in sets:
        key, _, _ = item.partition("=")
        new: dict[str, Any] = {}
        apply_override(new, item)
        node_old: Any = base
        node_new: Any = new
        for part in key.split("."):
            node_old = node_old.get(part, "(absent)") if isinstance(node_old, dict) else "(absent)"
            node_new = node_new[part]
        lines.append(f"`{key}`: {json.dumps(node_old)} → {json.dumps(node_new)}")
    return lines


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_results(out: Path) -> list[dict[str, Any]]:
    path = out / "results.csv"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {out} an experiment folder (made by `experiment.py run`)?")
    with open(path) as f:
        return list(csv.DictReader(f))


def _ok(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r["status"] == "ok" and r[key] not in ("", None)]


def _percent(value: Any) -> str:
    """An accuracy from a row (a fraction; empty when no epoch finished) as a percentage."""
    return "n/a" if value in ("", None) else f"{100 * float(value):.2f}%"


def _fmt(s: Any, scale: float = 1.0, digits: int = 2) -> str:
    if s.n < 2:
        return f"{scale * s.mean:.{digits}f} (n=1)"
    return f"{scale * s.mean:.{digits}f} ± {scale * s.ci_half:.{digits}f}"


def stats_table(rows: list[dict[str, Any]], target: float | None) -> dict[str, Any]:
    acc, tt = _ok(rows, "final_val_acc"), _ok(rows, "train_time_s")
    result: dict[str, Any] = {"n": len(acc), "failed": sum(r["status"] != "ok" for r in rows)}
    if acc:
        result["acc"], result["time"] = summarize(acc), summarize(tt)
        if target is not None:
            result["success"] = success_rate(acc, target)
    return result


def report(out: Path, target: float | None = None, say: Any = print) -> str:
    """Write report.md and the plots for experiment folder ``out``; return the report's text."""
    rows = read_results(out)
    meta = json.loads((out / "experiment.json").read_text()) if (out / "experiment.json").is_file() else {}
    target = target if target is not None else meta.get("target")
    st = stats_table(rows, target)
    manifest = _first_manifest(out, rows)
    lines = [f"## Experiment: {out.name}", "",
             "- **Hypothesis**: (what this experiment tests)",
             f"- **Config**: `{meta.get('config', '?')}`"
             + (("; changed: " + "; ".join(config_diff(Path(meta["config"]), meta["sets"])))
                if meta.get("sets") and Path(meta.get("config", "")).is_file() else ""),
             f"- **Seeds**: {len(rows)} ({st['n']} finished, {st['failed']} failed)",
             f"- **Launcher**: {meta.get('launcher', '?')}, {meta.get('nproc', 1)} process(es)",
             f"- **Hardware**: {manifest.get('device', '?')}; torch {manifest.get('versions', {}).get('torch', '?')}, "
             f"DeepSpeed {manifest.get('versions', {}).get('deepspeed', '?')}",
             "", "**Results** (mean ± 95% CI, Student t)", "",
             "| metric | n | mean | std | 95% CI | min | max |", "|---|---|---|---|---|---|---|"]
    if "acc" in st:
        for name, s, scale, unit in (("final val_acc", st["acc"], 100, "%"), ("train time", st["time"], 1, " s")):
            ci = f"{scale * s.ci_low:.2f} to {scale * s.ci_high:.2f}" if s.n > 1 else "n/a"
            std = f"{scale * s.std:.2f}" if s.n > 1 else "n/a"
            lines.append(f"| {name} ({unit.strip()}) | {s.n} | {scale * s.mean:.2f} | {std} | {ci} | "
                         f"{scale * s.min:.2f} | {scale * s.max:.2f} |")
        if "success" in st:
            lines += ["", f"Success rate (final val_acc ≥ {target}): {round(st['success'] * st['n'])}/{st['n']} "
                          f"= {100 * st['success']:.0f}%"]
    lines += ["", "**Per seed**", "", "| seed | status | final val_acc | best val_acc | train time (s) | note |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['seed']} | ok | {_percent(r['final_val_acc'])} | {_percent(r['best_val_acc'])} | "
                         f"{float(r['train_time_s']):.1f} | {r['stop_reason']} |")
        else:
            lines.append(f"| {r['seed']} | **failed** (exit {r['exit_code']}) | | | | {r['error']} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    plot_runs(out, rows)
    _report_to_wandb(out, meta, st, say)
    if "acc" in st:
        say(f"{out.name}: n={st['n']} final val_acc {_fmt(st['acc'], 100)}%, train time {_fmt(st['time'])} s"
            + (f", success {100 * st['success']:.0f}%" if "success" in st else "")
            + (f", {st['failed']} failed" if st["failed"] else ""))
    else:
        say(f"{out.name}: no run finished ({st['failed']} failed)")
    return text


def _report_to_wandb(out: Path, meta: dict[str, Any], st: dict[str, Any], say: Any) -> None:
    """With wandb enabled in the experiment's config: one more run in its group, holding the plots and
    the statistics. Like every wandb call here, a failure is one warning."""
    config = Path(meta.get("config", ""))
    if not config.is_file():
        return
    raw = read_json(config)
    for item in meta.get("sets", []):
        apply_override(raw, item)
    block = raw.get("wandb", {})
    if not (isinstance(block, dict) and block.get("enabled")):
        return
    try:
        import wandb

        run = wandb.init(project=block.get("project") or "cifar10-deepspeed", entity=block.get("team"),
                         group=block.get("group") or out.name, name=f"{out.name}-report", job_type="report",
                         dir=str(out), config={"experiment": meta})
        images = {name: wandb.Image(str(out / f"{name}.png")) for name in ("curves", "final_acc")
                  if (out / f"{name}.png").is_file()}
        run.log(images)
        if "acc" in st:
            run.summary.update({"n": st["n"], "failed": st["failed"], "acc_mean": st["acc"].mean,
                                "acc_ci_low": st["acc"].ci_low, "acc_ci_high": st["acc"].ci_high,
                                "time_mean": st["time"].mean, **({"success": st["success"]} if "success" in st else {})})
        run.finish()
    except Exception as e:
        say(f"warning: wandb report failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the files are written")


def _first_manifest(out: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's manifest (the device it trained on), else the experiment's own (where the runner ran)."""
    for path in [Path(r["output_dir"]) / "manifest.json" for r in rows] + [out / "manifest.json"]:
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(out: Path, rows: list[dict[str, Any]]) -> None:
    """curves.png: val_acc per epoch of every seed and their mean; final_acc.png: the distribution."""
    curves = []
    for r in rows:
        metrics = Path(r["output_dir"]) / "metrics.jsonl"
        if r["status"] == "ok" and metrics.is_file():
            curves.append([json.loads(line)["val_acc"] for line in metrics.read_text().splitlines() if line])
    if not curves:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        ax.plot(range(1, len(c) + 1), [100 * v for v in c], color="tab:blue", alpha=0.3, lw=1)
    length = min(len(c) for c in curves)
    mean = [100 * sum(c[i] for c in curves) / len(curves) for i in range(length)]
    ax.plot(range(1, length + 1), mean, color="black", lw=2, marker="o", label=f"mean of {len(curves)} seeds")
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=out.name)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    finals = [100 * c[-1] for c in curves]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(finals, bins=max(5, min(30, len(finals))), color="tab:blue", alpha=0.7)
    ax.axvline(sum(finals) / len(finals), color="black", lw=2, label="mean")
    ax.set(xlabel="final validation accuracy (%)", ylabel="seeds", title=f"{out.name}: n={len(finals)}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "final_acc.png", dpi=120)
    plt.close(fig)


def run_sweep(config: Path, key: str, values: list[str], seeds: list[int], out: Path, sets: list[str],
              say: Any = print, **kw: Any) -> list[dict[str, Any]]:
    """Every value x every seed, one experiment folder per value; a row per value in sweep.csv/report.md."""
    table = []
    for value in values:
        sub = out / f"{key}={value}"
        run_experiment(config, seeds, sub, [*sets, f"{key}={value}"], say=say, **kw)
        st = stats_table(read_results(sub), kw.get("target"))
        table.append({"value": value, **st, "dir": sub.name})
    lines = [f"## Sweep: {key}", "", f"Seeds per value: {len(seeds)}", "",
             "| value | n | failed | final val_acc (%) | train time (s) |", "|---|---|---|---|---|"]
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["value", "n", "failed", "acc_mean", "acc_ci_low", "acc_ci_high", "time_mean", "time_ci_low",
                     "time_ci_high"])
        for t in table:
            if "acc" in t:
                a, s = t["acc"], t["time"]
                w.writerow([t["value"], t["n"], t["failed"], a.mean, a.ci_low, a.ci_high, s.mean, s.ci_low, s.ci_high])
                lines.append(f"| {t['value']} | {t['n']} | {t['failed']} | {_fmt(a, 100)} | {_fmt(s)} |")
            else:
                w.writerow([t["value"], 0, t["failed"], "", "", "", "", "", ""])
                lines.append(f"| {t['value']} | 0 | {t['failed']} | | |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    say("\n".join(lines[4:]))
    plot_sweep(out, key, [t for t in table if "acc" in t])
    return table


def plot_sweep(out: Path, key: str, table: list[dict[str, Any]]) -> None:
    if not table:
        return
    plt = _plt()
    labels = [t["value"] for t in table]
    x = range(len(labels))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, name, scale, unit in ((a1, "acc", 100, "final validation accuracy (%)"), (a2, "time", 1, "train time (s)")):
        means = [scale * t[name].mean for t in table]
        errs = [scale * t[name].ci_half if t[name].n > 1 else 0 for t in table]
        ax.errorbar(x, means, yerr=errs, marker="o", capsize=4)
        ax.set_xticks(list(x), labels)
        ax.set(xlabel=key, ylabel=unit)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{out.name}: mean ± 95% CI")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)


def compare(dir_a: Path, dir_b: Path, say: Any = print) -> dict[str, Any]:
    """B against A: difference of means with its 95% CI and Welch's p-value, for accuracy and time."""
    a, b = read_results(dir_a), read_results(dir_b)
    acc_a, acc_b = _ok(a, "final_val_acc"), _ok(b, "final_val_acc")
    if len(acc_a) < 2 or len(acc_b) < 2:
        raise ConfigError(f"compare needs at least 2 finished runs on each side (A: {len(acc_a)}, B: {len(acc_b)})")
    time_a, time_b = _ok(a, "train_time_s"), _ok(b, "train_time_s")
    acc = welch(acc_a, acc_b)
    tim = welch(time_a, time_b)
    n = min(len(acc_a), len(acc_b))
    lines = [f"A: {dir_a} (n={len(acc_a)})", f"B: {dir_b} (n={len(acc_b)})", "",
             "| metric | mean A | mean B | B - A | 95% CI of B - A | p (Welch) |", "|---|---|---|---|---|---|",
             f"| final val_acc (%) | {100 * sum(acc_a) / len(acc_a):.2f} | {100 * sum(acc_b) / len(acc_b):.2f} | "
             f"{100 * acc.diff:+.2f} | {100 * acc.ci_low:+.2f} to {100 * acc.ci_high:+.2f} | {acc.p_value:.3g} |",
             f"| train time (s) | {sum(time_a) / len(time_a):.2f} | {sum(time_b) / len(time_b):.2f} | "
             f"{tim.diff:+.2f} | {tim.ci_low:+.2f} to {tim.ci_high:+.2f} | {tim.p_value:.3g} |",
             "", verdict(acc, tim, n)]
    say("\n".join(lines))
    return {"accuracy": acc, "time": tim, "verdict": lines[-1]}
