"""Steering profiles: what a condition does to an SAE's features, measured on the same latents.

A prompt moves a DiT's residual stream in a way that depends on where (which token) and when (which
step) it acts, and on what is being denoised. A steering profile measures that movement in the SAE's
feature space by *paired* forward passes: generations of a source condition (the null condition, or a
class A) are run, and at every step the conditional branch is also evaluated with a target condition
``c`` on the very same noisy latents. For every step ``s``, token ``p`` and feature ``f`` the profile
keeps the mean latent shift over the calibration generations

    shift[src -> c, s, p, f] = mean_x ( z_f(h_c(x_s)) - z_f(h_src(x_s)) )

for the ``keep`` features with the largest total shift (their *mass*, the sum of |shift| over steps and
tokens), and the mean shift of the hook's own activation, ``act_shift`` (the features' part plus what
the SAE does not reconstruct).

A steering edit built from a profile (:func:`profile_intervention`) adds, at step ``s`` and token ``p``,

    strength * sum_{f kept} shift[src -> B, s, p, f] * d_f(t_s)

to the conditional rows of classifier-free guidance (``d_f(t)``: the SAE's decoder row folded at ``t``),
so the edit carries what the prompt B does to those features where the generation is; guidance
amplifies it as it amplifies a prompt. The three uses:

* null -> B: the null -> B shift on null-condition generations;
* A -> B: the A -> B shift, measured along A's generations (``source="own"`` picks each sample's own
  condition as the source);
* removal of C: the C -> null shift on C's generations (and, to measure collateral damage, on others').

The edit does not depend on the activation it is added to, so the SAE's error term and every other
feature pass through exactly. Why paired, per token and per source: an edit that does not follow the
latents being denoised is amplified by the solver into noise; on ``fmnist-pixart`` (block 4) adding the
difference of mean residuals of class-B and null generations, or a shift averaged over tokens, gives
noise, and B's shift measured on null generations carries A's generations to B less often than the
A -> B shift measured along A's (23% vs 35% over 90 pairs, ``experiments/results/steering_bench.md``).

A profile is tied to its hook, SAE and schedule (steps, guidance); it is read at the nearest recorded
timestep, and it is stored as HDF5 (:meth:`SteeringProfile.save`, format ``tide.steering_profile``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from tide.device import eval_mode
from tide.errors import TideError
from tide.hooks import COND, current_step, require_step
from tide.models.base import NULL_CONDITION
from tide.sampling import Intervention, SamplerConfig, Trajectory

FORMAT = "tide.steering_profile"
VERSION = 1
PROFILE_BRANCHES = ("cond", "both")


NULL_NAME = "null"
"""How profiles name the null condition (the empty caption / the null class)."""


@dataclass
class ConditionShift:
    """What one condition does, relative to a source condition, at the profile's hook, along the source's
    trajectories: the mean of z(h_condition(x)) - z(h_source(x)) over the source's generations x."""

    condition: int
    """Condition id of the target (class or prompt index of the backbone it was measured on; -1 = null)."""
    name: str
    """The target's name (class name, prompt text, or ``null``)."""
    features_M: torch.Tensor
    """(M,) ids of the kept features, largest shift mass first."""
    shift_STM: torch.Tensor
    """(S, T, M) mean latent shift of those features per recorded step and token."""
    mass_M: torch.Tensor
    """(M,) sum over steps and tokens of |shift| (the ranking)."""
    act_shift_STD: torch.Tensor
    """(S, T, D) mean shift of the hook's activation itself (features and error term together)."""
    source: int = NULL_CONDITION
    """Condition id whose generations the shift was measured along (-1 = the null condition)."""
    source_name: str = NULL_NAME
    """The source's name."""

    def renumbered(self, condition: int, source: int) -> "ConditionShift":
        return ConditionShift(int(condition), self.name, self.features_M, self.shift_STM, self.mass_M,
                              self.act_shift_STD, int(source), self.source_name)


Pair = tuple[int, int]
"""(source, condition) ids."""


