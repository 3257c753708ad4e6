"""No code runs from a checkpoint or a data file: files made as an attacker would make them, fed to the trainer through
every path that loads them (docs/reliability.md, "Security")."""

import hashlib
import json
import os
import pickle
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch

from cifar10ds import data as data_mod
from cifar10ds.checkpoint import MARKER, check_types
from cifar10ds.data import load_cifar10
from cifar10ds.errors import ConfigError, DataError
from cifar10ds.unpickling import ForbiddenType, foreign_types, load_batch, weights_only_loads
from tests.helpers import make_images, run_cli, write_batches, write_targz
from tests.test_e2e import assert_user_error
from tests.test_reliability import CONFIG as RELIABILITY_CONFIG
from tests.test_reliability import launch

CONFIG = {**RELIABILITY_CONFIG, "trainer": {**RELIABILITY_CONFIG["trainer"], "epochs": 1}}  # 10 steps


class RunsCode:
    """An attacker's payload: unpickling it calls os.system, which creates the file ``proof``."""

    def __init__(self, proof):
        self.proof = proof

    def __reduce__(self):
        return os.system, (f"touch {self.proof}",)


# ------------------------------------------------------------------------------------------- checkpoint files


def deepspeed_zero_state():
    """What DeepSpeed's ZeRO optimizers put in zero_pp_rank_*_optim_states.pt, and Accelerate's numpy RNG state."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {"loss_scaler": LossScaler(scale=1), "zero_stage": ZeroStageEnum.gradients,
            "param_slice_mappings": [OrderedDict(w=fragment_address(numel=6, start=0))],
            # fp16 on a GPU: a dynamic scaler, with its dtype
            "gpu_loss_scaler": DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                                                 consecutive_hysteresis=False, dtype=torch.float16),
            "numpy_random_seed": np.random.get_state(), "weights": OrderedDict(w=torch.ones(2, 3))}


def test_the_types_a_checkpoint_file_may_build(tmp_path):
    state = deepspeed_zero_state()
    torch.save(state, tmp_path / "own.pt")
    assert foreign_types(tmp_path / "own.pt") == []
    with weights_only_loads():  # what DeepSpeed's torch.load(weights_only=False) gets: the same objects back
        back = torch.load(tmp_path / "own.pt", weights_only=False)
    assert back["gpu_loss_scaler"].__dict__ == state["gpu_loss_scaler"].__dict__
    assert back["zero_stage"] is state["zero_stage"] and back["param_slice_mappings"] == state["param_slice_mappings"]
    assert all(np.array_equal(a, b) for a, b in zip(back["numpy_random_seed"], state["numpy_random_seed"]))

    proof = tmp_path / "ran"
    torch.save({"weights": torch.ones(1), "extra": RunsCode(proof)}, tmp_path / "bad.pt")
    assert foreign_types(tmp_path / "bad.pt") == ["posix.system"]
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    torch.save({"a": 1}, tmp_path / "protocol4.pt", pickle_protocol=4)  # opcodes torch.save (protocol 2) never writes
    for name, why in [("plain.pkl", "Expected input to be a checkpoint returned by torch.save"),
                      ("protocol4.pt", "Unsupported operand")]:
        with pytest.raises(ValueError, match=why):
            foreign_types(tmp_path / name)
    assert not proof.exists()


def test_an_engine_load_inside_the_guard_runs_nothing_even_with_weights_only_false(tmp_path):
    """A file swapped after the check: DeepSpeed's own torch.load(weights_only=False) still builds only allowed types."""
    proof, before = tmp_path / "ran", torch.serialization.get_safe_globals()
    torch.save({"extra": RunsCode(proof)}, tmp_path / "bad.pt")
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="posix.system"):
        torch.load(tmp_path / "bad.pt", weights_only=False)
    assert not proof.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ and torch.serialization.get_safe_globals() == before


