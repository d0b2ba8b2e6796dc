"""Steering and editing with SAE features inside the sampling loop.

At the SAE's hook, every (row, token) activation ``x`` at timestep ``t`` is edited in latent space
while the SAE's error term is kept:

    x_new = x + decode_t(z_edited) - decode_t(z)

so features that are not edited, and whatever the SAE fails to reconstruct, pass through exactly.
Because the decoder is linear at a fixed ``t`` this difference is ``sum_f (z'_f - z_f) d_f(t)``,
with ``d_f(t)`` row ``f`` of the decoder of the SAE folded at ``t`` (:meth:`tide.sae.model.SAE.fold`,
the decoder direction in raw activation space). Edits:

* ``add``: ``x += alpha * d_f(t)`` (no encoding needed); with ``scale="norm"`` the strength is relative
  to the hook's own scale, ``x += alpha * R(t) * d_f(t) / |d_f(t)|`` with R(t) the RMS norm of the hook's
  activations at that step over unedited generations (:class:`HookScale`, from the feature statistics),
  so one ``alpha`` means the same at every timestep and in every model;
* ``clamp``: set ``z_f`` to ``value``;
* ``ablate``: clamp to 0.

``gate=True`` applies an edit only at the tokens where its feature already fires. An edit can be
restricted to a window of steps or timesteps, to CFG branches and to a spatial mask over the image
tokens; ``branch="cfg"`` adds it to the conditional rows and subtracts it from the unconditional ones,
so guidance (``uncond + g * (cond - uncond)``) carries (2g - 1) times the edit instead of g times.
:func:`edit_generation` re-runs generations from the same seeds with the edit applied from a given step
on, so the trajectory up to that step is the original one.

Steering toward a *condition* (``tide steer --toward B``) patches each sample's features toward what B gives on
the same latents, and removing one (``--remove C``) pushes the features of the generations that match C through
the null's (:mod:`tide.analysis.feature_patch`); toward a vocabulary word, or with ``--recipe profile``, it adds
the paired feature shifts of a steering profile (:mod:`tide.analysis.steering_profile`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from tide.analysis.feature_stats import HookScale  # noqa: F401  (R(t), measured with the statistics)
from tide.branches import COND
from tide.config import DEFAULT_BACKBONE, BackboneConfig, GenerationConfig
from tide.device import eval_mode
from tide.errors import TideError
from tide.eval.metrics import check_sae_hook
from tide.eval.splice import check_splice
from tide.hooks import HookedBackbone, is_text_hook, require_step
from tide.sampling import Intervention, SampleOutput, SamplerConfig, sample

MODES = ("add", "clamp", "ablate")
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
"""Suffixes `tide steer --out` takes (the grid's format follows the suffix)."""
SCALES = ("latent", "norm")
STEER_BRANCHES = ("cond", "uncond", "both", "cfg")
SteerBranch = Literal["cond", "uncond", "both", "cfg"]
"""Rows an edit applies to: one CFG branch, both, or ``cfg`` (+ on conditional rows, - on unconditional ones)."""


@dataclass(frozen=True)
class FeatureEdit:
    """One edit of one SAE feature."""

    feature: int
    """Latent index in [0, d_sae)."""
    mode: str = "add"
    """``add`` (alpha times the decoder direction), ``clamp`` (latent set to ``value``) or ``ablate``."""
    alpha: float = 0.0
    """Strength of ``add``: in units of the folded decoder row (``scale="latent"``) or of the hook's RMS norm R(t)
    along the unit decoder direction (``scale="norm"``)."""
    value: float = 0.0
    """The latent's value under ``clamp``."""
    scale: str = "latent"
    """Unit of ``alpha``: ``latent`` (the decoder row as it is) or ``norm`` (R(t) times the unit direction)."""
    gate: bool = False
    """Edit only the tokens where the feature fires (its latent > 0 before the edit)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise TideError(f"feature edit mode must be one of {MODES}, got {self.mode!r}")
        if self.scale not in SCALES:
            raise TideError(f"feature edit scale must be one of {SCALES}, got {self.scale!r}")


def _check_edits(edits: Sequence[FeatureEdit], d_sae: int) -> list[FeatureEdit]:
    edits = list(edits)
    if not edits:
        raise TideError("no feature edits given: pass at least one FeatureEdit")
    for e in edits:
        if not isinstance(e, FeatureEdit):
            raise TideError(f"expected FeatureEdit objects, got {type(e).__name__}")
        if not 0 <= int(e.feature) < d_sae:
            raise TideError(f"feature id {e.feature} is out of range: this SAE has features 0..{d_sae - 1}")
    return edits


def _check_mask(mask) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise TideError(f"the spatial mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.dim() not in (1, 2, 3):
        raise TideError(f"the spatial mask must have shape (rows, cols) of the patch grid ((frames, rows, cols) for "
                        f"video) or (num_tokens,), got shape {tuple(mask.shape)}")
    return mask


def _mask_error(mask: torch.Tensor, tokens: int, grid: tuple[int, int] | None = None) -> TideError:
    expected = f"{tuple(grid)} (the patch grid) or ({tokens},)" if grid else f"({tokens},) or a (rows, cols) patch grid with {tokens} cells"
    return TideError(f"the spatial mask has shape {tuple(mask.shape)} but the hook carries {tokens} tokens: "
                     f"expected shape {expected}")


def steering_fn(sae, edits: Sequence[FeatureEdit], mask=None, hook_name: str = "?", hook_scale: HookScale | None = None,
                signed_branches: bool = False):
    """The hook function of :func:`steering_intervention` (reads the timestep from the step context).
    ``signed_branches``: the edit is added to conditional rows and subtracted from unconditional ones."""
    edits = _check_edits(edits, sae.cfg.d_sae)
    mask = _check_mask(mask)
    if hook_scale is None and any(e.mode == "add" and e.scale == "norm" for e in edits):
        raise TideError("norm-relative edits (scale='norm') need R(t) of the hook: pass hook_scale="
                        "HookScale.from_stats(load_feature_stats(...)) (`tide stats` measures it)")
    param = next(sae.parameters())
    ids = torch.tensor([int(e.feature) for e in edits], device=param.device)
    add_K = torch.tensor([float(e.alpha) if e.mode == "add" else 0.0 for e in edits], device=param.device, dtype=param.dtype)
    is_set_K = torch.tensor([e.mode != "add" for e in edits], device=param.device)
    set_K = torch.tensor([float(e.value) if e.mode == "clamp" else 0.0 for e in edits], device=param.device, dtype=param.dtype)
    norm_K = torch.tensor([e.mode == "add" and e.scale == "norm" for e in edits], device=param.device)
    gate_K = torch.tensor([e.gate for e in edits], device=param.device)
    needs_encode = bool(is_set_K.any() or gate_K.any())
    directions: dict[float, torch.Tensor] = {}  # timestep -> (K, D) folded decoder rows, norm edits pre-scaled

    def direction_KD(t: float) -> torch.Tensor:
        if t not in directions:
            with eval_mode(sae):
                d_KD = sae.fold_decoder(t, ids).detach()
            if bool(norm_K.any()):  # R(t) along the unit direction
                unit_KD = d_KD / d_KD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                d_KD = torch.where(norm_K[:, None], unit_KD * hook_scale.at(t), d_KD)
            directions[t] = d_KD
        return directions[t]

    def fn(act: torch.Tensor, hook=None) -> torch.Tensor:
        ctx = require_step("steering")
        sae.check_width(act.shape[-1], f"hook {hook_name!r}")
        t = float(ctx.timestep)
        d_KD = direction_KD(t)
        x = act.to(param.device, param.dtype)
        x_ND = x.reshape(-1, x.shape[-1])
        coef_NK = add_K.expand(len(x_ND), -1)
        if needs_encode:
            with torch.no_grad(), eval_mode(sae):
                z_NK = sae.encode(x_ND, torch.full((len(x_ND),), t, device=param.device))[:, ids]
            coef_NK = torch.where(is_set_K, set_K - z_NK, coef_NK)
            coef_NK = torch.where(gate_K & (z_NK <= 0), torch.zeros_like(coef_NK), coef_NK)
        delta = (coef_NK @ d_KD).reshape(x.shape)
        if signed_branches:
            sign_B = 1.0 - 2.0 * (ctx.cfg_branch_B.to(delta.device) != COND).to(delta.dtype)
            delta = delta * sign_B.reshape(-1, *([1] * (delta.dim() - 1)))
        if mask is not None:
            if act.dim() != 3 or mask.numel() != act.shape[1]:
                raise _mask_error(mask, act.shape[1] if act.dim() == 3 else -1)
            delta = delta * mask.reshape(1, -1, 1).to(delta.device, delta.dtype)
        return (x + delta).to(act.device, act.dtype)

    return fn


def steering_intervention(sae, edits: Sequence[FeatureEdit], steps: tuple[int, int] | None = None,
                          timesteps: tuple[float, float] | None = None, mask=None, branch: SteerBranch = "both",
                          hook: str | None = None, hook_scale: HookScale | None = None) -> Intervention:
    """An :class:`~tide.sampling.Intervention` editing SAE features at the SAE's hook.

    ``steps`` / ``timesteps``: the window (checked against the schedule by :func:`~tide.sampling.sample`);
    ``mask``: bool tensor over the patch grid (rows, cols) or the tokens (T,), edits only where True;
    ``branch``: ``cond``, ``uncond``, ``both`` or ``cfg`` (added to conditional rows, subtracted from
    unconditional ones); ``hook``: defaults to ``sae.cfg.hook`` and must match it; ``hook_scale``: R(t) of the
    hook, needed by ``scale="norm"`` edits.
    """
    if branch not in STEER_BRANCHES:
        raise TideError(f"branch must be one of {list(STEER_BRANCHES)}, got {branch!r}")
    trained = getattr(sae.cfg, "hook", "") or ""
    if hook is None:
        if not trained:
            raise TideError("the SAE's config names no hook: pass hook=... to steering_intervention")
        hook = trained
    check_sae_hook(sae, hook)
    if getattr(sae.cfg, "target", "activation") != "activation" and \
            any(e.mode != "add" or e.gate for e in _check_edits(edits, sae.cfg.d_sae)):
        raise TideError("clamp, ablate and gated edits encode the hook's activation, but this SAE reads the block's "
                        "update: use ungated add edits (adding a decoder direction to the block's output adds it to "
                        "its update)")
    if hook_scale is not None and hook_scale.hook and hook_scale.hook != hook:
        raise TideError(f"hook_scale was measured at {hook_scale.hook!r}, not at the edited hook {hook!r}")
    if steps is not None and (len(steps) != 2 or steps[0] >= steps[1]):
        raise TideError(f"steps must be a (start, stop) window with start < stop, got {steps}")
    if timesteps is not None and (len(timesteps) != 2 or timesteps[0] > timesteps[1]):
        raise TideError(f"timesteps must be a (low, high) window with low <= high, got {timesteps}")
    fn = steering_fn(sae, edits, mask, hook, hook_scale, signed_branches=branch == "cfg")
    return Intervention(hook, fn, steps=tuple(steps) if steps else None,
                        timesteps=tuple(timesteps) if timesteps else None, branch="both" if branch == "cfg" else branch)


def edit_generation(model, sae, conds: Sequence[int], seeds: Sequence[int], sampler_config: SamplerConfig | None,
                    edits: Sequence[FeatureEdit], from_step: int = 0, to_step: int | None = None, mask=None,
                    branch: SteerBranch = "both", hook: str | None = None, progress: bool = False,
                    decode: bool = True, hook_scale: HookScale | None = None) -> tuple[SampleOutput, SampleOutput]:
    """Generate ``conds`` with ``seeds`` plainly (``before``) and again with the edits applied at steps
    [from_step, to_step) (``after``; to_step defaults to the end). Steps before ``from_step`` follow the
    original trajectory, so ``after`` is the original generation edited from that step on."""
    config = sampler_config or SamplerConfig()
    backbone = model.backbone if isinstance(model, HookedBackbone) else model
    hook = hook or (getattr(sae.cfg, "hook", "") or None)
    if hook is None:
        raise TideError("the SAE's config names no hook: pass hook=... to edit_generation")
    check_splice(sae, HookedBackbone.of(backbone), hook)
    n = config.num_steps
    stop = n if to_step is None else int(to_step)
    if not 0 <= int(from_step) < stop <= n:
        raise TideError(f"edit window steps [{from_step}, {stop}) lies outside the {n}-step schedule: "
                        f"need 0 <= from_step < to_step <= {n}")
    checked = _check_mask(mask)
    if checked is not None and not is_text_hook(hook):
        grid = tuple(backbone.patch_grid)
        if tuple(checked.shape) not in (grid, (math.prod(grid),)):
            raise _mask_error(checked, math.prod(grid), grid)
    iv = steering_intervention(sae, edits, steps=(int(from_step), stop), mask=checked, branch=branch, hook=hook,
                               hook_scale=hook_scale)
    before = sample(model, conds, seeds, config, progress=progress, decode=decode)
    after = sample(model, conds, seeds, config, interventions=[iv], progress=progress, decode=decode)
    return before, after


def save_before_after(before: SampleOutput, after: SampleOutput, path, row_labels: Sequence[str] | None = None,
                      ncol: int | None = None, title: str | None = None) -> Path:
    """A PNG grid: each sample a column, its original above its edited version; ``ncol`` samples per
    row pair (default all). ``row_labels``: two labels (default ``before``/``after``), repeated per pair.
    Written through a temporary name: an existing file at ``path`` is replaced only once the new one is complete."""
    from tide.io import staged_outputs

    path = Path(path)
    with staged_outputs() as stage:
        _write_before_after(before, after, stage(path), row_labels, ncol, title)
    return path


def _write_before_after(before: SampleOutput, after: SampleOutput, path, row_labels: Sequence[str] | None = None,
                        ncol: int | None = None, title: str | None = None) -> Path:
    from tide.images import save_grid

    a, b = before.images, after.images
    if a.numel() == 0 or b.numel() == 0:
        raise TideError("the samples carry no images: generate them with decode=True")
    if a.shape != b.shape:
        raise TideError(f"before and after images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    labels = list(row_labels) if row_labels is not None else ["before", "after"]
    if len(labels) != 2:
        raise TideError(f"row_labels needs two labels (before, after), got {len(labels)}")
    n = len(a)
    ncol = n if ncol is None else max(1, min(int(ncol), n))
    chunks, rows = [], []
    for start in range(0, n, ncol):
        pa, pb = a[start:start + ncol], b[start:start + ncol]
        pad = ncol - len(pa)
        if pad:
            blank = torch.ones(pad, *a.shape[1:], dtype=a.dtype)
            pa, pb = torch.cat([pa, blank]), torch.cat([pb, blank])
        chunks += [pa, pb]
        rows += labels
    return save_grid(torch.cat(chunks), path, nrow=ncol, row_labels=rows, title=title)


MASK_REGIONS = ("upper", "lower", "left", "right", "centre")


def region_mask(region: str, grid: tuple[int, ...]) -> torch.Tensor:
    """A named half (or the centre) of the patch grid as a bool (rows, cols) mask; for a video grid
    (frames, rows, cols) the same region in every frame."""
    if len(grid) == 3:
        return region_mask(region, tuple(grid[1:]))[None].expand(int(grid[0]), -1, -1).clone()
    rows, cols = grid
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if region == "upper":
        mask[: rows // 2] = True
    elif region == "lower":
        mask[rows - rows // 2:] = True
    elif region == "left":
        mask[:, : cols // 2] = True
    elif region == "right":
        mask[:, cols - cols // 2:] = True
    elif region == "centre":
        mask[rows // 4: rows - rows // 4, cols // 4: cols - cols // 4] = True
    else:
        raise TideError(f"unknown mask region {region!r}: choose one of {list(MASK_REGIONS)}")
    return mask


@dataclass(frozen=True)
class SteerResult:
    """What `tide steer` (:meth:`SteerConfig.run`) generated and wrote."""

    config: dict
    """The SteerConfig's fields."""
    grid_path: Path
    """The before/after grid (PNG)."""
    json_path: Path
    """The JSON summary beside it (:meth:`to_dict`)."""
    before: SampleOutput
    """The original generations."""
    after: SampleOutput
    """The same generations (same seeds) with the edit."""
    pixel_change: float
    """Mean absolute pixel difference between after and before."""
    target_class: str | None = None
    """Name of the config's target_class, when one was given."""
    target_rate_before: float | None = None
    """Fraction of the originals the evaluation classifier assigns to the target class."""
    target_rate_after: float | None = None
    """The same fraction for the edited generations."""
    chosen_features: list | None = None
    """With --choose-features effect: the patched features, best first, each {"feature", "effect"} (the mean rise
    in the classifier's probability of the target when it is patched alone)."""

    def to_dict(self) -> dict:
        """The JSON summary: config, grid, pixel_change, the target_* entries when a target was given, and the
        chosen features when they were chosen by effect."""
        out = {"config": self.config, "grid": str(self.grid_path), "pixel_change": self.pixel_change}
        if self.target_class is not None:
            out.update(target_class=self.target_class, target_rate_before=self.target_rate_before,
                       target_rate_after=self.target_rate_after)
        if self.chosen_features is not None:
            out["chosen_features"] = self.chosen_features
        return out


@dataclass
class SteerConfig(GenerationConfig, BackboneConfig):
    """`tide steer`: generate with SAE features turned up, clamped or ablated, and compare with the originals."""

    backbone: str | None = None
    """Backbone (embedded name or checkpoint directory); default: the one the SAE was trained on."""
    num_steps: int = 30
    """Denoising steps."""
    sae: str = "runs/sae/tide"
    """SAE directory; its hook is where the edit happens."""
    extra_saes: list[str] | None = None
    """--toward / --remove with the patch recipe: SAEs at further hooks (directories, each at its own hook of the
    same backbone) patched together with --sae, in one forward pass, so the edit is spread over several blocks."""
    features: list[int] | None = None
    """Feature ids to edit (required)."""
    mode: str = "add"
    """add (alpha x the feature's decoder direction at the current t), clamp (to value) or ablate."""
    alpha: float = 4.0
    """add: how much of each decoder direction to add."""
    value: float = 0.0
    """clamp: the value the latents are held at."""
    classes: list[int] | None = None
    """Classes (condition ids) to generate; default: all."""
    n: int = 4
    """Samples per class."""
    from_step: int = 0
    """First denoising step with the edit."""
    to_step: int | None = None
    """Step after the last edited one; default: the end of the schedule."""
    mask: str | None = None
    """Spatial region of the patch grid to edit: upper, lower, left, right or centre; default: everywhere."""
    keep_outside: bool = False
    """With --mask and the patch recipe: after every step reset the latents outside the mask to the unedited
    generation's (latent blending), so the outside ends exactly as it was; without it the edit also reaches the
    outside through attention."""
    branch: SteerBranch | None = None
    """CFG rows to edit: cond, uncond, both, or cfg (added to cond rows, subtracted from uncond rows); default both
    for --features edits and cond (amplified by guidance like a prompt) for --toward / --remove."""
    scale: str = "latent"
    """Unit of alpha for add edits: latent (the folded decoder row) or norm (alpha x R(t), the hook's RMS norm at
    each step, along the unit decoder direction; needs --stats)."""
    gate: bool = False
    """Edit only the tokens where each feature already fires."""
    stats: str | None = None
    """Feature statistics of this SAE (`tide stats`), for R(t) under --scale norm."""
    target_class: int | None = None
    """If set, report how often the evaluation classifier says this class before and after."""
    toward: str | None = None
    """Steer toward this condition (an id, a condition name or a vocabulary word such as `dark`), no --features
    needed: by feature patching for a condition (see --recipe), by the null -> word shift of a steering profile for
    a word."""
    recipe: str | None = None
    """--toward a condition: patch (each sample's SAE features set, step by step, to what the condition gives on
    the same latents; tide.analysis.feature_patch) or profile (the mean paired shift of a steering profile,
    tide.analysis.steering_profile, measured along each sample's own condition). --remove: patch (each sample's
    features pushed through what the null condition gives on its latents, where they match C's; see
    --removal-gate) or
    profile (C's mean C -> null shift added). Default: patch, or profile when --profile is given. Words always use
    a profile."""
    remove: str | None = None
    """Remove this condition (concept removal) from the generations of --classes (default: every class, so the
    damage to the others shows); see --recipe and --removal-gate."""
    removal_gate: float = 0.8
    """--remove with the patch recipe: a generation is edited where the cosine between its features' shift from
    the null and C's shift (on the same latents) exceeds this, fully from halfway between it and 1."""
    unconditional: bool = False
    """Generate the null condition (empty caption / null class) instead of --classes."""
    profile: str | None = None
    """Steering profile (`tide profile`) for --toward / --remove; default: measured now, over --profile-samples
    null-condition generations with seeds from 50000."""
    profile_samples: int = 16
    """Calibration generations per condition when the profile is measured now."""
    strength: float | None = None
    """--toward / --remove: multiple of the measured shift added (1 = what the prompt does to those features);
    default 1, and 2 for --remove with the patch recipe (as far past the null's features as C is before them)."""
    top_features: int | None = None
    """--toward / --remove: each condition's features of largest shift to use (default: all the profile kept); with
    --recipe patch, the features patched per token, those whose latents differ most (default: every feature)."""
    choose_features: str = "all"
    """--toward a condition with the patch recipe: which features are patched. all: every feature (or, with
    --top-features k, the k per token whose latents differ most); effect: a fixed set of --top-features (default 8)
    features chosen by causal effect: among the 32 of largest null -> target shift (a steering profile over 8
    null-condition generations, seeds 50000..), those that most raise the evaluation classifier's probability of
    the target when each is patched alone into 4 null-condition generations (seeds 60000..). The chosen features and
    their effects go into the JSON summary."""
    save_images: str | None = None
    """Also write before and after images (N, C, H, W in [0, 1]), conds and seeds to this .npz."""
    out: str = "runs/steer.png"
    """Before/after grid (PNG); a JSON summary is written beside it."""
    overwrite: bool = False
    """Replace existing outputs: the grid at --out, the JSON beside it and the --save-images file."""

    def outputs(self) -> tuple[Path, Path, Path | None]:
        """(grid, JSON summary, images .npz or None), each refused in one line when it exists without
        ``overwrite``, is a directory or cannot be written; creates nothing."""
        from tide.io import check_output_file

        out = Path(self.out)
        if out.suffix.lower() not in GRID_SUFFIXES:
            raise TideError(f"--out {out} must name an image file ({', '.join(GRID_SUFFIXES)}): the grid's format "
                            f"follows its suffix, e.g. --out {out.with_suffix('.png')}")
        summary = out.with_suffix(".json")
        images = Path(self.save_images) if self.save_images else None
        if images is not None and images in (out, summary):
            raise TideError(f"--save-images {images} is also the grid or its JSON summary: give it another name")
        check_output_file(out, self.overwrite)
        check_output_file(summary, self.overwrite)
        if images is not None:
            check_output_file(images, self.overwrite, "--save-images")
        return out, summary, images

    def run(self) -> SteerResult:
        import json

        from tide.models import load_backbone
        from tide.sae import load_sae

        profiled = self.toward is not None or self.remove is not None
        if profiled and self.features:
            raise TideError("choose either --features (edit named features) or --toward / --remove (steer with a "
                            "steering profile), not both")
        if not self.features and not profiled:
            raise TideError("name the features to edit (--features 12,40) or a condition to steer toward or away "
                            "from (--toward 8, --remove 1)")
        if self.choose_features not in ("all", "effect"):
            raise TideError(f"--choose-features is all or effect, got {self.choose_features!r}")
        if self.choose_features == "effect" and (self.toward is None or self.recipe == "profile" or self.profile
                                                 or self.extra_saes):
            raise TideError("--choose-features effect picks features for the patch recipe toward a condition, at one "
                            "SAE: use it with --toward B (no --recipe profile, --profile or --extra-saes)")
        if self.keep_outside and not self.mask:
            raise TideError("--keep-outside keeps what lies outside --mask: name a region (--mask upper)")
        if self.keep_outside and not profiled:
            raise TideError("--keep-outside works with --toward (the patch recipe); drop it for --features edits")
        if self.unconditional and self.classes:
            raise TideError("choose either --unconditional (null-condition generations) or --classes")
        if self.n < 1:
            raise TideError(f"--n must be >= 1, got {self.n}")
        if self.save_images and not str(self.save_images).endswith(".npz"):
            raise TideError(f"--save-images writes an .npz file, got {self.save_images!r}")
        out, summary, images = self.outputs()  # before the SAE and the backbone are loaded
        sae = load_sae(self.sae, device="cpu")
        extras = [load_sae(p, device="cpu") for p in (self.extra_saes or [])]
        spec = self.backbone or sae.cfg.backbone or DEFAULT_BACKBONE
        prompts = self.prompts or sae.cfg.prompts or None
        if profiled:
            from tide.analysis.steering_profile import resolve_conditions

            named = [x for x in (self.toward, self.remove) if x is not None]
            backbone, named_ids, n_base = resolve_conditions(spec, prompts, named, self.device, self.dtype)
            default_classes = list(range(n_base))
        else:
            backbone = load_backbone(spec, prompts=prompts, device=self.device, dtype=self.dtype)
            default_classes = list(range(backbone.num_conditions))
        sae = sae.to(backbone.device)
        if extras:
            if not profiled:
                raise TideError("--extra-saes spreads a --toward / --remove patch over several hooks: drop it for "
                                "--features edits, or edit each SAE's features in its own run")
            if self.recipe == "profile" or self.profile:
                raise TideError("--extra-saes works with the patch recipe: drop --recipe profile / --profile, or "
                                "drop --extra-saes")
            named = {getattr(e.cfg, "backbone", None) for e in extras} - {None, ""}
            if sae.cfg.backbone and named - {sae.cfg.backbone}:
                raise TideError(f"the --extra-saes were trained on {sorted(named)} but --sae on "
                                f"{sae.cfg.backbone!r}: give SAEs of one backbone")
            from tide.analysis.feature_patch import check_saes

            sae = check_saes([sae] + [e.to(backbone.device) for e in extras])
        classes = default_classes if self.classes is None else list(self.classes)
        from tide.models.base import NULL_CONDITION

        conds = [NULL_CONDITION] * self.n if self.unconditional else [c for c in classes for _ in range(self.n)]
        backbone.check_conditions(conds)
        seeds = [self.seed + i for i in range(len(conds))]
        mask = region_mask(self.mask, tuple(backbone.patch_grid)) if self.mask else None
        config = SamplerConfig(num_steps=self.num_steps, guidance_scale=self.guidance_scale)
        if profiled:
            before, after, target = self._run_profiled(sae, backbone, conds, seeds, config, mask, named_ids,
                                                       len(default_classes))
        else:
            before, after, target = self._run_features(sae, backbone, conds, seeds, config, mask)
        from tide.io import staged_outputs

        ncol = self.n if self.unconditional else self.n * min(len(classes), 4)
        result = SteerResult(config={k: getattr(self, k) for k in self.__dataclass_fields__}, grid_path=out,
                             json_path=summary, before=before, after=after,
                             pixel_change=float((after.images - before.images).abs().mean()), **target)
        with staged_outputs() as stage:  # all or nothing: the grid, the images and the JSON replace the old together
            _write_before_after(before, after, stage(out), ncol=min(ncol, 16))
            if images is not None:
                _write_images_npz(before, after, stage(images))
            stage(summary).write_text(json.dumps(result.to_dict(), indent=1))
        return result

    def _classifier_rates(self, backbone, before, after, cls: int, required: bool = True) -> dict:
        """How often the evaluation classifier says ``cls`` before and after; {} for a backbone without a classifier
        unless ``required`` (an explicit --target-class)."""
        from tide.eval.classifier import load_classifier

        try:
            clf = load_classifier(backbone, device=backbone.device)
        except TideError:
            if required:
                raise
            return {}
        if not 0 <= cls < int(clf.config["num_classes"]):
            return {}
        return {"target_class": clf.class_names[cls],
                "target_rate_before": float((clf.predict(before.images).cpu() == cls).float().mean()),
                "target_rate_after": float((clf.predict(after.images).cpu() == cls).float().mean())}

    def _run_features(self, sae, backbone, conds, seeds, config, mask):
        edits = [FeatureEdit(int(f), mode=self.mode, alpha=self.alpha, value=self.value, scale=self.scale, gate=self.gate)
                 for f in self.features]
        hook_scale = None
        if self.stats:
            from tide.analysis.feature_stats import load_feature_stats

            hook_scale = HookScale.from_stats(load_feature_stats(self.stats))
        elif self.scale == "norm":
            raise TideError("--scale norm needs the SAE's feature statistics for R(t): pass --stats STATS.h5 "
                            "(made by `tide stats`)")
        before, after = edit_generation(backbone, sae, conds, seeds, config, edits, from_step=self.from_step,
                                        to_step=self.to_step, mask=mask, branch=self.branch or "both",
                                        hook_scale=hook_scale)
        target = self._classifier_rates(backbone, before, after, self.target_class) \
            if self.target_class is not None else {}
        return before, after, target

    def _run_profiled(self, sae, backbone, conds, seeds, config, mask, named_ids, n_base: int):
        """``n_base``: conditions of the backbone before words were added to its prompts (ids from it on are words)."""
        from tide.analysis.steering_profile import OWN, load_profile, measure_profile, profile_intervention
        from tide.models.base import NULL_CONDITION

        if self.toward is not None and self.remove is not None:
            raise TideError("choose one of --toward and --remove per run")
        if self.recipe not in (None, "patch", "profile"):
            raise TideError(f"--recipe is patch or profile, got {self.recipe!r}")
        n = config.num_steps
        stop = n if self.to_step is None else int(self.to_step)
        if not 0 <= int(self.from_step) < stop <= n:
            raise TideError(f"edit window steps [{self.from_step}, {stop}) lies outside the {n}-step schedule: "
                            f"need 0 <= from_step < to_step <= {n}")
        target = named_ids[0]
        word = self.toward is not None and target >= n_base
        if self.recipe == "patch" and (word or self.profile):
            raise TideError("--recipe patch steers --toward or --remove a condition of the backbone; words and "
                            "--profile use --recipe profile")
        if self.keep_outside and (self.remove is not None or word or self.recipe == "profile" or self.profile):
            raise TideError("--keep-outside works with the patch recipe (--toward a condition); drop it here")
        patch = not word and self.recipe != "profile" and not self.profile
        if isinstance(sae, list) and not patch:
            raise TideError("--extra-saes works with the patch recipe, which steers toward a condition: a word uses a "
                            "steering profile at --sae's hook, so drop --extra-saes")
        if patch and self.toward is not None:
            return self._run_patched(sae, backbone, conds, seeds, config, mask, target, (int(self.from_step), stop))
        if patch:
            return self._run_removed(sae, backbone, conds, seeds, config, mask, target, (int(self.from_step), stop))
        if word:  # a word added to the prompts: its null -> word shift
            pairs = [(NULL_CONDITION, target)]
            kwargs = dict(toward=[target])
        elif self.toward is not None:  # each sample along its own condition (null for --unconditional)
            sources = sorted(set(conds))
            pairs = [(src, target) for src in sources if src != target]
            kwargs = dict(toward=[target], source=OWN)
        else:  # C -> null along C's generations, on every generation
            pairs = [(target, NULL_CONDITION)]
            kwargs = dict(toward=[NULL_CONDITION], source=target)
        if self.profile:
            profile = load_profile(self.profile)
            if int(profile.meta.get("num_steps", n)) != n:
                raise TideError(f"the steering profile {self.profile} was measured on a {profile.meta['num_steps']}-step "
                                f"schedule: steer with --num-steps {profile.meta['num_steps']} or measure it again")
            involved = {c for pair in pairs for c in pair if c != NULL_CONDITION}
            profile = profile.reindexed({c: backbone.condition_names[c] for c in involved})
            for src, c in pairs:
                profile.condition(c, src)  # a missing shift is refused by name before anything is generated
        else:
            profile = None
            for src in sorted({p[0] for p in pairs}):
                got = measure_profile(backbone, sae, [c for s_, c in pairs if s_ == src], config,
                                      num_samples=self.profile_samples, progress=False, sources=[src])
                profile = got if profile is None else profile.merged(got)
        iv = profile_intervention(sae, profile, strength=1.0 if self.strength is None else self.strength,
                                  features=self.top_features,
                                  steps=(int(self.from_step), stop), mask=mask, branch=self.branch or "cond", **kwargs)
        before = sample(backbone, conds, seeds, config)
        after = sample(backbone, conds, seeds, config, interventions=[iv])
        cls = self.target_class if self.target_class is not None else target
        return before, after, self._classifier_rates(backbone, before, after, cls, self.target_class is not None)


    def _run_patched(self, sae, backbone, conds, seeds, config, mask, target: int, window):
        from tide.analysis.feature_patch import sample_patched

        if self.branch not in (None, "cond"):
            raise TideError(f"a feature patch edits the conditional rows only (got --branch {self.branch}): drop "
                            "--branch, or use --recipe profile")
        strength = 1.0 if self.strength is None else self.strength
        chosen, top = None, self.top_features
        if self.choose_features == "effect":
            chosen = self._features_by_effect(sae, backbone, config, target, strength)
            top = None
        before = sample(backbone, conds, seeds, config)
        after = sample_patched(backbone, sae, conds, [target] * len(conds), seeds, config, strength=strength,
                               top_features=top, features=None if chosen is None else [c["feature"] for c in chosen],
                               steps=window, mask=mask, keep_outside=self.keep_outside)
        cls = self.target_class if self.target_class is not None else target
        rates = self._classifier_rates(backbone, before, after, cls, self.target_class is not None)
        return before, after, rates if chosen is None else {**rates, "chosen_features": chosen}

    def _features_by_effect(self, sae, backbone, config, target: int, strength: float,
                            candidates: int = 32) -> list[dict]:
        """The --top-features (default 8) features of largest causal effect on the evaluation classifier's
        probability of ``target`` (see ``choose_features``), best first, as {"feature", "effect"}."""
        from tide.analysis.feature_patch import feature_effects
        from tide.analysis.steering_profile import measure_profile
        from tide.eval.classifier import load_classifier
        from tide.models.base import NULL_CONDITION

        try:
            clf = load_classifier(backbone, device=backbone.device)
        except TideError as exc:
            raise TideError(f"--choose-features effect scores images with the evaluation classifier, and this "
                            f"backbone has none ({exc}): use --choose-features all") from None
        if not 0 <= target < int(clf.config["num_classes"]):
            raise TideError(f"--choose-features effect needs a target the evaluation classifier knows (one of its "
                            f"{clf.config['num_classes']} classes), got condition {target}")
        keep = 8 if self.top_features is None else int(self.top_features)
        if not 1 <= keep <= candidates:
            raise TideError(f"--top-features with --choose-features effect picks 1..{candidates} of the {candidates} "
                            f"candidates, got {keep}")
        prof = measure_profile(backbone, sae, [target], config, num_samples=8, keep=candidates, progress=False)
        cands = prof.condition(target).features_M.tolist()
        seeds = [60_000 + i for i in range(4)]

        def score(images):
            with torch.no_grad(), eval_mode(clf):
                return torch.softmax(clf(images.to(backbone.device)), -1)[:, target].cpu()

        eff = feature_effects(backbone, sae, [NULL_CONDITION] * len(seeds), seeds, target, cands, score, config,
                              strength=strength)
        order = eff.argsort(descending=True)[:keep].tolist()
        return [{"feature": int(cands[i]), "effect": float(eff[i])} for i in order]


    def _run_removed(self, sae, backbone, conds, seeds, config, mask, target: int, window):
        from tide.analysis.feature_patch import sample_removed

        if self.branch not in (None, "cond"):
            raise TideError(f"a feature removal edits the conditional rows only (got --branch {self.branch}): drop "
                            "--branch, or use --recipe profile")
        if self.top_features is not None:
            raise TideError("--top-features does not apply to --remove with the patch recipe (every feature whose "
                            "shift matches C's moves): drop it, or use --recipe profile")
        before = sample(backbone, conds, seeds, config)
        after = sample_removed(backbone, sae, conds, seeds, target, config,
                               strength=2.0 if self.strength is None else self.strength, gate=self.removal_gate,
                               steps=window, mask=mask)
        rates = self._classifier_rates(backbone, before, after, target, False)
        if self.target_class is not None:
            rates = self._classifier_rates(backbone, before, after, self.target_class, True)
        return before, after, rates


def save_images_npz(before: SampleOutput, after: SampleOutput, path) -> Path:
    """``before`` and ``after`` images (N, C, H, W, float32 in [0, 1]), ``conds`` and ``seeds`` as an .npz, written
    through a temporary name."""
    from tide.io import staged_outputs

    path = Path(path)
    with staged_outputs() as stage:
        _write_images_npz(before, after, stage(path))
    return path


def _write_images_npz(before: SampleOutput, after: SampleOutput, path) -> Path:
    import numpy as np

    with open(path, "wb") as fh:  # a file object: numpy adds no .npz suffix of its own
        np.savez_compressed(fh, before=before.images.float().numpy(), after=after.images.float().numpy(),
                            conds=before.conds.numpy(), seeds=before.seeds.numpy())
    return Path(path)
