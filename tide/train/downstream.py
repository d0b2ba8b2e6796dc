"""The downstream-aware objective: what the generation sees of an SAE's error.

An SAE spliced into a denoiser replaces the activation at its hook by its reconstruction; the
blocks after the hook read the reconstruction, and the scheduler reads their output. This term
measures that directly, as :func:`tide.eval.splice.denoiser_error` does, and trains on it:

    L_down = ||eps(x_t, t, c | hook <- SAE(act)) - eps(x_t, t, c)||^2 / ||eps(x_t, t, c)||^2

(with classifier-free guidance, eps is the guided output, both halves spliced, as the sampler sees it)

over a few denoiser inputs (x_t, t, c) at one timestep, back-propagated through the blocks after the
hook into the SAE (the blocks before it run without a graph; the backbone's weights stay frozen).
The trainer adds ``downstream_coefficient * L_down`` to the activation FVU (end-to-end SAEs,
Braun et al. 2024, mix the two the same way).

The denoiser inputs (:class:`Contexts`) are regenerated once from the dataset's manifest: the first
``downstream_samples`` captured samples, with the capture's backbone, seeds, conditions, guidance,
schedule and CFG branches, at every step; so they are the very inputs the captured rows came from.
It works for any hook of any family: it only uses the hooked denoiser call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from tide.branches import BRANCHES, CfgBranch
from tide.errors import TideError
from tide.hooks import HookedBackbone, step_context
from tide.models.base import NULL_CONDITION, Backbone
from tide.sampling import SamplerConfig, Trajectory


@dataclass
class Contexts:
    """Denoiser inputs along real trajectories, with the clean output of every row."""

    x_in_NCHW: torch.Tensor
    """Model inputs (after the scheduler's input scaling), one row per (sample, step) for guided contexts and per
    (sample, step, CFG branch) otherwise, float32 on CPU."""
    out_NCHW: torch.Tensor
    """The denoiser's clean output for each row (guided, or that branch's own), float32 on CPU."""
    step_N: torch.Tensor
    """Step index of each row."""
    cond_N: torch.Tensor
    """Condition id of each row (the null condition for unconditional rows of unguided contexts)."""
    timesteps: list[torch.Tensor]
    """The scheduler's timestep of each step, as the scheduler gives it (what the denoiser is called with)."""
    guidance_scale: float
    """Guidance of the trajectories (embedded-guidance families read it as an input)."""
    guided: bool = False
    """Rows are samples whose output is the guided one (both CFG halves run, as in sampling)."""

    def __len__(self) -> int:
        return len(self.step_N)

    def draw(self, n: int, generator: torch.Generator) -> tuple[int, torch.Tensor]:
        """(step, row indices): up to ``n`` rows of one step drawn at random (a denoiser call takes one timestep)."""
        step = int(self.step_N[int(torch.randint(len(self.step_N), (1,), generator=generator))])
        rows = torch.nonzero(self.step_N == step).flatten()
        pick = torch.randperm(len(rows), generator=generator)[:n]
        return step, rows[pick].sort().values


@torch.no_grad()
def collect_contexts(backbone: Backbone, conds: Sequence[int], seeds: Sequence[int], config: SamplerConfig,
                     branch: CfgBranch = "both", progress: bool = False) -> Contexts:
    """Run the trajectories of ``conds`` / ``seeds`` and keep every step's inputs and clean outputs.

    With classifier-free guidance and ``branch="both"`` a row is one sample at one step and its output is the
    *guided* one (what the scheduler reads: an error in either half is amplified by the guidance scale, so that
    is the error to train on); otherwise a row is one denoiser row of ``branch`` with its own output."""
    if not conds:
        raise TideError("the downstream objective needs at least one trajectory (downstream_samples >= 1)")
    xs, outs, steps, cs, timesteps = [], [], [], [], []
    bar = tqdm(total=len(conds) * config.num_steps, unit="step·img", disable=not progress, desc="downstream contexts")
    guidance = backbone.resolve_guidance(config.guidance_scale)
    guided = backbone.uses_cfg(guidance) and branch == "both"
    for start in range(0, len(conds), config.batch_size):
        c, s = list(conds[start:start + config.batch_size]), list(seeds[start:start + config.batch_size])
        traj = Trajectory(backbone, c, s, list(range(start, start + len(c))), config)
        if branch != "cond" and not traj.cfg:
            raise TideError(f"the downstream objective cannot use cfg branch {branch!r}: these trajectories have no "
                            "unconditional half (guidance 1)")
        keep = torch.arange(len(c)) if guided or branch == "cond" else \
            torch.nonzero(traj.branch_B == BRANCHES[branch]).flatten()
        for step in traj:
            x_in = traj.model_input(step)
            with step_context(step.ctx):
                raw = backbone.denoise(x_in, step.t, traj.cond)
            out = backbone.combine_guidance(*raw.chunk(2), traj.guidance_scale) if traj.cfg else raw
            rows = keep.to(raw.device)
            xs.append(x_in[rows].float().cpu())
            outs.append((out if guided else raw)[rows].float().cpu())
            steps.append(torch.full((len(keep),), step.index))
            cs.append(traj.conds_B[keep])
            if start == 0:
                timesteps.append(step.t)
            traj.advance(step, out)
            bar.update(traj.batch)
    bar.close()
    return Contexts(torch.cat(xs), torch.cat(outs), torch.cat(steps), torch.cat(cs), timesteps, guidance, guided)


