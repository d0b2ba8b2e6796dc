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

STATS_VERSION = 2
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
    var_TD: np.ndarray
    """Variance of each dimension per step (sums to ``var_T``)."""
    mean_D: np.ndarray
    """Mean activation over every row."""
    rms: float
    """sqrt(E ||x||^2) over every row."""
    var: float
    """E ||x - mean||^2 over every row."""
    var_D: np.ndarray
    """Variance of each dimension over every row (sums to ``var``)."""

    def index_of(self, timesteps) -> np.ndarray:
        """Position in ``steps_T`` of the step whose timestep is nearest to each value given (a value
        half-way between two takes the lower timestep; see :func:`tide.timesteps.nearest_index`)."""
        return nearest_index(self.timesteps_T, timesteps)


def finish_stats(hook: str, steps_T, timesteps_T, count_T, sum_TD, sumsq_TD) -> TimestepStats:
    """``TimestepStats`` from per-step row counts, sums and sums of squares (per dimension)."""
    count_T = np.asarray(count_T, dtype=np.int64)
    sum_TD = np.asarray(sum_TD, dtype=np.float64)
    sumsq_TD = np.asarray(sumsq_TD, dtype=np.float64)
    mean_TD = sum_TD / count_T[:, None]
    n = count_T.sum()
    mean_D = sum_TD.sum(axis=0) / n
    var_TD = np.maximum(sumsq_TD / count_T[:, None] - mean_TD ** 2, 0.0)
    var_D = np.maximum(sumsq_TD.sum(axis=0) / n - mean_D ** 2, 0.0)
    msq_T = sumsq_TD.sum(axis=1) / count_T
    return TimestepStats(
        hook=hook, steps_T=np.asarray(steps_T, dtype=np.int64), timesteps_T=np.asarray(timesteps_T, dtype=np.float32),
        count_T=count_T, mean_TD=mean_TD, rms_T=np.sqrt(msq_T), var_T=var_TD.sum(axis=1), var_TD=var_TD,
        mean_D=mean_D, rms=float(np.sqrt(sumsq_TD.sum() / n)), var=float(var_D.sum()), var_D=var_D)


def compute_stats(store: ActivationStore, hook: str, minus: str | None = None) -> TimestepStats:
    """One streaming float64 pass over every row of ``hook`` (or of ``hook - minus``, rows aligned), grouped by
    recorded step."""
    width = store.hooks[hook]
    if minus is not None and store.hooks[minus] != width:
        raise TideError(f"{hook} and {minus} have different widths ({width}, {store.hooks[minus]})")
    sums: dict[int, np.ndarray] = {}
    sumsq: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    step_t: dict[int, float] = {}
    block = store.rows_per_chunk(width, 8)
    for _, _, acts, meta in store.iter_blocks([hook] + ([minus] if minus else []), ("timestep", "step_index"), block):
        x_RD = acts[hook].astype(np.float64)
        if minus is not None:
            x_RD -= acts[minus]
        s_R, t_R = meta["step_index"], meta["timestep"]
        values, first, inverse = np.unique(s_R, return_index=True, return_inverse=True)
        for k, s in enumerate(values.tolist()):
            x = x_RD if len(values) == 1 else x_RD[inverse == k]
            if s not in sums:
                sums[s], sumsq[s], counts[s], step_t[s] = np.zeros(width), np.zeros(width), 0, float(t_R[first[k]])
            sums[s] += x.sum(axis=0)
            sumsq[s] += np.einsum("rd,rd->d", x, x)
            counts[s] += len(x)
    if not counts:
        raise TideError(f"dataset {store.path} holds no rows; capture some first")
    steps = sorted(counts)
    count_T = np.array([counts[s] for s in steps], dtype=np.int64)
    return finish_stats(hook if minus is None else f"{hook} - {minus}", np.array(steps, dtype=np.int64), np.array([step_t[s] for s in steps], np.float32),
                        count_T, np.stack([sums[s] for s in steps]), np.stack([sumsq[s] for s in steps]))


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
                    g["sumsq"] = (st.var_TD + st.mean_TD ** 2) * st.count_T[:, None]
    except OSError as exc:
        warnings.warn(f"could not cache statistics in {final} ({exc}); they will be recomputed next time")
