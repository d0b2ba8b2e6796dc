"""The feature atlas: a static site with a page for every firing feature of an SAE, and ``dashboard.json``.

``export_dashboard(DashboardConfig(...))`` writes (layout and schema in docs/DASHBOARD.md)::

    out/
      index.html          every feature in a paginated table, searchable by id, label, class, timestep and frequency
      features/f{id}.html one page per feature
      images/s{id}.png    each regenerated sample, once, shared by every feature that shows it
      effects/            causal strips: base.png (the unedited generations) and f{id}.png per feature
      assets/             the pages' stylesheet and scripts
      dashboard.json      the same data without pictures (schema_version 2)

How it scales to wide SAEs: the top samples of every feature come from the statistics in one vectorised pass
(:func:`~tide.analysis.regenerate.top_samples`); every needed sample is regenerated **once**, in batches, however
many features show it, and each needed (sample, step) activation is encoded once, as it is made, keeping only
the columns of the features that fired there (:func:`~tide.analysis.regenerate.encode_heatmaps`); heat maps
travel as 8-bit arrays drawn over the shared picture by the page's script, and plots are inline SVG
(:mod:`tide.analysis.feature_plots`). The causal strips (what adding and removing the feature does,
:mod:`tide.analysis.causal_strips`) cost generations per feature and are made for the ``effect_features`` most
frequent features (all with -1). ``experiments/atlas_bench.py`` measures the export.

The regenerated activation at the top token is reported beside the captured one (``value`` vs
``regenerated_value``): they agree up to the capture's storage precision.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tide.analysis.dashboard_html import (ASSETS_DIR, FEATURES_DIR, INDEX_FILE, feature_html, index_html,
                                          write_assets)
from tide.analysis.feature_plots import classes_svg, histogram_svg, profile_svg, sample_picture
from tide.analysis.feature_stats import FeatureStats, load_feature_stats
from tide.analysis.labels import auto_label, load_labels
from tide.analysis.regenerate import (capture_sample, check_conditions, decode_heat,  # noqa: F401
                                      encode_heat, encode_heatmaps, features_at, needed_steps, regenerate, top_samples)
from tide.errors import TideError
from tide.io import building_dir, check_writable_dir

SCHEMA = "tide.dashboard"
SCHEMA_VERSION = 2
JSON_FILE = "dashboard.json"
IMAGES_DIR = "images"
EFFECTS_DIR = "effects"


@dataclass
class DashboardConfig:
    """`tide dashboard`: the feature atlas, a static site with a page per firing feature of an SAE."""

    stats: str = "runs/feature_stats.h5"
    """Feature statistics file (or the directory holding feature_stats.h5)."""
    sae: str | None = None
    """SAE directory; default: the one the statistics were computed with (their sae_path)."""
    data: str | None = None
    """Captured dataset directory; default: the one the statistics were computed on (their dataset_path)."""
    out: str = "runs/dashboard"
    """Output directory (index.html, features/, images/, effects/, assets/, dashboard.json)."""
    features: list[int] | None = None
    """Feature ids to show; default: every feature that fired, most frequent first (see max_features)."""
    max_features: int = 0
    """With no --features: show at most this many of the most frequent firing features (0 = every one)."""
    images_per_feature: int = 12
    """Top-activating images per feature (distinct samples, regenerated once each from their seeds); 0 = none."""
    labels: str | None = None
    """Labels file, JSON {"feature_id": "label"}; a label there replaces the automatic one."""
    neighbours: int = 8
    """Features with the nearest decoder directions (cosine) listed per feature."""
    effect_features: int = 64
    """Features given causal strips (added / removed), the first of the shown ones (most frequent first); 0 = none,
    -1 = every shown feature. Each costs 2 x effect_samples generations."""
    effect_samples: int = 3
    """Generations per causal strip: null-condition seeds the feature is added to (shared by every feature) and the
    feature's own top samples it is removed from."""
    effect_strength: float = 0.1
    """Norm of the added decoder direction, in units of R(t), the hook's RMS norm at each step (the norm-relative
    steering recipe, `tide steer --scale norm`). On the demo's SAE (5 features x 3 seeds at 0.05, 0.1, 0.2, 0.5)
    0.1 changed shape and brightness visibly, at 0.2 about half and at 0.5 every strip became periodic noise."""
    effect_seed: int = 900_000
    """First seed of the null-condition generations of the added strips."""
    backbone: str | None = None
    """Backbone to regenerate with; default: the one named in the dataset's manifest."""
    device: str = "auto"
    """cpu, cuda[:N], or auto (the GPU when one is present)."""
    batch_size: int = 64
    """Samples generated together (regeneration and causal strips)."""
    image_px: int = 112
    """Displayed size of a sample picture in CSS pixels (its longer side; small images are enlarged)."""
    neuronpedia: bool = False
    """Also write the features in Neuronpedia's export format under out/neuronpedia/ (tide.analysis.neuronpedia)."""
    progress: bool = True
    """Show progress bars."""
    overwrite: bool = False
    """Replace an existing dashboard at --out (the whole directory)."""

    def __post_init__(self):
        if (self.max_features < 0 or self.images_per_feature < 0 or self.neighbours < 0 or self.batch_size < 1
                or self.effect_features < -1 or self.effect_samples < 0 or self.image_px < 16):
            raise TideError("max_features, images_per_feature, neighbours and effect_samples must be >= 0, "
                            "effect_features >= -1, batch_size >= 1 and image_px >= 16")
        if not self.effect_strength >= 0:
            raise TideError(f"effect_strength must be >= 0, got {self.effect_strength}")

    def check_out(self) -> Path:
        """The output directory, refused (one line) when it is a file, cannot be written, or is not empty without
        ``overwrite`` (with it, unless it is a tide dashboard: --overwrite replaces the whole directory)."""
        out = check_writable_dir(self.out)
        if out.is_dir() and any(out.iterdir()):
            if not self.overwrite:
                raise TideError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
            if not ((out / INDEX_FILE).is_file() or (out / JSON_FILE).is_file()):
                raise TideError(f"refusing to --overwrite {out}: it is not a tide dashboard (no {INDEX_FILE} or "
                                f"{JSON_FILE}) and would be deleted; choose another --out")
        return out


