"""Open and read a captured activation dataset (format: docs/FORMAT.md).

``ActivationStore(path)`` reads ``manifest.json`` and refuses a dataset it cannot serve (no
manifest, another schema, a malformed entry or a shard path outside the directory (checked by
``tide.capture.schema.read_manifest``), an unfinished capture, a listed shard gone), and reads rows of
its shards; ``verify_checksum(i)`` compares a shard's SHA-256 with the manifest's, once per process.
Its ``verify()`` (:mod:`tide.data.verify`), ``stats(hook)`` (:mod:`tide.data.stats`) and
``info()`` / ``format_info()`` (:mod:`tide.data.info`) are thin delegations to those modules.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from tide.capture.schema import ACTS_GROUP, MANIFEST, SCHEMA, SCHEMA_VERSION, ShardRecord, read_manifest
from tide.data.info import dataset_info, format_info
from tide.data.stats import TimestepStats, cached_stats, compute_stats
from tide.data.verify import HASH_CHUNK_BYTES, VerifyReport, verify_store
from tide.errors import TideError
from tide.io import sha256_file

ShardInfo = ShardRecord
"""The former reader-side name of :class:`tide.capture.schema.ShardRecord` (one manifest shard entry)."""

SCAN_CHUNK_BYTES = 64 << 20
"""Bytes of one activation dataset held at a time while scanning it or computing statistics."""
MAX_OPEN_SHARDS = 16
"""Shard files a store keeps open at once (least recently used are closed)."""
_VERIFIED: set[tuple] = set()
"""Shard files whose SHA-256 matched in this process (see ``ActivationStore.verify_checksum``)."""


class ActivationStore:
    """A captured activation dataset on disk: manifest, shards, verification and statistics.

    ``strict=False`` also opens an unfinished capture or one with listed shards missing, for
    inspection (``info``, ``verify``); reading a missing shard still fails.
    """

    def __init__(self, path: str | Path, strict: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise TideError(f"activation dataset {self.path} is not a directory; "
                            f"pass the directory `tide capture` wrote (it holds {MANIFEST})")
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise TideError(f"{self.path} has no {MANIFEST}; it is not a captured activation dataset, "
                            f"or its capture has not finished a shard yet (run `tide capture` to write one)")
        # JSON object, schema and version, entry types, shard files confined to the directory (tide.capture.schema)
        manifest, raw, shards = read_manifest(self.path)
        self.manifest: dict = manifest
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.complete: bool = manifest["complete"]
        if strict and not self.complete:
            listed = len(manifest["shards"])
            expected = manifest.get("num_shards", "?")
            raise TideError(f"dataset {self.path} is incomplete ({listed} of {expected} shards finished); "
                            f"finish it with `tide capture --resume` (same config and output directory)")
        self.hooks: dict[str, int] = {h: spec["d_model"] for h, spec in manifest["hooks"].items()}
        self.shards: list[ShardRecord] = shards
        if strict:
            for shard in self.shards:
                if not shard.path.is_file():
                    raise TideError(f"dataset {self.path}: shard {shard.file} is listed in the manifest but "
                                    f"missing; restore it from a copy or recapture the dataset")
        self._handles: OrderedDict[int, h5py.File] = OrderedDict()
        self._pid = os.getpid()
        self._dtypes: dict[str, np.dtype] | None = None

    # ------------------------------------------------------------------ basics

    @property
    def rows(self) -> int:
        """Rows in the listed shards."""
        return sum(s.rows for s in self.shards)

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, hooks={list(self.hooks)}, rows={self.rows}, "
                f"shards={len(self.shards)})")

    @property
    def patch_grid(self) -> tuple[int, ...]:
        """The backbone's token grid: (rows, cols) for images, (frames, rows, cols) for video; the
        ``token`` column is row-major over it (see :mod:`tide.data.coords`)."""
        grid = self.manifest.get("patch_grid") or [self.manifest.get("num_tokens")]
        if grid == [None]:
            raise TideError(f"{self.path / MANIFEST} records neither patch_grid nor num_tokens, so token indices "
                            f"cannot be mapped to grid positions; recapture the dataset")
        return tuple(int(g) for g in grid)

    def token_coords(self, token) -> tuple:
        """Grid coordinates of ``token`` values of this dataset: (frame, row, col) for video,
        (row, col) for images (see :func:`tide.data.token_coords`)."""
        from tide.data.coords import token_coords

        return token_coords(token, self.patch_grid)

    @property
    def recorded_steps(self) -> list[int]:
        return [int(s) for s in self.manifest.get("schedule", {}).get("recorded_steps", [])]

    @property
    def recorded_timesteps(self) -> list[float]:
        """Scheduler timestep of each recorded step, from the manifest's schedule.

        ``schedule.timesteps`` is the full schedule (``num_steps`` values) indexed by step; a list as
        long as ``recorded_steps`` is read as the recorded steps' timesteps already.
        """
        schedule = self.manifest.get("schedule", {})
        timesteps = [float(t) for t in schedule.get("timesteps", [])]
        steps = self.recorded_steps
        if len(timesteps) == schedule.get("num_steps") and all(0 <= s < len(timesteps) for s in steps):
            return [timesteps[s] for s in steps]
        return timesteps

    def check_hooks(self, hooks: Sequence[str] | None) -> list[str]:
        """The hooks asked for (all when None), refusing unknown names with the captured ones listed."""
        if hooks is None:
            return list(self.hooks)
        hooks = list(hooks)
        unknown = [h for h in hooks if h not in self.hooks]
        if unknown:
            raise TideError(f"hook(s) {unknown} were not captured in {self.path}; captured: {list(self.hooks)}")
        if not hooks:
            raise TideError(f"no hooks asked for; captured in {self.path}: {list(self.hooks)}")
        return hooks

    # ------------------------------------------------------------------ reading

    def open_shard(self, i: int) -> h5py.File:
        """Shard ``i`` (position in ``self.shards``) as an open read-only HDF5 file, shared and cached.

        The store closes it when it leaves its small cache of open files or on ``close()``; do not
        close it yourself.
        """
        if os.getpid() != self._pid:  # forked: handles belong to the parent
            self._handles = OrderedDict()
            self._pid = os.getpid()
        handle = self._handles.get(i)
        if handle is not None and handle.id.valid:
            self._handles.move_to_end(i)
            return handle
        shard = self.shards[i]
        if not shard.path.is_file():
            raise TideError(f"dataset {self.path}: shard {shard.file} is missing; restore it or recapture the dataset")
        size = shard.path.stat().st_size
        if size != shard.bytes:
            raise TideError(f"dataset {self.path}: shard {shard.file} is {size} bytes, the manifest says {shard.bytes} "
                            f"({'truncated' if size < shard.bytes else 'changed'}); run `tide data verify {self.path}`")
        try:
            handle = h5py.File(shard.path, "r")
        except OSError as exc:
            raise TideError(f"dataset {self.path}: shard {shard.file} cannot be opened as HDF5 ({exc}); "
                            f"run `tide data verify {self.path}`") from None
        problem = self._shard_header_problem(handle, shard)
        if problem:
            handle.close()
            raise TideError(f"dataset {self.path}: shard {shard.file} {problem}; run `tide data verify {self.path}`")
        self._handles[i] = handle
        while len(self._handles) > MAX_OPEN_SHARDS:
            _, old = self._handles.popitem(last=False)
            old.close()
        return handle

    @staticmethod
    def _shard_header_problem(f: h5py.File, shard: ShardRecord) -> str | None:
        """What is wrong with an opened shard's schema attributes or activation row counts (cheap: no data is
        read), or None; ``verify`` checks everything else."""
        schema, version = f.attrs.get("schema"), f.attrs.get("schema_version")
        schema = schema.decode(errors="replace") if isinstance(schema, bytes) else schema
        if schema is not None and schema != SCHEMA:
            return f"has schema {schema!r}, expected {SCHEMA!r}"
        if version is not None and not isinstance(version, (int, np.integer)):
            return f"has schema_version {version!r}, not an integer"
        if version is not None and version != SCHEMA_VERSION:
            if version > SCHEMA_VERSION:
                return f"was written by a newer tide (version {version}); upgrade tide to read it"
            return f"has schema_version {version}, older than this tide reads ({SCHEMA_VERSION})"
        group = f.get(ACTS_GROUP)
        if isinstance(group, h5py.Group):
            for name, ds in group.items():
                if isinstance(ds, h5py.Dataset) and ds.shape[:1] != (shard.rows,):
                    return f"holds {ds.shape[0] if ds.shape else 0} rows of {name}, the manifest says {shard.rows}"
        return None

    def verify_checksum(self, i: int) -> None:
        """Compare shard ``i``'s SHA-256 with the manifest's (streams the whole file in chunks); a TideError naming
        the shard when they differ. A match is remembered for the rest of the process (keyed by the file's path,
        inode, size and modification time and the expected digest), so a file is hashed once however often
        loaders open it; a file changed since is hashed again."""
        shard = self.shards[i]
        try:
            st = shard.path.stat()
        except OSError:
            raise TideError(f"dataset {self.path}: shard {shard.file} is missing; restore it or recapture "
                            "the dataset") from None
        key = (str(shard.path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, shard.sha256)
        if key in _VERIFIED:
            return
        if st.st_size != shard.bytes:
            raise TideError(f"dataset {self.path}: shard {shard.file} is {st.st_size} bytes, the manifest says "
                            f"{shard.bytes} ({'truncated' if st.st_size < shard.bytes else 'changed'}); "
                            f"run `tide data verify {self.path}` for details")
        digest = sha256_file(shard.path, HASH_CHUNK_BYTES)
        if digest != shard.sha256:
            raise TideError(f"dataset {self.path}: shard {shard.file} does not match its SHA-256 in the manifest "
                            f"(its bytes changed on disk: corrupted or edited); run `tide data verify {self.path}` "
                            f"for details")
        _VERIFIED.add(key)

    def read(self, i: int, start: int, stop: int, hooks: Sequence[str] = (),
             columns: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Rows ``[start, stop)`` of shard ``i``: ({hook: acts_RD in storage dtype}, {column: values_R})."""
        f = self.open_shard(i)
        try:
            acts = {h: f[ACTS_GROUP][h][start:stop] for h in hooks}
            meta = {c: f[c][start:stop] for c in columns}
        except (KeyError, OSError) as exc:
            raise TideError(f"dataset {self.path}: shard {self.shards[i].file} cannot be read ({exc}); "
                            f"run `tide data verify {self.path}`") from None
        return acts, meta

    def iter_blocks(self, hooks: Sequence[str] | None = None, columns: Sequence[str] = ("timestep",),
                    block_rows: int = 65536) -> Iterator[tuple[int, int, dict, dict]]:
        """Every row in order, as (shard position, first row, acts dict, metadata dict) blocks."""
        hooks = self.check_hooks(hooks)
        for i, shard in enumerate(self.shards):
            for start in range(0, shard.rows, block_rows):
                acts, meta = self.read(i, start, min(start + block_rows, shard.rows), hooks, columns)
                yield i, start, acts, meta

    @staticmethod
    def rows_per_chunk(width: int, itemsize: int, budget: int = SCAN_CHUNK_BYTES) -> int:
        """Rows of a ``width``-wide array of ``itemsize``-byte values that fit in ``budget`` bytes (at least 1):
        how much a streaming pass (verify's scan, statistics) holds at a time."""
        return max(1, budget // max(1, width * itemsize))

    def storage_dtypes(self) -> dict[str, np.dtype]:
        """Widest storage dtype of each hook over the shards (float32 where any shard fell back to it)."""
        if self._dtypes is None:
            dtypes = {h: np.dtype("float16") for h in self.hooks}
            for i, shard in enumerate(self.shards):
                if not shard.path.is_file():
                    continue
                group = self.open_shard(i)[ACTS_GROUP]
                for h in self.hooks:
                    if h in group:
                        dtypes[h] = np.promote_types(dtypes[h], group[h].dtype)
            self._dtypes = dtypes
        return dict(self._dtypes)

    def close(self) -> None:
        for handle in self._handles.values():
            if handle.id.valid:
                handle.close()
        self._handles.clear()

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ verify, summary, statistics

    def verify(self, check_hashes: bool = True, scan: bool = True) -> VerifyReport:
        """Check every listed shard against the manifest; problems are listed per shard file.

        ``check_hashes`` compares each file's SHA-256 (reads every byte); ``scan`` reads every
        activation for NaN/inf and checks the metadata values, in chunks of bounded size.
        """
        return verify_store(self, check_hashes, scan)

    def info(self) -> dict:
        """A summary of the dataset (JSON-able)."""
        return dataset_info(self)

    def format_info(self) -> str:
        """``info()`` as a human-readable multi-line summary."""
        return format_info(self.info())

    def stats(self, hook: str | None = None, recompute: bool = False) -> TimestepStats:
        """Per-timestep mean, RMS norm and variance of ``hook`` (the only hook when None).

        Computed in one streaming pass and cached in ``stats.h5``; the cache is used only while the
        manifest it was computed from is unchanged.
        """
        return cached_stats(self, hook, recompute, compute=self._compute_stats)

    def _compute_stats(self, hook: str) -> TimestepStats:
        return compute_stats(self, hook)
