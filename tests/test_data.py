import hashlib
import http.server
import tarfile
import threading

import numpy as np
import pytest
import torch

from cifar10ds import data as data_mod
from cifar10ds.data import balanced_subset, load_cifar10
from cifar10ds.errors import DataError
from tests.helpers import make_images, png_bytes, write_batches, write_folder, write_targz

TRAIN, TEST = make_images(3, seed=1), make_images(2, seed=2)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10DS_CACHE", str(tmp_path / "cache"))


def assert_matches_fixture(d, exact=True):
    assert d.train_x.shape == (30, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (20, 3, 32, 32) and d.test_y.dtype == torch.int64
    assert d.classes[:2] == ["airplane", "automobile"] and d.num_classes == 10
    assert sorted(d.train_y.tolist()) == sorted(TRAIN[1].tolist())
    # Images keep their labels (folders are read class by class, batches in file order).
    order = np.argsort(TRAIN[1], kind="stable")
    expected = torch.from_numpy(TRAIN[0][order]).permute(0, 3, 1, 2)
    got = d.train_x[torch.argsort(d.train_y, stable=True)]
    if exact:
        assert torch.equal(got, expected)
    else:  # lossy JPEG: each decoded image is far closer to its own original than to another one
        err = (got.float() - expected.float()).abs().mean()
        mismatched = (got.float() - expected.roll(1, 0).float()).abs().mean()
        assert err < 20 and err < mismatched / 2


def test_official_batches_folder_and_its_parent(tmp_path):
    batches = write_batches(tmp_path / "d", TRAIN, TEST)
    for path in (tmp_path / "d", batches):  # torchvision's root, or the batches folder itself
        d = load_cifar10(path, download=False)
        assert torch.equal(d.train_y, torch.from_numpy(TRAIN[1]))
        assert torch.equal(d.test_x, torch.from_numpy(TEST[0]).permute(0, 3, 1, 2))


@pytest.mark.parametrize("ext, exact", [("png", True), ("jpg", False)])
def test_image_folder_tree(tmp_path, ext, exact):
    root = write_folder(tmp_path / "tree", TRAIN, TEST, ext)
    assert_matches_fixture(load_cifar10(root, download=False), exact)
    # One folder down is found too (e.g. data/cifar10-jpeg/train/...).
    assert_matches_fixture(load_cifar10(tmp_path, download=False), exact)


def test_targz_of_folder_tree_and_of_batches(tmp_path):
    tree = write_folder(tmp_path / "tree", TRAIN, TEST)
    assert_matches_fixture(load_cifar10(write_targz(tmp_path / "a.tar.gz", tree, "cifar10-png"), download=False))
    batches = write_batches(tmp_path / "b", TRAIN, TEST)
    d = load_cifar10(write_targz(tmp_path / "b.tar.gz", batches, "cifar-10-batches-py"), download=False)
    assert torch.equal(d.train_y, torch.from_numpy(TRAIN[1]))


def test_official_archive_is_checked_then_extracted(tmp_path, monkeypatch):
    batches = write_batches(tmp_path / "src", TRAIN, TEST)
    home = tmp_path / "home"
    home.mkdir()
    archive = write_targz(home / "cifar-10-python.tar.gz", batches, "cifar-10-batches-py")
    with pytest.raises(DataError, match="does not match the official c58f30108f718f92721af3b95e74349a"):
        load_cifar10(home, download=False)
    monkeypatch.setattr(data_mod, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    d = load_cifar10(home, download=False)
    assert (home / "cifar-10-batches-py" / "data_batch_5").is_file()  # torchvision's layout, reusable
    assert torch.equal(d.test_y, torch.from_numpy(TEST[1]))


def test_extraction_refuses_paths_outside_the_target(tmp_path, monkeypatch):
    evil = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, fileobj=__import__("io").BytesIO(b"bad"))
    monkeypatch.setattr(data_mod, "ARCHIVE_MD5", hashlib.md5(evil.read_bytes()).hexdigest())
    with pytest.raises(DataError, match="cannot extract"):
        load_cifar10(tmp_path, download=False)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_download_verifies_and_extracts(tmp_path, monkeypatch):
    batches = write_batches(tmp_path / "src", TRAIN, TEST)
    served = tmp_path / "served"
    served.mkdir()
    archive = write_targz(served / "cifar-10-python.tar.gz", batches, "cifar-10-batches-py")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(data_mod, "URL", f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz")
        monkeypatch.setattr(data_mod, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
        d = load_cifar10(tmp_path / "fresh", download=True)
    finally:
        server.shutdown()
    assert (tmp_path / "fresh" / "cifar-10-python.tar.gz").is_file()
    assert torch.equal(d.train_y, torch.from_numpy(TRAIN[1]))


def test_offline_with_no_data_says_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path / "empty", download=True)
    msg = str(e.value)
    assert "download from http://127.0.0.1:9" in msg and "failed" in msg
    assert "--data-dir PATH" in msg and "train/<class>/" in msg and "cifar-10-batches-py/" in msg
    with pytest.raises(DataError, match="trainer.data.download is false; pass --data-dir PATH"):
        load_cifar10(tmp_path / "empty2", download=False)


def test_corrupt_image_is_named(tmp_path):
    root = write_folder(tmp_path / "tree", TRAIN, TEST)
    (root / "train" / "cat" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match=r"train/cat/0003.png is not a readable image"):
        load_cifar10(root, download=False)


@pytest.mark.parametrize(
    "change, message",
    [
        ("rm test/cat", r"test/ has no images of cat; every class in train/ needs test images"),
        ("rm train/cat test/cat", r"train/ holds 9 classes with images \(airplane, .*\); CIFAR-10 has 10"),
        ("add kitten", r"train/ holds 11 classes with images \(.*kitten.*\); CIFAR-10 has 10 .*: add the missing "
                       r"folder or remove the extra one"),
        ("add test/kitten", r"test/ has classes that train/ lacks: kitten"),
    ],
)
def test_a_tree_with_other_classes_is_refused(tmp_path, change, message):
    """A missing or extra class folder would shift the labels of the classes after it, or leave a class out of the
    evaluation, with nothing to show for it but a model with 9 or 11 outputs."""
    import shutil

    root = write_folder(tmp_path / "tree", TRAIN, TEST)
    verb, *where = change.split()
    for rel in where if verb == "rm" else []:
        shutil.rmtree(root / rel)
    if verb == "add":
        for split in ("train", "test") if where[0] == "kitten" else ["test"]:
            shutil.copytree(root / split / "cat", root / split / "kitten")
    with pytest.raises(DataError, match=message):
        load_cifar10(root, download=False)


def test_wrong_image_size_is_named(tmp_path):
    root = write_folder(tmp_path / "tree", TRAIN, TEST)
    (root / "test" / "dog" / "0005.png").write_bytes(png_bytes(np.zeros((28, 30, 3), np.uint8)))
    with pytest.raises(DataError, match=r"test/dog/0005.png is 30x28 pixels; CIFAR-10 images are 32x32"):
        load_cifar10(root, download=False)


def test_truncated_archive_is_named(tmp_path):
    tree = write_folder(tmp_path / "tree", TRAIN, TEST)
    archive = write_targz(tmp_path / "a.tar.gz", tree, "x")
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"a.tar.gz: cannot read the archive .* truncated or corrupt"):
        load_cifar10(archive, download=False)


def test_label_out_of_range_in_batches(tmp_path):
    bad_train = (TRAIN[0], TRAIN[1].copy())
    bad_train[1][4] = 11
    write_batches(tmp_path / "d", bad_train, TEST)
    with pytest.raises(DataError, match="train label 11 at index 4 is outside 0-9"):
        load_cifar10(tmp_path / "d", download=False)


def test_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="is a file but not a .tar.gz"):
        load_cifar10(tmp_path / "notes.txt", download=False)


