"""The ground floor: atomic file writes, fsync and hashing. Every stage writes through these; none
reaches into another stage for them.

An atomic write goes to a temporary file beside the target (``name + TMP_SUFFIX``), is flushed and
fsynced, renamed over the target, and the directory is fsynced: a reader (or a crash) sees the old
file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"
"""Suffix of the temporary file (or directory) an atomic write goes through."""


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, unique: bool = False) -> Iterator[Path]:
    """A temporary path to write ``path`` through (with any library: h5py, safetensors, ...).

    On a clean exit the file is fsynced and renamed over ``path`` and the directory fsynced; on an
    exception the temporary file is removed and ``path`` is left as it was. ``unique`` puts the
    process id in the temporary name (``name.PID.tmp``), for a file several processes may write at
    once (e.g. a cache): each writes its own temporary file and the last rename wins.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}" if unique else path.name + TMP_SUFFIX)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON (one-space indent, trailing newline) to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory to fill and then rename to ``path``. Files written inside should be closed
    before the block ends; they are fsynced with the directory. The rename is atomic only when
    ``path`` does not exist yet (an existing directory is removed first: directories cannot be renamed
    over one another atomically), so write each version under a new name and switch a pointer file
    with :func:`atomic_write_bytes`, as the trainer's checkpoints do."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                fsync_file(child)
        fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of ``obj`` (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensors_hash(named_tensors, config: dict | None = None) -> str:
    """SHA-256 over a JSON config and ``(name, tensor)`` pairs (sorted by name, raw bytes): identifies
    model weights independently of file layout."""
    import torch  # on use: the ground floor imports nothing heavy

    h = hashlib.sha256() if config is None else hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(named_tensors, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
