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
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from tide.device import eval_mode
from tide.errors import TideError
from tide.hooks import COND, HookedBackbone
from tide.sampling import SampleOutput, SamplerConfig, Trajectory


class _Reached(Exception):
    """Raised by the reference pass's last hook: nothing after the SAE's hook is needed."""


def _check(sae, hooked: HookedBackbone, steps, num_steps: int, strength: float, top_features, features):
    cfg = sae.cfg
    if not getattr(cfg, "hook", None):
        raise TideError("the SAE's config names no hook: a feature patch happens at the SAE's hook")
    hooked.check_hook_names(cfg.input_hooks)
    if strength < 0:
        raise TideError(f"strength must be >= 0, got {strength}")
    if top_features is not None and not 1 <= top_features <= cfg.d_sae:
        raise TideError(f"top_features must lie in 1..{cfg.d_sae} (the SAE's width), got {top_features}")
    if top_features is not None and features is not None:
        raise TideError("give either top_features (per token, the features that differ most) or features (a fixed "
                        "list), not both")
    if features is not None:
        bad = [int(f) for f in features if not 0 <= int(f) < cfg.d_sae]
        if bad or not len(features):
            raise TideError(f"features must be ids in 0..{cfg.d_sae - 1}" + (f", got {bad[:5]}" if bad else ""))
    start, stop = (0, num_steps) if steps is None else (int(steps[0]), int(steps[1]))
    if not 0 <= start < stop <= num_steps:
        raise TideError(f"patch window steps [{start}, {stop}) lies outside the {num_steps}-step schedule: "
                        f"need 0 <= start < stop <= {num_steps}")
    return start, stop


@torch.no_grad()
def sample_patched(backbone, sae, conds: Sequence[int], targets: Sequence[int], seeds: Sequence[int],
                   config: SamplerConfig | None = None, strength: float = 1.0, top_features: int | None = None,
                   features: Sequence[int] | None = None, steps: tuple[int, int] | None = None, mask=None,
                   progress: bool = False, decode: bool = True) -> SampleOutput:
    """Generate condition ``conds[i]`` from seed ``seeds[i]`` with its SAE features patched toward condition
    ``targets[i]`` (module docstring) at steps [start, stop) of ``steps`` (default: every step); ``mask``: bool over
    the hook's tokens (or the patch grid), the tokens that are patched."""
    config = config or SamplerConfig()
    conds, targets, seeds = [int(c) for c in conds], [int(c) for c in targets], [int(s) for s in seeds]
    if not conds or len(targets) != len(conds) or len(seeds) != len(conds):
        raise TideError(f"give one target and one seed per condition (got {len(conds)} conditions, {len(targets)} "
                        f"targets, {len(seeds)} seeds)")
    backbone.check_conditions(conds + targets)
    hooked = HookedBackbone.of(backbone)
    start, stop = _check(sae, hooked, steps, config.num_steps, strength, top_features, features)
    param = next(sae.parameters())
    mask_T = None if mask is None else torch.as_tensor(mask).reshape(-1).to(param.device, param.dtype)
    feats = None if features is None else torch.as_tensor([int(f) for f in features], device=param.device)
    images, latents = [], []
    bar = tqdm(total=len(conds) * config.num_steps, unit="step·img", disable=not progress, desc="feature patch")
    for b0 in range(0, len(conds), config.batch_size):
        sl = slice(b0, b0 + config.batch_size)
        x = _patched_batch(backbone, hooked, sae, conds[sl], targets[sl], seeds[sl], list(range(b0, b0 + len(conds[sl]))),
                           config, strength, top_features, feats, (start, stop), mask_T, bar)
        latents.append(x.float().cpu())
        if decode:
            images.append(backbone.decode(x).cpu())
    bar.close()
    lat = torch.cat(latents)
    return SampleOutput(torch.cat(images) if decode else lat.new_empty(0), lat, torch.tensor(conds), torch.tensor(seeds))


def _patched_batch(backbone, hooked, sae, conds, targets, seeds, ids, config, strength, top_features, feats, window,
                   mask_T, bar):
    cfg = sae.cfg
    param = next(sae.parameters())
    traj = Trajectory(backbone, conds, seeds, ids, config, hooked)
    ref = Trajectory(backbone, targets, seeds, ids, config, hooked, cond_only=True)
    rows_B = (traj.branch_B == COND).to(backbone.device)

    def encode(store: dict, t: float) -> torch.Tensor:
        x = cfg.rows(store).to(param.device, param.dtype)
        n, tok, d = x.shape
        with eval_mode(sae):
            z = sae.encode(x.reshape(-1, d), torch.full((n * tok,), t, device=param.device))
        return z.reshape(n, tok, -1)

    for step, r_step in zip(traj, ref):
        if not window[0] <= step.index < window[1]:
            traj.advance(step, traj.predict(step))
            bar.update(traj.batch)
            continue
        t = float(step.t)
        ref.x = traj.x
        got: dict = {}

        def keep(act, hook):
            got[hook.name] = act.detach()
            if hook.name == cfg.hook:
                raise _Reached
            return None

        try:
            ref.predict(r_step, [(h, keep) for h in cfg.input_hooks])
        except _Reached:
            pass
        z_ref = encode(got, t)
        mine: dict = {}

        def record(act, hook):
            mine[hook.name] = act[rows_B].detach()
            return None

        def patch(act, hook):
            if mask_T is not None and mask_T.numel() != act.shape[1]:
                raise TideError(f"the mask covers {mask_T.numel()} tokens but {hook.name} carries {act.shape[1]}: "
                                "give a mask over the hook's tokens (or the patch grid)")
            mine[hook.name] = act[rows_B].detach()
            dz = z_ref - encode(mine, t)  # target minus current
            if top_features is not None:
                top = dz.abs().topk(top_features, dim=-1).indices
                dz = torch.zeros_like(dz).scatter(-1, top, dz.gather(-1, top))
            with eval_mode(sae):
                if feats is not None:
                    delta = dz[..., feats] @ sae.fold_decoder(t, feats).to(dz.dtype)
                else:
                    delta = dz @ sae.fold_decoder(t, torch.arange(cfg.d_sae, device=param.device)).to(dz.dtype)
            delta = strength * delta * (1.0 if mask_T is None else mask_T[:, None])
            out = act.clone()
            out[rows_B] = act[rows_B] + delta.to(act.device, act.dtype)
            return out

        fwd = [(h, record) for h in cfg.input_hooks if h != cfg.hook] + [(cfg.hook, patch)]
        traj.advance(step, traj.predict(step, fwd))
        bar.update(traj.batch)
    return traj.x
