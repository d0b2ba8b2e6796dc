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

from typing import NamedTuple

import numpy as np
import torch

from tide.analysis.feature_stats import FeatureStats
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
               batch_size: int = 64, progress: bool = False, minus: str | None = None) -> Regenerated:
    """Regenerate the samples in ``needs`` (sample id -> step indices) in one batched sampling run,
    recording the ``hook`` activation of their ``branch`` rows (0 = conditional) at those steps (minus the
    activation at hook ``minus`` in the same call, for SAEs on a block's update)."""
    from tide.hooks import current_step
    from tide.sampling import Intervention, SamplerConfig, sample

    ids = sorted(needs)
    cfg = manifest.get("config", {})
    conds, seeds = zip(*(capture_sample(manifest, backbone, i) for i in ids)) if ids else ((), ())
    acts: dict[tuple[int, int], torch.Tensor] = {}
    timesteps: dict[int, float] = {}
    all_steps = set().union(*needs.values()) if needs else set()

    base: dict[str, torch.Tensor] = {}

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
        for row in range(act_BTD.shape[0]):
            sid = int(ctx.sample_ids_B[row])
            if int(ctx.cfg_branch_B[row]) == branch and ctx.step_index in needs.get(sid, ()):
                acts[(sid, ctx.step_index)] = act_BTD[row].detach().float().cpu().clone()
        return None

    config = SamplerConfig(num_steps=int(cfg.get("num_steps", 50)), guidance_scale=cfg.get("guidance_scale", 1.0),
                           batch_size=batch_size)
    if not ids:
        return Regenerated({}, acts, timesteps)
    recorders = ([Intervention(minus, record_base)] if minus is not None else []) + [Intervention(hook, record)]
    out = sample(backbone, list(conds), list(seeds), config, interventions=recorders,
                 progress=progress, sample_ids=ids)
    missing = [(s, t) for s in ids for t in needs[s] if (s, t) not in acts]
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
    device = next(sae.parameters()).device
    sae.eval()
    with torch.no_grad():
        for (s, step), x_TD in regen.acts.items():
            t_T = torch.full((x_TD.shape[0],), regen.timesteps[step], dtype=torch.float32)
            z_TF = sae.encode(x_TD.to(device), t_T.to(device)).cpu()
            for f, occ in occurrences.items():
                if any(o.sample_id == s and o.step == step for o in occ):
                    heat[(f, s, step)] = z_TF[:, f].numpy().reshape(patch_grid)
    return heat
