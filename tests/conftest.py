import json

import pytest

from tests.helpers import CLUSTER_CONFIG, SCRIPT, cli_env, run_bounded, tiny_dataset, torchrun


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """200 train / 70 test learnable PNG images in 10 classes (an image-folder tree), made once."""
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def config(tmp_path, request):
    """The test module's CONFIG dict written to a file the trainer reads."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(request.module.CONFIG))
    return path


@pytest.fixture(scope="session")
def one_node_two_ranks(tmp_path_factory, data):
    """The output folder of the run the multi-node ones must equal: CLUSTER_CONFIG on one node, 2 ranks under
    torchrun (one thread each, as torchrun sets), fp32 on CPU."""
    tmp = tmp_path_factory.mktemp("one_node")
    (tmp / "c.json").write_text(json.dumps(CLUSTER_CONFIG))
    out = tmp / "out"
    cmd = torchrun("--nproc-per-node=2", str(SCRIPT), "--deepspeed_config",
                   str(tmp / "c.json"), "--data-dir", str(data), "--output-dir", str(out), "--quiet")
    r = run_bounded(cmd, SCRIPT.parent, {**cli_env(tmp), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out
