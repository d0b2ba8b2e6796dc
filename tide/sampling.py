"""The sampling loop over a diffusers scheduler: per-sample seeds, classifier-free guidance, a
timestep context for hooks, and interventions active only inside a window of steps.

Determinism: sample ``i`` draws its initial noise (and any scheduler noise) from its own generator
seeded with ``seeds[i]`` on the CPU, so it regenerates alone exactly as it came out of a batch,
on any device, up to floating-point differences of batched matrix products.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from tide.errors import TideError
from tide.hooks import BRANCH_NAMES, COND, UNCOND, HookedBackbone, StepContext, step_context
from tide.models.base import NULL_CONDITION, Backbone
from tide.models.loading import BackboneConfig


@dataclass
class SamplerConfig:
    """How to sample."""

    num_steps: int = 50
    """Denoising steps of the scheduler."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale; 1.0 runs the conditional model alone (no null-condition half)."""
    batch_size: int = 100
    """Samples denoised together (the model sees twice as many rows under CFG)."""
    eta: float = 0.0
    """DDIM stochasticity (0 = deterministic DDIM); ignored by schedulers without it."""

    def __post_init__(self):
        if self.num_steps < 1:
            raise TideError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.batch_size < 1:
            raise TideError(f"batch_size must be >= 1, got {self.batch_size}")


HookFn = Callable[[torch.Tensor, object], "torch.Tensor | None"]


@dataclass
class Intervention:
    """A hook function active only inside a window of the schedule and on chosen CFG branches.

    ``fn(activation, hook)`` follows TransformerLens: it returns a new activation or None (read only).
    Inside it, :func:`tide.hooks.current_step` tells the step, timestep and rows' branches.
    """

    hook: str
    """Hook name, e.g. ``blocks.4.hook_resid_post``."""
    fn: HookFn
    """The hook function."""
    steps: tuple[int, int] | None = None
    """Active for step indices in [start, stop); None = every step."""
    timesteps: tuple[float, float] | None = None
    """Active while the scheduler timestep lies in [low, high] (inclusive); None = any."""
    branch: str = "both"
    """CFG rows the function changes: ``cond``, ``uncond`` or ``both``."""

    def __post_init__(self):
        if self.branch not in ("both", *BRANCH_NAMES):
            raise TideError(f"intervention branch must be 'cond', 'uncond' or 'both', got {self.branch!r}")

    def active(self, step_index: int, timestep: float) -> bool:
        if self.steps is not None and not self.steps[0] <= step_index < self.steps[1]:
            return False
        if self.timesteps is not None and not self.timesteps[0] <= timestep <= self.timesteps[1]:
            return False
        return True

    def bound_fn(self, ctx: StepContext) -> HookFn:
        """The function restricted to this intervention's CFG branch."""
        if self.branch == "both":
            return self.fn
        rows_B = ctx.cfg_branch_B == BRANCH_NAMES[self.branch]

        def fn(act, hook):
            out = self.fn(act, hook)
            if out is None:
                return None
            mask = rows_B.to(act.device).view(-1, *([1] * (act.dim() - 1)))
            return torch.where(mask, out, act)

        return fn


class SampleOutput(NamedTuple):
    images: torch.Tensor
    """(B, C, H, W) in [0, 1], on the CPU."""
    latents: torch.Tensor
    """(B, C, h, w) final latents, on the CPU."""
    conds: torch.Tensor
    """(B,) condition ids."""
    seeds: torch.Tensor
    """(B,) per-sample seeds."""


def make_scheduler(backbone: Backbone, num_steps: int):
    """A fresh copy of the backbone's scheduler with ``num_steps`` timesteps set."""
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    scheduler.set_timesteps(num_steps, device=backbone.device, **backbone.scheduler_kwargs(num_steps))
    return scheduler


