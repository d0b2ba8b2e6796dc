"""A static, self-contained feature dashboard: ``index.html``, one ``features/f{id}.html`` per
feature, and ``dashboard.json`` (the same data without images; schema in docs/DASHBOARD.md).

The site opens from ``file://`` with no server: images and plots are inline base64 PNGs, the
sorting/filtering script is inline, nothing is fetched from elsewhere. Every string written into
HTML goes through :func:`html.escape`, and JSON embedded in a page has ``<``, ``>`` and ``&``
written as ``\\u003c`` etc., so a label or class name cannot close a tag or a script.

Top-activating images are regenerated, not stored: sample ``i`` of the capture is sampled again
with its condition and seed (and the capture's ``num_steps`` and ``guidance_scale``), all needed
samples in one batched :func:`tide.sampling.sample` call, while a read-only
:class:`~tide.sampling.Intervention` records the hook activation at the steps where the features
fired. Each recorded (sample, step) activation is encoded by the SAE at that step's timestep; the
feature's activation per token, shaped to the patch grid and upsampled, is overlaid on the image.
Video backbones (a (frames, rows, cols) grid) get a film strip instead: up to 8 latent frames (the
top token's frame always among them), each heat map over the decoded frame it lines up with; the
JSON ``heatmap`` is then one (rows x cols) map per latent frame, and captions name the top token's
(frame, row, col).
The regenerated activation at the top token is reported beside the captured one
(``value`` vs ``regenerated_value``): they agree up to the capture's storage precision.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tide.analysis.feature_stats import FeatureStats, load_feature_stats
from tide.analysis.labels import auto_label, load_labels
from tide.errors import TideError

SCHEMA = "tide.dashboard"
SCHEMA_VERSION = 1
JSON_FILE = "dashboard.json"
INDEX_FILE = "index.html"
FEATURES_DIR = "features"


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

    def __post_init__(self):
        if self.max_features < 1 or self.images_per_feature < 0 or self.neighbours < 0 or self.batch_size < 1:
            raise TideError("max_features and batch_size must be >= 1; images_per_feature and neighbours >= 0")


class Occurrence(NamedTuple):
    """One top-activating occurrence of a feature (a top-k slot of the statistics)."""

    feature: int
    sample_id: int
    step: int
    timestep: float
    token: int
    value: float


class Regenerated(NamedTuple):
    images: dict[int, torch.Tensor]
    """sample id -> (C, H, W) image in [0, 1]."""
    acts: dict[tuple[int, int], torch.Tensor]
    """(sample id, step index) -> (T, D) hook activation of the recorded CFG branch."""
    timesteps: dict[int, float]
    """step index -> scheduler timestep."""


# ---------------------------------------------------------------------- selection

def default_features(stats: FeatureStats, max_features: int) -> list[int]:
    """The ``max_features`` most frequent features that fired, most frequent first."""
    freq = stats.frequency
    alive = np.flatnonzero(freq > 0)
    order = alive[np.argsort(-freq[alive], kind="stable")]
    return [int(f) for f in order[:max_features]]


def top_occurrences(stats: FeatureStats, f: int, n: int) -> list[Occurrence]:
    """The feature's ``n`` largest activations in distinct samples."""
    out, seen = [], set()
    for k in range(stats.topk_value.shape[1]):
        s = int(stats.topk_sample[f, k])
        if s < 0 or s in seen or len(out) >= n:
            continue
        seen.add(s)
        out.append(Occurrence(f, s, int(stats.topk_step[f, k]), float(stats.topk_timestep[f, k]),
                              int(stats.topk_token[f, k]), float(stats.topk_value[f, k])))
    return out


def capture_sample(manifest: dict, backbone, sample_id: int) -> tuple[int, int]:
    """(condition, seed) of sample ``sample_id`` of a capture."""
    cfg = manifest.get("config", {})
    classes = cfg.get("classes")
    classes = list(range(backbone.num_conditions)) if classes is None else list(classes)
    return int(classes[sample_id % len(classes)]), int(cfg.get("seed", 0)) + sample_id


