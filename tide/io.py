"""The ground floor: atomic file writes, fsync and hashing. Every stage writes through these; none
reaches into another stage for them.

An atomic write goes to a temporary file beside the target (``name + TMP_SUFFIX``), is flushed and
fsynced, renamed over the target, and the directory is fsynced: a reader (or a crash) sees the old
file or the new one, never a partial one.

A command's outputs are checked before anything is loaded (:func:`check_output_file`,
:func:`check_writable_dir`: an existing output without ``--overwrite``, a file where a folder goes, a
read-only folder are refused in one line) and written last, together: several files through
:func:`staged_outputs`, a whole directory through :func:`building_dir`, so an error leaves the old
outputs as they were and nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

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


# ------------------------------------------------------------------ outputs: refuse up front, write last

def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a broken link counts as existing)."""
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: str | Path, flag: str = "--out", target: str | Path | None = None) -> Path:
    """Refuse, in one line naming the path, a directory that is a file, lies under a file, or cannot be created or
    written; creates nothing. ``target``: the output the directory is for (named in the message; default ``path``)."""
    from tide.errors import TideError  # the ground floor imports no stage; errors is a leaf

    path = Path(path)
    shown = f"{flag} {target if target is not None else path}"
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        if target is None:
            raise TideError(f"{shown} is a file, not a directory: choose a directory path for {flag}")
        raise TideError(f"cannot write {shown}: {path} is a file, not a directory; choose another {flag}")
    base = _first_existing(path)
    if not base.is_dir():
        raise TideError(f"cannot write {shown}: {base} is a file, not a directory; choose another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise TideError(f"cannot write {shown}: {base} is not writable; choose another {flag} or make it writable")
    return path


def check_output_file(path: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse, in one line, an output file that exists (without ``overwrite``), is a directory, or whose folder
    cannot be created or written; creates nothing."""
    from tide.errors import TideError

    path = Path(path)
    if path.is_dir():
        raise TideError(f"{flag} {path} is a directory: give a file name for {flag}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise TideError(f"{path} already exists: pass --overwrite to replace it, or choose another {flag}")
    check_writable_dir(path.parent, flag, target=path)
    return path


def staged_name(path: str | Path) -> Path:
    """The temporary name a staged write of ``path`` goes through: ``stem.tmp.suffix`` beside it (the suffix kept
    last, so libraries that pick a format from it — PIL, matplotlib, numpy — write the right one)."""
    path = Path(path)
    return path.with_name(f"{path.stem}{TMP_SUFFIX}{path.suffix}")


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, outermost first (the order to create them in)."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing[::-1]


@contextlib.contextmanager
def staged_outputs() -> Iterator[Callable[[str | Path], Path]]:
    """Write several output files as one: ``stage(path)`` returns the temporary path to write ``path`` through
    (creating missing folders); on a clean exit every staged file is fsynced and renamed into place, on an exception
    every temporary file, and every folder ``stage`` created, is removed, so an error leaves the old outputs as they
    were and nothing half-written."""
    pending: list[tuple[Path, Path]] = []
    made: list[Path] = []

    def stage(path: str | Path) -> Path:
        path = Path(path)
        for folder in _missing_parents(path):
            folder.mkdir()
            made.append(folder)
        tmp = staged_name(path)
        pending.append((tmp, path))
        return tmp

    try:
        yield stage
        for tmp, _ in pending:
            fsync_file(tmp)
        for tmp, path in pending:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for folder in dict.fromkeys(path.parent for _, path in pending):
        fsync_dir(folder)


def replace_dir(tmp: str | Path, path: str | Path) -> None:
    """Move the finished directory ``tmp`` to ``path``, replacing a directory there: the old one is renamed aside
    first and removed only once the new one is in place (put back if that fails)."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old{TMP_SUFFIX}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


@contextlib.contextmanager
def building_dir(path: str | Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``path`` (``.name.tmp``, missing parents created) to build a whole output
    directory in; on a clean exit its files are fsynced and it replaces ``path`` (:func:`replace_dir`), on an
    exception it is removed with any parent this created, and ``path`` is left as it was."""
    path = Path(path)
    missing = _missing_parents(path)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    try:
        for folder in missing:
            folder.mkdir()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                fsync_file(Path(folder) / name)
            fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in missing:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
