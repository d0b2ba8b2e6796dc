"""A static, self-contained feature dashboard: ``index.html``, one ``features/f{id}.html`` per
feature, and ``dashboard.json`` (the same data without images; schema in docs/DASHBOARD.md).

:func:`export_dashboard` puts it together from three parts:

* :mod:`tide.analysis.regenerate` samples the top-activating images again from their seeds and
  records the hook activation there; the SAE encodes it into the feature's heat map per token;
* :mod:`tide.analysis.feature_plots` draws the timestep profile, the per-class plot and the heat map
  overlays (a film strip of up to 8 latent frames for video backbones, the top token's frame among
  them; the JSON ``heatmap`` is then one (rows x cols) map per latent frame, and captions name the
  top token's (frame, row, col));
* :mod:`tide.analysis.dashboard_html` writes the pages (self-contained, every string escaped).

The regenerated activation at the top token is reported beside the captured one
(``value`` vs ``regenerated_value``): they agree up to the capture's storage precision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tide.analysis.dashboard_html import FEATURES_DIR, INDEX_FILE, feature_html, index_html
from tide.analysis.feature_plots import class_plot, occurrence_overlay, profile_plot
from tide.analysis.feature_stats import FeatureStats, load_feature_stats
from tide.analysis.labels import auto_label, load_labels
from tide.analysis.regenerate import (Occurrence, Regenerated, capture_sample, check_conditions, feature_heatmaps,
                                      needed_steps, regenerate, top_occurrences)
from tide.errors import TideError
from tide.io import building_dir, check_writable_dir
from tide.plots import image_png_base64

SCHEMA = "tide.dashboard"
SCHEMA_VERSION = 1
JSON_FILE = "dashboard.json"


@dataclass
class DashboardConfig:
    """`tide dashboard`: a static HTML dashboard of SAE features."""

    stats: str = "runs/feature_stats.h5"
    """Feature statistics file (or the directory holding feature_stats.h5)."""
    sae: str | None = None
    """SAE directory; default: the one the statistics were computed with (their sae_path)."""
    data: str | None = None
    """Captured dataset directory; default: the one the statistics were computed on (their dataset_path)."""
    out: str = "runs/dashboard"
    """Output directory (index.html, features/, dashboard.json)."""
    features: list[int] | None = None
    """Feature ids to show; default: the max_features most frequent features that fired."""
    max_features: int = 50
    """Features shown when `features` is not given."""
    images_per_feature: int = 4
    """Top-activating images per feature (distinct samples, regenerated from their seeds); 0 = none."""
    labels: str | None = None
    """Labels file, JSON {"feature_id": "label"}; a label there replaces the automatic one."""
    neighbours: int = 5
    """Features with the nearest decoder directions (cosine) listed per feature."""
    backbone: str | None = None
    """Backbone to regenerate with; default: the one named in the dataset's manifest."""
    device: str = "auto"
    """cpu, cuda[:N], or auto (the GPU when one is present)."""
    batch_size: int = 64
    """Samples regenerated together."""
    image_px: int = 160
    """Minimum displayed image size in pixels (small images are enlarged, nearest neighbour)."""
    progress: bool = True
    """Show progress bars."""
    overwrite: bool = False
    """Replace an existing dashboard at --out (the whole directory)."""

    def __post_init__(self):
        if self.max_features < 1 or self.images_per_feature < 0 or self.neighbours < 0 or self.batch_size < 1:
            raise TideError("max_features and batch_size must be >= 1; images_per_feature and neighbours >= 0")

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
    """``dashboard.json``: the same data without images."""
    pages: tuple[Path, ...]
    """One page per shown feature, in the order of ``features``."""
    features: tuple[int, ...]
    """The feature ids shown."""
    sae_features: int
    """Features of the SAE (the dictionary size)."""
    num_images: int
    """Top-activating images shown, over all features."""

    @property
    def num_features(self) -> int:
        """Features shown."""
        return len(self.features)


# ---------------------------------------------------------------------- selection

