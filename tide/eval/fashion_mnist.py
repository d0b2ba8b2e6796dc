"""Fashion-MNIST from its IDX files (Debian package ``dataset-fashion-mnist``), read offline."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from tide.errors import TideError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the IDX files."""

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
"""Fashion-MNIST label names, by class id."""

_PREFIX = {"train": "train", "test": "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise TideError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise TideError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape).copy()


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the ``train`` (60k) or ``test`` (10k) split.

    ``root`` is the folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
    (default: the Debian package's folder).
    """
    if split not in _PREFIX:
        raise TideError(f"unknown Fashion-MNIST split {split!r}: choose 'train' or 'test'")
    root = Path(root) if root is not None else DEFAULT_ROOT
    prefix = _PREFIX[split]
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise TideError(f"Fashion-MNIST {split} files not found in {root}: install them with "
                        "`apt-get install dataset-fashion-mnist` (or pass the folder holding "
                        f"{prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz)")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise TideError(f"Fashion-MNIST {split} files in {root} have mismatched shapes "
                        f"{images.shape} and {labels.shape}")
    return images, labels
