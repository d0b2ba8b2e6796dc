"""Spliced fidelity: the SAE's reconstruction put in place of the activation at its hook.

Two measurements, both against the clean model with the same noise (per-sample seeds):

* :func:`denoiser_error` — along a clean sampling trajectory, at every step, the relative error of
  the denoiser's output when the hook's activation is replaced by the SAE's reconstruction,
  ||eps_spliced - eps_clean|| / ||eps_clean||, on the same input. The spliced output never feeds
  back into the trajectory. A mean-ablation baseline (the activation replaced by its mean) puts
  the number on a scale: an SAE is useful where its error is far below the baseline's.
* :func:`spliced_samples` — whole generations with the SAE in the loop at every step against the
  clean generations: pixel MSE and, with an evaluation classifier, class agreement of both, their
  agreement with each other, and Fréchet distances in the classifier's feature space.

The splice reads the timestep of each denoiser call from :func:`tide.hooks.current_step` and runs
the SAE on every (row, token) of the hook's (B, T, D) activation.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tide.branches import CfgBranch
from tide.device import eval_mode
from tide.errors import TideError
from tide.eval.frechet import frechet_distance
from tide.eval.metrics import check_sae_hook
from tide.hooks import BRANCH_NAMES, HookedBackbone, current_step, is_text_hook, require_step
from tide.models.base import Backbone
from tide.sampling import HookFn, Intervention, SampleOutput, SamplerConfig, Trajectory, sample


# ------------------------------------------------------------------------------------ checks and hook functions
def check_splice(sae, hooked: HookedBackbone, hook: str) -> None:
    """Refuse an unknown hook, an SAE trained on another hook, and an SAE of another width."""
    hooked.check_hook_names([hook] + ([sae.cfg.base_hook] if getattr(sae.cfg, "base_hook", None) else []))
    check_sae_hook(sae, hook)
    if not is_text_hook(hook):  # every image-stream hook carries d_model channels
        sae.check_width(hooked.backbone.d_model, f"hook {hook!r} of backbone {hooked.backbone.name!r}")


def splice_fn(sae, hook_name: str = "?", observe=None):
    """A hook function replacing a (..., D) activation by ``sae.reconstruct(x, t)`` at the sampler's timestep.

    It runs the SAE on the SAE's device and dtype and returns the result in the activation's.
    Put the SAE in eval mode first (BatchTopK uses its inference threshold there). ``observe(x, x_hat)``, if
    given, sees every input and reconstruction. For an SAE with an update target use :func:`splice_fns`.
    """
    param = next(sae.parameters())

    def fn(act: torch.Tensor, hook=None) -> torch.Tensor:
        ctx = require_step("the SAE splice")
        sae.check_width(act.shape[-1], f"hook {hook_name!r}")
        x_ND = act.reshape(-1, act.shape[-1]).to(param.device, param.dtype)
        t_N = torch.full((x_ND.shape[0],), float(ctx.timestep), device=param.device)
        with torch.no_grad():
            x_hat = sae.reconstruct(x_ND, t_N)
        x_hat = x_hat.to(act.device, act.dtype).reshape(act.shape)
        if observe is not None:
            observe(act, x_hat)
        return x_hat

    return fn


def splice_fns(sae, hook: str, observe=None) -> list[tuple[str, HookFn]]:
    """The (hook name, function) pairs that splice ``sae`` in at ``hook``: one replacing the activation, or for an
    update target (:attr:`SAEConfig.target`) one reading the block's input and one replacing its output by
    input + reconstruction of (output - input). ``observe(x, x_hat)`` sees the SAE's inputs and reconstructions."""
    main = splice_fn(sae, hook, observe)
    base_hook = getattr(sae.cfg, "base_hook", None)
    if base_hook is None:
        return [(hook, main)]
    saved: dict[str, torch.Tensor] = {}

    def read(act, hook=None):
        saved["x"] = act
        return None

    def replace(act, hook=None):
        if "x" not in saved:
            raise TideError(f"the update splice at {hook!r} ran without its block input {base_hook!r}")
        base = saved.pop("x")
        return base + main(act - base, hook)

    return [(base_hook, read), (hook, replace)]