@dataclass(frozen=True)
class DashboardResult:
    """What :func:`export_dashboard` wrote."""

    index_path: Path
    """``index.html`` (open it in a browser; no server needed)."""
    json_path: Path
    """``dashboard.json``: the same data without pictures."""
    pages: tuple[Path, ...]
    """One page per shown feature, in the order of ``features``."""
    features: tuple[int, ...]
    """The feature ids shown."""
    sae_features: int
    """Features of the SAE (the dictionary size)."""
    num_images: int
    """Top-activating images shown, over all features."""
    num_samples: int = 0
    """Distinct samples regenerated (each written once under images/)."""
    num_effects: int = 0
    """Features with causal strips."""
    bytes: int = 0
    """Size of everything written."""
    seconds: dict = field(default_factory=dict)
    """Wall time of each part: load, regenerate, effects, write, total."""

    @property
    def num_features(self) -> int:
        """Features shown."""
        return len(self.features)


# ---------------------------------------------------------------------- selection

def default_features(stats: FeatureStats, max_features: int = 0) -> list[int]:
    """The firing features, most frequent first; the first ``max_features`` of them when it is > 0."""
    freq = stats.frequency
    alive = np.flatnonzero(freq > 0)
    order = alive[np.argsort(-freq[alive], kind="stable")]
    return [int(f) for f in (order[:max_features] if max_features > 0 else order)]