def test_decoded_once_then_cached(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "tree", TRAIN, TEST)
    first = load_cifar10(root, download=False)
    assert len(list((tmp_path / "cache").glob("cifar10-*.pt"))) == 1
    monkeypatch.setattr(data_mod, "_decode", lambda source: pytest.fail("decoded again"))
    second = load_cifar10(root, download=False)
    assert torch.equal(first.train_x, second.train_x)
    # Changing the data changes the key: the cache is not trusted blindly.
    (root / "train" / "cat" / "0003.png").unlink()
    monkeypatch.undo()
    monkeypatch.setenv("CIFAR10DS_CACHE", str(tmp_path / "cache"))
    assert len(load_cifar10(root, download=False).train_y) == 29


def test_a_cache_that_cannot_be_written_costs_only_a_decode(tmp_path):
    root = write_folder(tmp_path / "tree", TRAIN, TEST)
    (tmp_path / "plain.txt").write_text("a file where the cache folder would go")
    for _ in range(2):
        assert len(load_cifar10(root, download=False, cache_dir=tmp_path / "plain.txt" / "cache").train_y) == 30


@pytest.mark.parametrize("limit, per_class", [(100, [10] * 10), (25, [3] * 5 + [2] * 5), (None, [50] * 10)])
def test_balanced_subset(limit, per_class):
    y = torch.arange(10).repeat(50)
    idx = balanced_subset(y, limit, seed=3)
    picked = y if idx is None else y[idx]
    assert torch.bincount(picked, minlength=10).tolist() == per_class
    if idx is not None:
        assert len(set(idx.tolist())) == len(idx)
        assert torch.equal(idx, balanced_subset(y, limit, seed=3))
        assert not torch.equal(idx, balanced_subset(y, limit, seed=4))


def test_prepare_data_script(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT, cli_env

    root = write_folder(tmp_path / "tree", TRAIN, TEST)
    script = str(ROOT / "scripts" / "prepare_data.py")
    env = cli_env(tmp_path)
    r = subprocess.run([sys.executable, script, "--data-dir", str(root)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train:  30 images, per class [3, 3, 3, 3, 3, 3, 3, 3, 3, 3]" in r.stdout
    assert "test:   20 images, per class [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]" in r.stdout
    cache_line = next(line for line in r.stdout.splitlines() if line.startswith("cache:"))
    assert (tmp_path / "cache") in __import__("pathlib").Path(cache_line.split()[1]).parents
    assert __import__("pathlib").Path(cache_line.split()[1]).is_file()
    r = subprocess.run([sys.executable, script, "--data-dir", str(tmp_path / "none"), "--no-download"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("data error: no CIFAR-10 data in") and "Traceback" not in r.stderr