def splice_interventions(sae, hook: str, steps: tuple[int, int] | None = None,
                         timesteps: tuple[float, float] | None = None, branch: CfgBranch = "both") -> list[Intervention]:
    """The :class:`~tide.sampling.Intervention` s that splice the SAE in at ``hook`` (every step by default)."""
    return [Intervention(name, fn, steps=steps, timesteps=timesteps, branch=branch) for name, fn in splice_fns(sae, hook)]


def splice_intervention(sae, hook: str, steps: tuple[int, int] | None = None,
                        timesteps: tuple[float, float] | None = None, branch: CfgBranch = "both") -> Intervention:
    """An :class:`~tide.sampling.Intervention` that splices the SAE in at ``hook`` (every step by default); an SAE
    with an update target needs two (:func:`splice_interventions`)."""
    ivs = splice_interventions(sae, hook, steps, timesteps, branch)
    if len(ivs) != 1:
        raise TideError("an SAE with an update target splices in through two hooks: use splice_interventions")
    return ivs[0]


def mean_ablation_fn(hook_name: str = "?", stats=None):
    """A hook function replacing the activation by a mean.

    With ``stats`` (:class:`tide.data.TimestepStats` of the hook), the dataset's mean at the recorded
    timestep nearest the current one; otherwise the mean over the call's rows and tokens.
    """
    def fn(act: torch.Tensor, hook=None) -> torch.Tensor:
        if stats is None:
            mean_D = act.reshape(-1, act.shape[-1]).mean(0)
        else:
            ctx = require_step("mean ablation at the data's timestep")
            if stats.mean_TD.shape[-1] != act.shape[-1]:
                raise TideError(f"hook {hook_name!r} carries width {act.shape[-1]} but the ablation statistics "
                                f"have width {stats.mean_TD.shape[-1]}")
            row = int(stats.index_of([ctx.timestep])[0])
            mean_D = torch.as_tensor(stats.mean_TD[row], dtype=act.dtype, device=act.device)
        return mean_D.expand_as(act).clone()

    return fn


# ------------------------------------------------------------------------------------ denoiser error
class DenoiserError(NamedTuple):
    """Per denoising step of the clean trajectory: how much the splice changes the denoiser's output."""

    hook: str
    samples: int
    guidance_scale: float
    branch: CfgBranch
    step_index_T: np.ndarray
    timesteps_T: np.ndarray
    relative_error_T: np.ndarray
    """||eps_spliced - eps_clean|| / ||eps_clean||, pooled over the samples (sums of squares over all of them)."""
    ablation_error_T: np.ndarray
    """The same with the activation mean-ablated instead of spliced."""
    fvu_T: np.ndarray
    """The SAE's FVU on its inputs at that step (every row and token of the call): the activations it replaced, or
    for an update-target SAE the block's updates."""
    ablation: str
    """Which mean the baseline used: ``data`` (the dataset's per-timestep mean) or ``batch``."""
    latents: torch.Tensor
    """Final latents of the clean trajectory (identical to ``sample``'s with the same seeds)."""

    def to_dict(self) -> dict:
        def curve(a):
            return [float(v) if np.isfinite(v) else None for v in a]
        return {
            "hook": self.hook, "samples": self.samples, "guidance_scale": self.guidance_scale,
            "branch": self.branch, "ablation": self.ablation,
            "mean_relative_error": float(np.mean(self.relative_error_T)),
            "mean_ablation_error": float(np.mean(self.ablation_error_T)),
            "per_step": {"step_index": [int(s) for s in self.step_index_T], "timestep": curve(self.timesteps_T),
                         "relative_error": curve(self.relative_error_T),
                         "ablation_error": curve(self.ablation_error_T), "fvu": curve(self.fvu_T)},
        }


