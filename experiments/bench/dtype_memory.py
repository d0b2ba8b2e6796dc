"""Memory of a backbone loaded in float32, bfloat16 and float16 (`--dtype` on every command).

1. Weights of the published models at each dtype, from their exact transformer configs instantiated on
   the meta device (no memory, no download): DiT-XL/2, PixArt-Σ, SD3.5-medium, FLUX.1-dev.
2. Measured: a FLUX.1-shaped pipeline at full width (24 heads x 128, T5/CLIP widths, the real 16-channel
   VAE) but only 1 double- and 2 single-stream blocks, stored in bfloat16 as the Hub stores FLUX, loaded
   by ``tide.models.load_backbone`` in each dtype in a fresh process: peak RSS after loading, and after one
   denoising step at a 16x16 latent (128 px) with 32 prompt tokens, and that step's time. Each dtype runs
   three times, interleaved; medians and ranges are reported.

    python experiments/bench/dtype_memory.py --out experiments/results/bench_dtype_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = ("float32", "bfloat16", "float16")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

FULL = {
    "DiT-XL/2-256": ("DiTTransformer2DModel", dict(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                                    out_channels=8, num_layers=28, sample_size=32, patch_size=2,
                                                    num_embeds_ada_norm=1000)),
    "PixArt-Σ-1024": ("PixArtTransformer2DModel", dict(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                                      out_channels=8, num_layers=28, sample_size=128, patch_size=2,
                                                      cross_attention_dim=1152, caption_channels=4096,
                                                      use_additional_conditions=False, interpolation_scale=2)),
    "SD3.5-medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                                  attention_head_dim=64, num_attention_heads=24,
                                                  joint_attention_dim=4096, caption_projection_dim=1536,
                                                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                                  dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                 attention_head_dim=128, num_attention_heads=24,
                                                 joint_attention_dim=4096, pooled_projection_dim=768,
                                                 guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
}
"""Transformer configs of the published checkpoints (the fields that set the parameter count)."""


def full_model_weights() -> dict:
    import diffusers

    out = {}
    for name, (cls_name, cfg) in FULL.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls_name)(**cfg)
        n = sum(p.numel() for p in model.parameters())
        out[name] = {"parameters": n, **{f"{d}_GiB": round(n * BYTES[d] / 2**30, 2) for d in DTYPES}}
    return out


def build_flux(path: Path) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from tide.models import PromptBank

    torch.manual_seed(0)
    cfg = dict(FULL["FLUX.1-dev"][1], num_layers=1, num_single_layers=2)
    transformer = FluxTransformer2DModel(**cfg).to(torch.bfloat16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False).to(torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    PromptBank({"prompt_embeds": torch.randn(1, 32, 4096, generator=g),
                "pooled_prompt_embeds": torch.randn(1, 768, generator=g)}, ["a prompt"]).save(
        path / "prompt_embeds.safetensors")
    (path / "tide.json").write_text(json.dumps({"latent_size": 16}))
    return {"transformer_parameters": sum(p.numel() for p in transformer.parameters()),
            "vae_parameters": sum(p.numel() for p in vae.parameters()), "stored_dtype": "bfloat16",
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}


def rss_peak_mb() -> float:
    """VmHWM of this process (a fresh address space per exec; ru_maxrss would carry the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(path: str, dtype: str) -> dict:
    torch.set_num_threads(2)
    from tide.models import load_backbone
    from tide.sampling import SamplerConfig, sample

    base = rss_peak_mb()
    t0 = time.perf_counter()
    backbone = load_backbone(path, device="cpu", dtype=dtype)
    load_s = time.perf_counter() - t0
    after_load = rss_peak_mb()
    weights = sum(p.numel() * p.element_size() for p in backbone.parameters())
    t0 = time.perf_counter()
    sample(backbone, [0], [0], SamplerConfig(num_steps=1), decode=False)
    step_s = time.perf_counter() - t0
    return {"dtype": dtype, "rss_after_imports_MB": round(base), "peak_rss_after_load_MB": round(after_load),
            "peak_rss_after_step_MB": round(rss_peak_mb()), "weights_MB": round(weights / 2**20),
            "load_s": round(load_s, 2), "step_s": round(step_s, 2)}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        if key == "dtype":
            continue
        vals = [r[key] for r in runs]
        out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results/bench_dtype_memory.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cpu_count": os.cpu_count()},
              "published_models_weights": full_model_weights()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flux-wide"
        result["measured_model"] = build_flux(path)
        runs: dict[str, list[dict]] = {d: [] for d in DTYPES}
        for r in range(args.repeats):
            for dtype in DTYPES:
                proc = subprocess.run([sys.executable, __file__, "--worker", str(path), dtype], capture_output=True,
                                      text=True, check=True)
                runs[dtype].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"repeat {r} {dtype}: {runs[dtype][-1]}", file=sys.stderr)
    result["runs"] = runs
    result["summary"] = {d: summarise(v) for d, v in runs.items()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