def downstream_loss(hooked: HookedBackbone, sae, hook: str, contexts: Contexts, step: int,
                    rows: torch.Tensor) -> torch.Tensor:
    """Squared relative error of the denoiser's output on ``rows`` (all of step ``step``) with ``sae``'s
    reconstruction in place of ``hook``'s activation; differentiable in the SAE's parameters. For guided contexts
    both halves run spliced and the guided outputs are compared."""
    backbone = hooked.backbone
    device = backbone.device
    param = next(sae.parameters())
    t = contexts.timesteps[step]
    t_value = float(t)

    def splice(act, hook=None):
        x_ND = act.reshape(-1, act.shape[-1]).to(param.device, param.dtype)
        x_hat = sae(x_ND, torch.full((len(x_ND),), t_value, device=param.device)).x_hat_BD
        return x_hat.to(act.device, act.dtype).reshape(act.shape)

    fwd_hooks = [(hook, splice)]
    base_hook = getattr(sae.cfg, "base_hook", None)
    if base_hook is not None:  # an update target: input + reconstruction of (output - input)
        saved = {}
        fwd_hooks = [(base_hook, lambda act, hook=None: saved.__setitem__("x", act)),
                     (hook, lambda act, hook=None: saved["x"] + splice(act - saved["x"]))]

    x_in = contexts.x_in_NCHW[rows].to(device, backbone.latent_dtype)
    conds = contexts.cond_N[rows]
    if contexts.guided:
        x_in = torch.cat([x_in, x_in])
        conds = torch.cat([conds, torch.full_like(conds, NULL_CONDITION)])
    cond = {**backbone.encode_conditions(conds.to(device)), **backbone.guidance_inputs(contexts.guidance_scale)}
    with torch.enable_grad(), hooked.hooks(fwd_hooks=fwd_hooks):
        out = hooked(x_in, t, cond)
        if contexts.guided:
            out = backbone.combine_guidance(*out.chunk(2), contexts.guidance_scale)
    clean = contexts.out_NCHW[rows].to(out.device)
    return (out.float() - clean).pow(2).sum() / clean.pow(2).sum().clamp_min(1e-12)


class DownstreamObjective:
    """The downstream term for the SAEs of one run: the contexts, the frozen hooked backbone, and a seeded draw.
    Building it freezes the backbone (``requires_grad_(False)``, eval mode) in place."""

    def __init__(self, backbone: Backbone, contexts: Contexts, rows_per_step: int, seed: int = 0):
        if rows_per_step < 1:
            raise TideError(f"downstream_batch must be >= 1, got {rows_per_step}")
        self.hooked = HookedBackbone.of(backbone)
        self.contexts = contexts
        self.rows_per_step = rows_per_step
        self.seed = seed
        backbone.requires_grad_(False)  # gradients flow through the backbone to the SAE only
        backbone.eval()

    def draw(self, step: int) -> tuple[int, torch.Tensor]:
        """The (denoising step, rows) of training step ``step``: the same on every rank and after a resume."""
        return self.contexts.draw(self.rows_per_step, torch.Generator().manual_seed(self.seed * 1_000_003 + step))

    def loss(self, sae, hook: str, draw: tuple[int, torch.Tensor]) -> torch.Tensor:
        return downstream_loss(self.hooked, sae, hook, self.contexts, *draw)


def downstream_for_dataset(store, config) -> DownstreamObjective:
    """The objective for training on captured dataset ``store`` (an :class:`~tide.data.ActivationStore`) with
    :class:`~tide.train.config.TrainConfig` ``config``: the capture's backbone on ``config.device``, and the
    trajectories of its first ``config.downstream_samples`` samples."""
    from tide.device import resolve_device
    from tide.models.loading import load_captured_backbone

    manifest = store.manifest
    captured = manifest.get("config", {}) or {}
    backbone = load_captured_backbone(manifest, store.path, device=resolve_device(config.device))
    classes = captured.get("classes")
    conds_all = list(range(backbone.num_conditions)) if classes is None else [int(c) for c in classes]
    n = min(int(config.downstream_samples), int(manifest.get("num_samples", config.downstream_samples)))
    seed = int(captured.get("seed", 0))
    sampler = SamplerConfig(num_steps=int(captured.get("num_steps", 50)),
                            guidance_scale=captured.get("guidance_scale"), batch_size=16)
    contexts = collect_contexts(backbone, [conds_all[i % len(conds_all)] for i in range(n)],
                                [seed + i for i in range(n)], sampler, captured.get("cfg_branch", "cond"),
                                progress=config.progress)
    return DownstreamObjective(backbone, contexts, config.downstream_batch, config.seed)
