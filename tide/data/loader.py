"""Shuffled, filtered, out-of-core batches of activations from an ``ActivationStore``.

A shard's rows are ordered by (step, branch, sample, token), so reading it front to back gives
batches of one image and one timestep. The loader instead cuts every shard into contiguous blocks
of ``block_rows`` rows, visits all blocks of all shards in a random order each epoch, keeps the
rows that pass the filters in a shuffle buffer of ``shuffle_buffer`` rows and emits batches drawn
uniformly at random from it. Memory holds the buffer plus one block, whatever the dataset size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from tide.branches import BRANCHES, CfgBranch, check_branch
from tide.capture.schema import COLUMN_DTYPES, META_COLUMNS
from tide.data.store import ActivationStore
from tide.errors import TideError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

EXTRA_COLUMNS = ("shard", "row")
"""Metadata the loader adds to the format's columns: shard position in the store and row in the shard."""


@dataclass
class LoaderConfig:
    """How to stream activations for training or evaluation."""

    hooks: list[str] | None = None
    """Hooks to read (rows aligned across them); None = every captured hook."""
    batch_size: int = 4096
    """Rows per batch."""
    shuffle: bool = True
    """Shuffle across shards, images and timesteps; False reads every row in stored order."""
    shuffle_buffer: int = 131072
    """Rows held in the shuffle buffer (memory: rows x sum of hook widths x storage bytes)."""
    block_rows: int = 16384
    """Contiguous rows read from one shard at a time."""
    t_min: float | None = None
    """Keep rows whose timestep is >= this value; None = no lower bound."""
    t_max: float | None = None
    """Keep rows whose timestep is <= this value; None = no upper bound."""
    steps: list[int] | None = None
    """Keep rows of these step indices only (0 = noisiest); None = every recorded step."""
    conds: list[int] | None = None
    """Keep rows of these condition ids only; None = every condition."""
    cfg_branch: CfgBranch = "both"
    """CFG half to keep: ``cond``, ``uncond`` or ``both``."""
    seed: int = 0
    """Seed of the block order and of the draws from the shuffle buffer."""
    epochs: int | None = 1
    """Passes over the data per iteration of the loader; None = endless."""
    drop_last: bool = False
    """Drop each epoch's last batch when it is smaller than batch_size."""
    with_metadata: bool = False
    """Also return the rows' metadata columns (timestep, step_index, sample_id, token, cond, cfg_branch, shard, row)."""
    dtype: str = "float32"
    """Dtype of the returned activations: float32, float16 or bfloat16."""
    rank: int = 0
    """This process's rank when reading in data-parallel; ranks read disjoint blocks."""
    world_size: int = 1
    """Number of data-parallel ranks."""
    verify_checksums: bool = False
    """Compare each shard's SHA-256 with the manifest's before the loader first reads its activations (the whole
    file is read once per process; see ActivationStore.verify_checksum); a mismatch raises a TideError naming
    the shard. Off by default here; `tide train` turns it on (TrainConfig.verify_checksums)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise TideError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.block_rows < 1:
            raise TideError(f"block_rows must be >= 1, got {self.block_rows}")
        if self.shuffle and self.shuffle_buffer < self.batch_size:
            raise TideError(f"shuffle_buffer ({self.shuffle_buffer}) must be at least batch_size ({self.batch_size}); "
                            f"raise shuffle_buffer or lower batch_size")
        check_branch(self.cfg_branch)
        if self.dtype not in TORCH_DTYPES:
            raise TideError(f"dtype must be one of {list(TORCH_DTYPES)}, got {self.dtype!r}")
        if self.epochs is not None and self.epochs < 1:
            raise TideError(f"epochs must be >= 1 or None (endless), got {self.epochs}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise TideError(f"rank must lie in [0, world_size); got rank {self.rank}, world_size {self.world_size}")
        if self.t_min is not None and self.t_max is not None and self.t_min > self.t_max:
            raise TideError(f"t_min ({self.t_min}) is above t_max ({self.t_max}); swap them")

    def filter_columns(self) -> list[str]:
        """Metadata columns the filters read."""
        cols = []
        if self.t_min is not None or self.t_max is not None:
            cols.append("timestep")
        if self.steps is not None:
            cols.append("step_index")
        if self.conds is not None:
            cols.append("cond")
        if self.cfg_branch != "both":
            cols.append("cfg_branch")
        return cols

    def mask(self, meta: dict[str, np.ndarray]) -> np.ndarray | None:
        """Rows that pass the filters (None = all of them)."""
        keep = None

        def both(a, b):
            return b if a is None else a & b
        if self.t_min is not None:
            keep = both(keep, meta["timestep"] >= self.t_min)
        if self.t_max is not None:
            keep = both(keep, meta["timestep"] <= self.t_max)
        if self.steps is not None:
            keep = both(keep, np.isin(meta["step_index"], self.steps))
        if self.conds is not None:
            keep = both(keep, np.isin(meta["cond"], self.conds))
        if self.cfg_branch != "both":
            keep = both(keep, meta["cfg_branch"] == BRANCHES[self.cfg_branch])
        return keep


class Batch(NamedTuple):
    """A batch of rows: activations, their timesteps and (optionally) their metadata."""

    acts: torch.Tensor | dict[str, torch.Tensor]
    """acts_BD of the one hook read, or {hook: acts_BD} when several hooks are read (same rows)."""
    t_B: torch.Tensor
    """Scheduler timestep of each row, float32."""
    meta: dict[str, torch.Tensor] | None
    """{column: values_B} (int64; timestep float32) when ``with_metadata``, else None."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The batch on ``device``."""
        def move(x):
            return x.to(device, non_blocking=non_blocking)
        acts = {h: move(a) for h, a in self.acts.items()} if isinstance(self.acts, dict) else move(self.acts)
        meta = None if self.meta is None else {c: move(v) for c, v in self.meta.items()}
        return Batch(acts, move(self.t_B), meta)