@dataclass
class SteeringProfile:
    """Paired latent shifts of several (source, condition) pairs at one SAE's hook (see the module docstring)."""

    hook: str
    """The hook the SAE reads and edits are added to."""
    timesteps_S: torch.Tensor
    """(S,) the schedule's timesteps, one per recorded step."""
    shifts: dict[Pair, ConditionShift]
    """Per (source, condition) ids."""
    meta: dict = field(default_factory=dict)
    """Provenance: backbone, SAE path, steps, guidance, calibration seeds, feature count."""

    def _listing(self) -> str:
        return ", ".join(f"{cs.source_name} -> {cs.name}" for _, cs in sorted(self.shifts.items()))

    def condition(self, c: int, source: int = NULL_CONDITION) -> ConditionShift:
        key = (int(source), int(c))
        if key not in self.shifts:
            raise TideError(f"the steering profile holds no shift {_label(source)} -> {_label(c)} (it has "
                            f"{self._listing()}): measure it with `tide profile`")
        return self.shifts[key]

    def id_of(self, name: int | str) -> int:
        """A condition id of this profile from an id or a name (class name, prompt text, word or ``null``; any case)."""
        if isinstance(name, int) or str(name).strip().lstrip("-").isdigit():
            return int(name)
        want = str(name).strip().lower()
        if want == NULL_NAME:
            return NULL_CONDITION
        for cs in self.shifts.values():
            if cs.name.lower() == want:
                return cs.condition
            if cs.source_name.lower() == want:
                return cs.source
        raise TideError(f"the steering profile holds no condition named {name!r} (it has {self._listing()}): "
                        f"measure it with `tide profile`")

    def find(self, condition: int | str, source: int | str = NULL_CONDITION) -> ConditionShift:
        """The shift source -> condition, each given by id or name."""
        return self.condition(self.id_of(condition), self.id_of(source))

    @property
    def shape_TD(self) -> tuple[int, int]:
        """(tokens, width) of the hook's activation the profile was measured on."""
        return tuple(next(iter(self.shifts.values())).act_shift_STD.shape[1:])

    def step_of(self, t: float) -> int:
        """The recorded step nearest to timestep ``t``."""
        return int((self.timesteps_S - float(t)).abs().argmin())

    def reindexed(self, ids: dict[int, int | str]) -> "SteeringProfile":
        """The profile's shifts between the given conditions (found by id or name; null is always kept), keyed by the
        given ids: a profile measured on one prompt list, used on a backbone whose prompts are numbered differently."""
        own = {self.id_of(name): int(c) for c, name in ids.items()}
        own[NULL_CONDITION] = NULL_CONDITION
        shifts = {(own[s], own[c]): cs.renumbered(own[c], own[s]) for (s, c), cs in self.shifts.items()
                  if s in own and c in own}
        return SteeringProfile(self.hook, self.timesteps_S, shifts, dict(self.meta))

    def merged(self, other: "SteeringProfile") -> "SteeringProfile":
        """This profile with ``other``'s shifts added (same hook and schedule)."""
        if other.hook != self.hook or not torch.equal(other.timesteps_S, self.timesteps_S):
            raise TideError("steering profiles of different hooks or schedules cannot be merged")
        return SteeringProfile(self.hook, self.timesteps_S, {**self.shifts, **other.shifts}, dict(self.meta))

    def save(self, path) -> Path:
        """Write the profile to HDF5 (through a temporary name; an existing file is replaced)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["format"], f.attrs["version"], f.attrs["hook"] = FORMAT, VERSION, self.hook
            f.attrs["meta"] = json.dumps(self.meta)
            f["timesteps"] = self.timesteps_S.numpy()
            for i, (_, cs) in enumerate(sorted(self.shifts.items())):
                g = f.create_group(f"shift_{i}")
                g.attrs["condition"], g.attrs["name"] = int(cs.condition), cs.name
                g.attrs["source"], g.attrs["source_name"] = int(cs.source), cs.source_name
                g["features"] = cs.features_M.numpy().astype(np.int64)
                g["shift"] = cs.shift_STM.numpy().astype(np.float32)
                g["mass"] = cs.mass_M.numpy().astype(np.float32)
                g["act_shift"] = cs.act_shift_STD.numpy().astype(np.float32)
        os.replace(tmp, path)
        return path


def _label(c: int) -> str:
    return NULL_NAME if int(c) == NULL_CONDITION else str(int(c))


def load_profile(path) -> SteeringProfile:
    """Read a profile written by :meth:`SteeringProfile.save`; anything else is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise TideError(f"steering profile {path} does not exist: measure one with `tide profile --sae SAE --out {path}`")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise TideError(f"{path} is not a steering profile (format {f.attrs.get('format')!r}, expected "
                                f"{FORMAT!r}): make one with `tide profile`")
            if int(f.attrs.get("version", -1)) != VERSION:
                raise TideError(f"{path} is a steering profile of version {f.attrs.get('version')}, this tide reads "
                                f"version {VERSION}: measure it again with `tide profile`")
            shifts = {}
            for name in f:
                if not name.startswith("shift_"):
                    continue
                g = f[name]
                cs = ConditionShift(int(g.attrs["condition"]), str(g.attrs["name"]), torch.from_numpy(g["features"][()]),
                                    torch.from_numpy(g["shift"][()]), torch.from_numpy(g["mass"][()]),
                                    torch.from_numpy(g["act_shift"][()]), int(g.attrs["source"]),
                                    str(g.attrs["source_name"]))
                shifts[(cs.source, cs.condition)] = cs
            if not shifts:
                raise TideError(f"steering profile {path} holds no shifts: measure it again with `tide profile`")
            return SteeringProfile(str(f.attrs["hook"]), torch.from_numpy(f["timesteps"][()]), shifts,
                                   json.loads(f.attrs.get("meta", "{}")))
    except (OSError, KeyError, ValueError) as exc:
        raise TideError(f"steering profile {path} cannot be read ({exc}): measure it again with `tide profile`") from None


