"""Per-feature statistics of an SAE over a captured activation dataset, from one streaming pass.

For every SAE feature (latent) ``f``:

- **frequency**: the fraction of rows where ``f`` fires (latent > 0), overall and per recorded
  denoising step (the *timestep profile*);
- **mean activation**: over all rows, over the rows where it fires, and per step;
- **top-k occurrences**: the ``top_k`` largest activations with the (sample, step, timestep, token)
  they came from, kept in bounded ``(F, K)`` arrays merged batch by batch with ``torch.topk``;
- **class selectivity**: an *image-level* activation per (sample, feature) = the **max** over the
  sample's tokens (and over its recorded steps for the overall score, or at one step for the
  per-step score), then the one-vs-rest AUROC of that score for each condition (class), computed
  exactly from mid-ranks (ties count one half) once the pass is over;
- **spatial map**: the mean activation at each token position, shaped to the patch grid:
  (rows, cols) for images, (frames, rows, cols) — one map per latent frame — for video backbones;
- **activation histogram**: how many of the rows where ``f`` fires have an activation in each of
  ``HIST_BINS`` (64) bins shared by all features, log-spaced over ``HIST_RANGE`` (1e-4 to 1e4, 8 bins
  per decade); a bin holds [lower edge, upper edge), a value below the first edge counts in the first
  bin and one at or above the last edge in the last, so a feature's counts sum to its fire count.

Beside the features, the hook's own scale: the RMS norm of its activation vectors at each step,
R(t) = sqrt(mean ||x||^2), the unit of norm-relative steering (:mod:`tide.analysis.steering`).

Latents of every sparsity are non-negative, so "fires" means "> 0" and the pass only looks at the
positive entries (a TopK SAE's k per row, or the non-zeros of a dense code).

The result is a :class:`FeatureStats`; :func:`save_feature_stats` writes it to one HDF5 file
(``feature_stats.h5``, written to a temporary file and renamed into place) and
:func:`load_feature_stats` reads it back. Layout of the file: one dataset per array field of
:class:`FeatureStats` under its field name, and the provenance in the root attributes
(``schema`` = ``"tide.feature_stats"``, ``schema_version``, ``hook``, ``sae_path``,
``sae_config_hash``, ``sae_weights_hash``, ``dataset_path``, ``manifest_sha256``,
``dataset_rows``, ``rows``, ``cfg_branch``, ``top_k``, ``image_reduce``, ``condition_names``,
``patch_grid``, ``tide_version``). Empty top-k slots (a feature that fired fewer than ``top_k``
times) have value 0 and sample id, step and token -1. Schema version 3 added the histogram datasets
``hist_edges`` (H+1,) and ``hist_count`` (F, H); :func:`load_feature_stats` refuses a file of any
other version (recompute it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import h5py
import numpy as np
import torch

from tide.analysis.ranking import auroc_one_vs_rest, safe_ratio
from tide.branches import BRANCHES, CfgBranch, check_branch
from tide.io import atomic_path, canonical_hash, check_output_file, tensors_hash
from tide.data import ActivationStore
from tide.device import eval_mode, resolve_device
from tide.errors import TideError

SCHEMA = "tide.feature_stats"
SCHEMA_VERSION = 3
FILENAME = "feature_stats.h5"
IMAGE_REDUCE = "max"
COLUMNS = ("timestep", "step_index", "sample_id", "token", "cond", "cfg_branch")
HIST_BINS = 64
HIST_RANGE = (1e-4, 1e4)


def histogram_edges() -> np.ndarray:
    """(HIST_BINS + 1,) the activation histogram's bin edges: log-spaced over HIST_RANGE (8 per decade)."""
    return np.logspace(np.log10(HIST_RANGE[0]), np.log10(HIST_RANGE[1]), HIST_BINS + 1)


