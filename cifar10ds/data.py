"""CIFAR-10 from any of its usual forms, decoded once into a cache of uint8 tensors.

Accepted sources (``--data-dir PATH`` or ``trainer.data.dir``):

* a folder holding ``cifar-10-batches-py/`` (torchvision's layout, reused as is), or the
  official ``cifar-10-python.tar.gz`` (extracted next to it), or the batches folder itself;
* an image-folder tree ``train/<class>/*.png|jpg`` and ``test/<class>/*`` (possibly one folder
  down, as in ``cifar10-jpeg/train/...``);
* a ``.tar.gz`` of either, read in place (nothing is extracted).

With no data and ``download`` on, the official archive is downloaded, checked against its
md5 and extracted (refusing any path that would leave the target folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import socket
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar10ds.config import DataConfig
from cifar10ds.dist import DistInfo, on_each_node_then_share, on_main_then_share
from cifar10ds.errors import DataError
from cifar10ds.unpickling import ForbiddenType, load_batch

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
# The md5 of each official batch file the trainer reads (torchvision's CIFAR10 lists the same; batches.meta is
# never read). A file that matches is the official one and unpickled as is; any other goes through load_batch.
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXT = (".png", ".jpg", ".jpeg")
CACHE_VERSION = 1

HOW_TO_SUPPLY = (
    "pass --data-dir PATH (or set trainer.data.dir) pointing to one of: a folder with cifar-10-batches-py/ "
    f"(torchvision's layout) or {ARCHIVE}; an image-folder tree train/<class>/*.png|jpg and test/<class>/*; "
    "or a .tar.gz of either"
)

_FOLDER_RE = re.compile(r"^(?:(.*)/)?(train|test)/([^/]+)/([^/]+)$")


@dataclass
class Cifar10:
    """Decoded images as uint8 (N, 3, 32, 32) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ------------------------------------------------------------------------------- public entry


def load_cifar10(path: str | Path, download: bool = True, cache_dir: str | Path | None = None) -> Cifar10:
    """Find, decode (or load from cache) and check CIFAR-10 at ``path``. Raises DataError."""
    path = Path(path).expanduser()
    source = _find_source(path, download)
    cache = _cache_file(source, cache_dir)
    if cache is not None and cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob.get("version") == CACHE_VERSION:
                return Cifar10(**blob["data"], source=str(source))
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    data = _decode(source)
    _check(data)
    if cache is not None:
        _write_cache(cache, data)
    return data


def cache_path(path: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """The cache file that data found at ``path`` decodes into (no download is attempted)."""
    return _cache_file(_find_source(Path(path).expanduser(), download=False), cache_dir)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CIFAR10DS_CACHE", Path.home() / ".cache" / "cifar10-deepspeed"))


# ------------------------------------------------------------------------------ finding data


def _find_source(path: Path, download: bool) -> Path:
    """The file or folder to decode: a batches folder, an image-folder root, or a .tar.gz."""
    try:
        return _find_source_unchecked(path, download)
    except PermissionError as e:
        raise DataError(f"cannot read {e.filename or path} (permission denied); {HOW_TO_SUPPLY}") from None


def _find_source_unchecked(path: Path, download: bool) -> Path:
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz")):
            if path.name == ARCHIVE:
                _verify_md5(path)
            return path
        raise DataError(f"{path} is a file but not a .tar.gz; {HOW_TO_SUPPLY}")
    if path.is_dir():
        found = _find_in_dir(path)
        if found is not None:
            return found
    elif path.exists():
        raise DataError(f"{path} is neither a folder nor a file; {HOW_TO_SUPPLY}")
    if not download:
        raise DataError(f"no CIFAR-10 data in {path} and trainer.data.download is false; {HOW_TO_SUPPLY}")
    return _download(path)


def _find_in_dir(path: Path) -> Path | None:
    if (path / TEST_BATCH).is_file():
        return path
    if (path / BATCHES / TEST_BATCH).is_file():
        return path / BATCHES
    if (path / ARCHIVE).is_file():
        _verify_md5(path / ARCHIVE)
        return _extract_official(path / ARCHIVE, path)
    for root in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    archives = sorted(p for p in path.iterdir() if p.name.endswith((".tar.gz", ".tgz")))
    return archives[0] if archives else None


def _download(path: Path) -> Path:
    target = path / ARCHIVE
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with urllib.request.urlopen(URL, timeout=60) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        tmp.replace(target)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        reason = getattr(e, "reason", None) or e.strerror or e
        raise DataError(f"no CIFAR-10 data in {path} and the download from {URL} failed ({reason}); {HOW_TO_SUPPLY}") from None
    _verify_md5(target)
    return _extract_official(target, path)


def _verify_md5(archive: Path) -> None:
    digest = hashlib.md5()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != ARCHIVE_MD5:
        raise DataError(
            f"{archive}: md5 {digest.hexdigest()} does not match the official {ARCHIVE_MD5}; "
            "the file is damaged or incomplete: delete it and run again to download it afresh"
        )


def _extract_official(archive: Path, dest: Path) -> Path:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter refuses absolute paths, "..", links out of dest and device files.
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive}: cannot extract ({e}); delete it and run again") from None
    if not (dest / BATCHES / TEST_BATCH).is_file():
        raise DataError(f"{archive}: extracted, but {dest / BATCHES / TEST_BATCH} is missing")
    return dest / BATCHES