def _recorder(store: dict):
    def fn(act, hook):
        rows = (current_step().cfg_branch_B == 0).to(act.device)
        store[hook.name] = act[rows].detach()
        return None
    return fn


def _name(backbone, c: int) -> str:
    return NULL_NAME if c == NULL_CONDITION else backbone.condition_names[c]


@torch.no_grad()
def measure_profile(backbone, sae, conditions: Sequence[int], config: SamplerConfig, num_samples: int = 16,
                    seed: int = 50_000, keep: int = 64, progress: bool = True,
                    sources: Sequence[int] = (NULL_CONDITION,)) -> SteeringProfile:
    """Measure the paired shifts source -> condition (ids of ``backbone``, -1 = null) at the SAE's hook, for every
    source and every condition other than it, along ``num_samples`` generations of the source seeded ``seed, seed + 1,
    ...`` (see the module docstring); keep the ``keep`` features of largest shift mass per pair."""
    from tide.hooks import HookedBackbone

    cfg = sae.cfg
    if not getattr(cfg, "hook", None):
        raise TideError("the SAE's config names no hook: a steering profile is measured at the SAE's hook")
    if num_samples < 1 or keep < 1:
        raise TideError(f"num_samples and keep must be >= 1, got {num_samples} and {keep}")
    conditions, sources = [int(c) for c in conditions], [int(c) for c in sources]
    pairs = [(s, c) for s in sources for c in conditions if s != c]
    if not pairs:
        raise TideError("name at least one condition (other than the source) to profile")
    backbone.check_conditions([c for c in conditions + sources if c != NULL_CONDITION] or [0])
    hooked = HookedBackbone.of(backbone)
    hooks = list(cfg.input_hooks)
    hooked.check_hook_names(hooks)
    param = next(sae.parameters())
    seeds = [seed + i for i in range(num_samples)]
    ids = list(range(num_samples))
    shifts, timesteps = {}, None
    bar = tqdm(total=len(pairs) * config.num_steps, disable=not progress, desc="steering profile", unit="step")
    for src in sources:  # one run of the source's generations serves every target on the same latents
        targets = [c for c in conditions if c != src]
        if not targets:
            continue
        base = Trajectory(backbone, [src] * num_samples, seeds, ids, config, hooked)
        others = [Trajectory(backbone, [c] * num_samples, seeds, ids, config, hooked) for c in targets]
        timesteps = base.timesteps.detach().float().cpu()
        dz = {c: [] for c in targets}
        dact = {c: [] for c in targets}
        for step, *o_steps in zip(base, *others):

            def run(traj, st):
                store: dict = {}
                out = traj.predict(st, [(h, _recorder(store)) for h in hooks])
                x = cfg.rows(store).to(param.device, param.dtype)
                n, t, d = x.shape
                with eval_mode(sae):
                    z = sae.encode(x.reshape(-1, d), torch.full((n * t,), float(step.t), device=param.device))
                return z.reshape(n, t, -1).float().cpu(), store[cfg.hook].float().cpu(), out

            z_src, h_src, out = run(base, step)
            for c, other, o_step in zip(targets, others, o_steps):
                other.x = base.x
                z_c, h_c, _ = run(other, o_step)
                dz[c].append((z_c - z_src).mean(0))
                dact[c].append((h_c - h_src).mean(0))
                bar.update(1)
            base.advance(step, out)
        for c in targets:
            dz_STF, dact_STD = torch.stack(dz[c]), torch.stack(dact[c])
            mass_F = dz_STF.abs().sum((0, 1))
            top = mass_F.argsort(descending=True)[: min(keep, len(mass_F))]
            shifts[(src, c)] = ConditionShift(c, _name(backbone, c), top, dz_STF[..., top].contiguous(), mass_F[top],
                                              dact_STD, src, _name(backbone, src))
    bar.close()
    meta = {"backbone": backbone.name, "num_steps": config.num_steps, "guidance_scale": config.guidance_scale,
            "num_samples": num_samples, "seed": seed, "keep": keep, "d_sae": cfg.d_sae,
            "sae_target": getattr(cfg, "target", "activation")}
    return SteeringProfile(cfg.hook, timesteps, shifts, meta)