def regenerate(backbone, hook: str, manifest: dict, needs: dict[int, set[int]], branch: int = 0,
               batch_size: int = 64, progress: bool = False) -> Regenerated:
    """Regenerate the samples in ``needs`` (sample id -> step indices) in one batched sampling run,
    recording the ``hook`` activation of their ``branch`` rows (0 = conditional) at those steps."""
    from tide.hooks import current_step
    from tide.sampling import Intervention, SamplerConfig, sample

    ids = sorted(needs)
    cfg = manifest.get("config", {})
    conds, seeds = zip(*(capture_sample(manifest, backbone, i) for i in ids)) if ids else ((), ())
    acts: dict[tuple[int, int], torch.Tensor] = {}
    timesteps: dict[int, float] = {}
    all_steps = set().union(*needs.values()) if needs else set()

    def record(act_BTD, hook):
        ctx = current_step()
        if ctx is None or ctx.step_index not in all_steps:
            return None
        timesteps[ctx.step_index] = ctx.timestep
        for row in range(act_BTD.shape[0]):
            sid = int(ctx.sample_ids_B[row])
            if int(ctx.cfg_branch_B[row]) == branch and ctx.step_index in needs.get(sid, ()):
                acts[(sid, ctx.step_index)] = act_BTD[row].detach().float().cpu().clone()
        return None

    config = SamplerConfig(num_steps=int(cfg.get("num_steps", 50)), guidance_scale=cfg.get("guidance_scale", 1.0),
                           batch_size=batch_size)
    if not ids:
        return Regenerated({}, acts, timesteps)
    out = sample(backbone, list(conds), list(seeds), config, interventions=[Intervention(hook, record)],
                 progress=progress, sample_ids=ids)
    missing = [(s, t) for s in ids for t in needs[s] if (s, t) not in acts]
    if missing:
        raise TideError(f"regeneration recorded no activation at {missing[:4]} (sample, step): does the "
                        f"capture's CFG branch or schedule differ from its manifest?")
    return Regenerated({i: img for i, img in zip(ids, out.images)}, acts, timesteps)


# ---------------------------------------------------------------------- pictures

