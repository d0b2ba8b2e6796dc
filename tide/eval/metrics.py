"""Reconstruction metrics of an SAE on captured activations, per timestep bucket and per timestep.

One streaming pass over the data (``torch.no_grad``, the SAE in eval mode) accumulates exact sums
in float64, so every number is over all rows read, never an average of batch averages:

* **FVU** (fraction of variance unexplained, 1 - explained variance) in the raw activation space:
  sum ||x^ - x||^2 / sum ||x - mean||^2, where the mean is the group's own (the bucket's, the
  timestep's, or all rows' for ``overall``);
* **MSE** per element: sum ||x^ - x||^2 / (rows * d_in);
* **cosine**: mean over rows of cos(x, x^);
* **L0**: mean number of active (non-zero) latents per row;
* **dead fraction**: latents that never fired on the group's rows;
* **dense fraction**: latents that fired on more than ``dense_threshold`` of the group's rows.

Buckets are timestep ranges given by their edges ``[e0, e1, ..., eK]``: bucket i holds
``e_i <= t < e_{i+1}`` (the last one includes its upper edge). Per recorded timestep the same
numbers except dead/dense are reported as curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from tide.data import ActivationLoader, ActivationStore, LoaderConfig
from tide.device import eval_mode
from tide.errors import TideError
from tide.timesteps import bucket_of

DEFAULT_NUM_BUCKETS = 5
"""Equal timestep ranges over [0, t_max] when no bucket edges are given."""
DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of rows counts as dense."""


def default_buckets(t_max: float = 1000.0, num: int = DEFAULT_NUM_BUCKETS) -> list[float]:
    """Edges of ``num`` equal timestep ranges over [0, t_max]."""
    return [float(e) for e in np.linspace(0.0, float(t_max), num + 1)]


def check_buckets(edges: Sequence[float]) -> list[float]:
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise TideError(f"bucket edges must be at least two increasing timesteps, e.g. 0,200,400,600,800,1000; "
                        f"got {edges}")
    return edges


def check_sae_hook(sae, hook: str) -> None:
    """Refuse an SAE trained on another hook than the one asked (an empty ``cfg.hook`` names none)."""
    trained = getattr(sae.cfg, "hook", "") or ""
    if trained and trained != hook:
        raise TideError(f"the SAE was trained on hook {trained!r} but hook {hook!r} was asked for: "
                        f"evaluate it at {trained!r}, or load an SAE trained on {hook!r}")


