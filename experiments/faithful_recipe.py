"""The faithful recipe end to end, timed, and its SAEs spliced into generation at every step.

    python experiments/faithful_recipe.py            # ~20 min on 2 CPU cores

Runs exactly the two commands the README gives,

    tide capture --config configs/faithful_capture.yaml --out CAP
    tide train --config configs/faithful.yaml --data CAP --out SAES

timing each, then splices each trained SAE (`tide` and `plain`) into generation at every step for
``--per-class`` samples per class prompt (seeds not used in training) and measures classifier agreement
with the requested class, agreement with the clean sample from the same noise, the Fréchet distance
(classifier features) between spliced and clean samples, and the same distance between two clean sets
of other seeds (what reseeding alone gives). Writes experiments/results/faithful_recipe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tide.eval.classifier import load_classifier
from tide.eval.frechet import frechet_distance
from tide.eval.splice import denoiser_error, spliced_samples
from tide.models import load_backbone
from tide.sae import load_sae
from tide.sampling import SamplerConfig, sample


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/faithful_recipe")
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--results", default="experiments/results/faithful_recipe")
    args = p.parse_args()
    work = Path(args.workdir)
    cap, saes = work / "capture", work / "saes"
    tide_bin = str(Path(sys.executable).with_name("tide"))
    timings = {"capture_s": run([tide_bin, "capture", "--config", "configs/faithful_capture.yaml", "--out", str(cap),
                                 "--overwrite"]),
               "train_s": run([tide_bin, "train", "--config", "configs/faithful.yaml", "--data", str(cap), "--out",
                               str(saes), "--overwrite"])}
    timings["total_s"] = timings["capture_s"] + timings["train_s"]
    print(f"capture {timings['capture_s']:.0f} s + train {timings['train_s']:.0f} s = {timings['total_s'] / 60:.1f} min",
          flush=True)

    manifest = json.loads((cap / "manifest.json").read_text())
    cfg = manifest["config"]
    backbone = load_backbone(cfg["backbone"], device="cpu")
    classifier = load_classifier(backbone)
    sampler = SamplerConfig(num_steps=cfg["num_steps"], guidance_scale=cfg["guidance_scale"], batch_size=100)
    conds = [c for c in range(backbone.num_conditions) for _ in range(args.per_class)]
    seeds = [5_000_000 + i for i in range(len(conds))]
    other = sample(backbone, conds, [6_000_000 + i for i in range(len(conds))], sampler)
    results = {}
    for name in ("tide", "plain"):
        sae = load_sae(saes / name)
        spl = spliced_samples(backbone, sae, sae.cfg.hook, conds, seeds, sampler, classifier=classifier)
        err = denoiser_error(backbone, sae, sae.cfg.hook, conds[::10], seeds[::10], sampler)
        c = spl.classifier
        feat_clean = classifier.embed(spl.clean.images).numpy()
        reseed = frechet_distance(feat_clean, classifier.embed(other.images).numpy())
        train = json.loads((saes / "train_summary.json").read_text())["final"][name]
        results[name] = {
            **c, "kept_of_clean": c["agreement_spliced"] / c["agreement_clean"], "frechet_reseed": reseed,
            "frechet_ratio_to_reseed": c["frechet_spliced_vs_clean"] / reseed,
            "denoiser_relative_error_mean": float(np.mean(err.relative_error_T)),
            "fvu_update_per_step_mean": float(np.nanmean(err.fvu_T)), "train_final": train,
            "pixel_mse": spl.pixel_mse, "config": {k: v for k, v in vars(sae.cfg).items()}}
        print(f"{name}: spliced agreement {c['agreement_spliced']:.1%} vs clean {c['agreement_clean']:.1%} "
              f"({results[name]['kept_of_clean']:.1%} kept); Fréchet spliced-vs-clean {c['frechet_spliced_vs_clean']:.3f}"
              f" vs reseeding {reseed:.3f}; denoiser rel. error {results[name]['denoiser_relative_error_mean']:.3f}",
              flush=True)
    out = {"command": "python " + " ".join(sys.argv), "commands": [
        "tide capture --config configs/faithful_capture.yaml --out CAP",
        "tide train --config configs/faithful.yaml --data CAP --out SAES"],
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "timings": timings, "samples": len(conds), "seeds": f"{seeds[0]}..{seeds[-1]}", "results": results}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.results}.json").write_text(json.dumps(out, indent=1, default=str))
    t, pl = results["tide"], results["plain"]
    md = [f"Command: `{out['command']}`  ", f"Machine: {out['machine']}", "",
          f"`tide capture --config configs/faithful_capture.yaml` took {timings['capture_s']:.0f} s and `tide train "
          f"--config configs/faithful.yaml` {timings['train_s']:.0f} s: **{timings['total_s'] / 60:.1f} min** on this "
          "2-core machine.", "",
          f"Spliced at every one of the {cfg['num_steps']} steps (guidance {cfg['guidance_scale']:g}), {len(conds)} "
          f"samples ({args.per_class} per class prompt, seeds {out['seeds']}):", "",
          "| SAE | clean agreement | spliced agreement | kept | agrees with clean sample | Fréchet spliced vs clean "
          "| Fréchet reseeding | ratio | denoiser rel. error | train FVU (update) | dead |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in (("tide", t), ("plain", pl)):
        md.append(f"| {name} | {r['agreement_clean']:.1%} | {r['agreement_spliced']:.1%} | {r['kept_of_clean']:.1%} | "
                  f"{r['agreement_spliced_vs_clean']:.1%} | {r['frechet_spliced_vs_clean']:.3f} | "
                  f"{r['frechet_reseed']:.3f} | {r['frechet_ratio_to_reseed']:.2f} | "
                  f"{r['denoiser_relative_error_mean']:.3f} | {r['train_final']['fvu']:.4f} | "
                  f"{r['train_final']['dead']:.1%} |")
    Path(f"{args.results}.md").write_text("\n".join(md) + "\n")
    print(f"-> {args.results}.json, {args.results}.md")


if __name__ == "__main__":
    main()