class _StepFVU:
    """Exact per-step FVU sums of what the splice saw (shifted by the step's first mean)."""

    def __init__(self, num_steps: int):
        self.n = np.zeros(num_steps)
        self.sse = np.zeros(num_steps)
        self.s2 = np.zeros(num_steps)
        self.s1: list[np.ndarray | None] = [None] * num_steps
        self.shift: list[np.ndarray | None] = [None] * num_steps

    def add(self, i: int, x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> None:
        if not len(x_ND):
            return
        x = x_ND.double()
        if self.shift[i] is None:
            self.shift[i] = x.mean(0).cpu().numpy()
            self.s1[i] = np.zeros_like(self.shift[i])
        dev = x - torch.as_tensor(self.shift[i], device=x.device)
        self.n[i] += len(x)
        self.sse[i] += float(((x_hat_ND.double() - x) ** 2).sum())
        self.s1[i] += dev.sum(0).cpu().numpy()
        self.s2[i] += float((dev * dev).sum())

    def fvu(self) -> np.ndarray:
        out = np.full(len(self.n), np.nan)
        for i, n in enumerate(self.n):
            if n:
                ssd = self.s2[i] - float((self.s1[i] ** 2).sum()) / n
                out[i] = self.sse[i] / ssd if ssd > 0 else np.nan
        return out


@torch.no_grad()
def denoiser_error(model: Backbone | HookedBackbone, sae, hook: str, conds: Sequence[int],
                   seeds: Sequence[int] | None = None, sampler_config: SamplerConfig | None = None,
                   ablation_stats=None, branch: CfgBranch = "both", progress: bool = False) -> DenoiserError:
    """Relative error of the denoiser's output with the SAE spliced in at ``hook``, per step of a clean trajectory.

    At every step the clean output, the spliced output and the mean-ablated output are computed on
    the same input; the trajectory follows the clean output only. With classifier-free guidance the
    guided outputs (what the scheduler sees) are compared. ``ablation_stats`` (the hook's
    :class:`tide.data.TimestepStats`) makes the baseline use the dataset's per-timestep mean;
    otherwise each call's own mean over rows and tokens. ``branch`` picks the CFG rows spliced.
    """
    config = sampler_config or SamplerConfig()
    hooked = HookedBackbone.of(model)
    backbone = hooked.backbone
    check_splice(sae, hooked, hook)
    conds = [int(c) for c in conds]
    seeds = list(range(len(conds))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(conds) or not conds:
        raise TideError(f"give one seed per condition (and at least one): got {len(conds)} conditions, "
                        f"{len(seeds)} seeds")
    backbone.check_conditions(conds)

    fvu_acc = _StepFVU(config.num_steps)

    def observe(x, y):
        ctx = current_step()
        if branch != "both":  # only the rows the splice replaces
            rows = (ctx.cfg_branch_B == BRANCH_NAMES[branch]).to(x.device)
            x, y = x[rows], y[rows]
        fvu_acc.add(ctx.step_index, x.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1]))

    splice_ivs = [Intervention(name, fn, branch=branch) for name, fn in splice_fns(sae, hook, observe)]
    ablate_iv = Intervention(hook, mean_ablation_fn(hook, ablation_stats), branch=branch)

    n_steps = config.num_steps
    sq_diff, sq_abl, sq_clean = np.zeros(n_steps), np.zeros(n_steps), np.zeros(n_steps)
    timesteps_T = np.zeros(n_steps)
    finals = []
    bar = tqdm(total=len(conds) * n_steps, unit="step·img", disable=not progress, desc="denoiser error")
    with eval_mode(sae):
        for start in range(0, len(conds), config.batch_size):
            c = conds[start:start + config.batch_size]
            s = seeds[start:start + config.batch_size]
            ids = list(range(start, start + len(c)))
            traj = Trajectory(backbone, c, s, ids, config, hooked)
            for step in traj:
                i = step.index
                timesteps_T[i] = step.ctx.timestep
                clean = traj.predict(step)
                out_s = traj.predict(step, [(iv.hook, iv.bound_fn(step.ctx)) for iv in splice_ivs])
                out_a = traj.predict(step, [(hook, ablate_iv.bound_fn(step.ctx))])
                clean64 = clean.double()
                sq_clean[i] += float((clean64 ** 2).sum())
                sq_diff[i] += float(((out_s.double() - clean64) ** 2).sum())
                sq_abl[i] += float(((out_a.double() - clean64) ** 2).sum())
                traj.advance(step, clean)
                bar.update(traj.batch)
            finals.append(traj.x.float().cpu())
    bar.close()
    denom = np.where(sq_clean > 0, sq_clean, np.nan)
    return DenoiserError(
        hook=hook, samples=len(conds), guidance_scale=backbone.resolve_guidance(config.guidance_scale), branch=branch,
        step_index_T=np.arange(n_steps), timesteps_T=timesteps_T,
        relative_error_T=np.sqrt(sq_diff / denom), ablation_error_T=np.sqrt(sq_abl / denom),
        fvu_T=fvu_acc.fvu(), ablation="data" if ablation_stats is not None else "batch",
        latents=torch.cat(finals))