@dataclasses.dataclass
class FeatureStats:
    """Per-feature statistics (F features, S recorded steps, N samples, C classes, K top-k slots)."""

    steps: np.ndarray
    """(S,) recorded step indices (0 = noisiest)."""
    timesteps: np.ndarray
    """(S,) scheduler timestep of each recorded step."""
    rows_per_step: np.ndarray
    """(S,) rows processed at each step."""
    fire_count_step: np.ndarray
    """(S, F) rows where the feature fired, per step."""
    act_sum_step: np.ndarray
    """(S, F) sum of the feature's activation, per step (float64)."""
    act_sq_step: np.ndarray
    """(S,) sum of the squared norm of the hook's activation vectors, per step (float64); for an SAE on a
    block's update, of the hook's activation itself (the block's output, where edits are added)."""
    topk_value: np.ndarray
    """(F, K) largest activations, descending; 0 in empty slots."""
    topk_sample: np.ndarray
    """(F, K) their sample ids (-1 in empty slots)."""
    topk_step: np.ndarray
    """(F, K) their step indices (-1 in empty slots)."""
    topk_timestep: np.ndarray
    """(F, K) their timesteps (NaN in empty slots)."""
    topk_token: np.ndarray
    """(F, K) their token (patch) indices, row-major over the patch grid (-1 in empty slots);
    :func:`tide.data.token_coords` gives their (frame,) row and column."""
    sample_cond: np.ndarray
    """(N,) condition (class) id of each sample; -1 for a sample with no processed rows."""
    image_acts_step: np.ndarray
    """(N, S, F) image-level activation: max over the sample's tokens at each step (0 when unseen)."""
    auroc: np.ndarray
    """(C, F) one-vs-rest AUROC of the image-level activation (max over tokens and steps) per class;
    NaN for a class with no positive or no negative sample."""
    auroc_step: np.ndarray
    """(S, C, F) the same with the image-level activation at one step."""
    token_rows: np.ndarray
    """(T,) rows processed at each token position."""
    spatial_sum: np.ndarray
    """(T, F) sum of the feature's activation at each token position (float64)."""
    hist_edges: np.ndarray
    """(H+1,) bin edges of the activation histogram, shared by all features: log-spaced over
    ``HIST_RANGE`` (float64)."""
    hist_count: np.ndarray
    """(F, H) rows where the feature fired with an activation in each bin [edge i, edge i+1) (int64); a value
    below the first edge counts in bin 0, one at or above the last edge in bin H-1, so each row sums to
    :attr:`fire_count`."""
    attrs: dict
    """Provenance: hook, SAE and dataset identity, settings (see the module docstring)."""

    # ------------------------------------------------------------------ derived views
    @property
    def hook(self) -> str:
        return self.attrs["hook"]

    @property
    def num_features(self) -> int:
        return self.fire_count_step.shape[1]

    @property
    def condition_names(self) -> list[str]:
        return list(self.attrs.get("condition_names", []))

    @property
    def patch_grid(self) -> tuple[int, ...]:
        return tuple(int(g) for g in self.attrs["patch_grid"])

    @property
    def rows(self) -> int:
        return int(self.rows_per_step.sum())

    @property
    def fire_count(self) -> np.ndarray:
        """(F,) rows where the feature fired."""
        return self.fire_count_step.sum(0)

    @property
    def frequency(self) -> np.ndarray:
        """(F,) fraction of all processed rows where the feature fired."""
        return self.fire_count / max(self.rows, 1)

    @property
    def frequency_step(self) -> np.ndarray:
        """(S, F) the timestep profile: fraction of the rows at each step where the feature fired."""
        return safe_ratio(self.fire_count_step, self.rows_per_step[:, None])

    @property
    def mean_act(self) -> np.ndarray:
        """(F,) mean activation over all processed rows."""
        return self.act_sum_step.sum(0) / max(self.rows, 1)

    @property
    def mean_act_firing(self) -> np.ndarray:
        """(F,) mean activation over the rows where the feature fired (NaN if it never fired)."""
        return safe_ratio(self.act_sum_step.sum(0), self.fire_count)

    @property
    def mean_act_step(self) -> np.ndarray:
        """(S, F) mean activation over the rows at each step."""
        return safe_ratio(self.act_sum_step, self.rows_per_step[:, None])

    @property
    def act_rms_step(self) -> np.ndarray:
        """(S,) R(t): the RMS norm of the hook's activation vectors at each step (NaN where no row was seen)."""
        return np.sqrt(safe_ratio(self.act_sq_step, self.rows_per_step))

    @property
    def image_acts(self) -> np.ndarray:
        """(N, F) image-level activation: max over the sample's tokens and recorded steps."""
        return self.image_acts_step.max(1)

    @property
    def spatial_mean(self) -> np.ndarray:
        """(F, *patch_grid) mean activation at each token position (NaN where no row was processed):
        (F, rows, cols) for images, (F, frames, rows, cols) for video."""
        mean_TF = safe_ratio(self.spatial_sum, self.token_rows[:, None])
        return mean_TF.T.reshape(self.num_features, *self.patch_grid)

    @property
    def hist_centers(self) -> np.ndarray:
        """(H,) geometric centre of each histogram bin, sqrt(lower edge * upper edge)."""
        return np.sqrt(self.hist_edges[:-1] * self.hist_edges[1:])


