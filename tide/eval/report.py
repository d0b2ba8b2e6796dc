"""`tide eval`: reconstruction per timestep and spliced fidelity of one SAE, written to a directory.

:func:`evaluate` loads the SAE, the activation dataset it is evaluated on and the backbone the
dataset was captured from (named in its manifest), then writes into ``out``:

* ``eval.json`` — the config, the SAE's config, reconstruction metrics (overall, per timestep
  bucket, per timestep), the denoiser error per step with its mean-ablation baseline, the spliced
  samples' scores, and wall times;
* ``eval.png`` — FVU against timestep, and the denoiser's relative error against timestep with
  the mean-ablation baseline;
* ``eval_samples.png`` — clean and spliced samples from the same noise, one pair of rows per condition
  (the condition's name labels the clean row, ``+ SAE`` the spliced one).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tide.config import BackboneConfig, GenerationConfig, save_yaml, to_dict
from tide.errors import TideError
from tide.io import check_writable_dir, staged_outputs

if TYPE_CHECKING:  # imported on use: the splice loads the backbones
    from tide.eval.metrics import ReconstructionMetrics
    from tide.eval.splice import DenoiserError, SplicedSamples

EVAL_JSON = "eval.json"
EVAL_PLOT = "eval.png"
EVAL_SAMPLES = "eval_samples.png"
EVAL_CONFIG = "eval_config.yaml"
EVAL_FILES = (EVAL_CONFIG, EVAL_JSON, EVAL_PLOT, EVAL_SAMPLES)
"""Every file `tide eval` writes into its output directory."""
MAX_GRID_COLUMNS = 8
"""Samples per condition shown in ``eval_samples.png``."""


@dataclass
class EvalConfig(GenerationConfig, BackboneConfig):
    """`tide eval`: how well an SAE reconstructs its hook, per timestep, and with it spliced into generation."""

    backbone: str | None = None
    """Backbone to splice the SAE into; default: the one named in the dataset's manifest."""
    dtype: str | None = None
    """Weight dtype of the backbone; default: the capture's."""
    num_steps: int | None = None
    """Denoising steps of the spliced generations; default: the capture's."""
    guidance_scale: float | None = None
    """Guidance scale of the spliced generations; default: the capture's."""
    sae: str = "runs/sae/tide"
    """SAE directory (cfg.json + sae.safetensors), e.g. one SAE under `tide train`'s output directory."""
    data: str = "runs/capture"
    """Activation dataset directory (written by `tide capture`) to measure reconstruction on."""
    out: str = "runs/eval"
    """Output directory for eval.json, eval.png and eval_samples.png."""
    hook: str | None = None
    """Hook to evaluate; default: the one the SAE was trained on (an SAE of another hook is refused)."""
    buckets: list[float] | None = None
    """Timestep bucket edges, e.g. 0,200,400,600,800,1000; default: 5 equal ranges over [0, the SAE's t_max]."""
    max_rows: int | None = None
    """Rows of the dataset to measure reconstruction on (a subset shuffled with `seed`); None = every row."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of rows counts as dense."""
    batch_size: int = 4096
    """Rows per SAE batch while measuring reconstruction."""
    splice_samples: int = 4
    """Samples per condition generated with and without the SAE spliced in (0 skips the splice measurements)."""
    overwrite: bool = False
    """Replace an evaluation already in --out (eval.json, eval.png, eval_samples.png, eval_config.yaml)."""

    def validate(self) -> "EvalConfig":
        if self.max_rows is not None and self.max_rows < 1:
            raise TideError(f"max_rows must be >= 1 (or empty for every row), got {self.max_rows}")
        if self.splice_samples < 0:
            raise TideError(f"splice_samples must be >= 0, got {self.splice_samples}")
        if self.num_steps is not None and self.num_steps < 1:
            raise TideError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.batch_size < 1:
            raise TideError(f"batch_size must be >= 1, got {self.batch_size}")
        return self

    def check_out(self) -> Path:
        """The output directory, refused (one line) when it is a file, cannot be written, or already holds an
        evaluation without ``overwrite``; creates nothing."""
        out = check_writable_dir(self.out)
        found = [name for name in EVAL_FILES if (out / name).exists() or (out / name).is_symlink()]
        if found and not self.overwrite:
            raise TideError(f"{out} already holds an evaluation ({', '.join(found)}): pass --overwrite to replace "
                            "it, or choose another --out")
        return out


def _real_images(backbone, classifier) -> tuple[torch.Tensor | None, str | None]:
    """Real test images for the Fréchet distance to data, when the backbone names a dataset tide can read."""
    dataset = str((getattr(backbone, "meta", None) or {}).get("dataset", ""))
    if classifier is None:
        return None, "no evaluation classifier"
    if not dataset.startswith("Fashion-MNIST"):
        return None, f"no readable real dataset for backbone {backbone.name!r}"
    from tide.eval.fashion_mnist import load_fashion_mnist

    try:
        images, _ = load_fashion_mnist("test")
    except TideError as exc:
        return None, str(exc)
    return torch.from_numpy(images).float().div(255).unsqueeze(1), None