def test_check_types_names_the_file_and_the_type(tmp_path):
    ckpt = tmp_path / "step00000010"
    ckpt.mkdir()
    (ckpt / MARKER).write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"tensors only, whatever the bytes")
    torch.save(deepspeed_zero_state(), ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_types(ckpt)
    torch.save({"extra": RunsCode(tmp_path / "ran")}, ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match=f"checkpoint {ckpt}: mp_rank_00_model_states.pt would build posix.system, "
                                          "which no checkpoint of this trainer holds"):
        check_types(ckpt)
    (ckpt / "mp_rank_00_model_states.pt").unlink()
    (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps({"a": 1}))  # a plain pickle, not torch.save's format
    with pytest.raises(ConfigError, match="random_states_0.pkl is not a file torch.save writes"):
        check_types(ckpt)
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------------------------------- data batches


def batch_blob(x, y, protocol):
    return pickle.dumps({b"batch_label": b"b", b"labels": [int(v) for v in y], b"data": x.reshape(len(x), -1),
                         b"filenames": [b"x.png"] * len(x)}, protocol=protocol)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_batch_that_is_not_official_builds_only_plain_types(tmp_path, protocol):
    x, y = make_images(2, seed=1)
    blob = batch_blob(x, y, protocol)
    got = load_batch(blob)
    assert np.array_equal(got[b"data"], x.reshape(len(x), -1)) and got[b"labels"] == y.tolist()
    proof = tmp_path / "ran"
    with pytest.raises(ForbiddenType, match="posix.system"):
        load_batch(pickle.dumps({b"data": RunsCode(proof), b"labels": []}, protocol=protocol))
    with pytest.raises(ForbiddenType, match="collections.OrderedDict"):
        load_batch(pickle.dumps(OrderedDict(data=x), protocol=protocol))
    assert not proof.exists()


def test_only_the_official_md5_skips_the_restricted_unpickler(tmp_path, monkeypatch):
    """A batch pickled as an OrderedDict (no harm in it, but not a type the format holds) is refused, unless its md5 is
    the official one for its name."""
    folder = write_batches(tmp_path / "d", make_images(3, seed=1), make_images(2, seed=2))
    x, y = make_images(1, seed=3)
    odd = pickle.dumps(OrderedDict([(b"data", x.reshape(len(x), -1)), (b"labels", y.tolist())]), protocol=2)
    (folder / "data_batch_2").write_bytes(odd)
    with pytest.raises(DataError, match="data_batch_2 would build collections.OrderedDict, which a CIFAR-10 batch never "
                                        "holds"):
        load_cifar10(folder, download=False, cache_dir=tmp_path / "cache")
    monkeypatch.setitem(data_mod.OFFICIAL_MD5, "data_batch_2", hashlib.md5(odd).hexdigest())
    assert len(load_cifar10(folder, download=False, cache_dir=tmp_path / "cache").train_y) == 30 - 6 + 10


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tar.gz"])
def test_a_tampered_batch_file_runs_nothing(tmp_path, config, packed):
    folder = write_batches(tmp_path / "d", make_images(20, seed=1), make_images(7, seed=2))
    proof = tmp_path / "ran"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": RunsCode(proof), b"labels": []}, protocol=2))
    source = write_targz(tmp_path / "d.tar.gz", folder, "cifar-10-batches-py") if packed else tmp_path / "d"
    r = run_cli(["--deepspeed_config", str(config), "--data-dir", str(source), "--output-dir", str(tmp_path / "out")],
                tmp_path)
    assert_user_error(r, "data_batch_3 would build posix.system, which a CIFAR-10 batch never holds (only dicts, lists, "
                         "bytes, str, ints and numpy arrays): refused, nothing from it ran; replace it with the official "
                         "file")
    assert not proof.exists()


# -------------------------------------------------------------------------------------- checkpoints, end to end


def tamper(ckpt, name, proof):
    """Re-save ``name`` with a payload added, and rewrite the commit marker to match, as an attacker would."""
    with weights_only_loads():
        state = torch.load(ckpt / name, weights_only=True)
    state["extra"] = RunsCode(proof)
    torch.save(state, ckpt / name)
    meta = json.loads((ckpt / MARKER).read_text())
    data = (ckpt / name).read_bytes()
    meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MARKER).write_text(json.dumps(meta))


# The file each backend's engine unpickles itself: DeepSpeed's model states (with full unpickling), and rank 1's
# random states under Accelerate (whose load of them swallows any error).
TAMPERED = {"deepspeed": "mp_rank_00_model_states.pt", "accelerate": "random_states_1.pkl"}


@pytest.fixture(scope="module", params=["deepspeed", "accelerate"])
def two_rank_run(request, tmp_path_factory, data):
    """A committed checkpoint (step 10) of a 2-rank run of each backend, made once (under the deepspeed launcher, which
    passes a rank's exit code on; accelerate launch turns 2 into 1)."""
    tmp = tmp_path_factory.mktemp(request.param)
    config = tmp / "c.json"
    config.write_text(json.dumps(CONFIG))
    r = launch(tmp, config, data, tmp / "run", "--backend", request.param, ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return request.param, config, tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["path", "auto"])
def test_a_tampered_checkpoint_with_a_matching_marker_runs_nothing(tmp_path, data, two_rank_run, resume):
    backend, config, run = two_rank_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    ckpt, proof = out / "checkpoints" / "step00000010", tmp_path / "ran"
    tamper(ckpt, TAMPERED[backend], proof)
    r = launch(tmp_path, config, data, out, "--backend", backend, "--resume", str(ckpt) if resume == "path" else "auto",
               ranks=2)
    assert_user_error(r, f"config error: checkpoint {ckpt}: {TAMPERED[backend]} would build posix.system, which no "
                         "checkpoint of this trainer holds", ranks=2)
    assert "[rank 0]" in r.stderr and "[rank 1]" in r.stderr
    assert "move step00000010 out of the folder" in r.stderr
    assert not proof.exists()
    assert json.loads((out / "summary.json").read_text()) == json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_a_rollback_to_a_tampered_checkpoint_runs_nothing(tmp_path, config, data):
    """The doctor's rollback reloads the newest checkpoint through the same check as a resume."""
    out, proof = tmp_path / "out", tmp_path / "ran"
    rollback = ["--set", "trainer.stability.on_nonfinite=rollback"]
    r = launch(tmp_path, config, data, out, *rollback, fault="sigterm@3")  # saves step 0 (for rollback) and step 3
    assert r.returncode == 143, r.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step00000000", "step00000003"]
    tamper(ckpts / "step00000003", "mp_rank_00_model_states.pt", proof)
    # Resumed from the intact step 0; the NaN at step 5 rolls back to the newest checkpoint, the tampered one.
    r = launch(tmp_path, config, data, out, *rollback, "--resume", str(ckpts / "step00000000"), fault="nan@5")
    assert_user_error(r, f"config error: checkpoint {ckpts / 'step00000003'}: mp_rank_00_model_states.pt would build "
                         "posix.system")
    assert not proof.exists()
