"""Rank statistics for feature selectivity: midranks with ties, and one-vs-rest AUROC per class from them."""

from __future__ import annotations

import numpy as np


def safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise (den broadcast), NaN where den is 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def midranks(x_NF: np.ndarray) -> np.ndarray:
    """1-based ranks of each column's values, ties sharing the mean of their ranks."""
    n = x_NF.shape[0]
    order = np.argsort(x_NF, axis=0, kind="stable")
    xs = np.take_along_axis(x_NF, order, axis=0)
    pos = np.broadcast_to(np.arange(n)[:, None], xs.shape)
    new = np.ones(xs.shape, dtype=bool)
    new[1:] = xs[1:] != xs[:-1]
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=0)
    end = np.ones(xs.shape, dtype=bool)
    end[:-1] = new[1:]
    last = np.flip(np.minimum.accumulate(np.flip(np.where(end, pos, n - 1), 0), axis=0), 0)
    ranks = np.empty(xs.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=0)
    return ranks


def auroc_one_vs_rest(score_NF: np.ndarray, label_N: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, F) AUROC of ``score`` separating class c from the rest (Mann-Whitney U / (n1 n0))."""
    ranks = midranks(score_NF)
    onehot = (label_N[None, :] == np.arange(num_classes)[:, None]).astype(np.float64)
    n1 = onehot.sum(1)[:, None]
    n0 = len(label_N) - n1
    u = onehot @ ranks - n1 * (n1 + 1) / 2
    return safe_ratio(u, n1 * n0)

# ---------------------------------------------------------------------- the pass