@dataclasses.dataclass(frozen=True)
class HookScale:
    """R(t): the RMS norm of a hook's activation vectors at the recorded timesteps of unedited generations
    (:attr:`FeatureStats.act_rms_step`); read at the nearest recorded timestep. The unit of norm-relative edits
    (:mod:`tide.analysis.steering`, ``scale="norm"``) and of the atlas's causal strips."""

    hook: str
    """The hook it was measured at."""
    timesteps: tuple[float, ...]
    """Recorded timesteps."""
    rms: tuple[float, ...]
    """R(t) at each of them."""

    @classmethod
    def from_stats(cls, stats) -> "HookScale":
        keep = [i for i, r in enumerate(stats.act_rms_step) if math.isfinite(float(r))]
        if not keep:
            raise TideError("the feature statistics hold no activation norms: recompute them with `tide stats`")
        return cls(stats.hook, tuple(float(stats.timesteps[i]) for i in keep), tuple(float(stats.act_rms_step[i]) for i in keep))

    def at(self, t: float) -> float:
        i = min(range(len(self.timesteps)), key=lambda j: abs(self.timesteps[j] - float(t)))
        return self.rms[i]


def _positive_coo(latents, d_sae: int):
    """(row, feature, value) of the positive latents of a batch."""
    if latents.idx is not None:
        acts = latents.acts
        mask = acts > 0
        rows = torch.arange(acts.shape[0], device=acts.device)[:, None].expand_as(acts)
        return rows[mask], latents.idx[mask], acts[mask]
    dense = latents.acts
    nz = (dense > 0).nonzero()
    return nz[:, 0], nz[:, 1], dense[nz[:, 0], nz[:, 1]]


def _batch_topk(feat: torch.Tensor, val: torch.Tensor, num_features: int, k: int):
    """The k largest entries per feature of a COO batch: ((F, k) values with -inf fill, (F, k) entry ids, -1 fill)."""
    order = torch.argsort(val, descending=True, stable=True)
    order = order[torch.argsort(feat[order], stable=True)]
    f_sorted = feat[order]
    counts = torch.bincount(f_sorted, minlength=num_features)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=feat.device) - starts[f_sorted]
    keep = rank < k
    values = torch.full((num_features, k), -torch.inf, device=val.device, dtype=val.dtype)
    entry = torch.full((num_features, k), -1, device=val.device, dtype=torch.long)
    values[f_sorted[keep], rank[keep]] = val[order[keep]]
    entry[f_sorted[keep], rank[keep]] = order[keep]
    return values, entry