OWN = "own"
"""``source="own"``: each sample's edit is measured along its own condition's generations."""


def profile_fn(sae, profile: SteeringProfile, toward: Sequence[int | str] = (), away: Sequence[int | str] = (),
               strength: float = 1.0, features: int | None = None, mask=None, source: int | str = NULL_CONDITION,
               away_own: bool = False, baseline: Sequence[int | str] = (), with_error: bool = False):
    """The hook function adding the profile edit (module docstring) at the current step.

    ``source``: the condition whose generations the shifts were measured along (default null), or ``"own"``: each
    row uses the shifts measured along its own condition's generations (A -> B along A's trajectories);
    ``features``: use each shift's ``features`` kept features of largest mass (default: all it kept);
    ``away_own``: also subtract, row by row, the null -> own-condition shift (A -> B from null-source shifts);
    ``baseline``: conditions whose mean shift is taken out of every toward / away shift (what all classes share);
    ``mask``: bool over the tokens or the patch grid; ``with_error``: add the whole activation shift instead
    (features and the part the SAE does not reconstruct), as a reference for what the features carry.
    """
    param = next(sae.parameters())
    if features is not None and features < 1:
        raise TideError(f"features must be >= 1, got {features}")
    per_row = source == OWN
    src = None if per_row else profile.id_of(source)
    terms = [(profile.id_of(c), 1.0) for c in toward] + [(profile.id_of(c), -1.0) for c in away]
    if baseline:
        net = sum(sign for _, sign in terms)
        terms += [(profile.id_of(c), -net / len(baseline)) for c in baseline]
    if not terms and not away_own:
        raise TideError("a steering edit needs a condition to steer toward or away from")
    if per_row and (away_own or baseline):
        raise TideError("source='own' measures each sample's A -> B shift directly: do not combine it with away_own or "
                        "a baseline")
    if not per_row:
        for c, _ in terms:
            profile.condition(c, src)  # refuse a missing shift now, not at the first step
    mask_T = None if mask is None else torch.as_tensor(mask).reshape(-1).to(param.device, param.dtype)
    cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def shift_TD(s: int, c: int, step: int) -> torch.Tensor:
        key = (s, c, step)
        if key not in cache:
            cs = profile.condition(c, s)
            if with_error:
                d = cs.act_shift_STD[step].to(param.device, param.dtype)
            else:
                m = len(cs.features_M) if features is None else min(features, len(cs.features_M))
                with torch.no_grad(), eval_mode(sae):
                    d_MD = sae.fold_decoder(float(profile.timesteps_S[step]), cs.features_M[:m].to(param.device)).detach()
                d = cs.shift_STM[step, :, :m].to(param.device, param.dtype) @ d_MD.to(param.dtype)
            cache[key] = d * float(strength) * (1.0 if mask_T is None else mask_T[:, None])
        return cache[key]

    def edit_TD(s: int, step: int, own: int) -> torch.Tensor:
        d = torch.zeros(profile.shape_TD, device=param.device, dtype=param.dtype)
        for c, sign in terms:
            if c != s:
                d = d + sign * shift_TD(s, c, step)
        if away_own and own != NULL_CONDITION:
            d = d - shift_TD(NULL_CONDITION, own, step)
        return d

    def fn(act: torch.Tensor, hook=None) -> torch.Tensor:
        ctx = require_step("steering")
        step = profile.step_of(float(ctx.timestep))
        if act.dim() != 3 or tuple(act.shape[1:]) != tuple(profile.shape_TD):
            raise TideError(f"the steering profile holds edits of shape (tokens, width) {tuple(profile.shape_TD)} but "
                            f"the hook carries {tuple(act.shape[1:])}: measure the profile on this backbone and SAE")
        if per_row or away_own:
            is_cond_B = (ctx.cfg_branch_B == COND).long()
            keys, inverse_B = torch.unique(ctx.conds_B.long() * 2 + is_cond_B, return_inverse=True)
            edits = []
            for key in keys.tolist():  # one edit per (condition, branch), gathered to the rows
                c, is_cond = key // 2, bool(key % 2)
                # rows of the unconditional branch are edited only under branch="both", where they need their pair
                missing = not is_cond and per_row and not any((c, t) in profile.shifts for t, _ in terms)
                edits.append(torch.zeros(profile.shape_TD, device=param.device, dtype=param.dtype) if missing
                             else edit_TD(c if per_row else src, step, c))
            delta = torch.stack(edits)[inverse_B.to(param.device)]
        else:
            delta = edit_TD(src, step, NULL_CONDITION).expand(act.shape[0], -1, -1)
        return act + delta.to(act.device, act.dtype)

    return fn