# ---------------------------------------------------------------------------------- decoding


def _entries(source: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(relative path, read()) for every file of a folder tree or a .tar.gz, in sorted order."""
    if source.is_dir():
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                yield full.relative_to(source).as_posix(), full.read_bytes
        return
    try:
        with tarfile.open(source, "r:gz") as tar:
            for member in tar:
                if member.isfile():
                    data = tar.extractfile(member).read()
                    yield member.name.lstrip("./"), (lambda data=data: data)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{source}: cannot read the archive ({type(e).__name__}: {e}); is it truncated or corrupt?") from None


def _decode(source: Path) -> Cifar10:
    batches: dict[str, bytes] = {}
    images: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    roots: set[str] = set()
    for rel, read in _entries(source):
        name = rel.rsplit("/", 1)[-1]
        if name in TRAIN_BATCHES or name == TEST_BATCH:
            batches[name] = read()
            continue
        m = _FOLDER_RE.match(rel)
        if m and name.lower().endswith(IMAGE_EXT):
            roots.add(m.group(1) or "")
            images.setdefault((m.group(2), m.group(3)), []).append((rel, read()))
    if TEST_BATCH in batches:
        return _from_batches(source, batches)
    if images:
        if len(roots) > 1:
            raise DataError(f"{source}: found train/ and test/ trees under several folders ({', '.join(sorted(roots))}); keep one")
        return _from_folders(source, images)
    raise DataError(f"{source}: no CIFAR-10 found inside; {HOW_TO_SUPPLY}")


def _from_batches(source: Path, batches: dict[str, bytes]) -> Cifar10:
    missing = [b for b in TRAIN_BATCHES if b not in batches]
    if missing:
        raise DataError(f"{source}: missing {', '.join(missing)} of the official batches")

    def unpickle(name: str) -> tuple[np.ndarray, np.ndarray]:
        blob = batches[name]
        try:
            official = hashlib.md5(blob).hexdigest() == OFFICIAL_MD5[name]
            d = pickle.loads(blob, encoding="bytes") if official else load_batch(blob)
            x = np.asarray(d[b"data"], dtype=np.uint8)
            y = np.asarray(d[b"labels"], dtype=np.int64)
        except ForbiddenType as e:
            raise DataError(f"{source}/{name} would build {e.name}, which a CIFAR-10 batch never holds (only dicts, "
                            "lists, bytes, str, ints and numpy arrays): refused, nothing from it ran; replace it "
                            "with the official file") from None
        except Exception as e:
            raise DataError(f"{source}/{name}: not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
            raise DataError(f"{source}/{name}: expected data of shape (N, 3072) and N labels, got {x.shape} and {len(y)}")
        return x.reshape(-1, 3, 32, 32), y

    train = [unpickle(b) for b in TRAIN_BATCHES]
    test_x, test_y = unpickle(TEST_BATCH)
    return Cifar10(
        train_x=torch.from_numpy(np.concatenate([x for x, _ in train])),
        train_y=torch.from_numpy(np.concatenate([y for _, y in train])),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
        classes=list(CLASSES),
        source=str(source),
    )


def _from_folders(source: Path, images: dict[tuple[str, str], list[tuple[str, bytes]]]) -> Cifar10:
    from PIL import Image

    classes = sorted({c for split, c in images if split == "train"})
    test_classes = sorted({c for split, c in images if split == "test"})
    if not classes or not test_classes:
        raise DataError(f"{source}: need both train/<class>/ and test/<class>/ images")
    if set(test_classes) - set(classes):
        extra = ", ".join(sorted(set(test_classes) - set(classes)))
        raise DataError(f"{source}: test/ has classes that train/ lacks: {extra}")
    if set(classes) - set(test_classes):  # evaluation would skip them without a word
        missing = ", ".join(sorted(set(classes) - set(test_classes)))
        raise DataError(f"{source}: test/ has no images of {missing}; every class in train/ needs test images")
    if len(classes) != len(CLASSES):  # the labels (sorted folder names) would mean other classes than intended
        raise DataError(f"{source}: train/ holds {len(classes)} classes with images ({', '.join(classes)}); CIFAR-10 "
                        f"has {len(CLASSES)} ({', '.join(CLASSES)}): add the missing folder or remove the extra one")

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for rel, blob in images.get((name, cls), []):
                try:
                    with Image.open(io.BytesIO(blob)) as im:
                        arr = np.asarray(im.convert("RGB"))
                except Exception as e:
                    raise DataError(f"{source}: {rel} is not a readable image ({type(e).__name__}: {e})") from None
                if arr.shape != (32, 32, 3):
                    raise DataError(f"{source}: {rel} is {arr.shape[1]}x{arr.shape[0]} pixels; CIFAR-10 images are 32x32")
                xs.append(arr)
                ys.append(label)
        if not xs:
            raise DataError(f"{source}: no images under {name}/")
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor(ys, dtype=torch.int64)

    train_x, train_y = split("train")
    test_x, test_y = split("test")
    return Cifar10(train_x, train_y, test_x, test_y, classes, str(source))


def _check(data: Cifar10) -> None:
    for name, y in (("train", data.train_y), ("test", data.test_y)):
        if len(y) == 0:
            raise DataError(f"{data.source}: the {name} split is empty")
        bad = (y < 0) | (y >= data.num_classes)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise DataError(f"{data.source}: {name} label {int(y[i])} at index {i} is outside 0-{data.num_classes - 1}")


# ------------------------------------------------------------------------------------ cache


def _cache_file(source: Path, cache_dir: str | Path | None) -> Path | None:
    """One cache file per source version: keyed on the path and the size/mtime of its files."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{source.resolve()}".encode())
    paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for p in paths:
        st = p.stat()
        digest.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(cache_dir or default_cache_dir()) / f"cifar10-{digest.hexdigest()[:20]}.pt"