def compute_feature_stats(sae, store_or_path, hook: str | None = None, top_k: int = 16, batch_size: int = 4096,
                          device=None, progress: bool = True, cfg_branch: int | None = 0,
                          image_budget_bytes: int = 2 << 30) -> FeatureStats:
    """One pass over the dataset: per-feature frequency, timestep profile, mean activations, top-k
    occurrences, class AUROC, spatial maps and activation histograms (see the module docstring).

    ``sae``: an :class:`~tide.sae.SAE` or the directory of a saved one. ``store_or_path``: an
    :class:`~tide.data.ActivationStore` or a dataset directory. ``hook`` defaults to the SAE's
    ``cfg.hook`` (or the dataset's only hook); the two must agree. Each row is encoded with its own
    timestep. ``cfg_branch``: 0 (default) processes the conditional CFG rows only, 1 the
    unconditional ones, None all rows. ``image_budget_bytes`` bounds the (samples, steps, features)
    image-level matrix the AUROC needs; a larger one is refused.
    """
    from tide.sae import load_sae  # imported here: tide.sae pulls in the kernels

    sae_path = ""
    if not isinstance(sae, torch.nn.Module):
        sae_path = str(sae)
        sae = load_sae(sae)
    store = store_or_path if isinstance(store_or_path, ActivationStore) else ActivationStore(store_or_path)
    cfg = sae.cfg
    if hook is None:
        hook = cfg.hook or (next(iter(store.hooks)) if len(store.hooks) == 1 else None)
        if hook is None:
            raise TideError(f"the SAE names no hook and {store.path} holds several {list(store.hooks)}: pass hook=")
    inputs = cfg.input_hooks if getattr(cfg, "target", "activation") == "update" else [hook]  # update: post - pre
    store.check_hooks(inputs)
    if cfg.hook and cfg.hook != hook:
        raise TideError(f"the SAE was trained on hook {cfg.hook!r} but the statistics were asked for hook {hook!r}: "
                        f"use an SAE trained on {hook!r} or pass hook={cfg.hook!r}")
    if store.hooks[hook] != cfg.d_in:
        raise TideError(f"hook {hook!r} has width {store.hooks[hook]} but the SAE reads d_in={cfg.d_in}")
    if top_k < 1 or batch_size < 1:
        raise TideError(f"top_k and batch_size must be positive, got {top_k} and {batch_size}")
    if cfg_branch not in (0, 1, None):
        raise TideError(f"cfg_branch must be 0 (conditional), 1 (unconditional) or None (both), got {cfg_branch!r}")

    manifest = store.manifest
    dev = resolve_device(device)
    steps = store.recorded_steps
    if not steps:
        raise TideError(f"{store.path}: the manifest lists no recorded steps")
    S, F, K = len(steps), cfg.d_sae, top_k
    step_pos = np.full(max(steps) + 1, -1, dtype=np.int64)
    step_pos[steps] = np.arange(S)
    grid = [int(g) for g in manifest.get("patch_grid") or [manifest["num_tokens"]]]
    T = int(np.prod(grid))
    N = int(manifest["num_samples"])
    names = [str(n) for n in manifest.get("condition_names") or []]
    need = N * S * F * 4
    if need > image_budget_bytes:
        raise TideError(f"the image-level activations of {N} samples x {S} steps x {F} features need {need / 2**30:.2f} GiB, "
                        f"over image_budget_bytes={image_budget_bytes / 2**30:.2f} GiB: raise the budget or analyse a "
                        f"dataset with fewer samples or recorded steps")

    rec_t = store.recorded_timesteps
    timesteps = np.array(rec_t if len(rec_t) == S else [np.nan] * S, dtype=np.float64)
    rows_step = torch.zeros(S, dtype=torch.long, device=dev)
    fire_step = torch.zeros(S * F, dtype=torch.long, device=dev)
    sum_step = torch.zeros(S * F, dtype=torch.float64, device=dev)
    sq_step = torch.zeros(S, dtype=torch.float64, device=dev)
    token_rows = torch.zeros(T, dtype=torch.long, device=dev)
    spatial = torch.zeros(T * F, dtype=torch.float64, device=dev)
    image = torch.zeros(N * S * F, dtype=torch.float32, device=dev)
    sample_cond = np.full(N, -1, dtype=np.int64)
    best_val = torch.full((F, K), -torch.inf, device=dev)
    best_meta = torch.full((4, F, K), -1, dtype=torch.float64, device=dev)  # sample, step, timestep, token
    H, edges = HIST_BINS, histogram_edges()
    inner = torch.from_numpy(edges[1:-1]).to(dev)  # bucketize on the inner edges clips to bins 0 and H-1
    hist = torch.zeros(F * H, dtype=torch.long, device=dev)

    from tqdm.auto import tqdm

    total = sum(s.rows for s in store.shards)
    bar = tqdm(total=total, unit="row", disable=not progress, desc="feature stats")
    processed = 0
    try:
        with torch.no_grad(), eval_mode(sae):
            for _, _, acts, meta in store.iter_blocks(inputs, COLUMNS, block_rows=batch_size):
                bar.update(len(meta["timestep"]))
                keep = None if cfg_branch is None else meta["cfg_branch"] == cfg_branch
                if keep is not None and not keep.any():
                    continue
                x = cfg.rows(acts) if len(inputs) > 1 else acts[hook]
                x = x if keep is None else x[keep]
                own = acts[hook] if keep is None else acts[hook][keep]  # the hook's activation (update SAEs: not x)
                cols = {c: (v if keep is None else v[keep]) for c, v in meta.items()}
                sp = step_pos[np.clip(cols["step_index"], 0, len(step_pos) - 1)]
                if (sp < 0).any() or (cols["step_index"] >= len(step_pos)).any():
                    raise TideError(f"{store.path}: rows at a step the manifest does not record; run `tide data verify`")
                sid = cols["sample_id"].astype(np.int64)
                tok = cols["token"].astype(np.int64)
                if sid.min() < 0 or sid.max() >= N or tok.min() < 0 or tok.max() >= T:
                    raise TideError(f"{store.path}: sample or token ids out of range; run `tide data verify`")
                sample_cond[sid] = cols["cond"]
                if np.isnan(timesteps).any():
                    timesteps[sp] = cols["timestep"]
                processed += len(sid)

                x_BD = torch.from_numpy(np.ascontiguousarray(x)).to(dev, torch.float32)
                t_B = torch.from_numpy(cols["timestep"].astype(np.float32)).to(dev)
                sp_B = torch.from_numpy(sp).to(dev)
                sid_B = torch.from_numpy(sid).to(dev)
                tok_B = torch.from_numpy(tok).to(dev)
                rows_step += torch.bincount(sp_B, minlength=S)
                own_BD = torch.from_numpy(np.ascontiguousarray(own)).to(dev, torch.float64)
                sq_step.index_add_(0, sp_B, own_BD.pow(2).sum(-1))
                token_rows += torch.bincount(tok_B, minlength=T)

                r, f, v = _positive_coo(sae(x_BD, t_B).latents, F)
                if len(v) == 0:
                    continue
                v = v.float()
                v64 = v.double()
                flat_step = sp_B[r] * F + f
                fire_step += torch.bincount(flat_step, minlength=S * F)
                sum_step.index_add_(0, flat_step, v64)
                spatial.index_add_(0, tok_B[r] * F + f, v64)
                flat_bin = f * H + torch.bucketize(v64, inner, right=True)
                hist.index_add_(0, flat_bin, torch.ones_like(flat_bin))
                image.scatter_reduce_(0, (sid_B[r] * S + sp_B[r]) * F + f, v, reduce="amax", include_self=True)

                bval, bentry = _batch_topk(f, v, F, K)
                brow = r[bentry.clamp(min=0)]
                bmeta = torch.stack([sid_B[brow].double(), torch.from_numpy(cols["step_index"].astype(np.float64)).to(dev)[brow],
                                     t_B.double()[brow], tok_B[brow].double()])
                vals, which = torch.cat([best_val, bval], 1).topk(K, dim=1)
                best_val = vals
                best_meta = torch.cat([best_meta, bmeta], 2).gather(2, which[None].expand(4, F, K))
    finally:
        bar.close()
    if processed == 0:
        raise TideError(f"{store.path}: no rows of CFG branch {cfg_branch} to analyse (pass cfg_branch=None for all)")

    empty = ~torch.isfinite(best_val) | (best_val <= 0)
    best_val = best_val.masked_fill(empty, 0.0).cpu().numpy().astype(np.float32)
    best_meta = best_meta.masked_fill(empty[None], -1).cpu().numpy()
    best_meta[2][empty.cpu().numpy()] = np.nan

    image_NSF = image.view(N, S, F).cpu().numpy()
    seen = sample_cond >= 0
    C = len(names) if names else int(sample_cond.max()) + 1
    labels = sample_cond[seen]
    auroc = auroc_one_vs_rest(image_NSF[seen].max(1), labels, C)
    auroc_step = np.stack([auroc_one_vs_rest(image_NSF[seen, s], labels, C) for s in range(S)]) if seen.any() \
        else np.full((S, C, F), np.nan)

    attrs = dict(schema=SCHEMA, schema_version=SCHEMA_VERSION, hook=hook, sae_path=sae_path,
                 sae_config_hash=canonical_hash(dataclasses.asdict(cfg)), sae_weights_hash=tensors_hash(sae.state_dict().items()),
                 sae_config=json.dumps(dataclasses.asdict(cfg), sort_keys=True),
                 dataset_path=str(store.path), manifest_sha256=store.manifest_sha256, dataset_rows=int(store.rows),
                 rows=int(processed), cfg_branch=-1 if cfg_branch is None else int(cfg_branch), top_k=K,
                 image_reduce=IMAGE_REDUCE, condition_names=names, patch_grid=grid,
                 tide_version=_version())
    return FeatureStats(
        steps=np.asarray(steps, dtype=np.int64), timesteps=timesteps, rows_per_step=rows_step.cpu().numpy(),
        fire_count_step=fire_step.view(S, F).cpu().numpy(), act_sum_step=sum_step.view(S, F).cpu().numpy(),
        act_sq_step=sq_step.cpu().numpy(),
        topk_value=best_val, topk_sample=best_meta[0].astype(np.int64), topk_step=best_meta[1].astype(np.int64),
        topk_timestep=best_meta[2].astype(np.float32), topk_token=best_meta[3].astype(np.int64),
        sample_cond=sample_cond, image_acts_step=image_NSF, auroc=auroc, auroc_step=auroc_step,
        token_rows=token_rows.cpu().numpy(), spatial_sum=spatial.view(T, F).cpu().numpy(),
        hist_edges=edges, hist_count=hist.view(F, H).cpu().numpy(), attrs=attrs)