def default_features(stats: FeatureStats, max_features: int) -> list[int]:
    """The ``max_features`` most frequent features that fired, most frequent first."""
    freq = stats.frequency
    alive = np.flatnonzero(freq > 0)
    order = alive[np.argsort(-freq[alive], kind="stable")]
    return [int(f) for f in order[:max_features]]


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


def decoder_neighbours(W_dec_NFD: torch.Tensor, features: list[int], n: int) -> dict[int, list[tuple[int, float]]]:
    """Per feature, the ``n`` other features with the highest decoder cosine (averaged over buckets)."""
    if n == 0 or not features:
        return {f: [] for f in features}
    W = torch.nn.functional.normalize(W_dec_NFD.detach().float().cpu(), dim=-1)
    cos_FG = torch.einsum("nfd,ngd->fg", W[:, features], W) / W.shape[0]
    cos_FG[torch.arange(len(features)), torch.tensor(features)] = -torch.inf
    vals, idx = cos_FG.topk(min(n, W.shape[1] - 1), dim=1)
    return {f: [(int(i), float(v)) for i, v in zip(idx[r], vals[r])] for r, f in enumerate(features)}


def class_means(stats: FeatureStats, f: int, num_classes: int) -> np.ndarray:
    """(C,) mean image-level activation (max over tokens and steps) of the samples of each class."""
    img = stats.image_acts[:, f]
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        sel = stats.sample_cond == c
        if sel.any():
            out[c] = img[sel].mean()
    return out


def feature_record(stats: FeatureStats, f: int, labels: dict[int, str], names: list[str],
                   neighbours: list[tuple[int, float]], shown: set[int]) -> dict:
    """The dashboard.json entry of feature ``f`` (without its images)."""
    auroc = stats.auroc[:, f]
    top = int(np.nanargmax(auroc)) if np.isfinite(auroc).any() else None
    prof = stats.frequency_step[:, f]
    peak = int(np.argmax(np.nan_to_num(prof))) if prof.size else None
    auto = auto_label(stats, f)
    return {
        "id": f, "label": labels.get(f, auto), "auto_label": auto, "user_label": labels.get(f),
        "page": f"{FEATURES_DIR}/f{f}.html",
        "frequency": float(stats.frequency[f]), "mean_act": float(stats.mean_act[f]),
        "mean_act_firing": _num(stats.mean_act_firing[f]),
        "top_class_id": top, "top_class": None if top is None else names[top],
        "top_auroc": None if top is None else _num(auroc[top]),
        "peak_step": None if peak is None else int(stats.steps[peak]),
        "peak_timestep": None if peak is None else _num(stats.timesteps[peak]),
        "profile": {"frequency": [_num(v) for v in prof], "mean_act": [_num(v) for v in stats.mean_act_step[:, f]]},
        "auroc": [_num(v) for v in auroc],
        "class_mean_act": [_num(v) for v in class_means(stats, f, len(names))],
        "neighbours": [{"id": g, "cosine": c, "shown": g in shown} for g, c in neighbours],
        "images": [],
    }


def _heat_json(heat: np.ndarray) -> list:
    """A heat map as nested lists (rows of values; one such map per frame for video), 6 decimals."""
    if heat.ndim > 2:
        return [_heat_json(h) for h in heat]
    return [[round(float(v), 6) for v in row] for row in np.atleast_2d(heat)]


def _image_record(o: Occurrence, cond: int, seed: int, names: list[str], heat: np.ndarray) -> dict:
    """The dashboard.json entry of one top-activating image (see docs/DASHBOARD.md)."""
    return {"sample_id": o.sample_id, "cond": cond, "cond_name": names[cond] if cond < len(names) else str(cond),
            "seed": seed, "step": o.step, "timestep": _num(o.timestep), "token": o.token,
            "value": o.value, "regenerated_value": float(heat.reshape(-1)[o.token]), "heatmap": _heat_json(heat)}


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


