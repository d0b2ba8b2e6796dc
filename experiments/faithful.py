"""Faithful splicing: which SAE objective keeps the generation intact when the SAE replaces the residual stream?

    python experiments/faithful.py                                  # the committed table (2 CPU cores, ~50 min)
    python experiments/faithful.py --model fmnist-dit --blocks 4    # the other embedded model
    python experiments/faithful.py --smoke                          # a few-minute check of the pipeline

For one embedded model: capture the residual stream after blocks 1, 4 and 7 at every step (both CFG
branches, the model's default guidance; training seeds 0.., held-out seeds 1,000,000..), train every
variant below at every block from one pass, and measure each against the clean model:

* FVU per timestep bucket on the held-out capture, L0, dead fraction;
* the denoiser's relative error per step with the SAE spliced in along clean trajectories;
* generations with the SAE spliced in at every step: classifier agreement with the requested class,
  agreement with the clean sample from the same noise, and the Fréchet distance (classifier features)
  of spliced to clean samples, against the distance between two clean sets of other seeds (reseeding).

Writes experiments/results/faithful[-MODEL].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tide.capture import CaptureConfig, capture
from tide.eval.classifier import load_classifier
from tide.eval.frechet import frechet_distance
from tide.eval.metrics import reconstruction_metrics
from tide.eval.splice import denoiser_error, spliced_samples
from tide.models import load_backbone
from tide.sae import load_sae
from tide.sampling import SamplerConfig, sample
from tide.train import SAESpec, TrainConfig, train

BUCKETS = [0, 200, 400, 600, 800, 1000]

DOWN = 0.25  # downstream_coefficient of the downstream-aware variants (1 and 4 were worse: see the results)
VARIANTS: dict[str, dict] = {
    # activation MSE only, the two conditionings, under the default (global) normalisation
    "plain": dict(conditioning="none", normalization="global"),
    "tide": dict(conditioning="tide", normalization="global"),
    # per-dimension standardisation
    "tide-perdim": dict(conditioning="tide", normalization="per_dimension"),
    # the downstream-aware objective (denoiser output error with the reconstruction spliced in)
    "tide-perdim-down": dict(conditioning="tide", normalization="per_dimension", downstream_coefficient=DOWN),
    # the block's update (resid_post - resid_pre) as the target
    "tide-perdim-update": dict(conditioning="tide", normalization="per_dimension", target="update"),
}
MIDDLE_ONLY: dict[str, dict] = {
    # at the middle block only: the plain counterparts, per-timestep statistics, adaLN-initialised modulation,
    # and a capacity sweep of the update target
    "plain-perdim": dict(conditioning="none", normalization="per_dimension"),
    "plain-perdim-down": dict(conditioning="none", normalization="per_dimension", downstream_coefficient=DOWN),
    "plain-perdim-update": dict(conditioning="none", normalization="per_dimension", target="update"),
    "tide-perdim-t": dict(conditioning="tide", normalization="per_timestep_dimension"),
    "tide-perdim-adaln": dict(conditioning="tide", normalization="per_dimension", modulation_init="adaln"),
    "tide-perdim-update-k8": dict(conditioning="tide", normalization="per_dimension", target="update", k=8),
    "tide-perdim-update-k16": dict(conditioning="tide", normalization="per_dimension", target="update", k=16),
    "tide-perdim-update-4096": dict(conditioning="tide", normalization="per_dimension", target="update", d_sae=4096),
}


def machine(device: str) -> dict:
    return {"platform": platform.platform(), "torch": torch.__version__, "device": device,
            "threads": torch.get_num_threads(), "python": sys.version.split()[0]}


def reseed_baseline(backbone, classifier, conds, seeds_a, seeds_b, sampler) -> dict:
    """Agreement and Fréchet distance between two clean sample sets from different seeds (the floor)."""
    a = sample(backbone, conds, seeds_a, sampler)
    b = sample(backbone, conds, seeds_b, sampler)
    pa, pb = classifier.predict(a.images), classifier.predict(b.images)
    want = torch.as_tensor(conds)
    return {"agreement_a": float((pa == want).float().mean()), "agreement_b": float((pb == want).float().mean()),
            "frechet_reseed": frechet_distance(classifier.embed(a.images).numpy(), classifier.embed(b.images).numpy())}


def evaluate_sae(sae, backbone, classifier, held_out, hook: str, conds, seeds, sampler, denoiser_samples: int) -> dict:
    """Every measurement of one SAE (see the module docstring)."""
    rec = reconstruction_metrics(sae, held_out, hook, buckets=BUCKETS, device=backbone.device)
    n = denoiser_samples
    err = denoiser_error(backbone, sae, hook, conds[::max(1, len(conds) // n)][:n],
                         seeds[::max(1, len(seeds) // n)][:n], sampler)
    spl = spliced_samples(backbone, sae, hook, conds, seeds, sampler, classifier=classifier)
    overall = rec.overall
    return {
        "fvu": float(overall.fvu), "l0": float(overall.l0), "dead_fraction": float(overall.dead_fraction),
        "fvu_per_bucket": {f"[{b.t_lo:g},{b.t_hi:g})": float(b.fvu) for b in rec.buckets},
        "denoiser_relative_error_mean": float(np.mean(err.relative_error_T)),
        "denoiser_relative_error_per_step": [float(v) for v in err.relative_error_T],
        "ablation_error_mean": float(np.mean(err.ablation_error_T)),
        "fvu_per_step_clean_trajectory": [float(v) for v in err.fvu_T],
        "spliced": spl.classifier, "pixel_mse": spl.pixel_mse,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-pixart")
    p.add_argument("--device", default="auto")
    p.add_argument("--blocks", default="1,4,7")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS (every block)")
    p.add_argument("--middle-variants", default=",".join(MIDDLE_ONLY), help="names of MIDDLE_ONLY (middle block)")
    p.add_argument("--train-samples", type=int, default=400)
    p.add_argument("--eval-samples", type=int, default=50)
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--splice-per-class", type=int, default=8)
    p.add_argument("--denoiser-samples", type=int, default=10)
    p.add_argument("--workdir", default="runs/faithful")
    p.add_argument("--results", default=None, help="output stem (default experiments/results/faithful[-MODEL])")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.train_samples, args.eval_samples, args.num_steps, args.d_sae, args.k = 20, 10, 6, 256, 8
        args.steps, args.batch_size, args.splice_per_class, args.denoiser_samples = 30, 1024, 1, 4
        args.results = str(Path(args.workdir) / "smoke")
    stem = Path(args.results or ("experiments/results/faithful" + ("" if args.model == "fmnist-pixart" else f"-{args.model}")))
    work = Path(args.workdir) / args.model
    blocks = [int(b) for b in args.blocks.split(",")]
    hooks = [f"blocks.{b}.hook_resid_post" for b in blocks]
    variants = {v: VARIANTS[v] for v in args.variants.split(",") if v}
    middle = {v: MIDDLE_ONLY[v] for v in args.middle_variants.split(",") if v}
    middle_block = blocks[len(blocks) // 2]
    capture_hooks = sorted(set(hooks) | {f"blocks.{b}.hook_resid_pre" for b in blocks})  # update targets need both
    timings: dict[str, float] = {}

    backbone = load_backbone(args.model, device=args.device)
    guidance = backbone.default_guidance_scale
    sets = {}
    for split, (n, seed) in {"train": (args.train_samples, 0), "heldout": (args.eval_samples, 1_000_000)}.items():
        out = work / f"acts-{split}"
        cfg = CaptureConfig(backbone=args.model, out=str(out), hooks=capture_hooks, num_samples=n, num_steps=args.num_steps,
                            guidance_scale=guidance, cfg_branch="both" if backbone.uses_cfg(guidance) else "cond",
                            seed=seed, samples_per_shard=40, device=args.device)
        cfg.resume = (out / "manifest.json").exists()
        t0 = time.perf_counter()
        sets[split] = capture(cfg, backbone, progress=False).path
        timings[f"capture_{split}_s"] = round(time.perf_counter() - t0, 1)

    def spec(name, hook, kw):
        return SAESpec(name=f"{name}-b{hook.split('.')[1]}", hook=hook, **{"d_sae": args.d_sae, "k": args.k, **kw})

    specs = [spec(name, hook, kw) for hook in hooks for name, kw in variants.items()]
    specs += [spec(name, f"blocks.{middle_block}.hook_resid_post", kw) for name, kw in middle.items()]
    run = TrainConfig(data=str(sets["train"]), out=str(work / "saes"), saes=specs, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=min(100, args.steps // 10),
                      checkpoint_every=0, overwrite=True, device=args.device, log_every=50,
                      downstream_samples=64, downstream_batch=8)
    t0 = time.perf_counter()
    trained = train(run)
    timings["train_s"] = round(time.perf_counter() - t0, 1)
    print(f"trained {len(specs)} SAEs in {timings['train_s']:.0f} s", flush=True)

    classifier = load_classifier(backbone, device=backbone.device)
    sampler = SamplerConfig(num_steps=args.num_steps, guidance_scale=guidance, batch_size=100)
    n_cond = backbone.num_conditions
    conds = [c for c in range(n_cond) for _ in range(args.splice_per_class)]
    seeds = [2_000_000 + i for i in range(len(conds))]
    t0 = time.perf_counter()
    reseed = reseed_baseline(backbone, classifier, conds, seeds, [3_000_000 + i for i in range(len(conds))], sampler)
    results: dict[str, dict] = {}
    for spec in specs:  # noqa: F402
        sae = load_sae(trained.sae_dir(spec.name), device=backbone.device)
        results[spec.name] = {"variant": spec.name.rsplit("-b", 1)[0], "hook": spec.hook, "d_sae": spec.d_sae,
                              "k": spec.k,
                              **evaluate_sae(sae, backbone, classifier, sets["heldout"], spec.hook, conds, seeds,
                                             sampler, args.denoiser_samples)}
        r = results[spec.name]
        print(f"{spec.name:24s} FVU {r['fvu']:.4f}  rel.err {r['denoiser_relative_error_mean']:.3f}  agreement "
              f"{r['spliced']['agreement_spliced']:.1%} (clean {r['spliced']['agreement_clean']:.1%})  FD "
              f"{r['spliced']['frechet_spliced_vs_clean']:.3f}", flush=True)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    train_final = trained.final
    summary = {"command": "python " + " ".join(sys.argv), "machine": machine(str(backbone.device)),
               "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "results", "smoke")},
               "guidance_scale": guidance, "variants": variants, "reseed": reseed, "timings": timings,
               "train_final": train_final, "results": results}
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=1))
    write_markdown(summary, Path(f"{stem}.md"), stem.name)
    plot(summary, Path(f"{stem}.png"))
    print(f"-> {stem}.json, {stem}.md, {stem}.png")


def write_markdown(summary: dict, path: Path, stem: str) -> None:
    res = summary["results"]
    rs = summary["reseed"]
    buckets = list(next(iter(res.values()))["fvu_per_bucket"])
    lines = [f"Command: `{summary['command']}`  ",
             f"Machine: {summary['machine']}  ",
             f"Timings: {summary['timings']}", "",
             f"Clean model, guidance {summary['guidance_scale']:g}, {summary['settings']['num_steps']} steps: "
             f"classifier agreement {rs['agreement_a']:.1%} (and {rs['agreement_b']:.1%} on other seeds); Fréchet "
             f"distance between the two clean sets (reseeding) **{rs['frechet_reseed']:.3f}**.", "",
             "| SAE | hook | d_sae | k | " + " | ".join(f"FVU t∈{b}" for b in buckets)
             + " | FVU | L0 | dead | denoiser rel. error | spliced agreement | of clean | agrees with clean "
               "| Fréchet spliced vs clean |",
             "|---|---|---|---|" + "---|" * len(buckets) + "---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        c = r["spliced"]
        lines.append(f"| {r['variant']} | {r['hook'].split('.')[1]} | {r['d_sae']} | {r['k']} | "
                     + " | ".join(f"{r['fvu_per_bucket'][b]:.4f}" for b in buckets)
                     + f" | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.1%} | "
                       f"{r['denoiser_relative_error_mean']:.3f} | {c['agreement_spliced']:.1%} | "
                       f"{c['agreement_spliced'] / c['agreement_clean']:.1%} | {c['agreement_spliced_vs_clean']:.1%} | "
                       f"{c['frechet_spliced_vs_clean']:.3f} |")
    lines += ["", f"![L0 against spliced agreement, and the denoiser error per step]({stem}.png)"]
    path.write_text("\n".join(lines) + "\n")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = summary["results"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    markers = {"1": "o", "4": "s", "7": "^"}
    for name, r in res.items():
        block = r["hook"].split(".")[1]
        c = r["spliced"]
        axes[0].scatter(r["l0"], c["agreement_spliced"] / c["agreement_clean"], marker=markers.get(block, "x"), s=30)
        axes[0].annotate(f"{r['variant']} b{block}", (r["l0"], c["agreement_spliced"] / c["agreement_clean"]),
                         fontsize=6, alpha=0.8)
        axes[1].scatter(r["fvu"], c["agreement_spliced"] / c["agreement_clean"], marker=markers.get(block, "x"), s=30)
        if block == "4" and r["k"] == summary["settings"]["k"] and r["d_sae"] == summary["settings"]["d_sae"]:
            axes[2].plot(r["denoiser_relative_error_per_step"], marker=".", lw=1, label=r["variant"])
    axes[0].axhline(0.95, color="grey", ls="--", lw=1)
    axes[0].set_xlabel("L0 (active latents per token)")
    axes[0].set_ylabel("spliced agreement / clean agreement")
    axes[0].set_title("spliced at every step (o block 1, s block 4, ^ block 7)", fontsize=10)
    axes[1].axhline(0.95, color="grey", ls="--", lw=1)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("held-out FVU")
    axes[1].set_ylabel("spliced agreement / clean agreement")
    axes[1].set_title("FVU does not predict fidelity", fontsize=10)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("denoising step")
    axes[2].set_ylabel("||eps_spliced - eps|| / ||eps|| (guided)")
    axes[2].set_title("denoiser error per step, block 4", fontsize=10)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
