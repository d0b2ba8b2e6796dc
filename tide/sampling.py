"""The sampling loop over a diffusers scheduler: per-sample seeds, classifier-free guidance, a
timestep context for hooks, and interventions active only inside a window of steps.

Determinism: sample ``i`` draws its initial noise (and any scheduler noise) from its own generator
seeded with ``seeds[i]`` on the CPU, so it regenerates alone exactly as it came out of a batch,
on any device, up to floating-point differences of batched matrix products.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from tide.branches import CfgBranch, check_branch
from tide.config import GenerationConfig
from tide.errors import TideError
from tide.hooks import BRANCH_NAMES, COND, UNCOND, HookedBackbone, StepContext, step_context
from tide.models.base import NULL_CONDITION, Backbone
from tide.models.loading import BackboneConfig


@dataclass
class SamplerConfig(GenerationConfig):
    """How to sample: the shared generation part (steps, guidance, first seed) and the batching."""

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
    branch: CfgBranch = "both"
    """CFG rows the function changes: ``cond``, ``uncond`` or ``both``."""

    def __post_init__(self):
        check_branch(self.branch, "intervention branch")

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
    """A fresh copy of the backbone's scheduler with ``num_steps`` timesteps set (see ``Backbone.make_scheduler``)."""
    return backbone.make_scheduler(num_steps)


def initial_noise(backbone: Backbone, seeds: Sequence[int]) -> torch.Tensor:
    """(B, *latent_shape) noise, each row from its own CPU generator seeded with its seed.

    Row ``i`` is what diffusers' ``randn_tensor`` draws for a batch with ``generator=[...]``, so a
    pipeline given the same generators starts from the same latents.
    """
    shape = backbone.latent_shape()
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(backbone.device, backbone.latent_dtype)


class Step(NamedTuple):
    """One step of a :class:`Trajectory`: its index, the scheduler timestep and the hooks' context."""

    index: int
    t: torch.Tensor
    ctx: StepContext


class Trajectory:
    """One batch on its way from noise to latents: THE denoising loop of tide.

    Iterating yields a :class:`Step` per scheduler timestep; :meth:`predict` runs the denoiser on
    the current latents (with hook functions if given) and returns the guided output the
    scheduler expects; :meth:`advance` takes the scheduler step with an output. Sampling predicts
    once and advances; the spliced evaluation predicts several times per step and advances along
    the clean prediction. ``cond_only``: only the conditional rows, with the guidance inputs of the
    config (a reference pass that reads what a condition does on another trajectory's latents). Works for DDPM-style schedulers (``init_noise_sigma``,
    ``scale_model_input``) and flow-matching ones (which have neither), as diffusers' pipelines do.
    """

    def __init__(self, backbone: Backbone, conds: Sequence[int], seeds: Sequence[int],
                 sample_ids: Sequence[int], config: SamplerConfig, hooked: HookedBackbone | None = None,
                 cond_only: bool = False):
        self.backbone, self.config = backbone, config
        self.hooked = hooked
        self.scheduler = backbone.make_scheduler(config.num_steps)
        self.x = initial_noise(backbone, seeds) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self.batch = b = len(conds)
        self.guidance_scale = backbone.resolve_guidance(config.guidance_scale)
        self.cfg = backbone.uses_cfg(self.guidance_scale) and not cond_only
        conds_B, ids_B = torch.tensor([int(c) for c in conds]), torch.tensor([int(i) for i in sample_ids])
        branch_B = torch.full((b,), COND, dtype=torch.int8)
        if self.cfg:
            conds_B = torch.cat([conds_B, torch.full((b,), NULL_CONDITION)])
            ids_B = torch.cat([ids_B, ids_B])
            branch_B = torch.cat([branch_B, torch.full((b,), UNCOND, dtype=torch.int8)])
        self.conds_B, self.ids_B, self.branch_B = conds_B, ids_B, branch_B
        self.cond = {**backbone.encode_conditions(conds_B.to(backbone.device)),
                     **backbone.guidance_inputs(self.guidance_scale)}
        params = inspect.signature(self.scheduler.step).parameters
        self._step_kwargs = {}
        if "generator" in params:
            self._step_kwargs["generator"] = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if "eta" in params:
            self._step_kwargs["eta"] = config.eta

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def __iter__(self) -> Iterator[Step]:
        n = len(self.timesteps)
        for i, t in enumerate(self.timesteps):
            yield Step(i, t, StepContext(i, n, float(t), self.branch_B, self.ids_B, self.conds_B))

    def model_input(self, step: Step) -> torch.Tensor:
        x_in = torch.cat([self.x, self.x]) if self.cfg else self.x
        if hasattr(self.scheduler, "scale_model_input"):
            x_in = self.scheduler.scale_model_input(x_in, step.t)
        return x_in

    def predict(self, step: Step, fwd_hooks: Sequence[tuple[str, HookFn]] = ()) -> torch.Tensor:
        """The guided denoiser output at ``step``, with ``fwd_hooks`` (name, fn) active during the call."""
        x_in = self.model_input(step)
        with step_context(step.ctx):
            if not fwd_hooks:
                out = self.backbone.denoise(x_in, step.t, self.cond)
            else:
                hooked = self.hooked or HookedBackbone.of(self.backbone)
                with hooked.hooks(fwd_hooks=list(fwd_hooks)):
                    out = hooked(x_in, step.t, self.cond)
        if self.cfg:
            out_c, out_u = out.chunk(2)
            out = self.backbone.combine_guidance(out_c, out_u, self.guidance_scale)
        return out

    def advance(self, step: Step, out: torch.Tensor) -> torch.Tensor:
        """Take the scheduler step from the current latents with the model output ``out``."""
        self.x = self.scheduler.step(out, step.t, self.x, **self._step_kwargs, return_dict=False)[0]
        return self.x


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
    seeds = [config.seed + i for i in range(len(conds))] if seeds is None else [int(s) for s in seeds]
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
    traj = Trajectory(backbone, conds, seeds, sample_ids, config, hooked)
    for step in traj:
        fwd = [(iv.hook, iv.bound_fn(step.ctx)) for iv in interventions if iv.active(step.index, step.ctx.timestep)]
        traj.advance(step, traj.predict(step, fwd))
        bar.update(traj.batch)
    return traj.x