def initial_noise(backbone: Backbone, seeds: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) noise, each row from its own CPU generator seeded with its seed."""
    shape = backbone.latent_shape()
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(backbone.device, backbone.dtype)


def check_windows(interventions: Sequence[Intervention], timesteps: Sequence[float]) -> None:
    """Refuse an intervention whose window selects no step of the schedule."""
    for iv in interventions:
        if not any(iv.active(i, float(t)) for i, t in enumerate(timesteps)):
            raise TideError(
                f"intervention at {iv.hook} (steps={iv.steps}, timesteps={iv.timesteps}) is active at no step "
                f"of the {len(timesteps)}-step schedule (step indices 0..{len(timesteps) - 1}, timesteps "
                f"{float(timesteps[0]):g} down to {float(timesteps[-1]):g})")


@torch.no_grad()
def sample(
    model: Backbone | HookedBackbone,
    conds: Sequence[int],
    seeds: Sequence[int] | None = None,
    config: SamplerConfig | None = None,
    interventions: Sequence[Intervention] = (),
    progress: bool = False,
    decode: bool = True,
    sample_ids: Sequence[int] | None = None,
) -> SampleOutput:
    """Generate one sample per condition id, sample ``i`` seeded with ``seeds[i]`` (default: i).

    ``sample_ids`` label the rows in the step context hooks read (default: 0..B-1).
    """
    config = config or SamplerConfig()
    backbone = model.backbone if isinstance(model, HookedBackbone) else model
    conds = [int(c) for c in conds]
    seeds = list(range(len(conds))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(conds):
        raise TideError(f"got {len(conds)} conditions but {len(seeds)} seeds: give one seed per sample")
    if not conds:
        raise TideError("nothing to sample: give at least one condition id")
    sample_ids = list(range(len(conds))) if sample_ids is None else [int(i) for i in sample_ids]
    backbone.check_conditions(conds)
    hooked = HookedBackbone.of(backbone) if interventions else None
    if hooked is not None:
        hooked.check_hook_names([iv.hook for iv in interventions])
        check_windows(interventions, make_scheduler(backbone, config.num_steps).timesteps)

    images, latents = [], []
    starts = range(0, len(conds), config.batch_size)
    bar = tqdm(total=len(conds) * config.num_steps, unit="step·img", disable=not progress, desc="sampling")
    for start in starts:
        c = conds[start:start + config.batch_size]
        s = seeds[start:start + config.batch_size]
        x = _denoise_batch(backbone, hooked, c, s, sample_ids[start:start + len(c)], config, interventions, bar)
        latents.append(x.float().cpu())
        if decode:
            images.append(backbone.decode(x).cpu())
    bar.close()
    lat = torch.cat(latents)
    return SampleOutput(torch.cat(images) if decode else lat.new_empty(0), lat,
                        torch.tensor(conds), torch.tensor(seeds))


def _denoise_batch(backbone, hooked, conds, seeds, sample_ids, config, interventions, bar):
    device = backbone.device
    scheduler = make_scheduler(backbone, config.num_steps)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = initial_noise(backbone, seeds) * scheduler.init_noise_sigma
    b = len(conds)

    cfg = backbone.uses_cfg(config.guidance_scale)
    conds_B = torch.tensor(conds)
    ids_B = torch.tensor(sample_ids)
    branch_B = torch.full((b,), COND, dtype=torch.int8)
    if cfg:
        conds_B = torch.cat([conds_B, torch.full((b,), NULL_CONDITION)])
        ids_B = torch.cat([ids_B, ids_B])
        branch_B = torch.cat([branch_B, torch.full((b,), UNCOND, dtype=torch.int8)])
    cond = backbone.encode_conditions(conds_B.to(device))

    step_params = inspect.signature(scheduler.step).parameters
    extra = {}
    if "generator" in step_params:
        extra["generator"] = generators
    if "eta" in step_params:
        extra["eta"] = config.eta

    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        x_in = torch.cat([x, x]) if cfg else x
        x_in = scheduler.scale_model_input(x_in, t)
        ctx = StepContext(i, len(timesteps), float(t), branch_B, ids_B, conds_B)
        with step_context(ctx):
            if hooked is None:
                out = backbone.denoise(x_in, t, cond)
            else:
                fwd = [(iv.hook, iv.bound_fn(ctx)) for iv in interventions if iv.active(i, float(t))]
                with hooked.hooks(fwd_hooks=fwd):
                    out = hooked(x_in, t, cond)
        if cfg:
            out_c, out_u = out.chunk(2)
            out = out_u + config.guidance_scale * (out_c - out_u)
        x = scheduler.step(out, t, x, **extra, return_dict=False)[0]
        bar.update(b)
    return x


# ------------------------------------------------------------------------------------ grid job

@dataclass
class GenerateConfig(SamplerConfig, BackboneConfig):
    """`tide sample`: a grid of class-conditional samples, one row per condition."""

    classes: list[int] | None = None
    """Condition ids, one grid row each: class ids, or prompt ids for text families (default: all)."""
    n: int = 8
    """Samples per condition (grid columns)."""
    seed: int = 0
    """Seed of the first sample; sample j of row r uses seed + r*n + j."""
    out: str = "grid.png"
    """Where to write the PNG grid."""


def generate_grid(config: GenerateConfig, backbone: Backbone | None = None, progress: bool = True):
    """Sample ``n`` images per condition and write a labelled grid; returns (SampleOutput, path)."""
    from tide.images import save_grid

    backbone = backbone or config.load_backbone()
    classes = list(range(backbone.num_conditions)) if config.classes is None else list(config.classes)
    if config.n < 1:
        raise TideError(f"n must be >= 1, got {config.n}")
    conds = [c for c in classes for _ in range(config.n)]
    seeds = [config.seed + i for i in range(len(conds))]
    backbone.check_conditions(conds)
    out = sample(backbone, conds, seeds, config, progress=progress)
    names = backbone.condition_names
    path = save_grid(out.images, config.out, nrow=config.n, row_labels=[names[c][:24] for c in classes])
    return out, path