def _version() -> str:
    from tide import __version__
    return __version__


# ---------------------------------------------------------------------- storage

_ARRAYS = [f.name for f in dataclasses.fields(FeatureStats) if f.name != "attrs"]
_JSON_ATTRS = ("condition_names", "patch_grid")


def save_feature_stats(stats: FeatureStats, path: str | Path) -> Path:
    """Write ``stats`` to one HDF5 file (a directory gets ``feature_stats.h5`` inside); atomic."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name in _ARRAYS:
            f.create_dataset(name, data=np.asarray(getattr(stats, name)))
        for key, value in stats.attrs.items():
            f.attrs[key] = json.dumps(value) if key in _JSON_ATTRS else value
    return path


def load_feature_stats(path: str | Path) -> FeatureStats:
    """Read a file written by :func:`save_feature_stats` (or the directory holding ``feature_stats.h5``)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise TideError(f"{path} does not exist; compute it with tide.analysis.compute_feature_stats and save_feature_stats")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            if attrs.get("schema") != SCHEMA:
                raise TideError(f"{path} is not a feature statistics file (schema {attrs.get('schema')!r})")
            if attrs.get("schema_version") != SCHEMA_VERSION:
                raise TideError(f"{path} has feature statistics schema_version {attrs.get('schema_version')!r} but this "
                                f"tide reads version {SCHEMA_VERSION}: recompute it with `tide stats` (or "
                                f"compute_feature_stats and save_feature_stats)")
            missing = [n for n in _ARRAYS if n not in f]
            if missing:
                raise TideError(f"{path} lacks {missing}; recompute it")
            arrays = {n: f[n][()] for n in _ARRAYS}
    except OSError as exc:
        raise TideError(f"{path} cannot be read as HDF5 ({exc}); recompute it") from None
    for key in _JSON_ATTRS:
        if key in attrs:
            attrs[key] = json.loads(attrs[key])
    return FeatureStats(**arrays, attrs=attrs)