class Block(NamedTuple):
    """Rows ``[start, stop)`` of the shard at position ``shard`` of the store; ``rows`` pass the filters."""

    shard: int
    start: int
    stop: int
    rows: int


class ShuffleBuffer:
    """Fixed-size arrays of rows; rows leave drawn uniformly at random (or in order, unshuffled)."""

    def __init__(self, capacity: int, widths: dict[str, tuple[int, np.dtype]], columns: dict[str, np.dtype]):
        self.capacity = capacity
        self.acts = {h: np.empty((capacity, w), dtype=dt) for h, (w, dt) in widths.items()}
        self.cols = {c: np.empty(capacity, dtype=dt) for c, dt in columns.items()}
        self.n = 0
        self.peak = 0  # most rows held at once

    def add(self, acts: dict[str, np.ndarray], cols: dict[str, np.ndarray]) -> None:
        k = len(next(iter(cols.values())))
        if self.n + k > self.capacity:
            raise RuntimeError(f"shuffle buffer overflow: {self.n} + {k} rows > {self.capacity}")
        for name, arr in self.acts.items():
            arr[self.n:self.n + k] = acts[name]
        for name, arr in self.cols.items():
            arr[self.n:self.n + k] = cols[name]
        self.n += k
        self.peak = max(self.peak, self.n)

    def take(self, k: int, rng: np.random.Generator | None) -> tuple[dict, dict]:
        """Remove ``k`` rows: uniformly at random with ``rng``, else the oldest ``k`` in order."""
        k = min(k, self.n)
        n = self.n
        if rng is None:
            out = ({h: a[:k].copy() for h, a in self.acts.items()}, {c: a[:k].copy() for c, a in self.cols.items()})
            for arr in (*self.acts.values(), *self.cols.values()):
                arr[:n - k] = arr[k:n]
        else:
            sel = rng.choice(n, size=k, replace=False) if k < n else rng.permutation(n)
            out = ({h: a[sel] for h, a in self.acts.items()}, {c: a[sel] for c, a in self.cols.items()})
            # Fill the holes below n - k with the surviving rows above it.
            holes = np.sort(sel[sel < n - k])
            taken_tail = np.zeros(k, dtype=bool)
            taken_tail[sel[sel >= n - k] - (n - k)] = True
            movers = np.flatnonzero(~taken_tail) + (n - k)
            if len(holes):
                for arr in (*self.acts.values(), *self.cols.values()):
                    arr[holes] = arr[movers]
        self.n = n - k
        return out