def profile_intervention(sae, profile: SteeringProfile, toward: Sequence[int | str] = (),
                         away: Sequence[int | str] = (), strength: float = 1.0, features: int | None = None,
                         steps: tuple[int, int] | None = None, mask=None, branch: str = "cond",
                         source: int | str = NULL_CONDITION, away_own: bool = False,
                         baseline: Sequence[int | str] = (), with_error: bool = False) -> Intervention:
    """An :class:`~tide.sampling.Intervention` adding the profile edit (:func:`profile_fn`) at the profile's hook, on
    the ``cond`` rows (guidance amplifies it like a prompt) or on ``both``."""
    if branch not in PROFILE_BRANCHES:
        raise TideError(f"a profile edit applies to one of {list(PROFILE_BRANCHES)} CFG branches, got {branch!r}")
    if getattr(sae.cfg, "hook", None) != profile.hook:
        raise TideError(f"the steering profile was measured at {profile.hook!r} but the SAE reads {sae.cfg.hook!r}")
    if int(profile.meta.get("d_sae", sae.cfg.d_sae)) != sae.cfg.d_sae:
        raise TideError(f"the steering profile was measured with an SAE of {profile.meta['d_sae']} features, this one "
                        f"has {sae.cfg.d_sae}: measure it again with this SAE")
    if strength < 0:
        raise TideError(f"strength must be >= 0 (steer away with --remove), got {strength}")
    fn = profile_fn(sae, profile, toward, away, strength, features, mask, source, away_own, baseline, with_error)
    return Intervention(profile.hook, fn, steps=tuple(steps) if steps else None, branch=branch)