def _png_b64(array_HWC: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array_HWC).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fig_b64(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def overlay(image_CHW: torch.Tensor, heat_grid: np.ndarray, min_px: int = 160, alpha: float = 0.55):
    """(plain, overlaid) (H', W', 3) uint8 images: the heat map upsampled (bilinear) to the image,
    coloured with 'inferno' scaled to its own maximum, blended over the image; both enlarged
    (nearest) to at least ``min_px``."""
    from matplotlib import colormaps
    from PIL import Image

    from tide.images import to_uint8

    img = to_uint8(image_CHW[None])[0]
    h, w = img.shape[:2]
    heat = np.nan_to_num(np.asarray(heat_grid, dtype=np.float32))
    heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h), Image.BILINEAR))
    peak = heat.max()
    norm = heat / peak if peak > 0 else np.zeros_like(heat)
    colour = colormaps["inferno"](norm)[..., :3] * 255
    blend = ((1 - alpha) * img + alpha * colour).round().clip(0, 255).astype(np.uint8)
    scale = max(1, -(-min_px // max(h, w)))
    big = [a.repeat(scale, 0).repeat(scale, 1) for a in (img, blend)]
    return big[0], big[1]


def video_frames(num_latent: int, num_pixel: int, keep: int | None = None,
                 max_frames: int = 8) -> list[tuple[int, int]]:
    """(latent frame, pixel frame) pairs to show for a video: at most ``max_frames`` latent frames evenly
    spread (plus ``keep``, the frame of the top token), each with the decoded frame it lines up with
    (latent frame k <-> pixel frame k * (num_pixel - 1) / (num_latent - 1): Wan's causal VAE decodes
    latent frame 0 to frame 0 and each later one to the next ``temporal_scale`` frames)."""
    picked = set(np.linspace(0, num_latent - 1, min(max_frames, num_latent)).round().astype(int).tolist())
    if keep is not None:
        picked.add(int(keep))
    scale = (num_pixel - 1) / max(num_latent - 1, 1)
    return [(k, min(num_pixel - 1, round(k * scale))) for k in sorted(picked)]


def overlay_video(video_CFHW: torch.Tensor, heat_FRC: np.ndarray, min_px: int = 160, keep: int | None = None,
                  gap: int = 4):
    """(plain, overlaid) film strips of a video: :func:`overlay` of each shown latent frame's heat map
    on its decoded frame (see :func:`video_frames`), side by side with a white ``gap``."""
    pairs = video_frames(heat_FRC.shape[0], video_CFHW.shape[1], keep)
    frames = [overlay(video_CFHW[:, p], heat_FRC[k], min_px) for k, p in pairs]
    strips = []
    for which in (0, 1):
        tiles = [frames[0][which]]
        for f in frames[1:]:
            tiles += [np.full((f[which].shape[0], gap, 3), 255, np.uint8), f[which]]
        strips.append(np.concatenate(tiles, axis=1))
    return strips[0], strips[1]


def _heat_json(heat: np.ndarray) -> list:
    """A heat map as nested lists (rows of values; one such map per frame for video), 6 decimals."""
    if heat.ndim > 2:
        return [_heat_json(h) for h in heat]
    return [[round(float(v), 6) for v in row] for row in np.atleast_2d(heat)]


def _plots():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def profile_plot(stats: FeatureStats, f: int) -> str:
    plt = _plots()
    order = np.argsort(stats.steps, kind="stable")
    x = stats.steps[order]
    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    ax.plot(x, stats.frequency_step[order, f], marker="o", ms=3, color="tab:blue")
    ax.set_xlabel("step (0 = noisiest)")
    ax.set_ylabel("firing frequency", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(x, np.nan_to_num(stats.mean_act_step[order, f]), color="tab:orange", lw=1)
    ax2.set_ylabel("mean activation", color="tab:orange")
    ax.set_title("timestep profile", fontsize=9)
    fig.tight_layout()
    return _fig_b64(fig)


def class_plot(names: list[str], auroc: np.ndarray, class_mean: np.ndarray) -> str:
    plt = _plots()
    c = len(names)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * c + 1.5), 2.6))
    ax.bar(np.arange(c), np.nan_to_num(class_mean), color="tab:green")
    ax.set_ylabel("mean image activation")
    ax.set_xticks(np.arange(c), labels=[n[:14] for n in names], rotation=60, fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(np.arange(c), auroc, "o", color="black", ms=3)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("AUROC")
    ax.set_title("per class", fontsize=9)
    fig.tight_layout()
    return _fig_b64(fig)


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


# ---------------------------------------------------------------------- HTML

E = html.escape


def json_for_html(obj) -> str:
    """JSON safe inside a <script> element: <, > and & are written as \\u escapes."""
    return (json.dumps(obj, sort_keys=True).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left}th{cursor:pointer;background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}.imgs{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}figcaption{font-size:.8em;color:#555;max-width:22em}img{image-rendering:pixelated}
.plots img{image-rendering:auto}.muted{color:#777}"""

SORT_JS = """(function(){var t=document.getElementById('features'),b=t.tBodies[0],f=document.getElementById('filter');
var dir={};Array.prototype.forEach.call(t.tHead.rows[0].cells,function(th,i){th.addEventListener('click',function(){
var num=th.getAttribute('data-type')==='num';dir[i]=-(dir[i]||-1);var rows=Array.prototype.slice.call(b.rows);
rows.sort(function(x,y){var a=x.cells[i].getAttribute('data-v'),c=y.cells[i].getAttribute('data-v');
if(num){a=a===''?-Infinity:parseFloat(a);c=c===''?-Infinity:parseFloat(c);return dir[i]*(a-c);}
return dir[i]*a.localeCompare(c);});rows.forEach(function(r){b.appendChild(r);});});});
f.addEventListener('input',function(){var q=f.value.toLowerCase();Array.prototype.forEach.call(b.rows,function(r){
r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});})();"""


def _page(title: str, body: str, data: dict) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{E(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n"
            f'<script type="application/json" id="tide-data">{json_for_html(data)}</script>\n</body></html>\n')


def _fmt(x, spec=".4g") -> str:
    return "–" if x is None else format(x, spec)


def index_html(meta: dict, records: list[dict]) -> str:
    rows = []
    for r in records:
        top = "–" if r["top_class"] is None else f"{E(r['top_class'])} ({_fmt(r['top_auroc'], '.2f')})"
        rows.append(
            f'<tr><td class="n" data-v="{r["id"]}"><a href="{E(r["page"])}">{r["id"]}</a></td>'
            f'<td data-v="{E(r["label"])}">{E(r["label"])}</td>'
            f'<td class="n" data-v="{r["frequency"]:.6g}">{r["frequency"]:.4f}</td>'
            f'<td data-v="{E(r["top_class"] or "")}">{top}</td>'
            f'<td class="n" data-v="{"" if r["top_auroc"] is None else format(r["top_auroc"], ".6g")}">{_fmt(r["top_auroc"], ".3f")}</td>'
            f'<td class="n" data-v="{"" if r["peak_timestep"] is None else format(r["peak_timestep"], "g")}">'
            f'{_fmt(r["peak_timestep"], "g")} (step {_fmt(r["peak_step"], "d")})</td></tr>')
    body = (f"<h1>SAE features</h1><p class=muted>hook {E(meta['hook'])} · SAE {E(meta['sae_path'])} · "
            f"dataset {E(meta['dataset_path'])} · {len(records)} of {meta['num_features']} features</p>"
            '<p><input id="filter" type="search" placeholder="filter (id, label, class)" size="40"></p>'
            '<table id="features"><thead><tr><th data-type="num">feature</th><th>label</th>'
            '<th data-type="num">frequency</th><th>top class (AUROC)</th><th data-type="num">AUROC</th>'
            '<th data-type="num">peak timestep</th></tr></thead><tbody>\n' + "\n".join(rows) +
            f"\n</tbody></table><script>{SORT_JS}</script>")
    return _page("SAE features", body, {"meta": meta, "features": [
        {k: r[k] for k in ("id", "label", "frequency", "top_class", "top_auroc", "peak_timestep")} for r in records]})


def _where(token: int, grid: list[int]) -> str:
    """`` (frame f, row r, col c)`` for a video token; empty for images (their grid is small and square)."""
    if len(grid) != 3:
        return ""
    f, r, c = (int(x) for x in np.unravel_index(int(token), tuple(grid)))
    return f" (frame {f}, row {r}, col {c})"


def feature_html(meta: dict, r: dict, pictures: dict) -> str:
    names = meta["condition_names"]
    figs = []
    for im, pics in zip(r["images"], pictures["images"]):
        cap = (f"sample {im['sample_id']} · {E(im['cond_name'])} · seed {im['seed']} · step {im['step']} "
               f"(t={_fmt(im['timestep'], 'g')}) · token {im['token']}{_where(im['token'], meta['patch_grid'])} "
               f"· activation {_fmt(im['value'])} "
               f"(regenerated {_fmt(im['regenerated_value'])})")
        figs.append(f'<figure><img alt="sample {im["sample_id"]}" src="data:image/png;base64,{pics[0]}"> '
                    f'<img alt="activation overlay" src="data:image/png;base64,{pics[1]}">'
                    f"<figcaption>{cap}</figcaption></figure>")
    neigh = "".join(
        f'<li><a href="f{n["id"]}.html">feature {n["id"]}</a> (cos {n["cosine"]:.3f})</li>' if n["shown"] else
        f'<li>feature {n["id"]} <span class=muted>(not in this dashboard)</span> (cos {n["cosine"]:.3f})</li>'
        for n in r["neighbours"])
    auroc_rows = "".join(f"<tr><td>{E(n)}</td><td class=n>{_fmt(a, '.3f')}</td><td class=n>{_fmt(m)}</td></tr>"
                         for n, a, m in zip(names, r["auroc"], r["class_mean_act"]))
    user = f' <span class=muted>(automatic: {E(r["auto_label"])})</span>' if r["user_label"] is not None else ""
    body = (f'<p><a href="../{INDEX_FILE}">← all features</a></p><h1>Feature {r["id"]}: {E(r["label"])}</h1>'
            f"<p>{user}frequency {r['frequency']:.4f} · mean activation {_fmt(r['mean_act'])} · when firing "
            f"{_fmt(r['mean_act_firing'])} · peak at step {_fmt(r['peak_step'], 'd')} (t={_fmt(r['peak_timestep'], 'g')})</p>"
            f"<h2>Top-activating images</h2><div class=imgs>{''.join(figs) or '<p class=muted>none</p>'}</div>"
            f'<h2>Timestep profile and classes</h2><div class="imgs plots"><img alt="timestep profile" '
            f'src="data:image/png;base64,{pictures["profile"]}"><img alt="per class" '
            f'src="data:image/png;base64,{pictures["classes"]}"></div>'
            f"<table><thead><tr><th>class</th><th>AUROC</th><th>mean image activation</th></tr></thead>"
            f"<tbody>{auroc_rows}</tbody></table>"
            f"<h2>Nearest decoder directions</h2><ul>{neigh or '<li class=muted>none</li>'}</ul>")
    return _page(f"Feature {r['id']}", body, r)


# ---------------------------------------------------------------------- the job

def export_dashboard(config: DashboardConfig, backbone=None) -> Path:
    """Write the dashboard to ``config.out``; returns the path of its ``index.html``."""
    from tide.data import ActivationStore
    from tide.models.loading import load_backbone
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
    manifest = ActivationStore(data_path).manifest
    if stats.attrs.get("manifest_sha256") and ActivationStore(data_path).manifest_sha256 != stats.attrs["manifest_sha256"]:
        raise TideError(f"the dataset at {data_path} is not the one the statistics were computed on (manifest differs)")
    F = stats.num_features
    labels = load_labels(config.labels, F) if config.labels else {}
    if config.features is None:
        features = default_features(stats, config.max_features)
    else:
        features = list(dict.fromkeys(int(f) for f in config.features))
        bad = [f for f in features if not 0 <= f < F]
        if bad:
            raise TideError(f"features {bad} are out of range: the SAE has {F} features (0..{F - 1})")
    names = stats.condition_names or [str(c) for c in range(stats.auroc.shape[0])]

    occ = {f: top_occurrences(stats, f, config.images_per_feature) for f in features}
    needs: dict[int, set[int]] = {}
    for f in features:
        for o in occ[f]:
            needs.setdefault(o.sample_id, set()).add(o.step)
    regen = Regenerated({}, {}, {})
    if needs:
        cfgm = manifest.get("config", {})
        if backbone is None:
            spec = config.backbone or cfgm.get("backbone")
            if not spec:
                raise TideError(f"the manifest of {data_path} names no backbone: pass backbone=")
            backbone = load_backbone(spec, prompts=cfgm.get("prompts"), device=config.device,
                                     dtype=cfgm.get("dtype", "float32"))
        for s in needs:
            cond, _ = capture_sample(manifest, backbone, s)
            if 0 <= stats.sample_cond[s] != cond:
                raise TideError(f"sample {s} has condition {stats.sample_cond[s]} in the statistics but {cond} from the "
                                "manifest's classes: the manifest does not describe this capture")
        branch = 1 if stats.attrs.get("cfg_branch") == 1 else 0
        regen = regenerate(backbone, stats.hook, manifest, needs, branch, config.batch_size, config.progress)

    # encode each recorded (sample, step) once, keeping the columns of the features that need it
    heat: dict[tuple[int, int, int], np.ndarray] = {}
    sae.eval()
    with torch.no_grad():
        for (s, step), x_TD in regen.acts.items():
            t = torch.full((x_TD.shape[0],), regen.timesteps[step], dtype=torch.float32)
            z_TF = sae.encode(x_TD.to(next(sae.parameters()).device), t.to(next(sae.parameters()).device)).cpu()
            for f in features:
                if any(o.sample_id == s and o.step == step for o in occ[f]):
                    heat[(f, s, step)] = z_TF[:, f].numpy().reshape(stats.patch_grid)

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
            r["images"].append({"sample_id": o.sample_id, "cond": cond, "cond_name": names[cond] if cond < len(names) else str(cond),
                                "seed": seed, "step": o.step, "timestep": _num(o.timestep), "token": o.token,
                                "value": o.value, "regenerated_value": float(h.reshape(-1)[o.token]),
                                "heatmap": _heat_json(h)})
            if h.ndim == 3:  # video: a strip of frames, the top token's frame among them
                frame = int(np.unravel_index(o.token, h.shape)[0])
                plain, over = overlay_video(regen.images[o.sample_id], h, config.image_px, keep=frame)
            else:
                plain, over = overlay(regen.images[o.sample_id], np.atleast_2d(h), config.image_px)
            pics["images"].append((_png_b64(plain), _png_b64(over)))
        records.append(r)
        pictures[f] = pics

    cfgm = manifest.get("config", {})
    meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tide_version": stats.attrs.get("tide_version"),
            "hook": stats.hook, "stats_path": str(config.stats), "sae_path": str(sae_path), "dataset_path": str(data_path),
            "backbone": config.backbone or cfgm.get("backbone"), "num_steps": cfgm.get("num_steps"),
            "guidance_scale": cfgm.get("guidance_scale"), "cfg_branch": stats.attrs.get("cfg_branch"),
            "num_features": F, "condition_names": names, "patch_grid": list(stats.patch_grid),
            "steps": [int(s) for s in stats.steps], "timesteps": [_num(t) for t in stats.timesteps]}

    out = Path(config.out)
    (out / FEATURES_DIR).mkdir(parents=True, exist_ok=True)
    for r in records:
        (out / r["page"]).write_text(feature_html(meta, r, pictures[r["id"]]), encoding="utf-8")
    (out / INDEX_FILE).write_text(index_html(meta, records), encoding="utf-8")
    (out / JSON_FILE).write_text(json.dumps({**meta, "features": records}, indent=1, sort_keys=True), encoding="utf-8")
    return out / INDEX_FILE

