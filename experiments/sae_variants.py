"""TIDE vs plain vs plain with per-timestep normalisation vs per-bucket SAEs (and TIDE on top of
per-timestep normalisation), at an early, a middle and a late block of the embedded DiT, at equal k
and dictionary size.

    python experiments/sae_variants.py --device cuda            # the committed table (H100)
    python experiments/sae_variants.py --smoke                  # a 2-minute CPU check of the pipeline

1. capture the three blocks' residual streams at every step (training set: seeds 0..N-1;
   held-out evaluation set: other seeds);
2. train all 12 SAEs from one pass over the training set;
3. evaluate each on the held-out set: FVU per timestep bucket and overall, dead fraction, and
   with the SAE spliced into generation at every step (classifier agreement, Fréchet distance).

Writes experiments/results/sae_variants.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from tide.capture import CaptureConfig, capture
from tide.eval.report import EvalConfig, evaluate
from tide.models import load_backbone
from tide.train import SAESpec, TrainConfig, train

VARIANTS = {
    "tide": dict(conditioning="tide", normalization="global"),
    "plain": dict(conditioning="none", normalization="global"),
    "plain-per-t": dict(conditioning="none", normalization="per_timestep"),
    "tide-per-t": dict(conditioning="tide", normalization="per_timestep"),
    "bucket": dict(conditioning="bucket", normalization="global", num_buckets=5),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--blocks", default="1,4,7")
    p.add_argument("--train-samples", type=int, default=400)
    p.add_argument("--eval-samples", type=int, default=100)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--splice-samples", type=int, default=10, help="spliced samples per class")
    p.add_argument("--eval-rows", type=int, default=300_000)
    p.add_argument("--workdir", default="runs/sae_variants")
    p.add_argument("--results", default="experiments/results/sae_variants")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the pipeline")
    args = p.parse_args()
    if args.smoke:
        args.train_samples, args.eval_samples, args.num_steps, args.d_sae, args.k = 20, 10, 10, 256, 8
        args.steps, args.batch_size, args.splice_samples, args.eval_rows = 30, 1024, 1, 5000
        args.results = str(Path(args.workdir) / "smoke")
    work = Path(args.workdir)
    hooks = [f"blocks.{b}.hook_resid_post" for b in args.blocks.split(",")]
    started = time.perf_counter()
    timings = {}

    backbone = load_backbone("fmnist-dit", device=args.device)
    sets = {}
    for split, (n, seed) in {"train": (args.train_samples, 0), "eval": (args.eval_samples, 1_000_000)}.items():
        cfg = CaptureConfig(backbone="fmnist-dit", out=str(work / f"acts-{split}"), hooks=hooks, num_samples=n,
                            num_steps=args.num_steps, seed=seed, samples_per_shard=20, device=args.device)
        cfg.resume = (work / f"acts-{split}" / "manifest.json").exists()
        t0 = time.perf_counter()
        sets[split] = capture(cfg, backbone).manifest
        timings[f"capture_{split}_s"] = time.perf_counter() - t0

    specs = [SAESpec(name=f"{name}-b{hook.split('.')[1]}", hook=hook, d_sae=args.d_sae, k=args.k, sparsity="topk", **kw)
             for hook in hooks for name, kw in VARIANTS.items()]
    t0 = time.perf_counter()
    summary = train(TrainConfig(data=str(work / "acts-train"), out=str(work / "saes"), saes=specs, steps=args.steps,
                                batch_size=args.batch_size, warmup_steps=min(200, args.steps // 10), checkpoint_every=0,
                                overwrite=True, device=args.device, log_every=50))
    timings["train_s"] = time.perf_counter() - t0

    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        res = evaluate(EvalConfig(sae=str(work / "saes" / spec.name), data=str(work / "acts-eval"),
                                  out=str(work / "eval" / spec.name), max_rows=args.eval_rows,
                                  splice_samples=args.splice_samples, device=args.device), backbone=backbone,
                       progress=False).report
        timings[f"eval_{spec.name}_s"] = time.perf_counter() - t0
        rows.append({"sae": spec.name, "variant": spec.name.rsplit("-b", 1)[0], "hook": spec.hook, "eval": res})
        print(f"{spec.name}: FVU {res['reconstruction']['overall']['fvu']:.4f}", flush=True)

    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "device": torch.cuda.get_device_name(0) if backbone.device.type == "cuda" else "cpu",
                          "threads": torch.get_num_threads()},
              "datasets": {k: {"rows": v["total_rows"], "samples": v["num_samples"]} for k, v in sets.items()},
              "train": {"steps": summary.steps, "vectors_per_s_all_saes": summary.vectors_per_s},
              "timings_s": timings, "total_s": time.perf_counter() - started, "rows": rows}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    write_table(result, out.with_suffix(".md"))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}.json/.md/.png in {result['total_s']:.0f} s")


def _fmt(v, pct=False):
    if v is None:
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def write_table(result: dict, path: Path) -> None:
    first = result["rows"][0]["eval"]["reconstruction"]["buckets"]
    heads = [f"FVU t∈[{b['t_lo']:.0f},{b['t_hi']:.0f})" for b in first]
    lines = [f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             "| hook | variant | " + " | ".join(heads) + " | FVU all | dead | denoiser rel. error | spliced agreement | "
             "clean agreement | Fréchet (spliced vs clean) |",
             "|---" * (len(heads) + 8) + "|"]
    for row in result["rows"]:
        ev = row["eval"]
        rec = ev["reconstruction"]
        clf = (ev.get("spliced_samples") or {}).get("classifier") or {}
        den = ev.get("denoiser_error") or {}
        lines.append(f"| {row['hook']} | {row['variant']} | " + " | ".join(_fmt(b["fvu"]) for b in rec["buckets"])
                     + f" | {_fmt(rec['overall']['fvu'])} | {_fmt(rec['overall']['dead_fraction'], True)} | "
                     f"{_fmt(den.get('mean_relative_error'))} | "
                     f"{_fmt(clf.get('agreement_spliced'), True)} | {_fmt(clf.get('agreement_clean'), True)} | "
                     f"{_fmt(clf.get('frechet_spliced_vs_clean'))} |")
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hooks = sorted({r["hook"] for r in result["rows"]}, key=lambda h: int(h.split(".")[1]))
    fig, axes = plt.subplots(1, len(hooks), figsize=(4.2 * len(hooks), 3.4), sharey=False)
    for ax, hook in zip(axes if len(hooks) > 1 else [axes], hooks):
        for row in (r for r in result["rows"] if r["hook"] == hook):
            curve = row["eval"]["reconstruction"]["per_timestep"]
            ax.plot(curve["timestep"], curve["fvu"], label=row["variant"])
        ax.set_title(hook, fontsize=9)
        ax.set_xlabel("timestep")
        ax.invert_xaxis()
    (axes[0] if len(hooks) > 1 else axes).set_ylabel("FVU (held-out)")
    (axes[0] if len(hooks) > 1 else axes).legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
