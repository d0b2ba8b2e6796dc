"""Regenerating captured samples from their seeds, to see where a feature fired.

A capture stores activations, not images. Sample ``i`` of a capture is sampled again with its
condition and seed (:func:`capture_sample`: condition ``classes[i % len(classes)]``, seed
``seed + i``, the capture's ``num_steps`` and ``guidance_scale``), all needed samples in one batched
:func:`tide.sampling.sample` call, while a read-only :class:`~tide.sampling.Intervention` records the
hook activation at the steps where the features fired (:func:`regenerate`). Each recorded
(sample, step) activation is then encoded by the SAE at that step's timestep, giving the feature's
activation per token shaped to the patch grid (:func:`feature_heatmaps`); at the top token it agrees
with the captured value up to the capture's storage precision.
"""

from __future__ import annotations

import base64
from typing import NamedTuple

import numpy as np
import torch

from tide.analysis.feature_stats import FeatureStats
from tide.device import eval_mode
from tide.errors import TideError


class Occurrence(NamedTuple):
    """One top-activating occurrence of a feature (a top-k slot of the statistics)."""

    feature: int
    sample_id: int
    step: int
    timestep: float
    token: int
    value: float


class Regenerated(NamedTuple):
    images: dict[int, torch.Tensor]
    """sample id -> (C, H, W) image in [0, 1] ((C, F, H, W) for video)."""
    acts: dict[tuple[int, int], torch.Tensor]
    """(sample id, step index) -> (T, D) hook activation of the recorded CFG branch."""
    timesteps: dict[int, float]
    """step index -> scheduler timestep."""


def top_occurrences(stats: FeatureStats, f: int, n: int) -> list[Occurrence]:
    """The feature's ``n`` largest activations in distinct samples."""
    out, seen = [], set()
    for k in range(stats.topk_value.shape[1]):
        s = int(stats.topk_sample[f, k])
        if s < 0 or s in seen or len(out) >= n:
            continue
        seen.add(s)
        out.append(Occurrence(f, s, int(stats.topk_step[f, k]), float(stats.topk_timestep[f, k]),
                              int(stats.topk_token[f, k]), float(stats.topk_value[f, k])))
    return out


def top_samples(stats: FeatureStats, features, n: int) -> dict[int, list[Occurrence]]:
    """Per feature, its ``n`` distinct samples of largest image-level activation (the max over tokens at one step,
    :attr:`FeatureStats.image_acts_step`), largest first, each at the step where it peaked. ``token`` is -1: the
    top token is read off the regenerated heat map. One vectorised pass over (samples, steps, features)."""
    features = [int(f) for f in features]
    if n <= 0 or not features:
        return {f: [] for f in features}
    acts_NSF = stats.image_acts_step[:, :, features]
    best_NF = acts_NSF.max(1)
    step_NF = acts_NSF.argmax(1)
    k = min(n, best_NF.shape[0])
    top_KF = np.argsort(-best_NF, axis=0, kind="stable")[:k]
    out: dict[int, list[Occurrence]] = {}
    for j, f in enumerate(features):
        occ = []
        for s in top_KF[:, j]:
            v = float(best_NF[s, j])
            if not v > 0:
                break
            si = int(step_NF[s, j])
            occ.append(Occurrence(f, int(s), int(stats.steps[si]), float(stats.timesteps[si]), -1, v))
        out[f] = occ
    return out


def needed_steps(occurrences: dict[int, list[Occurrence]]) -> dict[int, set[int]]:
    """sample id -> the step indices at which any of the ``occurrences`` (feature -> list) happened."""
    needs: dict[int, set[int]] = {}
    for occ in occurrences.values():
        for o in occ:
            needs.setdefault(o.sample_id, set()).add(o.step)
    return needs


def capture_sample(manifest: dict, backbone, sample_id: int) -> tuple[int, int]:
    """(condition, seed) of sample ``sample_id`` of a capture."""
    cfg = manifest.get("config", {})
    classes = cfg.get("classes")
    classes = list(range(backbone.num_conditions)) if classes is None else list(classes)
    return int(classes[sample_id % len(classes)]), int(cfg.get("seed", 0)) + sample_id


def check_conditions(manifest: dict, backbone, sample_cond: np.ndarray, sample_ids) -> None:
    """Refuse a manifest whose classes give a sample another condition than the statistics recorded."""
    for s in sample_ids:
        cond, _ = capture_sample(manifest, backbone, s)
        if 0 <= sample_cond[s] != cond:
            raise TideError(f"sample {s} has condition {sample_cond[s]} in the statistics but {cond} from the "
                            "manifest's classes: the manifest does not describe this capture")