class ActivationLoader:
    """Iterable of ``Batch``es from a captured dataset, shuffled across shards, images and timesteps.

    Deterministic: the same store, config and epoch give the same batches. Each iteration runs
    ``config.epochs`` epochs starting at ``self.epoch`` and advances it, so iterating again continues
    with new orders; ``set_epoch`` picks one (as a distributed sampler's does).
    """

    def __init__(self, store: ActivationStore | str | Path, config: LoaderConfig | None = None):
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        self.config = config = config or LoaderConfig()
        self.hooks = self.store.check_hooks(config.hooks)
        dtypes = self.store.storage_dtypes()
        widths = {h: (self.store.hooks[h], dtypes[h]) for h in self.hooks}
        self.columns = list(META_COLUMNS) if config.with_metadata else ["timestep"]
        col_dtypes = {c: max(COLUMN_DTYPES[c], key=lambda d: d.itemsize) for c in self.columns}  # token may be int32
        if config.with_metadata:
            col_dtypes.update({c: np.dtype("int64") for c in EXTRA_COLUMNS})
        self.read_columns = sorted(set(self.columns) | set(config.filter_columns()), key=list(META_COLUMNS).index)
        held = config.shuffle_buffer if config.shuffle else config.batch_size
        self.max_buffer_rows = held + config.block_rows
        """Most rows a buffer can hold: shuffle_buffer (batch_size unshuffled) + one block."""
        self._buffer_spec = (widths, col_dtypes)
        self._peak = 0
        self.blocks = self._plan()
        self.num_rows = sum(b.rows for b in self.blocks)
        """Rows that pass the filters, over all ranks."""
        if self.num_rows == 0:
            info = self.store.info()
            raise TideError(f"the loader's filters keep no rows of {self.store.path} (t_min={config.t_min}, "
                            f"t_max={config.t_max}, steps={config.steps}, conds={config.conds}, "
                            f"cfg_branch={config.cfg_branch}); recorded steps {info['recorded_steps']} with "
                            f"timesteps {info['timesteps']}, {len(info['conditions'])} condition(s), "
                            f"{info['cfg_branches']} CFG branch(es): widen the filters")
        self.epoch = 0
        self._torch_dtype = TORCH_DTYPES[config.dtype]
        self._verified: set[int] = set()
        """Shards whose checksum this loader has checked (the store remembers matches for the process)."""

    @property
    def peak_buffer_rows(self) -> int:
        """Most rows a shuffle buffer of this loader has held so far."""
        return self._peak

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _plan(self) -> list[Block]:
        """Every shard cut into blocks, with the rows of each that pass the filters (empty blocks dropped)."""
        cfg, store = self.config, self.store
        cols = cfg.filter_columns()
        blocks = []
        for i, shard in enumerate(store.shards):
            for start in range(0, shard.rows, cfg.block_rows):
                stop = min(start + cfg.block_rows, shard.rows)
                rows = stop - start
                if cols:
                    keep = cfg.mask(store.read(i, start, stop, (), cols)[1])
                    rows = int(keep.sum())
                if rows:
                    blocks.append(Block(i, start, stop, rows))
        return blocks

    def epoch_blocks(self, epoch: int) -> list[Block]:
        """The blocks this rank reads in ``epoch``, in reading order."""
        cfg = self.config
        order = (np.random.default_rng([cfg.seed, epoch]).permutation(len(self.blocks)) if cfg.shuffle
                 else np.arange(len(self.blocks)))
        return [self.blocks[j] for j in order[cfg.rank::cfg.world_size]]

    def _read(self, block: Block) -> tuple[dict, dict]:
        cfg = self.config
        if cfg.verify_checksums and block.shard not in self._verified:
            self.store.verify_checksum(block.shard)
            self._verified.add(block.shard)
        _, meta = self.store.read(block.shard, block.start, block.stop, (), self.read_columns)
        keep = cfg.mask(meta)
        if keep is None:
            lo, hi, idx = block.start, block.stop, None
        else:
            idx = np.flatnonzero(keep)
            lo, hi = block.start + int(idx[0]), block.start + int(idx[-1]) + 1
            idx = idx - (lo - block.start)
            meta = {c: v[lo - block.start:hi - block.start] for c, v in meta.items()}
        acts, _ = self.store.read(block.shard, lo, hi, self.hooks, ())
        if cfg.with_metadata:
            meta["shard"] = np.full(hi - lo, block.shard, dtype=np.int64)
            meta["row"] = np.arange(lo, hi, dtype=np.int64)
        if idx is not None and len(idx) != hi - lo:
            acts = {h: a[idx] for h, a in acts.items()}
            meta = {c: v[idx] for c, v in meta.items()}
        return acts, meta

    def _batch(self, acts: dict[str, np.ndarray], cols: dict[str, np.ndarray]) -> Batch:
        tensors = {h: torch.from_numpy(a).to(self._torch_dtype) for h, a in acts.items()}
        t_B = torch.from_numpy(cols["timestep"]).to(torch.float32)
        meta = None
        if self.config.with_metadata:
            meta = {c: torch.from_numpy(v).to(torch.float32 if c == "timestep" else torch.int64)
                    for c, v in cols.items()}
        return Batch(tensors[self.hooks[0]] if len(self.hooks) == 1 else tensors, t_B, meta)

    def _epoch(self, epoch: int, buf: ShuffleBuffer) -> Iterator[Batch]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch, cfg.rank, 1]) if cfg.shuffle else None
        held = self.max_buffer_rows - cfg.block_rows
        buf.n = 0
        for block in self.epoch_blocks(epoch):
            buf.add(*self._read(block))
            self._peak = max(self._peak, buf.n)
            while buf.n >= held:
                yield self._batch(*buf.take(cfg.batch_size, rng))
        while buf.n >= cfg.batch_size or (buf.n and not cfg.drop_last):
            yield self._batch(*buf.take(cfg.batch_size, rng))

    def __iter__(self) -> Iterator[Batch]:
        buf = ShuffleBuffer(self.max_buffer_rows, *self._buffer_spec)
        done = 0
        while self.config.epochs is None or done < self.config.epochs:
            yield from self._epoch(self.epoch, buf)
            self.epoch += 1
            done += 1