def _nan_to_none(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


class BucketMetrics(NamedTuple):
    """Reconstruction metrics over the rows of one timestep range (or all rows)."""

    t_lo: float
    t_hi: float
    rows: int
    fvu: float
    mse: float
    cosine: float
    l0: float
    dead_fraction: float
    dense_fraction: float

    def to_dict(self) -> dict:
        return {k: _nan_to_none(float(v)) if k != "rows" else int(v) for k, v in self._asdict().items()}


class ReconstructionMetrics(NamedTuple):
    """What :func:`reconstruction_metrics` measured."""

    hook: str
    d_in: int
    d_sae: int
    dense_threshold: float
    bucket_edges: list[float]
    overall: BucketMetrics
    """Over every row read."""
    buckets: list[BucketMetrics]
    """One per timestep range (a range with no rows has rows=0 and NaN metrics)."""
    timesteps_T: np.ndarray
    """Each timestep seen, ascending."""
    rows_T: np.ndarray
    fvu_T: np.ndarray
    mse_T: np.ndarray
    cosine_T: np.ndarray
    l0_T: np.ndarray

    @property
    def rows(self) -> int:
        return self.overall.rows

    def to_dict(self) -> dict:
        """JSON-able (NaN becomes null)."""
        def curve(a):
            return [_nan_to_none(float(v)) for v in a]
        return {
            "hook": self.hook, "rows": self.rows, "d_in": self.d_in, "d_sae": self.d_sae,
            "dense_threshold": self.dense_threshold, "bucket_edges": list(self.bucket_edges),
            "overall": self.overall.to_dict(),
            "buckets": [b.to_dict() for b in self.buckets],
            "per_timestep": {"timestep": curve(self.timesteps_T), "rows": [int(v) for v in self.rows_T],
                             "fvu": curve(self.fvu_T), "mse": curve(self.mse_T),
                             "cosine": curve(self.cosine_T), "l0": curve(self.l0_T)},
        }


class _Slots:
    """Float64 sums per distinct timestep, grown as new timesteps appear.

    Variance sums are kept about a per-slot shift (the mean of the slot's first rows), which
    keeps sum ||x - c||^2 - ||sum (x - c)||^2 / n free of cancellation when activations have a
    large mean.
    """

    def __init__(self, d: int, device: torch.device):
        self.d, self.device = d, device
        self.index: dict[float, int] = {}
        z = torch.zeros(0, dtype=torch.float64, device=device)
        self.n, self.sse, self.s2, self.cos, self.l0 = z, z.clone(), z.clone(), z.clone(), z.clone()
        self.shift = torch.zeros(0, d, dtype=torch.float64, device=device)
        self.s1 = torch.zeros(0, d, dtype=torch.float64, device=device)

    def slots_of(self, t_B: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        values, inverse = torch.unique(t_B, return_inverse=True)
        vals = values.tolist()
        new = [j for j, v in enumerate(vals) if v not in self.index]
        if new:
            shifts = torch.stack([x_BD[inverse == j].double().mean(0) for j in new])
            for j in new:
                self.index[vals[j]] = len(self.index)
            k = len(new)
            grow = torch.zeros(k, dtype=torch.float64, device=self.device)
            self.n, self.sse, self.s2 = (torch.cat([a, grow]) for a in (self.n, self.sse, self.s2))
            self.cos, self.l0 = (torch.cat([a, grow]) for a in (self.cos, self.l0))
            self.s1 = torch.cat([self.s1, torch.zeros(k, self.d, dtype=torch.float64, device=self.device)])
            self.shift = torch.cat([self.shift, shifts])
        lut = torch.tensor([self.index[v] for v in vals], device=t_B.device)
        return lut[inverse]

    def add(self, slot_B, x_BD, sse_B, cos_B, l0_B) -> None:
        dev = x_BD.double() - self.shift[slot_B]
        ones = torch.ones_like(sse_B)
        self.n.index_add_(0, slot_B, ones)
        self.sse.index_add_(0, slot_B, sse_B)
        self.s1.index_add_(0, slot_B, dev)
        self.s2.index_add_(0, slot_B, (dev * dev).sum(-1))
        self.cos.index_add_(0, slot_B, cos_B)
        self.l0.index_add_(0, slot_B, l0_B)

    def timesteps(self) -> np.ndarray:
        return np.array(sorted(self.index, key=self.index.get), dtype=np.float64)

    def summary(self, select: np.ndarray) -> tuple[int, float, float, float, float]:
        """(rows, fvu, mse, cosine, l0) over the slots where ``select`` is True (exact combination)."""
        sel = torch.as_tensor(select, device=self.device)
        n = self.n[sel]
        total = float(n.sum())
        if total == 0:
            nan = float("nan")
            return 0, nan, nan, nan, nan
        keep = n > 0
        n, s1, s2, shift = n[keep], self.s1[sel][keep], self.s2[sel][keep], self.shift[sel][keep]
        mean_SD = shift + s1 / n[:, None]                       # each slot's mean
        ssd_S = s2 - (s1 * s1).sum(-1) / n                      # each slot's sum ||x - mean_s||^2
        grand = (mean_SD * n[:, None]).sum(0) / total
        ssd = float(ssd_S.sum() + (n * ((mean_SD - grand) ** 2).sum(-1)).sum())
        sse = float(self.sse[sel].sum())
        fvu = sse / ssd if ssd > 0 else float("nan")
        return (int(round(total)), fvu, sse / (total * self.d), float(self.cos[sel].sum()) / total,
                float(self.l0[sel].sum()) / total)


def _batches(data, hook: str | None, batch_size: int, seed: int, sae, subset: bool):
    """(hook, width, loader, iterator of (x_BD, t_B)) from a store, a dataset path, or a loader.

    A store is read in stored order (every row; order does not change exact sums), or shuffled with
    ``seed`` when only a ``subset`` of rows will be read, so the subset spans shards and timesteps.
    """
    if isinstance(data, (str, Path)):
        data = ActivationStore(data)
    if isinstance(data, ActivationStore):
        hook = hook or getattr(sae.cfg, "hook", "") or None
        if hook is None:
            if len(data.hooks) != 1:
                raise TideError(f"the SAE names no hook and {data.path} holds several ({list(data.hooks)}): "
                                "say which hook to evaluate")
            hook = next(iter(data.hooks))
        base = getattr(sae.cfg, "base_hook", None)
        data.check_hooks([hook] + ([base] if base else []))
        loader = ActivationLoader(data, LoaderConfig(hooks=[hook] + ([base] if base else []), batch_size=batch_size,
                                                     seed=seed, shuffle=subset, shuffle_buffer=max(batch_size, 65536),
                                                     epochs=1))
        width = data.hooks[hook]
    elif isinstance(data, ActivationLoader):
        loader = data
        hook = hook or getattr(sae.cfg, "hook", "") or None
        if hook is None:
            if len(loader.hooks) != 1:
                raise TideError(f"the loader reads several hooks ({loader.hooks}): say which hook to evaluate")
            hook = loader.hooks[0]
        if hook not in loader.hooks:
            raise TideError(f"hook {hook!r} is not read by this loader (it reads {loader.hooks})")
        width = loader.store.hooks[hook]
    else:
        raise TideError(f"reconstruction metrics read an ActivationStore, an ActivationLoader or a dataset "
                        f"directory, got {type(data).__name__}")

    base = getattr(sae.cfg, "base_hook", None)

    def rows() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            acts = batch.acts[hook] if isinstance(batch.acts, dict) else batch.acts
            if base is not None:  # an update target: the block's output minus its input
                if not isinstance(batch.acts, dict) or base not in batch.acts:
                    raise TideError(f"the SAE's update target needs {base!r} beside {hook!r}; the loader reads "
                                    f"{loader.hooks}")
                acts = acts - batch.acts[base]
            yield acts, batch.t_B

    return hook, width, loader, rows()


@torch.no_grad()
def reconstruction_metrics(sae, data, hook: str | None = None, buckets: Sequence[float] | None = None,
                           max_rows: int | None = None, dense_threshold: float = DENSE_THRESHOLD,
                           batch_size: int = 4096, seed: int = 0,
                           device: str | torch.device | None = None) -> ReconstructionMetrics:
    """Reconstruction metrics of ``sae`` on a captured dataset, in one streaming pass.

    ``data`` is an :class:`~tide.data.ActivationStore`, a dataset directory or an
    :class:`~tide.data.ActivationLoader` (read for one pass; an endless loader needs ``max_rows``).
    ``hook`` defaults to the SAE's ``cfg.hook``; an SAE trained on another hook is refused.
    ``buckets`` are timestep edges (default: 5 equal ranges over [0, sae.cfg.t_max]).
    ``max_rows`` stops after that many rows; from a store they are a shuffled (seeded) subset.
    """
    if max_rows is not None and max_rows < 1:
        raise TideError(f"max_rows must be >= 1 (or None for every row), got {max_rows}")
    if not 0 <= dense_threshold <= 1:
        raise TideError(f"dense_threshold is a fraction of rows in [0, 1], got {dense_threshold}")
    edges = check_buckets(buckets if buckets is not None else default_buckets(getattr(sae.cfg, "t_max", 1000.0)))
    hook, width, loader, rows = _batches(data, hook, batch_size, seed, sae, max_rows is not None)
    check_sae_hook(sae, hook)
    sae.check_width(width, f"hook {hook!r}")
    if max_rows is None and isinstance(data, ActivationLoader) and loader.config.epochs is None:
        raise TideError("the loader is endless (epochs=None): give max_rows, or a loader with epochs=1")

    param = next(sae.parameters())
    device = torch.device(device) if device is not None else param.device
    d_sae = sae.cfg.d_sae
    edges_t = torch.tensor(edges, dtype=torch.float64, device=device)
    n_b = len(edges) - 1
    slots = _Slots(width, device)
    fired_KF = torch.zeros(n_b + 1, d_sae, dtype=torch.float64, device=device)  # last row: every row
    rows_K = torch.zeros(n_b + 1, dtype=torch.float64, device=device)

    seen = 0
    with eval_mode(sae):
        for x_BD, t_B in rows:
            if max_rows is not None:
                x_BD, t_B = x_BD[:max_rows - seen], t_B[:max_rows - seen]
            if not len(x_BD):
                break
            x_BD = x_BD.to(device=device, dtype=param.dtype)
            t_B = t_B.to(device=device, dtype=torch.float32)
            out = sae(x_BD, t_B)
            x_hat = out.x_hat_BD
            sse_B = ((x_hat.double() - x_BD.double()) ** 2).sum(-1)
            cos_B = F.cosine_similarity(x_hat.double(), x_BD.double(), dim=-1, eps=1e-12)
            acts, idx = out.latents
            active = acts != 0                                   # (B, K) with idx, else (B, F)
            l0_B = active.sum(-1).double()
            slot_B = slots.slots_of(t_B, x_BD)
            slots.add(slot_B, x_BD, sse_B, cos_B, l0_B)

            bucket_B = bucket_of(t_B, edges_t)  # n_b = outside every bucket
            per_bucket = torch.zeros(n_b + 1, d_sae, dtype=torch.float64, device=device)
            if idx is None:
                per_bucket.index_add_(0, bucket_B, active.double())
            else:  # k-sparse codes: count (bucket, latent) pairs without a dense (B, F) tensor
                per_bucket.index_put_((bucket_B[:, None].expand_as(idx), idx), active.double(), accumulate=True)
            fired_KF[:n_b] += per_bucket[:n_b]
            fired_KF[n_b] += per_bucket.sum(0)
            rows_K[:n_b] += torch.bincount(bucket_B, minlength=n_b + 1)[:n_b].double()
            rows_K[n_b] += len(x_BD)
            seen += len(x_BD)
            if max_rows is not None and seen >= max_rows:
                break
    if seen == 0:
        raise TideError(f"no rows of hook {hook!r} were read: the data is empty or its filters keep nothing")

    timesteps = slots.timesteps()
    order = np.argsort(timesteps)

    def group(select: np.ndarray, k: int, lo: float, hi: float) -> BucketMetrics:
        n, fvu, mse, cos, l0 = slots.summary(select)
        if n == 0:
            nan = float("nan")
            return BucketMetrics(lo, hi, 0, nan, nan, nan, nan, nan, nan)
        freq = fired_KF[k] / rows_K[k]
        dead = float((fired_KF[k] == 0).double().mean())
        dense = float((freq > dense_threshold).double().mean())
        return BucketMetrics(lo, hi, n, fvu, mse, cos, l0, dead, dense)

    bucket_T = bucket_of(timesteps, edges)
    bucket_metrics = [group(bucket_T == b, b, edges[b], edges[b + 1]) for b in range(n_b)]
    overall = group(np.ones(len(timesteps), dtype=bool), n_b,
                    float(timesteps.min()), float(timesteps.max()))

    curves = [slots.summary(np.arange(len(timesteps)) == j) for j in order]
    return ReconstructionMetrics(
        hook=hook, d_in=width, d_sae=d_sae, dense_threshold=float(dense_threshold), bucket_edges=edges,
        overall=overall, buckets=bucket_metrics, timesteps_T=timesteps[order],
        rows_T=np.array([c[0] for c in curves], dtype=np.int64),
        fvu_T=np.array([c[1] for c in curves]), mse_T=np.array([c[2] for c in curves]),
        cosine_T=np.array([c[3] for c in curves]), l0_T=np.array([c[4] for c in curves]))