def _chosen_features(config: DashboardConfig, stats: FeatureStats) -> list[int]:
    if config.features is None:
        return default_features(stats, config.max_features)
    F = stats.num_features
    features = list(dict.fromkeys(int(f) for f in config.features))
    bad = [f for f in features if not 0 <= f < F]
    if bad:
        raise TideError(f"features {bad} are out of range: the SAE has {F} features (0..{F - 1})")
    return features


# ---------------------------------------------------------------------- numbers

def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def decoder_neighbours(W_dec_NFD: torch.Tensor, features: list[int], n: int,
                       chunk: int = 1024) -> dict[int, list[tuple[int, float]]]:
    """Per feature, the ``n`` other features with the highest decoder cosine (averaged over buckets), in chunks
    of ``chunk`` features (a 16k x 16k cosine table is never held)."""
    if n == 0 or not features:
        return {f: [] for f in features}
    W = torch.nn.functional.normalize(W_dec_NFD.detach().float().cpu(), dim=-1)
    out = {}
    for c0 in range(0, len(features), chunk):
        fs = features[c0:c0 + chunk]
        cos_FG = torch.einsum("nfd,ngd->fg", W[:, fs], W) / W.shape[0]
        cos_FG[torch.arange(len(fs)), torch.tensor(fs)] = -torch.inf
        vals, idx = cos_FG.topk(min(n, W.shape[1] - 1), dim=1)
        out.update({f: [(int(i), float(v)) for i, v in zip(idx[r], vals[r])] for r, f in enumerate(fs)})
    return out


def all_class_means(stats: FeatureStats, features: list[int], num_classes: int) -> np.ndarray:
    """(len(features), C) mean image-level activation (max over tokens and steps) of each class's samples."""
    img = stats.image_acts[:, features]
    out = np.full((len(features), num_classes), np.nan)
    for c in range(num_classes):
        sel = stats.sample_cond == c
        if sel.any():
            out[:, c] = img[sel].mean(0)
    return out


def class_means(stats: FeatureStats, f: int, num_classes: int) -> np.ndarray:
    """(C,) mean image-level activation (max over tokens and steps) of the samples of each class."""
    return all_class_means(stats, [f], num_classes)[0]


def feature_record(stats: FeatureStats, f: int, labels: dict[int, str], names: list[str],
                   neighbours: list[tuple[int, float]], shown: set[int], class_mean=None) -> dict:
    """The dashboard.json entry of feature ``f`` (its images and effects are filled in by the export)."""
    auroc = stats.auroc[:, f]
    top = int(np.nanargmax(auroc)) if np.isfinite(auroc).any() else None
    prof = stats.frequency_step[:, f]
    peak = int(np.argmax(np.nan_to_num(prof))) if prof.size else None
    auto = auto_label(stats, f)
    cm = class_means(stats, f, len(names)) if class_mean is None else class_mean
    hist = getattr(stats, "hist_count", None)
    histogram = None
    if hist is not None:
        nz = np.flatnonzero(hist[f])
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        histogram = {"first_bin": lo, "counts": [int(v) for v in hist[f, lo:hi]]}
    return {
        "id": f, "label": labels.get(f, auto), "auto_label": auto, "user_label": labels.get(f),
        "page": f"{FEATURES_DIR}/f{f}.html",
        "frequency": float(stats.frequency[f]), "mean_act": float(stats.mean_act[f]),
        "mean_act_firing": _num(stats.mean_act_firing[f]), "max_act": float(stats.topk_value[f, 0]),
        "top_class_id": top, "top_class": None if top is None else names[top],
        "top_auroc": None if top is None else _num(auroc[top]),
        "peak_step": None if peak is None else int(stats.steps[peak]),
        "peak_timestep": None if peak is None else _num(stats.timesteps[peak]),
        "profile": {"frequency": [_num(v) for v in prof], "mean_act": [_num(v) for v in stats.mean_act_step[:, f]]},
        "auroc": [_num(v) for v in auroc],
        "class_mean_act": [_num(v) for v in cm],
        "histogram": histogram,
        "neighbours": [{"id": g, "cosine": c, "shown": g in shown} for g, c in neighbours],
        "images": [],
        "effects": None,
    }


