"""The shard writer: a background thread that turns per-step chunks into atomic HDF5 shards.

The sampling thread hands over chunks through a bounded queue (back-pressure instead of unbounded
memory); the writer casts to the storage dtype, checks float16 overflow, writes the shard to a
temp file, fsyncs, renames it into place and reports the finished shard.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from tide.capture.schema import (ACTS_GROUP, COLUMN_DTYPES, FP16_MAX, META_COLUMNS, SCHEMA, SCHEMA_VERSION, ShardRecord,
                                 dtype_attr, shard_name)
from tide.errors import TideError
from tide.io import atomic_path, sha256_file


@dataclass
class StepChunk:
    """The rows one denoising step contributes to a shard (every hook, aligned)."""

    shard: int
    acts: dict[str, np.ndarray]
    """hook -> (rows, d_model) float32."""
    meta: dict[str, np.ndarray]
    """column -> (rows,) per :data:`META_COLUMNS`."""


@dataclass
class ShardDone:
    """Marks the end of a shard's chunks."""

    shard: int
    first_sample: int
    num_samples: int


class ShardWriter:
    """Background writer; ``put`` chunks, ``finish_shard`` them, ``close`` to wait for the disk."""

    def __init__(self, out: Path, dtype: str, on_overflow: str, backbone_hash: str, rank: int,
                 on_shard: Callable[[ShardRecord], None], queue_size: int = 8):
        self.out = Path(out)
        self.dtype = np.dtype(dtype)
        self.on_overflow = on_overflow
        self.backbone_hash = backbone_hash
        self.rank = rank
        self.on_shard = on_shard
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.rows_written = 0
        self.busy_seconds = 0.0
        self._pending: dict[int, list[StepChunk]] = {}
        self._thread = threading.Thread(target=self._loop, name="tide-shard-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side
    def put(self, item: StepChunk | ShardDone) -> None:
        self._raise_if_failed()
        while True:
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        """Wait until every queued shard is on disk; re-raise a writer failure."""
        self.queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if isinstance(self.error, TideError):
            raise self.error
        if self.error is not None:
            raise TideError(f"writing shards to {self.out} failed: {self.error}") from self.error

    # ------------------------------------------------------------------ writer thread
    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain without work after a failure
            try:
                start = time.perf_counter()
                if isinstance(item, StepChunk):
                    self._pending.setdefault(item.shard, []).append(item)
                else:
                    self._write_shard(item)
                self.busy_seconds += time.perf_counter() - start
            except BaseException as exc:  # reported to the producer on its next call
                self.error = exc

    def _storage(self, hook: str, acts: np.ndarray) -> np.ndarray:
        if self.dtype == np.float16:
            peak = float(np.abs(acts).max()) if acts.size else 0.0  # NaN compares False: kept, and verify flags it
            if peak > FP16_MAX:
                if self.on_overflow == "error":
                    raise TideError(f"activations at {hook} reach {peak:.3g}, beyond float16's range "
                                    f"({FP16_MAX:g}): capture with --dtype float32 or --on-overflow float32")
                return acts.astype(np.float32)
        return acts.astype(self.dtype, copy=False)

    def _write_shard(self, done: ShardDone) -> None:
        chunks = self._pending.pop(done.shard, [])
        if not chunks:
            raise TideError(f"shard {done.shard} received no rows (no recorded step hit the hooks)")
        hooks = list(chunks[0].acts)
        name = shard_name(done.shard)
        final = self.out / name
        rows = sum(len(c.meta["sample_id"]) for c in chunks)
        dtypes = {}
        with atomic_path(final) as tmp:
            self._write_file(tmp, done, chunks, hooks, rows, dtypes)
        size = final.stat().st_size
        self.bytes_written += size
        self.rows_written += rows
        self.on_shard(ShardRecord(done.shard, name, rows, size, sha256_file(final), done.first_sample,
                                  done.num_samples, self.rank, dtypes))

    def _write_file(self, tmp: Path, done: ShardDone, chunks: list[StepChunk], hooks: list[str], rows: int,
                    dtypes: dict[str, str]) -> None:
        with h5py.File(tmp, "w", libver="latest", track_order=True) as f:
            f.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "shard_index": done.shard,
                            "first_sample": done.first_sample, "num_samples": done.num_samples, "rows": rows,
                            "backbone_hash": self.backbone_hash})
            group = f.create_group(ACTS_GROUP, track_order=True)
            for hook in hooks:
                data = self._storage(hook, np.concatenate([c.acts[hook] for c in chunks]))
                group.create_dataset(hook, data=data, track_times=False)
                dtypes[hook] = str(data.dtype)
                f.attrs[dtype_attr(hook)] = str(data.dtype)
            for column, dt in META_COLUMNS.items():
                data = np.concatenate([c.meta[column] for c in chunks])
                # the recorder picks the token column's width (int32 for large video grids); others are fixed
                f.create_dataset(column, data=data if data.dtype in COLUMN_DTYPES[column] else data.astype(dt),
                                 track_times=False)
