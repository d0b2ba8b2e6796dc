"""`tide demo`: the whole pipeline end to end on the embedded model, into one run directory.

Stages so far: load the embedded DiT, list its hooks, sample a class-conditional grid with
classifier-free guidance, score the samples with the evaluation classifier, and capture the
residual stream at every denoising step into an HDF5 dataset (verified and summarised).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tide.config import save_yaml, to_dict
from tide.errors import TideError
from tide.models.loading import BackboneConfig


@dataclass
class DemoConfig(BackboneConfig):
    """`tide demo`: every stage on a small scale."""

    out: str = "runs/demo"
    """Run directory; every artefact goes under it."""
    n_per_class: int = 8
    """Samples per class in the demo grid."""
    num_steps: int = 50
    """Denoising steps."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale of the demo samples."""
    seed: int = 0
    """Seed of the first sample."""
    capture_samples: int = 40
    """Samples whose activations the demo captures (at every step, every token)."""
    capture_hooks: list[str] | None = None
    """Hooks the demo captures; default: the middle block's residual stream."""


def run_demo(config: DemoConfig) -> dict:
    from tide.hooks import HookedBackbone
    from tide.sampling import GenerateConfig, generate_grid

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, out / "demo_config.yaml")
    artefacts: dict[str, str] = {"config": str(out / "demo_config.yaml")}
    summary: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                 "threads": torch.get_num_threads()}}

    # 1. backbone + hooks
    backbone = config.load_backbone()
    hooked = HookedBackbone.of(backbone)
    summary["backbone"] = backbone.describe()
    shapes = hooked.hook_shapes()
    (out / "hooks.json").write_text(json.dumps({k: list(v) for k, v in shapes.items()}, indent=1))
    artefacts["hooks"] = str(out / "hooks.json")
    print(f"[demo] backbone {backbone.name}: {len(hooked.block_specs)} blocks, {len(shapes)} hooks "
          f"-> {out / 'hooks.json'}")

    # 2. samples
    gen = GenerateConfig(backbone=config.backbone, device=config.device, n=config.n_per_class, seed=config.seed,
                         num_steps=config.num_steps, guidance_scale=config.guidance_scale,
                         out=str(out / "samples.png"))
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
        print(f"[demo] no evaluation classifier: {exc}")
    else:
        pred = classifier.predict(samples.images)
        agreement = (pred.cpu() == samples.conds).float().mean().item()
        summary["sampling"]["classifier_agreement"] = round(agreement, 4)
        print(f"[demo] evaluation classifier agrees with the requested class on {agreement:.1%} of samples")

    # 4. capture activations at every timestep, then verify and summarise the dataset
    from tide.capture import CaptureConfig, capture
    from tide.data import ActivationStore

    cap = CaptureConfig(backbone=config.backbone, device=config.device, out=str(out / "activations"),
                        hooks=config.capture_hooks, num_samples=config.capture_samples, num_steps=config.num_steps,
                        seed=config.seed, overwrite=True)
    start = time.perf_counter()
    manifest = capture(cap, backbone)
    seconds = time.perf_counter() - start
    store = ActivationStore(cap.out)
    store.verify().raise_if_bad()
    info = store.format_info()
    summary["capture"] = {"config": to_dict(cap), "rows": manifest["total_rows"], "shards": len(manifest["shards"]),
                          "seconds": round(seconds, 2), "info": store.info()}
    artefacts["activations"] = cap.out
    print(f"[demo] captured {manifest['total_rows']:,} rows in {seconds:.1f} s -> {cap.out} (verified)")
    print("\n".join("[demo]   " + line for line in info.splitlines()))

    summary["artefacts"] = artefacts
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    artefacts["summary"] = str(out / "summary.json")
    return summary
