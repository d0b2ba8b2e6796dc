"""A first probe of the steering recipes: null-condition generations steered toward class B.

    python experiments/steering_probe.py --sae runs/demo/sae/tide --stats runs/demo/feature_stats.h5

For every target class B: the ``--features`` features with the largest contrast for B (mean image-level
activation on B's captured samples minus on the others', over the feature's overall std) are added at
every step, each with strength rho * R(t) along its unit decoder direction (R(t): the hook's RMS norm
at that step, from the feature statistics), to the conditional rows only (``cond``) or to the
conditional rows and subtracted from the unconditional ones (``cfg``). The evaluation classifier says
how many of ``--n`` null-condition generations per class (seeds not used in the statistics) become B.
Writes experiments/results/steering_probe.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tide.analysis.feature_stats import load_feature_stats
from tide.analysis.steering import FeatureEdit, HookScale, steering_intervention
from tide.eval.classifier import load_classifier
from tide.images import save_grid
from tide.models import load_backbone
from tide.models.base import NULL_CONDITION
from tide.sae import load_sae
from tide.sampling import SamplerConfig, sample

ROOT = Path(__file__).resolve().parents[1]


def contrast(stats, cls: int) -> np.ndarray:
    """(F,) mean image-level activation on class ``cls`` minus on the other classes, over its overall std."""
    img = stats.image_acts  # (N, F)
    seen = stats.sample_cond >= 0
    img, cond = img[seen], stats.sample_cond[seen]
    diff = img[cond == cls].mean(0) - img[cond != cls].mean(0)
    return diff / np.maximum(img.std(0), 1e-8)


def scale_diagnosis(sae, stats) -> dict:
    """At the first, middle and last recorded step: R(t), the norm of the mean activation, and the median std
    of the activations along the SAE's unit decoder directions (what a norm-relative edit is measured against)."""
    from tide.data import ActivationStore

    store = ActivationStore(stats.attrs["dataset_path"])
    xs, ts = [], []
    for _, _, acts, meta in store.iter_blocks([stats.hook], ("timestep", "cfg_branch"), block_rows=8192):
        keep = meta["cfg_branch"] == 0
        xs.append(np.asarray(acts[stats.hook])[keep])
        ts.append(meta["timestep"][keep])
    x, t = np.concatenate(xs).astype(np.float64), np.concatenate(ts)
    out = {}
    for i in (0, len(stats.timesteps) // 2, len(stats.timesteps) - 1):
        tt = float(stats.timesteps[i])
        xt = x[np.isclose(t, tt)]
        W = sae.fold(tt).W_dec[0].detach().double().numpy()
        along = (xt - xt.mean(0)) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
        out[str(tt)] = {"R": float(np.sqrt((xt ** 2).sum(-1).mean())), "mean_norm": float(np.linalg.norm(xt.mean(0))),
                        "median_std_along_decoder_directions": float(np.median(along.std(0)))}
    return out


def removal(args, backbone, sae, stats, clf, cfg) -> list[dict]:
    """Class C's generations with C's ``--features`` most contrastive features clamped, only where they fire, to
    minus ``mult`` times their mean firing activation (SAeUron's recipe; mult 0 = ablation): how many stay C."""
    classes = list(range(backbone.num_conditions))
    conds = [c for c in classes for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(conds))]
    before = clf.predict(sample(backbone, conds, seeds, cfg).images).cpu().numpy()
    out = []
    for mult in (float(m) for m in args.remove_mults.split(",")):
        kept = []
        for c in classes:
            feats = np.argsort(-np.nan_to_num(contrast(stats, c), nan=-np.inf))[: args.features].tolist()
            edits = [FeatureEdit(int(f), "clamp", value=-mult * float(np.nan_to_num(stats.mean_act_firing[f])), gate=True)
                     for f in feats]
            at = [i for i, k in enumerate(conds) if k == c]
            pred = clf.predict(sample(backbone, [c] * args.n, [seeds[i] for i in at], cfg,
                                      interventions=[steering_intervention(sae, edits)]).images).cpu().numpy()
            kept.append(float((pred == c).mean()))
            out.append({"remove": c, "mult": mult, "features": feats, "still_c": kept[-1],
                        "still_c_before": float((before[at] == c).mean())})
        print(f"remove, clamp to -{mult} x mean where firing: still the class {np.mean(kept):.0%} "
              f"(before {np.mean([(before[np.asarray(conds) == c] == c).mean() for c in classes]):.0%}) "
              f"per class {[f'{k:.0%}' for k in kept]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--features", type=int, default=4)
    p.add_argument("--rhos", default="0.25,0.5,1.0")
    p.add_argument("--branches", default="cond,cfg")
    p.add_argument("--n", type=int, default=8, help="generations per target class")
    p.add_argument("--window", default=None, help="start,stop: edit only these steps (default: every step)")
    p.add_argument("--remove-mults", default="", help="also probe removal: comma-separated multiples (e.g. 0,5,15)")
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "steering_probe"))
    args = p.parse_args()

    sae = load_sae(args.sae)
    stats = load_feature_stats(args.stats)
    backbone = load_backbone(sae.cfg.backbone, prompts=sae.cfg.prompts or None, device="cpu")
    clf = load_classifier(backbone)
    scale = HookScale.from_stats(stats)
    classes = list(range(backbone.num_conditions))
    cfg = SamplerConfig(num_steps=args.num_steps, guidance_scale=args.guidance)
    seeds = [args.seed + i for i in range(args.n)]
    started = time.time()
    null = sample(backbone, [NULL_CONDITION] * args.n, seeds, cfg)
    base = clf.predict(null.images).cpu().numpy()
    print(f"null generations: classes {np.bincount(base, minlength=len(classes)).tolist()}", flush=True)
    results, rows = [], [null.images[torch.arange(len(classes)) % args.n]]
    for branch in args.branches.split(","):
        for rho in (float(r) for r in args.rhos.split(",")):
            rate, shown = [], []
            for b in classes:
                feats = np.argsort(-np.nan_to_num(contrast(stats, b), nan=-np.inf))[: args.features].tolist()
                edits = [FeatureEdit(int(f), "add", alpha=rho, scale="norm") for f in feats]
                window = tuple(int(v) for v in args.window.split(",")) if args.window else None
                iv = steering_intervention(sae, edits, steps=window, branch=branch, hook_scale=scale)
                out = sample(backbone, [NULL_CONDITION] * args.n, seeds, cfg, interventions=[iv])
                pred = clf.predict(out.images).cpu().numpy()
                rate.append(float((pred == b).mean()))
                shown.append(out.images[0])
                results.append({"branch": branch, "rho": rho, "target": b, "features": feats,
                                "success": rate[-1], "predicted": np.bincount(pred, minlength=len(classes)).tolist()})
            rows.append(torch.stack(shown))
            print(f"branch {branch} rho {rho}: success {np.mean(rate):.0%} per class {[f'{r:.0%}' for r in rate]} "
                  f"({time.time() - started:.0f}s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    removed = removal(args, backbone, sae, stats, clf, cfg) if args.remove_mults else []
    diagnosis = scale_diagnosis(sae, stats)
    print(f"scale diagnosis: {diagnosis}", flush=True)
    out.with_suffix(".json").write_text(json.dumps({"what": __doc__.split("\n\n")[0], "args": vars(args),
                                                    "scale_diagnosis": diagnosis, "removal": removed,
                                                    "null_predicted": np.bincount(base, minlength=len(classes)).tolist(),
                                                    "results": results}, indent=1) + "\n")
    labels = ["null"] + [f"{br} rho {r}" for br in args.branches.split(",") for r in args.rhos.split(",")]
    save_grid(torch.cat([r[: len(classes)] for r in rows]), out.with_suffix(".png"), nrow=len(classes), row_labels=labels,
              title="null generations steered toward class B (columns: B = 0..9)")
    print(f"wrote {out}.json and .png")


if __name__ == "__main__":
    main()
