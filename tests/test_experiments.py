"""The experiment runner end to end on small generated data, and its statistics on known numbers."""

import csv
import json

import pytest

from cifar10ds import experiments
from cifar10ds.errors import ConfigError
from cifar10ds.stats import welch

CONFIG = {
    "train_batch_size": 20,
    "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
    "trainer": {"model": "bn_cnn", "epochs": 1, "checkpoint": {"every_epochs": None},
                "data": {"download": False}},
}


@pytest.mark.parametrize("text, seeds", [("3", [0, 1, 2]), ("10-12", [10, 11, 12]), ("1,5,9", [1, 5, 9])])
def test_parse_seeds(text, seeds):
    assert experiments.parse_seeds(text) == seeds


def test_bad_seeds():
    with pytest.raises(ConfigError, match="--seeds 'x': expected a count"):
        experiments.parse_seeds("x")



def png_ok(path):
    blob = path.read_bytes()
    return blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 8000


@pytest.mark.slow
def test_run_reports_and_resumes(tmp_path, config, data, monkeypatch):
    monkeypatch.setenv("CIFAR10DS_CACHE", str(tmp_path / "cache"))
    out, said = tmp_path / "exp", []
    rows = experiments.run_experiment(config, [0, 1], out, ["trainer.epochs=2"], data_dir=str(data), target=0.5,
                                      say=said.append)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in table] == [0, 1]
    for r in table:
        summary = json.loads((out / "runs" / f"seed-{int(r['seed']):04d}" / "summary.json").read_text())
        assert float(r["final_val_acc"]) == summary["final_val_acc"] and summary["seed"] == int(r["seed"])
        assert summary["epochs_run"] == 2
    text = (out / "report.md").read_text()
    assert "| final val_acc (%) | 2 |" in text and "Seeds**: 2 (2 finished, 0 failed)" in text
    assert "Success rate (final val_acc ≥ 0.5): 2/2 = 100%" in text
    assert "changed: `trainer.epochs`: 1 → 2" in text  # the diff against the base config
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["torch"] and "git_commit" in manifest and manifest["device_count"] >= 1
    assert png_ok(out / "curves.png") and png_ok(out / "final_acc.png")
    assert said[-1].startswith("exp: n=2 final val_acc")
    # Running it again skips finished seeds; a new seed is added to the same experiment.
    said.clear()
    experiments.run_experiment(config, [0, 1, 2], out, ["trainer.epochs=2"], data_dir=str(data), say=said.append)
    assert said[0].endswith("(already done)") and said[1].endswith("(already done)")
    assert not said[2].endswith("(already done)")
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 3


@pytest.mark.slow
def test_a_failed_seed_is_reported_and_the_rest_run(tmp_path, config, data, monkeypatch):
    monkeypatch.setenv("CIFAR10DS_CACHE", str(tmp_path / "cache"))
    out, said = tmp_path / "exp", []
    blocked = out / "runs" / "seed-0001"
    blocked.mkdir(parents=True)
    (blocked / "checkpoints").write_text("a file where the checkpoint folder goes")
    rows = experiments.run_experiment(config, [0, 1, 2], out, ["trainer.checkpoint.every_epochs=1"],
                                      data_dir=str(data), say=said.append)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["exit_code"] == 2 and "checkpoints is not writable" in rows[1]["error"]
    assert "seed 1: FAILED (exit 2)" in said[1]
    text = (out / "report.md").read_text()
    assert "Seeds**: 3 (2 finished, 1 failed)" in text and "| 1 | **failed** (exit 2) |" in text


