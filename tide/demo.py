"""`tide demo`: the whole pipeline end to end on an embedded model (default fmnist-pixart), into one run directory.

Stages: load the embedded model, list its hooks, sample a grid of its ten class conditions with
classifier-free guidance, score the samples with the evaluation classifier, capture the
residual stream before and after the middle block at every denoising step into an HDF5 dataset
(verified and summarised), train a TIDE and a plain SAE on it in one pass with the faithful recipe
(configs/faithful.yaml, scaled down: the block's update as the target, each dimension standardised),
evaluate both (per-timestep FVU, and spliced into generation at every step: classifier agreement),
map the TIDE SAE's features in one streaming pass, export a static dashboard, and steer null-condition
generations toward every class by patching the features of an SAE on the residual stream itself.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tide.config import BackboneConfig, GenerationConfig, save_yaml, to_dict
from tide.errors import TideError
from tide.io import atomic_write_bytes, check_writable_dir, staged_outputs
from tide.sampling import SamplerConfig


@dataclass
class DemoConfig(GenerationConfig, BackboneConfig):
    """`tide demo`: every stage on a small scale."""

    num_steps: int = 20
    """Denoising steps of every stage (fmnist-pixart's DPM-Solver needs 20)."""
    guidance_scale: float | None = 3.0
    """Classifier-free guidance scale of the demo samples (the capture runs at the model's default: 3 for fmnist-pixart, 1 for fmnist-dit)."""
    out: str = "runs/demo"
    """Run directory; every artefact goes under it."""
    n_per_class: int = 8
    """Samples per class in the demo grid."""
    capture_samples: int = 80
    """Samples whose activations the demo captures (at every step, every token)."""
    capture_hooks: list[str] | None = None
    """Hooks the demo captures; default: the residual stream before and after the middle block (its update is what
    the demo's SAEs read). The SAEs read the last hook given (its block's update when its resid_pre is captured too)."""
    train_steps: int = 600
    """Training steps of the demo's SAEs (a TIDE and a plain TopK SAE, trained together)."""
    d_sae: int = 1024
    """Dictionary size of the demo's SAEs."""
    k: int = 32
    """Active latents per row of the demo's SAEs."""
    splice_samples: int = 5
    """Samples per class generated with each SAE spliced in at every step (0 skips it)."""
    dashboard_features: int = 0
    """Features of the TIDE SAE shown in the demo's atlas (the most frequent ones); 0 = every firing feature."""
    dashboard_effects: int = 24
    """Features of the atlas given causal strips (added / removed; the most frequent ones), 6 generations each."""
    steer_samples: int = 8
    """Null-condition generations steered toward each class in the demo's steering grid."""
    steer_strength: float = 0.5
    """Strength of the demo's feature patch. The demo's small, briefly trained SAE overshoots at 1 (over-bright
    images): on seeds 70000.. (8 per class) the classifier said the target in 81% at 0.5, 79% at 0.75 and 66% at 1;
    the full-size SAE of configs/steering.yaml does best at 1 (experiments/results/steering_bench.md)."""
    overwrite: bool = False
    """Run into an --out that already holds a demo, replacing its artefacts."""

    def validate(self) -> "DemoConfig":
        """Refuse (one line) sizes that cannot run; called before anything is loaded or written."""
        if self.dashboard_features < 0 or self.dashboard_effects < 0:
            raise TideError("dashboard_features and dashboard_effects must be >= 0 (0 features = every firing one)")
        for name in ("num_steps", "n_per_class", "capture_samples", "train_steps", "d_sae", "k", "steer_samples"):
            if getattr(self, name) < 1:
                raise TideError(f"{name} must be >= 1, got {getattr(self, name)}: pass --{name.replace('_', '-')} 1 "
                                "or more")
        if self.splice_samples < 0:
            raise TideError(f"splice_samples must be >= 0, got {self.splice_samples}: pass --splice-samples 0 or more")
        if self.k > self.d_sae:
            raise TideError(f"k ({self.k}) must not exceed d_sae ({self.d_sae}): lower --k or raise --d-sae")
        return self

    def check_out(self) -> Path:
        """The run directory, refused (one line) when it is a file, cannot be written, or already holds a demo's
        artefacts without ``overwrite``; creates nothing."""
        out = check_writable_dir(self.out)
        found = [name for name in DEMO_ARTEFACTS if (out / name).exists() or (out / name).is_symlink()]
        if found and not self.overwrite:
            raise TideError(f"{out} already holds a demo ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): "
                            "pass --overwrite to replace it, or choose another --out")
        return out


DEMO_ARTEFACTS = ("demo_config.yaml", "hooks.json", "samples.png", "activations", "sae", "eval", "feature_stats.h5",
                  "dashboard", "steering.png", "summary.json")
"""What `tide demo` writes under its run directory."""


def run_demo(config: DemoConfig) -> dict:
    from tide.hooks import HookedBackbone
    from tide.sampling import GenerateConfig, generate_grid

    # validate everything before the first file is written
    config.validate()
    out = config.check_out()
    backbone = config.load_backbone()
    hooked = HookedBackbone.of(backbone)
    if config.capture_hooks:
        hooked.check_hook_names(config.capture_hooks)
    shapes = hooked.hook_shapes()

    out.mkdir(parents=True, exist_ok=True)
    with staged_outputs() as stage:
        save_yaml(config, stage(out / "demo_config.yaml"))
        stage(out / "hooks.json").write_text(json.dumps({k: list(v) for k, v in shapes.items()}, indent=1))
    artefacts: dict[str, str] = {"config": str(out / "demo_config.yaml")}
    summary: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                 "threads": torch.get_num_threads()}}

    # 1. backbone + hooks
    summary["backbone"] = backbone.describe()
    artefacts["hooks"] = str(out / "hooks.json")
    print(f"[demo] backbone {backbone.name}: {len(hooked.block_specs)} blocks, {len(shapes)} hooks "
          f"-> {out / 'hooks.json'}")

    # 2. samples
    gen = GenerateConfig(backbone=config.backbone, device=config.device, dtype=config.dtype, n=config.n_per_class, seed=config.seed,
                         num_steps=config.num_steps, guidance_scale=config.guidance_scale,
                         out=str(out / "samples.png"),
                         **({"overwrite": True} if "overwrite" in GenerateConfig.__dataclass_fields__ else {}))
    start = time.perf_counter()
    samples, grid = generate_grid(gen, backbone)
    seconds = time.perf_counter() - start
    summary["sampling"] = {"config": to_dict(gen), "num_samples": len(samples.images), "seconds": round(seconds, 2)}
    artefacts["samples"] = str(grid)
    print(f"[demo] {len(samples.images)} samples in {seconds:.1f} s -> {grid}")

    # 3. evaluation classifier agreement
    try:
        from tide.eval.classifier import load_classifier

        classifier = load_classifier(backbone)
    except TideError as exc:
        classifier = None
        print(f"[demo] no evaluation classifier: {exc}")
    else:
        pred = classifier.predict(samples.images)
        agreement = (pred.cpu() == samples.conds).float().mean().item()
        summary["sampling"]["classifier_agreement"] = round(agreement, 4)
        print(f"[demo] evaluation classifier agrees with the requested class on {agreement:.1%} of samples")

    # 4. capture activations at every timestep, then verify and summarise the dataset
    from tide.capture import CaptureConfig, capture
    from tide.data import ActivationStore

    mid = hooked.default_hook()
    hooks = config.capture_hooks or [mid.replace("resid_post", "resid_pre"), mid]
    cap = CaptureConfig(backbone=config.backbone, device=config.device, dtype=config.dtype, out=str(out / "activations"),
                        hooks=hooks, num_samples=config.capture_samples, num_steps=config.num_steps,
                        cfg_branch="both" if backbone.uses_cfg(backbone.default_guidance_scale) else "cond",
                        seed=config.seed, overwrite=True)
    start = time.perf_counter()
    manifest = capture(cap, backbone).manifest
    seconds = time.perf_counter() - start
    store = ActivationStore(cap.out)
    store.verify().raise_if_bad()
    info = store.format_info()
    summary["capture"] = {"config": to_dict(cap), "rows": manifest["total_rows"], "shards": len(manifest["shards"]),
                          "seconds": round(seconds, 2), "info": store.info()}
    artefacts["activations"] = cap.out
    print(f"[demo] captured {manifest['total_rows']:,} rows in {seconds:.1f} s -> {cap.out} (verified)")
    print("\n".join("[demo]   " + line for line in info.splitlines()))

    # 5. train a TIDE and a plain SAE in one pass, then evaluate both on the captured data
    from tide.eval.report import EvalConfig, evaluate
    from tide.train import SAESpec, TrainConfig, train

    hook = hooks[-1]
    pre = hook.replace("resid_post", "resid_pre")
    target = "update" if pre != hook and pre in manifest["hooks"] else "activation"
    specs = [SAESpec(name=name, hook=hook, d_sae=config.d_sae, k=config.k, conditioning=cond, target=target,
                     normalization="per_dimension")
             for name, cond in (("tide", "tide"), ("plain", "none"))]
    # steering reads what a prompt does to the whole residual stream, so it gets an SAE of the activation itself
    # (configs/steering.yaml); trained in the same pass
    steer_spec = SAESpec(name="steer", hook=hook, d_sae=config.d_sae, k=config.k, conditioning="tide",
                         target="activation", normalization="global")
    run = TrainConfig(data=cap.out, out=str(out / "sae"), saes=specs + [steer_spec], steps=config.train_steps,
                      batch_size=2048,
                      lr=1e-3, warmup_steps=min(50, config.train_steps // 5), checkpoint_every=0, overwrite=True,
                      device=config.device, seed=config.seed)
    trained = train(run)
    summary["train"] = {"steps": trained.steps, "seconds": round(trained.seconds, 1), "final": trained.final}
    print(f"[demo] trained {', '.join(trained.saes)} for {trained.steps} steps in {trained.seconds:.0f} s "
          f"-> {run.out}")
    summary["eval"] = {}
    for spec in specs:
        result = evaluate(EvalConfig(sae=str(out / "sae" / spec.name), data=cap.out, out=str(out / "eval" / spec.name),
                                     splice_samples=config.splice_samples, device=config.device, seed=config.seed,
                                     overwrite=True),  # the run directory was checked above
                          backbone=backbone, progress=False)
        rec = result.report["reconstruction"]["overall"]
        summary["eval"][spec.name] = result.report
        artefacts[f"eval_{spec.name}"] = str(out / "eval" / spec.name)
        clf = (result.report.get("spliced_samples") or {}).get("classifier") or {}
        spliced = ""
        if "agreement_spliced" in clf:
            spliced = (f"; spliced at every step, the classifier agrees with the requested class on "
                       f"{clf['agreement_spliced']:.0%} of samples (clean {clf['agreement_clean']:.0%})")
        print(f"[demo] {spec.name} SAE on the {target} at {hook}: FVU {rec['fvu']:.3f}, L0 {rec['l0']:.1f}, "
              f"dead {rec['dead_fraction']:.1%}{spliced} -> {out / 'eval' / spec.name / 'eval.png'}")
    artefacts["sae"] = run.out

    # 6. feature statistics of the TIDE SAE, then a static dashboard
    from tide.analysis import compute_feature_stats, save_feature_stats
    from tide.analysis.dashboard import DashboardConfig, export_dashboard

    start = time.perf_counter()
    stats = compute_feature_stats(str(out / "sae" / "tide"), cap.out, device=backbone.device, progress=False)
    stats_path = save_feature_stats(stats, out / "feature_stats.h5")
    seconds = time.perf_counter() - start
    alive = int((stats.frequency > 0).sum())
    summary["feature_stats"] = {"path": str(stats_path), "rows": int(stats.rows), "alive_features": alive,
                                "seconds": round(seconds, 2)}
    artefacts["feature_stats"] = str(stats_path)
    print(f"[demo] feature statistics of {alive} firing features over {stats.rows:,} rows in {seconds:.1f} s "
          f"-> {stats_path}")
    dashboard = export_dashboard(DashboardConfig(stats=str(stats_path), out=str(out / "dashboard"),
                                                 max_features=config.dashboard_features,
                                                 effect_features=config.dashboard_effects,
                                                 device=config.device, progress=False, overwrite=True),
                                 backbone=backbone)
    artefacts["dashboard"] = str(dashboard.index_path)
    summary["dashboard"] = {"features": dashboard.num_features, "images": dashboard.num_images,
                            "samples": dashboard.num_samples, "causal_strips": dashboard.num_effects,
                            "megabytes": round(dashboard.bytes / 1e6, 2),
                            "seconds": {k: round(v, 2) for k, v in dashboard.seconds.items()}}
    print(f"[demo] feature atlas of {dashboard.num_features} features ({dashboard.num_images} top images from "
          f"{dashboard.num_samples} regenerated samples, causal strips for {dashboard.num_effects}) in "
          f"{dashboard.seconds['total']:.1f} s -> open {dashboard.index_path}")

    # 7. steering: null-condition generations steered toward each class by patching the activation SAE's features,
    #    step by step, toward what the class prompt gives on the same latents; the rate the evaluation classifier
    #    measures
    from tide.analysis.feature_patch import sample_patched
    from tide.images import save_grid
    from tide.models.base import NULL_CONDITION
    from tide.sae import load_sae
    from tide.sampling import sample

    sae = load_sae(out / "sae" / steer_spec.name, device=backbone.device)
    steer_cfg = SamplerConfig(num_steps=config.num_steps, guidance_scale=config.guidance_scale)
    classes = list(range(backbone.num_conditions))
    start = time.perf_counter()
    steer_n = config.steer_samples
    seeds = [config.seed + 1000 + i for i in range(steer_n)]
    before = sample(backbone, [NULL_CONDITION] * steer_n, seeds, steer_cfg)
    patched = sample_patched(backbone, sae, [NULL_CONDITION] * (steer_n * len(classes)),
                             [b for b in classes for _ in seeds], seeds * len(classes), steer_cfg,
                             strength=config.steer_strength).images
    afters = list(patched.split(steer_n))
    seconds = time.perf_counter() - start
    names = backbone.condition_names
    rate, per_class = None, None
    if classifier is not None:
        per_class = [float((classifier.predict(a).cpu() == b).float().mean()) for b, a in zip(classes, afters)]
        rate = float(sum(per_class) / len(per_class))
    shown = min(steer_n, 3)
    rows = [before.images[i].unsqueeze(0).expand(len(classes), -1, -1, -1) for i in range(shown)]
    rows = [r for i in range(shown) for r in (rows[i], torch.stack([a[i] for a in afters]))]
    title = "null condition, then steered toward each class (columns: " + ", ".join(names) + ")"
    if rate is not None:
        title += f"; classifier says the class in {rate:.0%} of {steer_n * len(classes)}"
    grid = save_grid(torch.cat(rows), out / "steering.png", nrow=len(classes),
                     row_labels=[lab for i in range(shown) for lab in (f"null #{i}", "steered")], title=title)
    summary["steering"] = {"recipe": "feature patch (tide.analysis.feature_patch), null condition -> each class",
                           "sae": str(out / "sae" / steer_spec.name), "strength": config.steer_strength,
                           "samples_per_class": steer_n,
                           "seconds": round(seconds, 1), "success": rate, "success_per_class": per_class}
    artefacts["steering"] = str(grid)
    if rate is not None:
        print(f"[demo] steering null-condition generations toward each class by patching SAE features: the "
              f"classifier says the target class in {rate:.0%} of {steer_n * len(classes)} -> {grid}")
    else:
        print(f"[demo] steering null-condition generations toward each class -> {grid}")

    summary["artefacts"] = artefacts
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1, default=str).encode())
    artefacts["summary"] = str(out / "summary.json")
    return summary