def _regenerate_for(config: DashboardConfig, stats: FeatureStats, manifest: dict, data_path, backbone,
                    occ: dict[int, list[Occurrence]], minus: str | None = None):
    """(backbone, regenerated samples) for the occurrences; the backbone is loaded when needed and not given."""
    from tide.models.loading import load_backbone

    needs = needed_steps(occ)
    if not needs:
        return backbone, Regenerated({}, {}, {})
    cfgm = manifest.get("config", {})
    if backbone is None:
        spec = config.backbone or cfgm.get("backbone")
        if not spec:
            raise TideError(f"the manifest of {data_path} names no backbone: pass backbone=")
        backbone = load_backbone(spec, prompts=cfgm.get("prompts"), device=config.device,
                                 dtype=cfgm.get("dtype", "float32"))
    check_conditions(manifest, backbone, stats.sample_cond, needs)
    branch = 1 if stats.attrs.get("cfg_branch") == 1 else 0
    return backbone, regenerate(backbone, stats.hook, manifest, needs, branch, config.batch_size, config.progress,
                                minus=minus)


def export_dashboard(config: DashboardConfig, backbone=None) -> DashboardResult:
    """Write the dashboard to ``config.out``; returns what it wrote (:class:`DashboardResult`).

    ``backbone`` may be passed already loaded (notebooks, the demo); otherwise the one named in the
    dataset's manifest (or ``config.backbone``) is loaded when there are images to regenerate.
    """
    out = config.check_out()  # before anything is loaded
    stats, sae, sae_path, data_path, manifest = _load_inputs(config)
    F = stats.num_features
    labels = load_labels(config.labels, F) if config.labels else {}
    features = _chosen_features(config, stats)
    names = stats.condition_names or [str(c) for c in range(stats.auroc.shape[0])]

    occ = {f: top_occurrences(stats, f, config.images_per_feature) for f in features}
    backbone, regen = _regenerate_for(config, stats, manifest, data_path, backbone, occ,
                                      minus=getattr(sae.cfg, "base_hook", None))
    heat = feature_heatmaps(sae, regen, occ, stats.patch_grid)

    neighbours = decoder_neighbours(sae.W_dec, features, config.neighbours)
    shown = set(features)
    records, pictures = [], {}
    for f in features:
        r = feature_record(stats, f, labels, names, neighbours[f], shown)
        pics = {"profile": profile_plot(stats, f), "classes": class_plot(names, stats.auroc[:, f],
                                                                          class_means(stats, f, len(names))), "images": []}
        for o in occ[f]:
            cond, seed = capture_sample(manifest, backbone, o.sample_id)
            h = heat[(f, o.sample_id, o.step)]
            r["images"].append(_image_record(o, cond, seed, names, h))
            plain, over = occurrence_overlay(regen.images[o.sample_id], h, o.token, config.image_px)
            pics["images"].append((image_png_base64(plain), image_png_base64(over)))
        records.append(r)
        pictures[f] = pics

    cfgm = manifest.get("config", {})
    meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tide_version": stats.attrs.get("tide_version"),
            "hook": stats.hook, "stats_path": str(config.stats), "sae_path": str(sae_path), "dataset_path": str(data_path),
            "backbone": config.backbone or cfgm.get("backbone"), "num_steps": cfgm.get("num_steps"),
            "guidance_scale": cfgm.get("guidance_scale"), "cfg_branch": stats.attrs.get("cfg_branch"),
            "num_features": F, "condition_names": names, "patch_grid": list(stats.patch_grid),
            "steps": [int(s) for s in stats.steps], "timesteps": [_num(t) for t in stats.timesteps]}

    with building_dir(out) as tmp:  # built beside --out and renamed into place: all or nothing
        (tmp / FEATURES_DIR).mkdir()
        for r in records:
            (tmp / r["page"]).write_text(feature_html(meta, r, pictures[r["id"]]), encoding="utf-8")
        (tmp / INDEX_FILE).write_text(index_html(meta, records), encoding="utf-8")
        (tmp / JSON_FILE).write_text(json.dumps({**meta, "features": records}, indent=1, sort_keys=True),
                                     encoding="utf-8")
    return DashboardResult(index_path=out / INDEX_FILE, json_path=out / JSON_FILE,
                           pages=tuple(out / r["page"] for r in records), features=tuple(features), sae_features=F,
                           num_images=sum(len(r["images"]) for r in records))
