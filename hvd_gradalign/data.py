"""Datasets: the embedded Fashion-MNIST and per-worker sharding."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not), the format of (Fashion-)MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def fashion_mnist_arrays(split: str, data_dir=None):
    """(images uint8 [N, 28, 28], labels int64 [N]) from the IDX files."""
    data_dir = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(FASHION_MNIST_FILES)}")
    images_file, labels_file = (data_dir / name for name in FASHION_MNIST_FILES[split])
    for f in (images_file, labels_file):
        if not f.exists():
            raise FileNotFoundError(
                f"{f} is missing. The embedded Fashion-MNIST comes from Debian's package "
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist, or run "
                "scripts/setup.sh); or point FASHION_MNIST_DIR at a folder with the four IDX files."
            )
    return read_idx(images_file), read_idx(labels_file).astype(np.int64)


def shard_indices(n: int, rank: int, size: int) -> np.ndarray:
    """Indices of worker ``rank``'s shard: equal length on every worker (so that
    every worker runs the same number of steps and no allreduce waits forever);
    the n mod size samples left over are not used."""
    per = n // size
    if per == 0:
        raise ValueError(f"{n} samples cannot be shared among {size} workers")
    return np.arange(rank * per, (rank + 1) * per)
