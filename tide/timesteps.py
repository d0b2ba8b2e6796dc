"""(Ground floor) Timestep lookups shared by every stage: the nearest recorded timestep, and the
timestep bucket a value falls in. Plain numpy at import time; torch tensors are accepted where
noted (torch is only used when the caller passes a tensor).

Three rules, each written once:

* :func:`nearest_index`: position of the recorded timestep nearest to each query; a query exactly
  half-way between two recorded timesteps takes the *lower* timestep (statistics lookups:
  ``TimestepStats.index_of``, mean ablation).
* :func:`bucket_of`: bucket ``i`` of edges ``[e0, ..., eK]`` holds ``e_i <= t < e_{i+1}``, the last
  one also ``t == eK``; values outside every bucket (and NaN) get ``K`` (evaluation metrics).
* :func:`bucket_index`: ``num_buckets`` equal ranges over ``[0, t_max]`` computed in float32, values
  outside clamped to the first or last bucket (per-bucket SAE conditioning). It is not
  ``bucket_of`` over equal edges: it clamps instead of leaving values out, and its float32
  division can place a value within rounding of an edge differently.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np


def nearest_index(recorded_T, query_N) -> np.ndarray:
    """(N,) position in ``recorded_T`` of the recorded timestep nearest to each query (float64).

    ``recorded_T`` may be in any order (a schedule runs from noisy to clean); a query exactly
    half-way between two recorded timesteps takes the lower one.
    """
    t = np.asarray(query_N, dtype=np.float64)
    recorded = np.asarray(recorded_T)
    order = np.argsort(recorded)
    sorted_t = recorded[order].astype(np.float64)
    pos = np.clip(np.searchsorted(sorted_t, t), 1, max(len(sorted_t) - 1, 1))
    left = sorted_t[pos - 1]
    right = sorted_t[np.minimum(pos, len(sorted_t) - 1)]
    pos = np.where(np.abs(t - left) <= np.abs(right - t), pos - 1, pos)
    return order[np.minimum(pos, len(sorted_t) - 1)]


def bucket_of(t, edges: Sequence[float]):
    """Bucket of each timestep for strictly increasing ``edges`` ``[e0, ..., eK]``.

    Bucket ``i`` holds ``e_i <= t < e_{i+1}``; the last bucket also holds ``t == eK``; a value
    outside ``[e0, eK]`` (or NaN) gets ``K``, one past the last bucket. Compared in float64. ``t``
    is a numpy array (or sequence), returning int64, or a torch tensor, returning a long tensor on
    its device (``edges`` may then be a float64 tensor on that device).
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(t, torch.Tensor):
        t64 = t.double()
        edges_t = torch.as_tensor(edges, dtype=torch.float64, device=t.device)
        n = len(edges_t) - 1
        b = torch.bucketize(t64, edges_t, right=True) - 1
        b = torch.where(t64 == edges_t[-1], torch.full_like(b, n - 1), b)
        inside = (b >= 0) & (b < n)
        return torch.where(inside, b, torch.full_like(b, n))
    t64 = np.asarray(t, dtype=np.float64)
    edges_e = np.asarray(edges, dtype=np.float64)
    n = len(edges_e) - 1
    b = np.searchsorted(edges_e, t64, side="right").astype(np.int64) - 1
    b = np.where(t64 == edges_e[-1], n - 1, b)
    return np.where((b >= 0) & (b < n), b, n)


def bucket_index(t_B, num_buckets: int, t_max: float):
    """Equal-width timestep buckets over [0, t_max] (a torch tensor): (B,) long in 0..num_buckets-1,
    computed in float32; values below 0 or above ``t_max`` fall in the first or last bucket."""
    return (t_B.float() / t_max * num_buckets).floor().long().clamp(0, num_buckets - 1)
