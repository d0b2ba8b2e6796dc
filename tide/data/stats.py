"""Per-timestep statistics of a hook's activations, and their cache ``stats.h5`` (docs/FORMAT.md).

``compute_stats`` makes one streaming float64 pass over a store; ``cached_stats`` (what
``ActivationStore.stats`` calls) reads them from ``stats.h5`` beside the manifest while the
manifest they were computed from is unchanged, and otherwise computes and caches them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import h5py
import numpy as np

from tide.capture.schema import STATS_FILE
from tide.errors import TideError
from tide.io import atomic_path
from tide.timesteps import nearest_index

if TYPE_CHECKING:
    from tide.data.store import ActivationStore

STATS_VERSION = 1
"""Layout version of ``stats.h5``; a cache with another version is recomputed."""


class TimestepStats(NamedTuple):
    """Per-timestep statistics of one hook's activations (rows of every CFG branch together)."""

    hook: str
    steps_T: np.ndarray
    """Recorded step indices, ascending (noisiest first), int64."""
    timesteps_T: np.ndarray
    """Scheduler timestep of each step, float32."""
    count_T: np.ndarray
    """Rows per step, int64."""
    mean_TD: np.ndarray
    """Mean activation per step, float64."""
    rms_T: np.ndarray
    """Root-mean-square norm per step: sqrt(E ||x||^2)."""
    var_T: np.ndarray
    """Total variance per step: E ||x - mean_t||^2 (the denominator of FVU at that step)."""
    mean_D: np.ndarray
    """Mean activation over every row."""
    rms: float
    """sqrt(E ||x||^2) over every row."""
    var: float
    """E ||x - mean||^2 over every row."""

    def index_of(self, timesteps) -> np.ndarray:
        """Position in ``steps_T`` of the step whose timestep is nearest to each value given (a value
        half-way between two takes the lower timestep; see :func:`tide.timesteps.nearest_index`)."""
        return nearest_index(self.timesteps_T, timesteps)


def finish_stats(hook: str, steps_T, timesteps_T, count_T, sum_TD, sumsq_T) -> TimestepStats:
    """``TimestepStats`` from per-step row counts, sums and sums of squared norms."""
    count_T = np.asarray(count_T, dtype=np.int64)
    sum_TD = np.asarray(sum_TD, dtype=np.float64)
    sumsq_T = np.asarray(sumsq_T, dtype=np.float64)
    mean_TD = sum_TD / count_T[:, None]
    msq_T = sumsq_T / count_T
    n = count_T.sum()
    mean_D = sum_TD.sum(axis=0) / n
    msq = float(sumsq_T.sum() / n)
    return TimestepStats(
        hook=hook, steps_T=np.asarray(steps_T, dtype=np.int64), timesteps_T=np.asarray(timesteps_T, dtype=np.float32),
        count_T=count_T, mean_TD=mean_TD, rms_T=np.sqrt(msq_T),
        var_T=np.maximum(msq_T - (mean_TD ** 2).sum(axis=1), 0.0),
        mean_D=mean_D, rms=float(np.sqrt(msq)), var=max(msq - float((mean_D ** 2).sum()), 0.0))


def compute_stats(store: ActivationStore, hook: str) -> TimestepStats:
    """One streaming float64 pass over every row of ``hook``, grouped by recorded step."""
    width = store.hooks[hook]
    sums: dict[int, np.ndarray] = {}
    sumsq: dict[int, float] = {}
    counts: dict[int, int] = {}
    step_t: dict[int, float] = {}
    block = store.rows_per_chunk(width, 8)
    for _, _, acts, meta in store.iter_blocks([hook], ("timestep", "step_index"), block):
        x_RD = acts[hook].astype(np.float64)
        s_R, t_R = meta["step_index"], meta["timestep"]
        values, first, inverse = np.unique(s_R, return_index=True, return_inverse=True)
        for k, s in enumerate(values.tolist()):
            x = x_RD if len(values) == 1 else x_RD[inverse == k]
            if s not in sums:
                sums[s], sumsq[s], counts[s], step_t[s] = np.zeros(width), 0.0, 0, float(t_R[first[k]])
            sums[s] += x.sum(axis=0)
            sumsq[s] += float(np.einsum("rd,rd->", x, x))
            counts[s] += len(x)
    if not counts:
        raise TideError(f"dataset {store.path} holds no rows; capture some first")
    steps = sorted(counts)
    count_T = np.array([counts[s] for s in steps], dtype=np.int64)
    return finish_stats(hook, np.array(steps, dtype=np.int64), np.array([step_t[s] for s in steps], np.float32),
                        count_T, np.stack([sums[s] for s in steps]), np.array([sumsq[s] for s in steps]))


def cached_stats(store: ActivationStore, hook: str | None = None, recompute: bool = False,
                 compute: Callable[[str], TimestepStats] | None = None) -> TimestepStats:
    """Statistics of ``hook`` (the store's only hook when None) from the cache, or computed (by
    ``compute``, default :func:`compute_stats` on ``store``) and added to the cache."""
    if hook is None:
        if len(store.hooks) != 1:
            raise TideError(f"{store.path} holds several hooks; name one of {list(store.hooks)}")
        hook = next(iter(store.hooks))
    store.check_hooks([hook])
    if not recompute:
        cached = read_stats_cache(store.path, store.manifest_sha256, store.rows).get(hook)
        if cached is not None:
            return cached
    result = compute(hook) if compute is not None else compute_stats(store, hook)
    write_stats_cache(store.path, store.manifest_sha256, store.rows, result)
    return result


def read_stats_cache(root: Path, manifest_sha256: str, rows: int) -> dict[str, TimestepStats]:
    """Every hook's statistics in ``root/stats.h5``; empty when the file is missing, unreadable, of
    another layout version, or computed from another manifest or row count."""
    path = Path(root) / STATS_FILE
    if not path.is_file():
        return {}
    try:
        with h5py.File(path, "r") as f:
            if (f.attrs.get("manifest_sha256") != manifest_sha256
                    or int(f.attrs.get("total_rows", -1)) != rows
                    or int(f.attrs.get("stats_version", -1)) != STATS_VERSION):
                return {}
            out = {}
            for hook in f:
                g = f[hook]
                out[hook] = finish_stats(hook, g["steps"][()], g["timesteps"][()], g["count"][()],
                                         g["sum"][()], g["sumsq"][()])
            return out
    except Exception:  # an unreadable cache is recomputed
        return {}


def write_stats_cache(root: Path, manifest_sha256: str, rows: int, result: TimestepStats) -> None:
    """Add ``result`` to ``root/stats.h5`` (atomically; a directory that cannot be written only
    loses the cache, with a warning)."""
    entries = read_stats_cache(root, manifest_sha256, rows)
    entries[result.hook] = result
    final = Path(root) / STATS_FILE
    try:
        with atomic_path(final, unique=True) as tmp:  # unique: several processes may compute at once
            with h5py.File(tmp, "w") as f:
                f.attrs["manifest_sha256"] = manifest_sha256
                f.attrs["total_rows"] = rows
                f.attrs["stats_version"] = STATS_VERSION
                for hook, st in entries.items():
                    g = f.create_group(hook)
                    g["steps"], g["timesteps"], g["count"] = st.steps_T, st.timesteps_T, st.count_T
                    g["sum"] = st.mean_TD * st.count_T[:, None]
                    g["sumsq"] = st.rms_T ** 2 * st.count_T
    except OSError as exc:
        warnings.warn(f"could not cache statistics in {final} ({exc}); they will be recomputed next time")
