"""What a feature does to the generation: the same generations with the feature added, and with it removed.

For the feature atlas (:mod:`tide.analysis.dashboard`), every feature gets two small strips:

* **added**: generations of the null condition from a fixed set of seeds (the same for every feature, so their
  unedited versions are generated once and shared) with, at every step and every token of both CFG rows,
  ``strength * R(t) * d_f(t) / |d_f(t)|`` added at the SAE's hook: the norm-relative recipe of
  :mod:`tide.analysis.steering` (``scale="norm"``), R(t) the hook's RMS norm at that step over unedited
  generations (:class:`~tide.analysis.steering.HookScale`, from the feature statistics);
* **removed**: the feature's own top-activating samples, generated again with the feature's latent set to 0 at
  every token and step, the SAE's error term kept (``ablate``), so what the image loses is what the feature
  contributed. For an SAE of a block's update the latent is read from the update (the block's output minus its
  input, both from the same forward pass) and its reconstruction subtracted from the block's output.

All features' edits run in shared batches: each row of a batch is one (feature, edit, seed) job, and one
intervention reads the row's job from the sampler's step context, so 1000 features cost 1000 x (added +
removed) generations in as few sampler calls as the batch size allows, not 1000 separate runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tide.device import eval_mode
from tide.errors import TideError
from tide.hooks import require_step
from tide.sampling import Intervention, SamplerConfig, sample


@dataclass(frozen=True)
class FeatureStrip:
    """One feature's causal strips."""

    feature: int
    """The feature."""
    added: torch.Tensor
    """(n, C, H, W) the shared null-condition generations with the feature added."""
    removed: torch.Tensor
    """(m, C, H, W) the feature's top samples generated again with it removed (m may be 0)."""


def strip_edit_fn(sae, features_J: torch.Tensor, add_J: torch.Tensor, strength: float, hook_scale,
                  chunk_rows: int = 2048, base: dict | None = None):
    """The hook function of a batch of jobs: row ``r`` belongs to job ``sample_ids_B[r]``, whose feature is
    ``features_J[job]``; ``add_J[job]`` True adds ``strength * R(t)`` along the unit decoder direction, False
    removes the feature (its latent's reconstruction subtracted). For an SAE of a block's update, ``base["x"]``
    holds the block's input of the same call (recorded by a hook at ``sae.cfg.base_hook``): the SAE encodes the
    difference, and what is added to the block's output is added to its update."""
    param = next(sae.parameters())
    features_J, add_J = features_J.to(param.device), add_J.to(param.device)

    def fn(act, hook=None):
        ctx = require_step("causal strips")
        t = float(ctx.timestep)
        jobs = ctx.sample_ids_B.to(param.device).long()
        f_B, add_B = features_J[jobs], add_J[jobs]
        x = act.to(param.device, param.dtype)
        with torch.no_grad(), eval_mode(sae):
            d_BD = sae.fold_decoder(t, f_B)
            unit_BD = d_BD / d_BD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = torch.zeros_like(x)
            if bool(add_B.any()):
                delta[add_B] = (strength * hook_scale.at(t) * unit_BD[add_B])[:, None, :].to(x.dtype)
            rm = (~add_B).nonzero().flatten()
            if len(rm):
                rows = x[rm] if base is None else x[rm] - base.pop("x").to(x)[rm]
                n, tok, d = rows.shape
                flat, f_rows = rows.reshape(-1, d), f_B[rm].repeat_interleave(tok)
                z = []
                for r0 in range(0, len(flat), chunk_rows):
                    tt = torch.full((len(flat[r0:r0 + chunk_rows]),), t, device=param.device)
                    z.append(sae.encode(flat[r0:r0 + chunk_rows], tt).gather(1, f_rows[r0:r0 + chunk_rows, None]))
                z_NT = torch.cat(z).reshape(n, tok)
                delta[rm] = -z_NT[..., None] * d_BD[rm][:, None, :]
        return (x + delta).to(act.device, act.dtype)

    return fn


def feature_strips(backbone, sae, features: Sequence[int], seeds: Sequence[int], removal: dict[int, list[tuple[int, int]]],
                   config: SamplerConfig, hook_scale, strength: float = 0.1, null_condition: int | None = None,
                   progress: bool = False) -> tuple[torch.Tensor, dict[int, FeatureStrip]]:
    """(the unedited null-condition generations from ``seeds``, per feature its :class:`FeatureStrip`).

    ``removal``: feature -> (condition, seed) of the generations it is removed from (its top samples);
    ``hook_scale``: R(t) of the SAE's hook; ``strength``: the added direction's norm in units of R(t)."""
    from tide.models.base import NULL_CONDITION

    if not getattr(sae.cfg, "hook", None):
        raise TideError("the SAE's config names no hook: causal strips edit the SAE's hook")
    if strength < 0:
        raise TideError(f"strength must be >= 0, got {strength}")
    null = NULL_CONDITION if null_condition is None else int(null_condition)
    features, seeds = [int(f) for f in features], [int(s) for s in seeds]
    jobs: list[tuple[int, bool, int, int]] = []  # (feature, add, condition, seed)
    for f in features:
        jobs += [(f, True, null, s) for s in seeds]
        jobs += [(f, False, int(c), int(s)) for c, s in removal.get(f, [])]
    base = sample(backbone, [null] * len(seeds), seeds, config).images if seeds else torch.empty(0)
    if not jobs:
        return base, {f: FeatureStrip(f, base[:0], base[:0]) for f in features}
    features_J = torch.tensor([j[0] for j in jobs])
    add_J = torch.tensor([j[1] for j in jobs])
    base_hook = getattr(sae.cfg, "base_hook", None) if getattr(sae.cfg, "target", "activation") != "activation" \
        else None
    stash: dict | None = None if base_hook is None else {}

    def record(act, hook=None):
        stash["x"] = act.detach()
        return None

    ivs = [] if base_hook is None else [Intervention(base_hook, record)]
    ivs.append(Intervention(sae.cfg.hook, strip_edit_fn(sae, features_J, add_J, strength, hook_scale, base=stash)))
    out = sample(backbone, [j[2] for j in jobs], [j[3] for j in jobs], config, interventions=ivs, progress=progress,
                 sample_ids=list(range(len(jobs))))
    images = out.images
    strips, at = {}, 0
    for f in features:
        n_add, n_rm = len(seeds), len(removal.get(f, []))
        strips[f] = FeatureStrip(f, images[at:at + n_add], images[at + n_add:at + n_add + n_rm])
        at += n_add + n_rm
    return base, strips