# ---------------------------------------------------------------------- the job

def _load_inputs(config: DashboardConfig):
    """(statistics, SAE, SAE path, dataset path, manifest), checked to belong together."""
    from tide.data import ActivationStore
    from tide.sae import load_sae

    stats = load_feature_stats(config.stats)
    sae_path = config.sae or stats.attrs.get("sae_path")
    data_path = config.data or stats.attrs.get("dataset_path")
    if not sae_path:
        raise TideError(f"{config.stats} does not record its SAE path: pass sae=")
    if not data_path:
        raise TideError(f"{config.stats} does not record its dataset path: pass data=")
    sae = load_sae(sae_path)
    if sae.cfg.d_sae != stats.num_features:
        raise TideError(f"the SAE at {sae_path} has {sae.cfg.d_sae} features but the statistics {stats.num_features}: "
                        "pass the SAE the statistics were computed with")
    store = ActivationStore(data_path)
    if stats.attrs.get("manifest_sha256") and store.manifest_sha256 != stats.attrs["manifest_sha256"]:
        raise TideError(f"the dataset at {data_path} is not the one the statistics were computed on (manifest differs)")
    return stats, sae, sae_path, data_path, store.manifest


def _load_backbone(config: DashboardConfig, manifest: dict, data_path, backbone):
    from tide.models.loading import load_backbone

    if backbone is not None:
        return backbone
    cfgm = manifest.get("config", {})
    spec = config.backbone or cfgm.get("backbone")
    if not spec:
        raise TideError(f"the manifest of {data_path} names no backbone: pass backbone=")
    return load_backbone(spec, prompts=cfgm.get("prompts"), device=config.device, dtype=cfgm.get("dtype", "float32"))


def _regenerate(config, stats, sae, manifest, backbone, occ):
    """(sample images, heat maps) of every occurrence: each sample regenerated once, each needed (sample, step)
    encoded as it is made."""
    needs = needed_steps(occ)
    if not needs:
        return {}, {}
    check_conditions(manifest, backbone, stats.sample_cond, needs)
    where = features_at(occ)
    heat: dict[tuple[int, int, int], np.ndarray] = {}
    grid = stats.patch_grid

    def keep(sample_ids, step, timestep, x_NTD):
        heat.update(encode_heatmaps(sae, sample_ids, step, timestep, x_NTD, where, grid))

    branch = 1 if stats.attrs.get("cfg_branch") == 1 else 0
    regen = regenerate(backbone, stats.hook, manifest, needs, branch, config.batch_size, config.progress,
                       minus=getattr(sae.cfg, "base_hook", None), keep=keep)
    return regen.images, heat


def _strips(config, stats, sae, manifest, backbone, features, occ):
    """(meta entry, per-feature strips with their changes) for the first ``effect_features`` features."""
    from tide.analysis.causal_strips import feature_strips
    from tide.analysis.feature_stats import HookScale
    from tide.sampling import SamplerConfig

    n = len(features) if config.effect_features == -1 else min(config.effect_features, len(features))
    if n == 0 or config.effect_samples == 0:
        return None, {}
    chosen = features[:n]
    cfgm = manifest.get("config", {})
    sconf = SamplerConfig(num_steps=int(cfgm.get("num_steps", 50)), guidance_scale=cfgm.get("guidance_scale", 1.0),
                          batch_size=config.batch_size)
    removal = {f: [capture_sample(manifest, backbone, o.sample_id) for o in occ[f][:config.effect_samples]]
               for f in chosen}
    seeds = [config.effect_seed + i for i in range(config.effect_samples)]
    base, strips = feature_strips(backbone, sae, chosen, seeds, removal, sconf, HookScale.from_stats(stats),
                                  config.effect_strength, progress=config.progress)
    meta = {"strength": config.effect_strength, "unit": "R(t)", "seeds": seeds, "condition": "null",
            "base": f"{EFFECTS_DIR}/base.png", "features": len(chosen)}
    return meta, {"base": base, "strips": strips}


