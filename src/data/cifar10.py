"""Reading CIFAR-10's official python-pickle layout into uint8 tensors, and fetching it when asked.

We read the batches ourselves instead of going through ``torchvision.datasets.CIFAR10`` because its md5
check rejects re-built copies (such as the JPEG copy used for development) that have the same format.
"""
from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Official CIFAR-10 statistics (see shared data README: the JPEG copy's own differ by <0.002).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class DataError(RuntimeError):
    """A data folder problem the user can fix; the message says how."""


def _fix_hint(data_dir: Path) -> str:
    return (
        f"build it with `python ../shared/data/build_cifar10.py {data_dir}` (offline copy), "
        f"or pass data.download=true to fetch the official archive"
    )


def _load_batch(path: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = entry[b"data"] if b"data" in entry else entry["data"]
        labels = entry[b"labels"] if b"labels" in entry else entry["labels"]
        data = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(labels, dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 batch file {path} is missing: {_fix_hint(data_dir)}") from None
    except Exception as e:  # truncated pickle, wrong keys, wrong size: all mean a damaged file
        raise DataError(
            f"CIFAR-10 batch file {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            f"delete {data_dir / FOLDER} and {_fix_hint(data_dir)}"
        ) from None
    if len(data) != len(labels) or len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"CIFAR-10 batch file {path} has inconsistent data/labels; rebuild {data_dir / FOLDER}")
    return data, labels


def load_cifar10(data_dir: str | Path, download: bool = False) -> dict[str, torch.Tensor]:
    """Return {'train_x','train_y','test_x','test_y'}: uint8 [N,3,32,32] images and int64 labels."""
    data_dir = Path(data_dir).expanduser()
    folder = data_dir / FOLDER
    if not folder.is_dir():
        if download:
            download_cifar10(data_dir)
        else:
            raise DataError(f"CIFAR-10 not found: {folder} does not exist; {_fix_hint(data_dir)}")
    out = {}
    for split, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        parts = [_load_batch(folder / name, data_dir) for name in files]
        out[f"{split}_x"] = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        out[f"{split}_y"] = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return out


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def extract_verified_archive(archive: Path, data_dir: Path, md5: str = CIFAR10_MD5) -> None:
    actual = md5sum(archive)
    if actual != md5:
        raise DataError(f"{archive} has md5 {actual}, expected {md5}: the download is damaged; delete it and retry")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(data_dir, filter="data")


def download_cifar10(data_dir: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / "cifar-10-python.tar.gz"
    if not archive.exists():
        tmp = archive.with_suffix(".part")
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise DataError(
                f"could not download CIFAR-10 from {url} ({e}); without network, {_fix_hint(data_dir)}"
            ) from None
        tmp.replace(archive)
    extract_verified_archive(archive, data_dir, md5)