def resolve_conditions(backbone_spec: str, prompts: str | None, names: Sequence[str], device: str = "cpu",
                       dtype: str = "float32"):
    """Load a backbone on which every entry of ``names`` (condition ids, condition names, ``null``, or words of a
    vocabulary text encoder) is a condition; returns (backbone, ids, n_base), n_base being the number of conditions
    before any word was added. Words that are not yet conditions are appended to the backbone's prompts, so ids
    0..n_base-1 keep their meaning."""
    from tide.models.loading import load_backbone

    backbone = load_backbone(backbone_spec, prompts=prompts, device=device, dtype=dtype)

    def lookup(bb, name: str) -> int | None:
        name = str(name).strip()
        if name.lower() == NULL_NAME:
            return NULL_CONDITION
        if name.lstrip("-").isdigit():
            return int(name)
        low = [n.lower() for n in bb.condition_names]
        texts = [t.lower() for t in (bb.prompts.texts if bb.prompts is not None else [])]
        for table in (low, texts):
            if name.lower() in table:
                return table.index(name.lower())
        return None

    n_base = backbone.num_conditions
    extra = [n for n in names if lookup(backbone, n) is None]
    if extra:
        if backbone.vocabulary is None or backbone.prompts is None:
            raise TideError(f"{extra[0]!r} is neither a condition id nor a condition of this backbone "
                            f"({', '.join(backbone.condition_names[:12])}): give an id 0..{backbone.num_conditions - 1}")
        for word in extra:
            backbone.vocabulary.encode([word])  # refuses unknown words by name
        backbone = load_backbone(backbone_spec, prompts=list(backbone.prompts.texts) + [str(w).strip() for w in extra],
                                 device=device, dtype=dtype)
    ids = [lookup(backbone, n) for n in names]
    backbone.check_conditions([c for c in ids if c != NULL_CONDITION] or [0])
    return backbone, ids, n_base


@dataclass
class ProfileConfig:
    """`tide profile`: measure the paired feature shifts that steer toward conditions (a steering profile)."""

    sae: str = "runs/sae/tide"
    """SAE directory; the profile is measured at its hook."""
    backbone: str | None = None
    """Backbone (embedded name or checkpoint directory); default: the one the SAE was trained on."""
    prompts: str | None = None
    """Prompts of a text-conditioned backbone (see `tide sample --help`); default: the SAE's, else the checkpoint's."""
    conditions: list[str] | None = None
    """Target conditions: ids, condition names or vocabulary words (`--conditions 1,8,dark`), `null` for removal;
    default: every condition of the backbone."""
    sources: list[str] | None = None
    """Conditions whose generations the shifts are measured along: `null` (steer null-condition generations), class
    ids or names (A -> B, and A -> null for removal), or `all` (null and every condition); default: null."""
    num_samples: int = 16
    """Null-condition calibration generations per condition."""
    keep: int = 64
    """Features kept per condition (largest total shift)."""
    num_steps: int = 20
    """Denoising steps of the schedule the profile is measured on (use the same when steering)."""
    guidance_scale: float | None = None
    """Guidance scale; None = the model's default."""
    seed: int = 50_000
    """Seed of the first calibration generation (keep it apart from the seeds you steer)."""
    device: str = "auto"
    """cpu, cuda[:N], or auto."""
    dtype: str = "float32"
    """Weight dtype of the backbone."""
    out: str = "runs/profile.h5"
    """The profile (HDF5)."""
    overwrite: bool = False
    """Replace an existing profile at --out."""

    def run(self) -> Path:
        from tide.config import DEFAULT_BACKBONE
        from tide.sae import load_sae

        from tide.io import check_output_file

        out = check_output_file(self.out, self.overwrite)  # before anything is loaded
        if not out.parent.is_dir():
            raise TideError(f"the folder of --out {out} does not exist: create it first")
        if self.num_samples < 1 or self.keep < 1 or self.num_steps < 1:
            raise TideError("--num-samples, --keep and --num-steps must be >= 1")
        sae = load_sae(self.sae, device="cpu")
        spec = self.backbone or sae.cfg.backbone or DEFAULT_BACKBONE
        targets = [str(c) for c in self.conditions] if self.conditions else []
        sources = [str(c) for c in self.sources] if self.sources else [NULL_NAME]
        every = "all" in sources
        sources = [c for c in sources if c != "all"]
        backbone, ids, n_base = resolve_conditions(spec, self.prompts or sae.cfg.prompts or None, targets + sources,
                                                   self.device, self.dtype)
        target_ids = ids[: len(targets)] or list(range(n_base))
        source_ids = ids[len(targets):]
        if every:
            source_ids = list(dict.fromkeys([NULL_CONDITION, *source_ids, *range(n_base)]))
        sae = sae.to(backbone.device)
        config = SamplerConfig(num_steps=self.num_steps, guidance_scale=self.guidance_scale)
        profile = measure_profile(backbone, sae, target_ids, config, self.num_samples, self.seed, self.keep,
                                  sources=source_ids)
        profile.meta["sae"] = str(self.sae)
        return profile.save(out)