def _png(array_HWC: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array_HWC).save(path, optimize=False, compress_level=6)


def _row(pictures: list[np.ndarray], n: int) -> np.ndarray:
    """``n`` equal pictures side by side, white where there are fewer."""
    h, w = pictures[0].shape[:2] if pictures else (1, 1)
    tiles = pictures + [np.full((h, w, 3), 255, np.uint8)] * (n - len(pictures))
    return np.concatenate(tiles, axis=1)


def export_dashboard(config: DashboardConfig, backbone=None) -> DashboardResult:
    """Write the atlas to ``config.out``; returns what it wrote (:class:`DashboardResult`).

    ``backbone`` may be passed already loaded (notebooks, the demo); otherwise the one named in the
    dataset's manifest (or ``config.backbone``) is loaded when there are images to regenerate or strips to make.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    seconds = {}
    out = config.check_out()  # before anything is loaded
    stats, sae, sae_path, data_path, manifest = _load_inputs(config)
    sae.eval()
    F = stats.num_features
    labels = load_labels(config.labels, F) if config.labels else {}
    features = _chosen_features(config, stats)
    names = stats.condition_names or [str(c) for c in range(stats.auroc.shape[0])]
    occ = top_samples(stats, features, config.images_per_feature)
    wants_model = any(occ.values()) or (config.effect_features != 0 and config.effect_samples > 0 and features)
    if wants_model:
        backbone = _load_backbone(config, manifest, data_path, backbone)
    seconds["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    with torch.no_grad():
        images, heat = _regenerate(config, stats, sae, manifest, backbone, occ) if any(occ.values()) else ({}, {})
    seconds["regenerate"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        effects_meta, effects = _strips(config, stats, sae, manifest, backbone, features, occ) if wants_model \
            else (None, {})
    seconds["effects"] = time.perf_counter() - t

    t = time.perf_counter()
    neighbours = decoder_neighbours(sae.W_dec, features, config.neighbours)
    shown = set(features)
    cms = all_class_means(stats, features, len(names)) if features else np.zeros((0, len(names)))
    grid = stats.patch_grid
    pictures = {s: sample_picture(img, grid) for s, img in images.items()}
    records = []
    for j, f in enumerate(tqdm(features, desc="feature records", disable=not config.progress, unit="feature")):
        r = feature_record(stats, f, labels, names, neighbours[f], shown, cms[j])
        for o in occ[f]:
            h = heat[(f, o.sample_id, o.step)]
            token = int(np.argmax(h))
            frames = pictures[o.sample_id][1]
            shown_heat = h[frames] if frames is not None else h
            cond, seed = capture_sample(manifest, backbone, o.sample_id)
            r["images"].append({
                "sample_id": o.sample_id, "cond": cond, "cond_name": names[cond] if 0 <= cond < len(names) else str(cond),
                "seed": seed, "step": o.step, "timestep": _num(o.timestep), "token": token,
                "value": o.value, "regenerated_value": float(h.reshape(-1)[token]),
                "image": f"{IMAGES_DIR}/s{o.sample_id}.png", "frames": frames, "heat": encode_heat(shown_heat)})
        records.append(r)

    strips = effects.get("strips", {})
    cfgm = manifest.get("config", {})
    meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tide_version": stats.attrs.get("tide_version"),
            "hook": stats.hook, "sae_target": getattr(sae.cfg, "target", "activation"),
            "stats_path": str(config.stats), "sae_path": str(sae_path), "dataset_path": str(data_path),
            "backbone": config.backbone or cfgm.get("backbone"), "num_steps": cfgm.get("num_steps"),
            "guidance_scale": cfgm.get("guidance_scale"), "cfg_branch": stats.attrs.get("cfg_branch"),
            "num_features": F, "num_shown": len(features), "condition_names": names, "patch_grid": list(grid),
            "steps": [int(s) for s in stats.steps], "timesteps": [_num(t) for t in stats.timesteps],
            "histogram_edges": None if getattr(stats, "hist_edges", None) is None
            else [float(e) for e in stats.hist_edges],
            "effects": effects_meta, "image_px": config.image_px, "picture_size": None}
    if pictures:
        meta["picture_size"] = list(next(iter(pictures.values()))[0].shape[:2])
    elif effects:
        meta["picture_size"] = list(sample_picture(effects["base"][0], grid)[0].shape[:2])

    with building_dir(out) as tmp:  # built beside --out and renamed into place: all or nothing
        for d in (FEATURES_DIR, IMAGES_DIR, EFFECTS_DIR, ASSETS_DIR):
            (tmp / d).mkdir()
        write_assets(tmp / ASSETS_DIR)
        for s, (pic, _) in pictures.items():
            _png(pic, tmp / IMAGES_DIR / f"s{s}.png")
        if strips:
            base = [sample_picture(im, grid)[0] for im in effects["base"]]
            _png(_row(base, len(base)), tmp / EFFECTS_DIR / "base.png")
            by_id = {r["id"]: r for r in records}
            for f, st in strips.items():
                added = [sample_picture(im, grid)[0] for im in st.added]
                removed = [sample_picture(im, grid)[0] for im in st.removed]
                n = max(len(added), len(removed), 1)
                _png(np.concatenate([_row(added, n), _row(removed, n)] if removed else [_row(added, n)]),
                     tmp / EFFECTS_DIR / f"f{f}.png")
                rm_ids = [o.sample_id for o in occ[f][:len(st.removed)]]
                before = torch.stack([images[s] for s in rm_ids]) if rm_ids else None
                by_id[f]["effects"] = {
                    "strip": f"{EFFECTS_DIR}/f{f}.png", "columns": n,
                    "added": {"row": 0, "count": len(added),
                              "change": float((st.added - effects["base"]).abs().mean()) if len(added) else None},
                    "removed": {"row": 1, "count": len(removed), "samples": rm_ids,
                                "change": float((st.removed - before).abs().mean()) if rm_ids else None}}
        order = [r["id"] for r in records]
        for j, r in enumerate(tqdm(records, desc="pages", disable=not config.progress, unit="page")):
            nav = {"prev": order[j - 1] if j else None, "next": order[j + 1] if j + 1 < len(order) else None}
            plots = {"profile": profile_svg(stats.steps, stats.frequency_step[:, r["id"]],
                                            stats.mean_act_step[:, r["id"]]),
                     "classes": classes_svg(names, np.array([np.nan if v is None else v for v in r["class_mean_act"]]),
                                            stats.auroc[:, r["id"]]),
                     "histogram": None if r["histogram"] is None else histogram_svg(
                         stats.hist_edges, stats.hist_count[r["id"]])}
            (tmp / r["page"]).write_text(feature_html(meta, r, plots, nav), encoding="utf-8")
        (tmp / INDEX_FILE).write_text(index_html(meta, records), encoding="utf-8")
        (tmp / JSON_FILE).write_text(json.dumps({**meta, "features": records}, sort_keys=True, separators=(",", ":")),
                                     encoding="utf-8")
        if config.neuronpedia:
            from tide.analysis.neuronpedia import write_neuronpedia

            write_neuronpedia({**meta, "features": records}, tmp / "neuronpedia")
    seconds["write"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return DashboardResult(index_path=out / INDEX_FILE, json_path=out / JSON_FILE,
                           pages=tuple(out / r["page"] for r in records), features=tuple(features), sae_features=F,
                           num_images=sum(len(r["images"]) for r in records), num_samples=len(pictures),
                           num_effects=len(strips), bytes=size, seconds=seconds)