# ------------------------------------------------------------------------------------ spliced samples
class SplicedSamples(NamedTuple):
    """Generations with the SAE in the loop at every step against clean ones from the same noise."""

    hook: str
    clean: SampleOutput
    spliced: SampleOutput
    pixel_mse: float
    """Mean over pixels and samples of (spliced - clean)^2, images in [0, 1]."""
    classifier: dict | None
    """With an evaluation classifier: ``agreement_clean`` / ``agreement_spliced`` (prediction = requested
    class; class-conditional backbones only), ``agreement_spliced_vs_clean`` (same prediction),
    ``frechet_spliced_vs_clean`` and, with real images, ``frechet_clean_vs_real``,
    ``frechet_spliced_vs_real`` and ``real_images``. None without a classifier."""

    def to_dict(self) -> dict:
        return {"hook": self.hook, "samples": int(len(self.clean.conds)), "pixel_mse": self.pixel_mse,
                "max_abs_pixel_difference": float((self.spliced.images - self.clean.images).abs().max()),
                "classifier": self.classifier}


def _frechet_or_none(a, b) -> float | None:
    return frechet_distance(a, b) if len(a) >= 2 and len(b) >= 2 else None


@torch.no_grad()
def spliced_samples(backbone: Backbone | HookedBackbone, sae, hook: str, conds: Sequence[int],
                    seeds: Sequence[int] | None = None, sampler_config: SamplerConfig | None = None,
                    classifier=None, real_images: torch.Tensor | None = None, branch: CfgBranch = "both",
                    progress: bool = False) -> SplicedSamples:
    """Sample with the SAE spliced in at ``hook`` at every step, and without, from the same seeds.

    ``classifier`` (an :class:`~tide.eval.EvalClassifier`, optional) adds class agreement and
    Fréchet distances in its feature space; ``real_images`` ((N, C, H, W) in [0, 1], optional)
    adds the distances of both sample sets to real data. Fréchet distances need >= 2 samples per set.
    """
    hooked = HookedBackbone.of(backbone)
    plain = hooked.backbone
    check_splice(sae, hooked, hook)
    config = sampler_config or SamplerConfig()
    seeds = list(range(len(conds))) if seeds is None else list(seeds)
    with eval_mode(sae):
        clean = sample(plain, conds, seeds, config, progress=progress)
        spliced = sample(plain, conds, seeds, config, interventions=splice_interventions(sae, hook, branch=branch),
                         progress=progress)
    pixel_mse = float(((spliced.images.double() - clean.images.double()) ** 2).mean())
    scores = None
    if classifier is not None:
        pred_c, pred_s = classifier.predict(clean.images), classifier.predict(spliced.images)
        feat_c, feat_s = classifier.embed(clean.images).numpy(), classifier.embed(spliced.images).numpy()
        scores = {"agreement_spliced_vs_clean": float((pred_c == pred_s).float().mean()),
                  "frechet_spliced_vs_clean": _frechet_or_none(feat_s, feat_c)}
        if plain.conditions_are_classes:
            want = clean.conds.long()
            scores["agreement_clean"] = float((pred_c == want).float().mean())
            scores["agreement_spliced"] = float((pred_s == want).float().mean())
        if real_images is not None:
            feat_r = classifier.embed(real_images).numpy()
            scores.update(real_images=int(len(feat_r)), frechet_clean_vs_real=_frechet_or_none(feat_c, feat_r),
                          frechet_spliced_vs_real=_frechet_or_none(feat_s, feat_r))
    return SplicedSamples(hook, clean, spliced, pixel_mse, scores)