def _write_cache(cache: Path, data: Cifar10) -> None:
    """Best effort: a cache that cannot be written only costs a decode next time."""
    blob = {
        "version": CACHE_VERSION,
        "data": {k: getattr(data, k) for k in ("train_x", "train_y", "test_x", "test_y", "classes")},
    }
    # The host in the name too: the first ranks of several nodes may write one shared cache at once.
    tmp = cache.parent / f"{cache.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        tmp.replace(cache)
    except (OSError, RuntimeError):  # a full disk surfaces as RuntimeError from torch.save
        with contextlib.suppress(OSError):  # e.g. a cache_dir below a file: there is no tmp to remove
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- a run's data


def load_for_run(cfg: DataConfig, info: DistInfo) -> Cifar10:
    """The run's images on the host: found (downloaded), decoded and cached by rank 0, then by the first rank of each
    other node into that node's cache (which may be node-local), which the node's other ranks read; then cut to
    ``trainer.data``'s class-balanced subsets."""
    loaded: list[Cifar10] = []
    # Rank 0 first, so that a download into a data folder every node shares happens once.
    on_main_then_share(lambda: loaded.append(load_cifar10(cfg.dir, cfg.download, cfg.cache_dir)), info)
    on_each_node_then_share(lambda: loaded or loaded.append(load_cifar10(cfg.dir, cfg.download, cfg.cache_dir)), info)
    ds = loaded[0] if loaded else load_cifar10(cfg.dir, cfg.download, cfg.cache_dir)
    train = balanced_subset(ds.train_y, cfg.train_limit, cfg.subset_seed)
    test = balanced_subset(ds.test_y, cfg.test_limit, cfg.subset_seed)
    if train is not None:
        ds.train_x, ds.train_y = ds.train_x[train], ds.train_y[train]
    if test is not None:
        ds.test_x, ds.test_y = ds.test_x[test], ds.test_y[test]
    return ds


@dataclass
class DeviceData:
    """The data set as tensors on the training device (uint8 images, int64 labels)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @classmethod
    def of(cls, ds: Cifar10, device: torch.device) -> DeviceData:
        return cls(ds.train_x.to(device), ds.train_y.to(device), ds.test_x.to(device), ds.test_y.to(device))




def balanced_subset(y: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor | None:
    """Indices of a seeded class-balanced subset of size ``limit`` (None: use everything).

    Each class contributes ``limit // C`` images (the first ``limit % C`` classes one more),
    drawn without replacement from a permutation seeded by ``seed``.
    """
    if limit is None or limit >= len(y):
        return None
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    classes = torch.unique(y).tolist()
    per_class = [limit // len(classes) + (1 if i < limit % len(classes) else 0) for i in range(len(classes))]
    picked = []
    for c, k in zip(classes, per_class):
        members = perm[y[perm] == c]
        picked.append(members[:k])
    return torch.cat(picked).sort().values
