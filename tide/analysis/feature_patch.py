"""Feature patching: steer each generation toward a condition by giving it, in the SAE's features, what that
condition gives on the very latents being denoised.

At every step of the edit window the conditional branch is first run with the target condition B on the same
noisy latents, only as far as the SAE's hook (the rest of that pass is skipped); both activations are encoded
at the step's timestep, and the generation's conditional rows get, at every token ``p``,

    h_p + strength * sum_{f in S_p} (z_f(h^B_p) - z_f(h_p)) d_f(t)

(``d_f(t)``: feature ``f``'s decoder row folded at ``t``). ``S_p`` is every feature (the default), the
``top_features`` features whose latents differ most at that token, or a fixed list of features (to test whether
*those* features carry B). The SAE's error term stays the generation's own, so only what the SAE's features say
about B is moved in; unconditional rows are untouched and guidance amplifies the edit as it amplifies a prompt.

Why per sample: the shift a prompt causes depends on what is being denoised. A steering profile
(:mod:`tide.analysis.steering_profile`) adds the *mean* paired shift and carries class A's generations to class B
35% of the time on ``fmnist-pixart`` (block 4); patching the features sample by sample reaches 80%
(``experiments/results/steering_bench.md``). The price is the partial second pass: on ``fmnist-pixart`` at block 4
of 8 a patched generation costs about 1.6 plain ones (100 samples, 20 steps: 20.3 s against 12.5 s, medians of 3 on
2 CPU threads), and it needs no calibration.

When B is the sample's own condition the patch is zero up to the encoder's floating-point noise.

**Several hooks at once**: every function here takes one SAE or a list of SAEs at distinct hooks (one SAE per
hook, e.g. blocks 2, 4 and 6). The reference passes run unedited as far as the deepest hook; the generation's
forward pass patches each hook in turn, so a later hook's patch is computed on what the earlier ones made. On
``fmnist-pixart`` three hooks carry A -> B 88% with 10% neither-class and images closer to real ones (realism
1.89 against 2.86 for block 4 alone; ``experiments/results/steering_bench.md``, several hooks).

The same loop gives three more edits:

* **removal** (:func:`sample_removed`): reference passes with C and with the null condition; generations whose
  features match C's (relative to the null) are pushed through the null's features and beyond;
* **masked edits that keep the outside** (``keep_outside``): after every step the latents outside the mask are
  reset to the unedited generation's (latent blending), so only the inside changes;
* **transfer** (:func:`sample_transferred`): the reference is another generation, denoised alongside, and its
  features are copied token by token. On ``fmnist-pixart`` this does *not* work: the hook's features also carry
  the reference's own noisy latents, the denoiser's prediction stops matching the latents it is applied to and the
  solver diverges (the copied features' magnitude grows to tens or hundreds of times the reference's over 20 steps;
  ``experiments/results/steering_bench.md``, transfer). Move an attribute with a prompt on the sample's own latents
  instead: the patch toward a condition, or a steering profile toward a word.

:func:`feature_effects` ranks features by what each does when patched alone (a score of the images, such as the
evaluation classifier's probability of the target), to choose features by causal effect.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from tide.device import eval_mode
from tide.errors import TideError
from tide.hooks import COND, HookedBackbone
from tide.sampling import SampleOutput, SamplerConfig, Trajectory, sample


class _Reached(Exception):
    """Raised by the reference pass's last hook: nothing after the SAE's hook is needed."""


def check_saes(sae) -> list:
    """One SAE or a sequence of SAEs (at distinct hooks) as a non-empty list."""
    saes = list(sae) if isinstance(sae, (list, tuple)) else [sae]
    if not saes:
        raise TideError("give at least one SAE")
    hooks = [getattr(s.cfg, "hook", None) for s in saes]
    if len(set(hooks)) != len(hooks):
        raise TideError(f"the SAEs must sit at distinct hooks (got {hooks}): one patch per hook")
    return saes


def _check(saes, hooked: HookedBackbone, steps, num_steps: int, strength: float, top_features, features):
    for sae in saes:
        cfg = sae.cfg
        if not getattr(cfg, "hook", None):
            raise TideError("the SAE's config names no hook: a feature patch happens at the SAE's hook")
        hooked.check_hook_names(cfg.input_hooks)
        if top_features is not None and not 1 <= top_features <= cfg.d_sae:
            raise TideError(f"top_features must lie in 1..{cfg.d_sae} (the SAE's width), got {top_features}")
    if strength < 0:
        raise TideError(f"strength must be >= 0, got {strength}")
    if top_features is not None and features is not None:
        raise TideError("give either top_features (per token, the features that differ most) or features (a fixed "
                        "list), not both")
    if features is not None:
        if len(saes) > 1:
            raise TideError("a fixed feature list names features of one SAE: patch several hooks with every feature "
                            "or with top_features")
        d_sae = saes[0].cfg.d_sae
        bad = [int(f) for f in features if not 0 <= int(f) < d_sae]
        if bad or not len(features):
            raise TideError(f"features must be ids in 0..{d_sae - 1}" + (f", got {bad[:5]}" if bad else ""))
    start, stop = (0, num_steps) if steps is None else (int(steps[0]), int(steps[1]))
    if not 0 <= start < stop <= num_steps:
        raise TideError(f"patch window steps [{start}, {stop}) lies outside the {num_steps}-step schedule: "
                        f"need 0 <= start < stop <= {num_steps}")
    return start, stop


@torch.no_grad()
def sample_patched(backbone, sae, conds: Sequence[int], targets: Sequence[int], seeds: Sequence[int],
                   config: SamplerConfig | None = None, strength: float = 1.0, top_features: int | None = None,
                   features: Sequence[int] | None = None, steps: tuple[int, int] | None = None, mask=None,
                   keep_outside: bool = False, progress: bool = False, decode: bool = True) -> SampleOutput:
    """Generate condition ``conds[i]`` from seed ``seeds[i]`` with its SAE features patched toward condition
    ``targets[i]`` (module docstring) at steps [start, stop) of ``steps`` (default: every step); ``mask``: bool over
    the hook's tokens (or the patch grid), the tokens that are patched. ``keep_outside`` (needs ``mask``): after
    every step, the latents outside the mask are reset to the unedited generation's at that step (latent blending),
    so the outside ends exactly as it was and the model still sees, and blends into, the whole image."""
    config = config or SamplerConfig()
    conds, targets, seeds = [int(c) for c in conds], [int(c) for c in targets], [int(s) for s in seeds]
    if not conds or len(targets) != len(conds) or len(seeds) != len(conds):
        raise TideError(f"give one target and one seed per condition (got {len(conds)} conditions, {len(targets)} "
                        f"targets, {len(seeds)} seeds)")
    backbone.check_conditions(conds + targets)
    hooked, saes, (start, stop), mask_T, feats = _prepare(backbone, sae, config, steps, strength, top_features,
                                                          features, mask)
    keep_X = _latent_mask(backbone, mask) if keep_outside else None
    return _in_batches(backbone, conds, seeds, config, "feature patch", progress, decode, lambda sl, ids, bar: (
        _patched_batch(backbone, hooked, saes, conds[sl], [targets[sl]], seeds[sl], ids, config, strength, top_features,
                       feats, (start, stop), mask_T, bar, keep_X=keep_X)))


@torch.no_grad()
def feature_effects(backbone, sae, conds: Sequence[int], seeds: Sequence[int], target: int,
                    candidates: Sequence[int], score, config: SamplerConfig | None = None, strength: float = 1.0,
                    steps: tuple[int, int] | None = None, progress: bool = False) -> torch.Tensor:
    """Causal effect of each candidate feature: the generations ``conds`` / ``seeds`` are patched toward ``target``
    in that one feature alone (every token, every step of ``steps``), and ``score`` (decoded images -> (N,) scores,
    e.g. the evaluation classifier's probability of the target) is compared with the unedited generations'.
    Returns (len(candidates),) mean score changes, one run of len(candidates) x len(conds) generations in batches.
    Features chosen this way carry the target by what they *do*, not by how selectively they fire."""
    config = config or SamplerConfig()
    conds, seeds, cands = [int(c) for c in conds], [int(s) for s in seeds], [int(f) for f in candidates]
    if not conds or len(seeds) != len(conds) or not cands:
        raise TideError(f"give one seed per condition and at least one candidate feature (got {len(conds)} "
                        f"conditions, {len(seeds)} seeds, {len(cands)} candidates)")
    backbone.check_conditions(conds + [int(target)])
    hooked = HookedBackbone.of(backbone)
    if isinstance(sae, (list, tuple)):
        raise TideError("feature_effects measures the features of one SAE: pass one")
    start, stop = _check([sae], hooked, steps, config.num_steps, strength, None, cands)
    param = next(sae.parameters())
    n, m = len(conds), len(cands)
    feature_N = torch.tensor(cands, device=param.device).repeat_interleave(n)  # the one feature of each generation
    all_conds, all_seeds = conds * m, seeds * m
    plain = sample(backbone, conds, seeds, config)

    def run(sl, ids, bar):
        keep = torch.zeros(len(ids), 1, sae.cfg.d_sae, device=param.device)
        keep[torch.arange(len(ids)), 0, feature_N[sl]] = 1.0
        return _patched_batch(backbone, hooked, [sae], all_conds[sl], [[int(target)] * len(ids)], all_seeds[sl], ids,
                              config, strength, None, None, (start, stop), None, bar,
                              rule=lambda z, z_refs, t: (z_refs[0] - z) * keep.to(z.dtype))

    edited = _in_batches(backbone, all_conds, all_seeds, config, "feature effects", progress, True, run)
    base = torch.as_tensor(score(plain.images)).float().cpu()
    got = torch.as_tensor(score(edited.images)).float().cpu().reshape(m, n)
    return (got - base[None]).mean(1)


def _in_batches(backbone, conds, seeds, config, desc, progress, decode, run) -> SampleOutput:
    """``run(slice, sample ids, bar)`` -> final latents, batch by batch (``config.batch_size``), as one
    :class:`SampleOutput`."""
    images, latents = [], []
    bar = tqdm(total=len(conds) * config.num_steps, unit="step·img", disable=not progress, desc=desc)
    for b0 in range(0, len(conds), config.batch_size):
        sl = slice(b0, b0 + config.batch_size)
        x = run(sl, list(range(b0, b0 + len(conds[sl]))), bar)
        latents.append(x.float().cpu())
        if decode:
            images.append(backbone.decode(x).cpu())
    bar.close()
    lat = torch.cat(latents)
    return SampleOutput(torch.cat(images) if decode else lat.new_empty(0), lat, torch.tensor(conds), torch.tensor(seeds))


def removal_rule(gate: float = 0.8):
    """The removal edit of :func:`sample_removed` as a rule over (z, [z_C, z_null], t)."""

    def rule(z, z_refs, t):
        z_c, z_null = z_refs
        own, concept = (z - z_null).flatten(1), (z_c - z_null).flatten(1)
        cos = torch.nn.functional.cosine_similarity(own, concept, dim=1, eps=1e-8)
        g = ((cos - gate) / (1 - gate)).clamp(0, 1) if gate < 1 else (cos >= 1 - 1e-6).to(z.dtype)
        return -g.view(-1, *([1] * (z.dim() - 1))) * (z - z_null)

    return rule


@torch.no_grad()
def sample_removed(backbone, sae, conds: Sequence[int], seeds: Sequence[int], remove: int,
                   config: SamplerConfig | None = None, strength: float = 2.0, gate: float = 0.8,
                   steps: tuple[int, int] | None = None, mask=None, progress: bool = False,
                   decode: bool = True) -> SampleOutput:
    """Concept removal: generate ``conds[i]`` from ``seeds[i]``; at every step two reference passes on the sample's
    own latents give what condition ``remove`` (C) and the null condition make of them, as far as the SAE's hook.
    The sample's features are compared with C's, relative to the null: ``cos(z - z_null, z_C - z_null)`` over its
    tokens and features (1 for a generation of C itself, far lower for other conditions); where it exceeds ``gate``
    the features are pushed through the null and beyond, ``z -> z - strength * g * (z - z_null)`` with
    ``g = (cos - gate) / (1 - gate)`` clipped to [0, 1] (``strength`` 1 = the null's features, 2 = as far again on
    the other side). The gate is a detector: it decides which generations are edited, so what the edit costs other
    conditions is what the detector lets through; ungated, the same edit on every generation damages classes that
    share features with C (``experiments/results/steering_bench.md``, removal)."""
    config = config or SamplerConfig()
    conds, seeds = [int(c) for c in conds], [int(s) for s in seeds]
    if not conds or len(seeds) != len(conds):
        raise TideError(f"give one seed per condition (got {len(conds)} conditions, {len(seeds)} seeds)")
    if not 0 <= gate <= 1:
        raise TideError(f"gate is a cosine threshold in [0, 1], got {gate}")
    from tide.models.base import NULL_CONDITION

    if int(remove) == NULL_CONDITION:
        raise TideError("the null condition cannot be removed: it is what removal moves toward")
    backbone.check_conditions(conds + [int(remove)])
    hooked, saes, (start, stop), mask_T, _ = _prepare(backbone, sae, config, steps, strength, None, None, mask)
    null = [NULL_CONDITION] * len(conds)
    return _in_batches(backbone, conds, seeds, config, "feature removal", progress, decode, lambda sl, ids, bar: (
        _patched_batch(backbone, hooked, saes, conds[sl], [[int(remove)] * len(ids), null[sl]], seeds[sl], ids, config,
                       strength, None, None, (start, stop), mask_T, bar, rule=removal_rule(gate))))


@torch.no_grad()
def sample_transferred(backbone, sae, conds: Sequence[int], seeds: Sequence[int], ref_conds: Sequence[int],
                       ref_seeds: Sequence[int], features: Sequence[int] | None = None,
                       config: SamplerConfig | None = None, strength: float = 1.0,
                       steps: tuple[int, int] | None = None, mask=None, progress: bool = False,
                       decode: bool = True) -> SampleOutput:
    """Transfer: generate condition ``conds[i]`` from seed ``seeds[i]`` while a reference generation
    (``ref_conds[i]`` from ``ref_seeds[i]``) is denoised alongside, and at every step of ``steps`` set the sample's
    latents of ``features`` (default: every feature), token by token, to the reference's at the same step:
    ``h + strength * sum_f (z_f(h_ref) - z_f(h)) d_f(t)``, the error term kept. Measured on ``fmnist-pixart``, this
    does not carry an attribute: the copied features also describe the reference's own noisy latents, the sample's
    denoising diverges (its copied features grow to tens or hundreds of times the reference's) and it is lost, with
    every feature set and window tried (``experiments/results/steering_bench.md``, transfer; module docstring)."""
    config = config or SamplerConfig()
    conds, seeds = [int(c) for c in conds], [int(s) for s in seeds]
    ref_conds, ref_seeds = [int(c) for c in ref_conds], [int(s) for s in ref_seeds]
    if not conds or not len(seeds) == len(ref_conds) == len(ref_seeds) == len(conds):
        raise TideError(f"give one seed, one reference condition and one reference seed per condition (got "
                        f"{len(conds)} conditions, {len(seeds)} seeds, {len(ref_conds)} reference conditions, "
                        f"{len(ref_seeds)} reference seeds)")
    backbone.check_conditions(conds + ref_conds)
    hooked, saes, (start, stop), mask_T, feats = _prepare(backbone, sae, config, steps, strength, None, features,
                                                          mask)
    return _in_batches(backbone, conds, seeds, config, "feature transfer", progress, decode, lambda sl, ids, bar: (
        _patched_batch(backbone, hooked, saes, conds[sl], [ref_conds[sl]], seeds[sl], ids, config, strength, None, feats,
                       (start, stop), mask_T, bar, ref_seeds=[ref_seeds[sl]])))


def _prepare(backbone, sae, config, steps, strength, top_features, features, mask):
    """Everything a patch run checks and places before its first batch: (hooked backbone, SAEs, (start, stop)
    window, token mask and feature ids on the first SAE's device)."""
    hooked = HookedBackbone.of(backbone)
    saes = check_saes(sae)
    window = _check(saes, hooked, steps, config.num_steps, strength, top_features, features)
    mask_T, feats = _on_sae(saes[0], mask, features)
    return hooked, saes, window, mask_T, feats


def _on_sae(sae, mask, features):
    """(flat float token mask or None, feature ids or None) on the SAE's device."""
    param = next(sae.parameters())
    mask_T = None if mask is None else torch.as_tensor(mask).reshape(-1).to(param.device, param.dtype)
    feats = None if features is None else torch.as_tensor([int(f) for f in features], device=param.device)
    return mask_T, feats


def _latent_mask(backbone, mask) -> torch.Tensor:
    """A token mask over the patch grid as a (1, 1, H, W) float mask over the latents (each patch's pixels)."""
    if mask is None:
        raise TideError("keep_outside needs a mask: name the region that is edited")
    grid = tuple(int(g) for g in backbone.patch_grid)
    shape = tuple(backbone.latent_shape())
    if len(grid) != 2 or len(shape) != 3:
        raise TideError(f"keep_outside works on image latents (a 2-d patch grid); this backbone's grid is {grid}")
    m = torch.as_tensor(mask).reshape(grid).float()
    (h, w), (r, c) = shape[1:], grid
    if h % r or w % c:
        raise TideError(f"latents of {h}x{w} do not split into the {r}x{c} patch grid")
    m = m.repeat_interleave(h // r, 0).repeat_interleave(w // c, 1)
    return m[None, None].to(backbone.device)


def _toward(z, z_refs, t):
    """The patch toward one condition: its latents minus the sample's own."""
    return z_refs[0] - z


def _encode(sae, store: dict, t: float) -> torch.Tensor:
    """(rows, tokens, d_sae) latents of the SAE's input hooks' activations in ``store`` at timestep ``t``."""
    param = next(sae.parameters())
    x = sae.cfg.rows(store).to(param.device, param.dtype)
    n, tok, d = x.shape
    with eval_mode(sae):
        z = sae.encode(x.reshape(-1, d), torch.full((n * tok,), t, device=param.device))
    return z.reshape(n, tok, -1)


def _patched_batch(backbone, hooked, saes, conds, refs, seeds, ids, config, strength, top_features, feats, window,
                   mask_T, bar, rule=_toward, keep_X=None, ref_seeds=None):
    """Denoise ``conds`` with, at every step of ``window``, the conditional rows' features of each SAE in ``saes``
    moved by ``strength * rule(z, [z_ref...], t)`` at its own hook: ``refs`` holds one condition list per reference
    pass, each run on the batch's own latents as far as the deepest SAE's hook; with ``ref_seeds`` (one list per
    reference) a reference is instead a generation of its own (its conditions from its seeds), denoised alongside
    and read at every step. With several SAEs the references are unedited and every hook is patched in the same
    forward pass, so a later hook's patch sees what the earlier ones did."""
    needed = [h for sae in saes for h in sae.cfg.input_hooks]
    needed = list(dict.fromkeys(needed))
    patch_at = {sae.cfg.hook: j for j, sae in enumerate(saes)}
    traj = Trajectory(backbone, conds, seeds, ids, config, hooked)
    own = [None] * len(refs) if ref_seeds is None else list(ref_seeds)
    passes = [Trajectory(backbone, r, seeds if o is None else o, ids, config, hooked, cond_only=o is None)
              for r, o in zip(refs, own)]
    rows_B = (traj.branch_B == COND).to(backbone.device)
    plain = None if keep_X is None else Trajectory(backbone, conds, seeds, ids, config, hooked)

    def follow(ref: Trajectory, r_step, t: float, active: bool) -> list | None:
        """A reference generation's own step: each SAE's latents (when ``active``), then its advance."""
        got: dict = {}
        rows = (ref.branch_B == COND).to(backbone.device)

        def keep(act, hook):
            got[hook.name] = act[rows].detach()
            return None

        ref.advance(r_step, ref.predict(r_step, [(h, keep) for h in needed] if active else []))
        return [_encode(sae, got, t) for sae in saes] if active else None

    def reference(ref: Trajectory, r_step, t: float) -> list:
        ref.x = traj.x
        got: dict = {}

        def keep(act, hook):
            got[hook.name] = act.detach()
            if len(got) == len(needed):
                raise _Reached
            return None

        try:
            ref.predict(r_step, [(h, keep) for h in needed])
        except _Reached:
            pass
        return [_encode(sae, got, t) for sae in saes]

    for step, *r_steps in zip(traj, *passes):
        active = window[0] <= step.index < window[1]
        t = float(step.t)
        z_own = [follow(ref, r_step, t, active) for ref, r_step, o in zip(passes, r_steps, own) if o is not None]
        if not active:
            out = traj.predict(step)
            if plain is not None:
                if step.index < window[0]:  # identical latents so far: the same output serves both
                    plain.advance(step, out)
                else:
                    plain.advance(step, plain.predict(step))
            traj.advance(step, out)
            if plain is not None:
                traj.x = keep_X * traj.x + (1 - keep_X) * plain.x
            bar.update(traj.batch)
            continue
        z_it = iter(z_own)
        z_refs = [reference(ref, r_step, t) if o is None else next(z_it) for ref, r_step, o in zip(passes, r_steps, own)]
        mine: dict = {}

        def patch(act, hook):
            mine[hook.name] = act[rows_B].detach()
            j = patch_at.get(hook.name)
            if j is None:
                return None
            if mask_T is not None and mask_T.numel() != act.shape[1]:
                raise TideError(f"the mask covers {mask_T.numel()} tokens but {hook.name} carries {act.shape[1]}: "
                                "give a mask over the hook's tokens (or the patch grid)")
            sae = saes[j]
            dz = rule(_encode(sae, mine, t), [z[j] for z in z_refs], t)
            if top_features is not None:
                top = dz.abs().topk(top_features, dim=-1).indices
                dz = torch.zeros_like(dz).scatter(-1, top, dz.gather(-1, top))
            with eval_mode(sae):
                ids_F = feats if feats is not None else torch.arange(sae.cfg.d_sae, device=dz.device)
                delta = (dz[..., feats] if feats is not None else dz) @ sae.fold_decoder(t, ids_F).to(dz.dtype)
            delta = strength * delta * (1.0 if mask_T is None else mask_T.to(delta)[:, None])
            out = act.clone()
            out[rows_B] = act[rows_B] + delta.to(act.device, act.dtype)
            return out

        traj.advance(step, traj.predict(step, [(h, patch) for h in needed]))
        if plain is not None:
            plain.advance(step, plain.predict(step))
            traj.x = keep_X * traj.x + (1 - keep_X) * plain.x
        bar.update(traj.batch)
    return traj.x