def regenerate(backbone, hook: str, manifest: dict, needs: dict[int, set[int]], branch: int = 0,
               batch_size: int = 64, progress: bool = False, minus: str | None = None, keep=None) -> Regenerated:
    """Regenerate the samples in ``needs`` (sample id -> step indices) in one batched sampling run,
    recording the ``hook`` activation of their ``branch`` rows (0 = conditional) at those steps (minus the
    activation at hook ``minus`` in the same call, for SAEs on a block's update).

    ``keep(sample_ids, step, timestep, acts_NTD)``, when given, receives each batch's needed rows as they are
    made and nothing is stored in ``acts`` (for many features or large models: encode as you go)."""
    from tide.hooks import current_step
    from tide.sampling import Intervention, SamplerConfig, sample

    ids = sorted(needs)
    cfg = manifest.get("config", {})
    conds, seeds = zip(*(capture_sample(manifest, backbone, i) for i in ids)) if ids else ((), ())
    acts: dict[tuple[int, int], torch.Tensor] = {}
    timesteps: dict[int, float] = {}
    all_steps = set().union(*needs.values()) if needs else set()

    base: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()

    def record_base(act_BTD, hook):
        base["x"] = act_BTD
        return None

    def record(act_BTD, hook):
        ctx = current_step()
        if ctx is None or ctx.step_index not in all_steps:
            return None
        if minus is not None:
            act_BTD = act_BTD - base.pop("x")
        timesteps[ctx.step_index] = ctx.timestep
        rows, sids = [], []
        for row in range(act_BTD.shape[0]):
            sid = int(ctx.sample_ids_B[row])
            if int(ctx.cfg_branch_B[row]) == branch and ctx.step_index in needs.get(sid, ()):
                rows.append(row)
                sids.append(sid)
                seen.add((sid, ctx.step_index))
        if not rows:
            return None
        got_NTD = act_BTD[rows].detach().float()
        if keep is not None:
            keep(sids, ctx.step_index, float(ctx.timestep), got_NTD)
        else:
            for sid, x_TD in zip(sids, got_NTD.cpu()):
                acts[(sid, ctx.step_index)] = x_TD.clone()
        return None

    config = SamplerConfig(num_steps=int(cfg.get("num_steps", 50)), guidance_scale=cfg.get("guidance_scale", 1.0),
                           batch_size=batch_size)
    if not ids:
        return Regenerated({}, acts, timesteps)
    recorders = ([Intervention(minus, record_base)] if minus is not None else []) + [Intervention(hook, record)]
    out = sample(backbone, list(conds), list(seeds), config, interventions=recorders,
                 progress=progress, sample_ids=ids)
    missing = [(s, t) for s in ids for t in needs[s] if (s, t) not in seen]
    if missing:
        raise TideError(f"regeneration recorded no activation at {missing[:4]} (sample, step): does the "
                        f"capture's CFG branch or schedule differ from its manifest?")
    return Regenerated({i: img for i, img in zip(ids, out.images)}, acts, timesteps)


def feature_heatmaps(sae, regen: Regenerated, occurrences: dict[int, list[Occurrence]],
                     patch_grid: tuple[int, ...]) -> dict[tuple[int, int, int], np.ndarray]:
    """(feature, sample id, step) -> the feature's activation per token, shaped to ``patch_grid``.

    Each recorded (sample, step) activation is encoded once, at its step's timestep; the columns of
    the features with an occurrence there are kept.
    """
    heat: dict[tuple[int, int, int], np.ndarray] = {}
    where = features_at(occurrences)
    for (s, step), x_TD in regen.acts.items():
        if (s, step) in where:
            heat.update(encode_heatmaps(sae, [s], step, regen.timesteps[step], x_TD[None], where, patch_grid))
    return heat


def features_at(occurrences: dict[int, list[Occurrence]]) -> dict[tuple[int, int], list[int]]:
    """(sample id, step) -> the features with an occurrence there."""
    where: dict[tuple[int, int], list[int]] = {}
    for f, occ in occurrences.items():
        for o in occ:
            where.setdefault((o.sample_id, o.step), []).append(f)
    return where


def encode_heatmaps(sae, sample_ids, step: int, timestep: float, x_NTD: torch.Tensor,
                    where: dict[tuple[int, int], list[int]], patch_grid: tuple[int, ...],
                    chunk_rows: int = 2048) -> dict[tuple[int, int, int], np.ndarray]:
    """(feature, sample id, step) -> heat map, for the rows ``x_NTD`` of ``sample_ids`` at one step: encoded by
    the SAE at ``timestep`` in chunks of rows (a wide SAE's dense code is never held for a whole batch), only the
    columns of the features in ``where`` kept."""
    param = next(sae.parameters())
    n, tok, d = x_NTD.shape
    cols = sorted({f for s in sample_ids for f in where.get((s, step), ())})
    if not cols:
        return {}
    col_of = {f: j for j, f in enumerate(cols)}
    ids = torch.tensor(cols, device=param.device)
    x = x_NTD.reshape(-1, d)
    parts = []
    with torch.no_grad(), eval_mode(sae):
        for r0 in range(0, len(x), chunk_rows):
            xr = x[r0:r0 + chunk_rows].to(param.device, param.dtype)
            t = torch.full((len(xr),), float(timestep), device=param.device)
            parts.append(sae.encode(xr, t)[:, ids].float().cpu())
    z_NTK = torch.cat(parts).reshape(n, tok, len(cols)).numpy()
    out = {}
    for i, s in enumerate(sample_ids):
        for f in where.get((s, step), ()):
            out[(f, s, step)] = z_NTK[i, :, col_of[f]].reshape(patch_grid).copy()
    return out


def encode_heat(heat: np.ndarray) -> dict:
    """A heat map as 8-bit values relative to its maximum: ``{"shape", "max", "data"}`` with ``data`` the
    base64 of ``round(255 * heat / max)`` as uint8, row-major (decode: ``uint8 / 255 * max``)."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64)).clip(min=0)
    peak = float(heat.max()) if heat.size else 0.0
    q = np.zeros(heat.shape, np.uint8) if peak <= 0 else np.round(heat / peak * 255).astype(np.uint8)
    return {"shape": list(heat.shape), "max": peak, "data": base64.b64encode(q.tobytes()).decode("ascii")}


def decode_heat(entry: dict) -> np.ndarray:
    """The heat map of an :func:`encode_heat` entry (to within max / 510)."""
    q = np.frombuffer(base64.b64decode(entry["data"]), np.uint8).reshape(entry["shape"])
    return q.astype(np.float64) / 255 * float(entry["max"])
