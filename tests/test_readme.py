"""Every command in README.md runs as printed, in a fresh copy of the checkout, on a small generated data set.

The commands: each ```bash block (its commands in order, in one checkout), each ``$ command`` of a plain block with
the output printed under it, and each inline `command` that runs a script or make/pip/wandb.

What is rewritten to run small here, and nothing else (by option name, the same for every command):
- a command that trains (cifar10_deepspeed.py, make train, scripts/experiment.py run|sweep, scripts/bench.py) gets
  SMALL appended: --data-dir the fixture (replacing the one it names), one epoch, batches of 100 (the speed preset
  trains on full batches of 1024 only) and trainer.warmup_epochs=null (a warmup counted in epochs outlasts one epoch);
- counts: --seeds N -> 2 for experiment.py (a CI needs two), 1 for bench.py; bench_cpu.py gets --rounds 1,
  --wait-quiet 0 (this machine is never quiet) and --images 200 (the fixture's size);
- programs: python is this interpreter, deepspeed/torchrun/accelerate the launchers next to it, each on a free port
  (other runs here may hold the default one); make gets VENV=this interpreter's environment and -o on its set-up
  stamp (the set-up installs from PyPI);
- the placeholder PATH (a data dir) is the fixture.
Commands that cannot run here are in SKIPPED, with the reason.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli_env, free_port, run_bounded, tiny_dataset

pytestmark = pytest.mark.slow
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
VENV = BIN.parent

SKIPPED = {
    "make test": "the whole test suite (tens of minutes), this test among it",
    "make gpu-test": "needs a CUDA GPU",
    "scripts/gpu_check.sh gpu-check/ --data data/cifar10-jpeg.tar.gz": "the GPU kit needs a CUDA GPU (its --dry-run "
                                                                        "runs in tests/test_bench.py)",
    "pip install .": "installs into an environment from PyPI (make's set-up step)",
    "wandb sync": "uploads to wandb's servers (online)",
    "python scripts/bench.py --config configs/speedrun94.json --seeds 10 --data-dir cifar10-jpeg.tar.gz --vs-airbench":
        "needs the airbench package (pip install airbench), which is not a dependency",
}
# What a command must end with, where not exit 0.
EXPECTED_EXIT = {"configs/unstable_adam_nobn.json": (0, 3)}  # the doctor's demo: it may stop it (3) on any data
TRAINS = ("cifar10_deepspeed.py", "scripts/experiment.py run", "scripts/experiment.py sweep", "scripts/bench.py --c",
          "scripts/bench.py --s", "make train")


def readme_commands() -> list[tuple[str, list[tuple[str, list[str] | None]]]]:
    """(case name, [(command, the output printed under it or None)]) in the README's order."""
    text = README.read_text()
    cases = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if lang == "bash":
            commands = [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
            commands = [c for c in commands if c and not c.startswith("#")]
            cases.append((f"block: {commands[0]}", [(c, None) for c in commands]))
        for m in re.finditer(r"^\$ (.+)\n((?:(?!\$ ).*\n?)*)", block if not lang else "", flags=re.M):
            cases.append((m.group(1), [(m.group(1), m.group(2).strip().splitlines())]))
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"(python|deepspeed|torchrun|accelerate launch) .*\.py\b|(make|pip|wandb) \S", span):
            cases.append((span, [(span, None)]))
    return cases


def test_the_readme_has_its_commands():
    """The extraction finds what a reader sees: the make targets, the four launchers, the scripts."""
    commands = [c for _, cmds in readme_commands() for c, _ in cmds]
    for expected in ("make train", "deepspeed --num_gpus=2 cifar10_deepspeed.py", "torchrun --nproc-per-node=2 "
                     "cifar10_deepspeed.py", "python scripts/experiment.py compare", "python scripts/bench.py --merge",
                     "python cifar10_deepspeed.py --set trainer.modle=bn_cnn"):
        assert any(c.startswith(expected) for c in commands), expected
    assert all(skipped in commands for skipped in SKIPPED), "a skipped command left the README: drop it from SKIPPED"


def rewrite(command: str, data: Path) -> list[str]:
    """The command as it runs here (see the module docstring)."""
    argv = shlex.split(command)
    program, args = argv[0], argv[1:]
    small = ["--data-dir", str(data), "--set", "trainer.epochs=1", "--set", "train_batch_size=100",
             "--set", "trainer.warmup_epochs=null"]
    args = [str(data) if a == "PATH" else a for a in args]
    if any(t in command for t in TRAINS) and program != "make":
        args = drop_option(args, "--data-dir") + small
    if "scripts/experiment.py" in command or "scripts/bench.py" in command:
        args = replace_value(args, "--seeds", "2" if "experiment.py" in command else "1")
    if "scripts/bench_cpu.py" in command:
        args = replace_value(replace_value(drop_option(args, "--data-dir"), "--rounds", "1"), "--wait-quiet", "0")
        args += ["--data-dir", str(data), "--images", "200"]
    if program == "python":
        return [sys.executable, *args]
    if program == "deepspeed":
        return [str(BIN / "deepspeed"), f"--master_port={free_port()}", *args]
    if program == "torchrun":
        return [str(BIN / "torchrun"), f"--master-port={free_port()}", *args]
    if program == "accelerate":
        return [str(BIN / "accelerate"), args[0], f"--main_process_port={free_port()}", *args[1:]]
    if program == "make":
        extra = [a for a in args if a.startswith("ARGS=")]
        targets = [a for a in args if not a.startswith("ARGS=")]
        make_args = " ".join([*(a.removeprefix("ARGS=") for a in extra), *map(shlex.quote, small)])
        stamp = VENV / "bin" / ".installed"
        return ["make", "-o", str(stamp), f"VENV={VENV}", *targets,
                *([f"ARGS={make_args}"] if "train" in targets else [])]
    return [program, *args]


def drop_option(args: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def replace_value(args: list[str], name: str, value: str) -> list[str]:
    return [value if i and args[i - 1] == name else a for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The files a fresh clone of this checkout has (tracked, and new files not yet committed), nothing else: no
    .venv, no data, no runs."""
    out = tmp_path_factory.mktemp("clone") / "cifar10-deepspeed"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if name == ".venv" or not src.is_file():  # a symlinked environment; a file deleted but not yet committed
            continue
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / name)
    return out


def digests(root: Path, names: list[str] | None = None) -> dict[str, str | None]:
    """sha256 of each of ``names`` (default: every file but Python's caches), None where it is gone."""
    if names is None:
        names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() if (root / n).is_file() else None for n in names}


CASES = readme_commands()


@pytest.mark.parametrize("name, commands", CASES, ids=[name[:60] for name, _ in CASES])
def test_readme_command(name, commands, clone, fixture_data, tmp_path):
    runnable = [(c, out) for c, out in commands if c not in SKIPPED]
    if not runnable:
        pytest.skip(SKIPPED[commands[0][0]])
    before = digests(clone)
    env = cli_env(tmp_path)
    for command, printed in runnable:
        argv = rewrite(command, fixture_data)
        r = run_bounded(argv, clone, env, timeout=600)
        assert "Traceback" not in r.stderr, f"{command}\n{r.stderr[-3000:]}"
        if printed is not None:  # the output the README shows under it
            assert r.returncode == 2 and r.stderr.splitlines() == printed, f"{command}\n{r.stderr[-3000:]}"
            continue
        allowed = next((codes for key, codes in EXPECTED_EXIT.items() if key in command), (0,))
        assert r.returncode in allowed, f"{command} -> {' '.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert digests(clone, list(before)) == before, "a command changed or deleted files of the checkout"