# ------------------------------------------------------------------------------------ grid job

@dataclass
class GenerateConfig(SamplerConfig, BackboneConfig):
    """`tide sample`: a grid of class-conditional samples, one row per condition."""

    classes: list[int] | None = None
    """Condition ids, one grid row each: class ids, or prompt ids for text families (default: all)."""
    n: int = 8
    """Samples per condition (grid columns); sample j of row r uses seed + r*n + j."""
    out: str = "grid.png"
    """Where to write the PNG grid (missing folders are created)."""
    overwrite: bool = False
    """Replace an existing --out file (otherwise an existing file is refused and left as it is)."""

    def check_output(self) -> Path:
        """The --out path, refused in one line (before any model is loaded) when it is not a .png name, exists
        (without --overwrite), is a directory, or lies where no folder can be created or written."""
        out = Path(self.out)
        if not str(self.out).strip() or out.suffix.lower() != ".png":
            raise TideError(f"--out {self.out!r} is not a .png file name: tide sample writes a PNG grid; give e.g. "
                            "--out grid.png")
        if out.is_dir():
            raise TideError(f"--out {out} is a directory: give a .png file name inside it")
        if (out.exists() or out.is_symlink()) and not self.overwrite:
            raise TideError(f"--out {out} already exists: pass --overwrite to replace it, or choose another --out")
        from tide.io import check_writable_dir

        check_writable_dir(out.parent, "--out", target=out)  # a missing folder is created when the grid is written
        return out


def generate_grid(config: GenerateConfig, backbone: Backbone | None = None, progress: bool = True):
    """Sample ``n`` images per condition and write a labelled grid; returns (SampleOutput, path).

    Refused up front, in one line and before anything is written: a bad --out (see
    :meth:`GenerateConfig.check_output`), an --n below 1, a class id the backbone does not know (the null condition
    included: every grid row is a condition), and a request whose estimated memory exceeds what is available
    (:func:`tide.memory.check_sample`). The grid is written through a temporary file in the same folder, renamed
    into place when complete."""
    from tide.memory import check_sample

    if config.n < 1:
        raise TideError(f"--n must be >= 1, got {config.n}")
    out_path = config.check_output()
    backbone = backbone or config.load_backbone()
    classes = list(range(backbone.num_conditions)) if config.classes is None else [int(c) for c in config.classes]
    if not classes:
        raise TideError("--classes is empty: give at least one condition id, or leave it out for all")
    backbone.check_conditions(classes, allow_null=False)
    check_sample(backbone, config.n, len(classes), config.batch_size, config.guidance_scale)
    conds = [c for c in classes for _ in range(config.n)]
    seeds = [config.seed + i for i in range(len(conds))]
    out = sample(backbone, conds, seeds, config, progress=progress)
    names = backbone.condition_names
    return out, _write_grid(out.images, out_path, config.n, [names[c][:24] for c in classes])


def _write_grid(images: torch.Tensor, path: Path, nrow: int, labels: list[str]) -> Path:
    """``save_grid`` through a temporary ``.png`` beside ``path`` (:func:`tide.io.staged_outputs`), renamed over it
    when complete: a failed write leaves the old file (or none) and no partial one."""
    from tide.images import save_grid
    from tide.io import staged_outputs

    with staged_outputs() as stage:
        save_grid(images, stage(path), nrow=nrow, row_labels=labels)
    return path