@dataclasses.dataclass(frozen=True)
class FeatureStatsResult:
    """What `tide stats` (:meth:`FeatureStatsConfig.run`) wrote."""

    path: Path
    """The HDF5 file (``feature_stats.h5``)."""
    stats: FeatureStats
    """The statistics written there."""

    @property
    def rows(self) -> int:
        return self.stats.rows

    @property
    def num_features(self) -> int:
        return self.stats.num_features

    @property
    def alive_features(self) -> int:
        """Features that fired at least once."""
        return int((self.stats.frequency > 0).sum())


@dataclasses.dataclass
class FeatureStatsConfig:
    """`tide stats`: per-feature statistics of an SAE over a captured dataset, in one pass."""

    sae: str = "runs/sae/tide"
    """SAE directory (cfg.json + sae.safetensors)."""
    data: str = "runs/capture"
    """Captured dataset directory."""
    out: str = "runs/feature_stats.h5"
    """Output HDF5 file (or a directory to put feature_stats.h5 in)."""
    top_k: int = 16
    """Top-activating occurrences kept per feature."""
    batch_size: int = 4096
    """Rows per SAE batch."""
    cfg_branch: CfgBranch = "cond"
    """CFG rows to analyse: cond, uncond or both."""
    device: str = "auto"
    """cpu, cuda[:N], or auto."""
    overwrite: bool = False
    """Replace an existing statistics file at --out."""

    def output_path(self) -> Path:
        """The file `run` writes: ``out``, or ``feature_stats.h5`` inside it when it is a directory; refused (one
        line) when it exists without ``overwrite`` or cannot be written."""
        out = Path(self.out)
        if out.is_dir():
            out = out / FILENAME
        return check_output_file(out, self.overwrite)

    def run(self, progress: bool = True) -> FeatureStatsResult:
        from tide.device import resolve_device

        out = self.output_path()  # before the SAE and the dataset are read
        branch = BRANCHES.get(check_branch(self.cfg_branch))  # None = both
        stats = compute_feature_stats(self.sae, self.data, top_k=self.top_k, batch_size=self.batch_size,
                                      device=resolve_device(self.device), progress=progress,
                                      cfg_branch=branch)
        return FeatureStatsResult(save_feature_stats(stats, out), stats)