@dataclass(frozen=True)
class EvalResult:
    """What `tide eval` measured: the typed measurements, and eval.json's dict (``report``) as written."""

    out: Path
    """Directory holding eval.json, eval.png (and eval_samples.png with the splice)."""
    reconstruction: "ReconstructionMetrics"
    """Per-bucket and per-timestep reconstruction metrics."""
    denoiser_error: "DenoiserError | None"
    """Denoiser error with the SAE spliced in along clean trajectories (None without the splice)."""
    spliced_samples: "SplicedSamples | None"
    """Generations with the SAE in the loop against clean ones (None without the splice)."""
    report: dict
    """eval.json's content."""

    @property
    def fvu(self) -> float:
        """Overall fraction of variance unexplained."""
        return float(self.reconstruction.overall.fvu)


def plot_eval(result: dict, path: str | Path) -> Path:
    """FVU against timestep (per timestep and per bucket) and the denoiser error against timestep."""
    from tide.plots import finite_or_nan, new_figure, save_figure

    rec = result["reconstruction"]
    den = result.get("denoiser_error")
    fig, axes = new_figure((11 if den else 5.5, 4), ncols=2 if den else 1, squeeze=False)
    ax = axes[0, 0]
    curve = rec["per_timestep"]
    t = np.array(curve["timestep"], dtype=float)
    fvu = finite_or_nan(curve["fvu"])
    ax.plot(t, fvu, marker=".", lw=1.2, label="per timestep")
    for b in rec["buckets"]:
        if b["rows"] and b["fvu"] is not None:
            ax.hlines(b["fvu"], b["t_lo"], b["t_hi"], colors="tab:orange", lw=2.5, alpha=0.7)
    ax.plot([], [], color="tab:orange", lw=2.5, alpha=0.7, label="per bucket")
    ax.set_xlabel("timestep (0 = clean)")
    ax.set_ylabel("FVU (1 - explained variance)")
    ax.set_title(f"reconstruction at {rec['hook']}: FVU {rec['overall']['fvu']:.3g}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if den:
        ax = axes[0, 1]
        steps = den["per_step"]
        t = np.array(steps["timestep"], dtype=float)
        err = finite_or_nan(steps["relative_error"])
        abl = finite_or_nan(steps["ablation_error"])
        ax.plot(t, err, marker=".", lw=1.2, label="SAE spliced")
        ax.plot(t, abl, marker=".", lw=1.2, ls="--", color="grey", label=f"mean ablation ({den['ablation']} mean)")
        ax.set_yscale("log")
        ax.set_xlabel("timestep (0 = clean)")
        ax.set_ylabel("||eps_spliced - eps|| / ||eps||")
        ax.set_title(f"denoiser error, {den['samples']} samples: mean {den['mean_relative_error']:.3g} "
                     f"(ablation {den['mean_ablation_error']:.3g})", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def evaluate(config: EvalConfig, backbone=None, sae=None, progress: bool = True) -> EvalResult:
    """Measure one SAE (reconstruction per timestep, denoiser error, spliced samples); writes eval.json and the
    plots and returns the typed measurements with eval.json's dict.

    ``backbone`` / ``sae`` may be passed already loaded (notebooks, tests); otherwise they are loaded
    from ``config.backbone`` (default: the dataset manifest's) and ``config.sae``.
    """
    from tide.data import ActivationStore
    from tide.device import resolve_device
    from tide.eval.classifier import load_classifier
    from tide.eval.metrics import check_sae_hook, reconstruction_metrics
    from tide.eval.splice import denoiser_error, spliced_samples
    from tide.images import save_grid
    from tide.models.loading import load_captured_backbone
    from tide.sae import load_sae
    from tide.sampling import SamplerConfig

    config.validate()
    out = config.check_out()  # before anything is loaded; every file is written at the end, together
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    device = resolve_device(config.device) if backbone is None else backbone.device
    grid = None

    if sae is None:
        sae_dir = Path(config.sae)
        inside = sorted(p.parent.name for p in sae_dir.glob("*/cfg.json")) if sae_dir.is_dir() else []
        if inside and not (sae_dir / "cfg.json").exists():
            raise TideError(f"{sae_dir} holds several SAEs ({', '.join(inside)}): pass one of them, "
                            f"e.g. --sae {sae_dir / inside[0]}")
        sae = load_sae(sae_dir, device=device)
    sae = sae.to(device)
    store = ActivationStore(config.data)
    hook = config.hook or sae.cfg.hook or None
    if hook is None:
        if len(store.hooks) != 1:
            raise TideError(f"the SAE names no hook and {store.path} holds several ({list(store.hooks)}): "
                            "give --hook")
        hook = next(iter(store.hooks))
    check_sae_hook(sae, hook)
    store.check_hooks([hook])

    # 1. reconstruction
    t0 = time.perf_counter()
    metrics = reconstruction_metrics(sae, store, hook, buckets=config.buckets, max_rows=config.max_rows,
                                     dense_threshold=config.dense_threshold, batch_size=config.batch_size,
                                     seed=config.seed, device=device)
    times["reconstruction"] = round(time.perf_counter() - t0, 2)
    if progress:
        print(f"[eval] reconstruction at {hook} on {metrics.rows:,} rows: FVU {metrics.overall.fvu:.4f}, "
              f"L0 {metrics.overall.l0:.1f}, dead {metrics.overall.dead_fraction:.3f}", flush=True)

    result: dict = {
        "config": to_dict(config),
        "sae": {"path": str(config.sae), "config": dataclasses.asdict(sae.cfg)},
        "dataset": {"path": str(store.path), "rows": store.rows, "hook": hook,
                    "backbone": store.manifest.get("backbone", {}).get("name")},
        "reconstruction": metrics.to_dict(),
    }

    # 2. splice into the backbone the data came from
    err = spl = None
    if config.splice_samples > 0:
        captured = store.manifest.get("config", {}) or {}
        if backbone is None:
            backbone = load_captured_backbone(store.manifest, store.path, config.backbone, config.prompts, config.dtype,
                                              device)
        else:
            expected = store.manifest.get("backbone_hash")
            if expected and backbone.identity_hash() != expected:
                raise TideError(f"backbone {backbone.name!r} is not the model {store.path} was captured from (its "
                                "weights differ): pass the capture's backbone with --backbone")
        sampler = SamplerConfig(
            num_steps=int(config.num_steps or captured.get("num_steps") or 50),
            guidance_scale=config.guidance_scale if config.guidance_scale is not None
            else captured.get("guidance_scale", 1.0))
        n_cond = backbone.num_conditions
        conds = [c for c in range(n_cond) for _ in range(config.splice_samples)]
        seeds = [config.seed + i for i in range(len(conds))]
        result["sampler"] = {**to_dict(sampler), "conditions": n_cond, "samples": len(conds),
                             "seeds": f"{config.seed}..{config.seed + len(conds) - 1}"}

        t0 = time.perf_counter()
        err = denoiser_error(backbone, sae, hook, conds, seeds, sampler, ablation_stats=store.stats(hook),
                             progress=progress)
        times["denoiser_error"] = round(time.perf_counter() - t0, 2)
        result["denoiser_error"] = err.to_dict()
        if progress:
            print(f"[eval] denoiser error with the SAE spliced in: mean {err.to_dict()['mean_relative_error']:.4f} "
                  f"(mean ablation {err.to_dict()['mean_ablation_error']:.4f})", flush=True)

        try:
            classifier, clf_note = load_classifier(backbone, device=device), None
        except TideError as exc:
            classifier, clf_note = None, str(exc)
        real, real_note = _real_images(backbone, classifier)
        t0 = time.perf_counter()
        spl = spliced_samples(backbone, sae, hook, conds, seeds, sampler, classifier=classifier, real_images=real,
                              progress=progress)
        times["spliced_samples"] = round(time.perf_counter() - t0, 2)
        result["spliced_samples"] = {**spl.to_dict(), "classifier_note": clf_note, "real_images_note": real_note}
        if progress:
            scores = spl.classifier or {}
            extra = "".join(f", {k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))
            print(f"[eval] spliced samples: pixel MSE {spl.pixel_mse:.5f}{extra}", flush=True)

        cols = min(config.splice_samples, MAX_GRID_COLUMNS)
        pick = [c * config.splice_samples + j for c in range(n_cond) for j in range(cols)]
        pairs = torch.cat([torch.stack([spl.clean.images[i] for i in pick[c * cols:(c + 1) * cols]]
                                       + [spl.spliced.images[i] for i in pick[c * cols:(c + 1) * cols]])
                           for c in range(n_cond)])
        names = backbone.condition_names
        labels = [label for c in range(n_cond) for label in (names[c][:12], "+ SAE")]  # short: narrow grids clip
        grid = (pairs, cols, labels)
        result["samples_grid"] = EVAL_SAMPLES

    times["total"] = round(time.perf_counter() - t_start, 2)
    result["wall_time_s"] = times
    result["plot"] = EVAL_PLOT
    with staged_outputs() as stage:  # all or nothing: an error leaves the old evaluation as it was
        save_yaml(config, stage(out / EVAL_CONFIG))
        if grid is not None:
            save_grid(grid[0], stage(out / EVAL_SAMPLES), nrow=grid[1], row_labels=grid[2])
        plot_eval(result, stage(out / EVAL_PLOT))
        stage(out / EVAL_JSON).write_text(json.dumps(result, indent=1) + "\n")
    if grid is None:  # an older evaluation's samples do not belong to this one
        (out / EVAL_SAMPLES).unlink(missing_ok=True)
    if progress:
        print(f"[eval] wrote {out / EVAL_JSON} and {out / EVAL_PLOT}", flush=True)
    return EvalResult(out, metrics, err, spl, result)