@pytest.mark.slow
def test_a_seed_the_doctor_stopped_stays_failed_and_the_experiment_keeps_its_config(tmp_path, config, data, monkeypatch):
    monkeypatch.setenv("CIFAR10DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CIFAR10DS_FAULT", "nan@2")  # the loss of step 2 is NaN: the doctor stops the run (exit 3)
    out, sets = tmp_path / "exp", ["trainer.stability.on_nonfinite=stop"]
    for _ in range(2):  # the second time it reads the seed's summary instead of training it again
        said = []
        rows = experiments.run_experiment(config, [0], out, sets, data_dir=str(data), say=said.append)
        assert (rows[0]["status"], rows[0]["exit_code"], rows[0]["final_val_acc"]) == ("failed", 3, "")
        assert rows[0]["error"] == ("stopped by the stability doctor: nonfinite_loss (summary.json has the "
                                    "diagnosis)")
        assert said[0].startswith("seed 0: FAILED (exit 3): stopped by the stability doctor")
        assert "Seeds**: 1 (0 finished, 1 failed)" in (out / "report.md").read_text()
    assert said[-1] == "exp: no run finished (1 failed)"
    # Another configuration in the same folder would be mixed with these runs: refused before any run.
    with pytest.raises(ConfigError, match=r"exp holds runs of another configuration \(optimizer.params.lr: 0.05 -> "
                                          r"0.01\): give this one its own --out"):
        experiments.run_experiment(config, [0, 1], out, [*sets, "optimizer.params.lr=0.01"], data_dir=str(data))
    # An invalid --set stops once, before the first seed (not once per seed).
    with pytest.raises(ConfigError, match="trainer.epochs"):
        experiments.run_experiment(config, [0, 1], tmp_path / "bad", ["trainer.epochs=-1"], data_dir=str(data))
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_relative_paths_are_the_callers(tmp_path, data):
    """From any working directory, --config, --out and --data-dir mean what they mean there."""
    import shutil
    import subprocess
    import sys

    from tests.helpers import ROOT, cli_env

    here = tmp_path / "work"
    here.mkdir()
    (here / "c.json").write_text(json.dumps(CONFIG))
    shutil.copytree(data, here / "mydata")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "experiment.py"), "run", "--config", "c.json",
                        "--seeds", "1", "--out", "exp", "--data-dir", "mydata"], cwd=here, env=cli_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((here / "exp" / "runs" / "seed-0000" / "summary.json").read_text())
    assert summary["final_val_acc"] > 0
    resolved = json.loads((here / "exp" / "runs" / "seed-0000" / "config.json").read_text())
    assert (here / resolved["trainer"]["data"]["dir"]).resolve() == (here / "mydata").resolve()
    meta = json.loads((here / "exp" / "experiment.json").read_text())
    assert meta["config"] == str((here / "c.json").resolve())  # `experiment.py report` works from anywhere


@pytest.mark.slow
def test_sweep_two_values_two_seeds(tmp_path, config, data, monkeypatch):
    monkeypatch.setenv("CIFAR10DS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    table = experiments.run_sweep(config, "optimizer.params.lr", ["0.02", "0.08"], [0, 1], out, [],
                                  data_dir=str(data), say=lambda *_: None)
    assert [t["value"] for t in table] == ["0.02", "0.08"] and all(t["n"] == 2 for t in table)
    lrs = {json.loads((out / "optimizer.params.lr=0.08" / "runs" / "seed-0000" / "config.json").read_text())
           ["optimizer"]["params"]["lr"]}
    assert lrs == {0.08}
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["value"] for r in rows] == ["0.02", "0.08"] and all(int(r["n"]) == 2 for r in rows)
    assert "| 0.08 | 2 | 0 |" in (out / "report.md").read_text()
    assert png_ok(out / "sweep.png")


def write_results(folder, accs, times):
    folder.mkdir(parents=True)
    rows = [{"seed": i, "status": "ok", "final_val_acc": a, "train_time_s": t, "output_dir": str(folder / f"r{i}")}
            for i, (a, t) in enumerate(zip(accs, times))]
    experiments.write_results(folder, rows)


def test_compare_on_known_numbers(tmp_path):
    a_acc, a_time = [0.940, 0.942, 0.938, 0.941], [10.0, 10.3, 9.8, 10.1]
    b_acc, b_time = [0.941, 0.939, 0.940, 0.942], [8.1, 8.0, 7.9, 8.2]
    write_results(tmp_path / "a", a_acc, a_time)
    write_results(tmp_path / "b", b_acc, b_time)
    said = []
    result = experiments.compare(tmp_path / "a", tmp_path / "b", say=said.append)
    ref = welch(a_acc, b_acc)
    assert result["accuracy"].p_value == pytest.approx(ref.p_value)
    assert result["verdict"].startswith("B vs A: faster") and "no accuracy difference detected at n=4" in result["verdict"]
    assert "| final val_acc (%) | 94.02 | 94.05 | +0.02 |" in said[0]  # 94.025 rounds down in binary
    assert "| train time (s) | 10.05 | 8.05 | -2.00 | -2.31 to -1.69 |" in said[0]


def test_compare_needs_two_runs_each(tmp_path):
    write_results(tmp_path / "a", [0.9], [1.0])
    write_results(tmp_path / "b", [0.9, 0.91], [1.0, 1.1])
    with pytest.raises(ConfigError, match="at least 2 finished runs on each side"):
        experiments.compare(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_experiment_report_goes_to_wandb_in_the_experiments_group(tmp_path, config, data, monkeypatch):
    monkeypatch.setenv("CIFAR10DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "exp"
    experiments.run_experiment(config, [0], out, ["wandb.enabled=true"], data_dir=str(data), say=lambda *_: None)
    # The seed's own wandb run and the report run, both grouped under the experiment's name.
    (seed_run,) = (out / "runs" / "seed-0000" / "wandb").glob("offline-run-*/run-*.wandb")
    (report_run,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    from tests.helpers import wandb_records

    for path, name in ((seed_run, "seed-0000"), (report_run, "exp-report")):
        run = next(r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run")
        assert (run.run_group, run.display_name) == ("exp", name)
    images = list((out / "wandb").glob("offline-run-*/files/media/images/*.png"))
    assert {p.name.split("_")[0] for p in images} >= {"curves", "final"}
