"""Quality report of the embedded text-conditioned model (``fmnist-pixart``), run on the CPU.

Measures, with the model's own sampler (DPM-Solver++, ``--steps`` steps) through ``tide.sampling``:
  * class agreement: the evaluation classifier's prediction on samples of the ten bare class prompts
    (``--per-class`` each, seeds 0..N-1, sample i asks for class i mod 10) at each guidance scale of
    ``--guidances`` (1 = no classifier-free guidance), per class and overall, with the Fréchet distance
    in classifier features to the real test set beside the real-vs-real floor of the same size;
  * attribute agreement: for each class and each attribute word (dark, light, small, large),
    ``--per-attribute`` samples of the prompt "<word> <class>" at ``--cfg``; a sample agrees when its
    measured attribute (tide.eval.attributes) lies on the word's side of the class median, and its class
    agreement is reported beside; the bare prompts' split around the same medians is the baseline;
  * sampling wall time (median of ``--timing-runs`` runs of ``--timing-images`` images with CFG);
and writes a sample grid: one row per class, columns bare, dark, light, small, large (two seeds each).

    python experiments/eval_fmnist_pixart.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tide.eval.attributes import WORDS, AttributeThresholds  # noqa: E402
from tide.eval.classifier import load_classifier  # noqa: E402
from tide.eval.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist  # noqa: E402
from tide.eval.frechet import frechet_distance  # noqa: E402
from tide.images import save_grid  # noqa: E402
from tide.models import load_backbone  # noqa: E402
from tide.sampling import SamplerConfig, sample  # noqa: E402
from eval_embedded import machine  # noqa: E402  (experiments/ is on sys.path when run as a script)

RESULTS = ROOT / "experiments" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="fmnist-pixart")
    p.add_argument("--per-class", type=int, default=50, help="samples per class prompt for class agreement")
    p.add_argument("--per-attribute", type=int, default=10, help="samples per (attribute word, class) prompt")
    p.add_argument("--guidances", default="1,2,3,4.5", help="guidance scales of the class-agreement rows")
    p.add_argument("--cfg", type=float, default=None, help="guidance of the attribute rows, grid and timing "
                   "(default: the model's)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver steps")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--timing-images", type=int, default=80)
    p.add_argument("--timing-runs", type=int, default=3)
    p.add_argument("--data-dir", default=str(DEFAULT_ROOT))
    p.add_argument("--json", default=str(RESULTS / "fmnist_pixart.json"))
    p.add_argument("--grid", default=str(RESULTS / "fmnist_pixart_samples.png"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_all = time.time()
    base = load_backbone(args.backbone, device="cpu")
    vocab = base.vocabulary
    class_words = vocab.groups["class"]
    names = base.condition_names
    k = len(class_words)
    cfg = base.default_guidance_scale if args.cfg is None else args.cfg
    thresholds = AttributeThresholds.from_dict(vocab.attributes)
    attr_words = [(g, i, w) for g in WORDS for i, w in enumerate(WORDS[g])]
    prompts = class_words + [f"{w} {c}" for _, _, w in attr_words for c in class_words]
    backbone = load_backbone(args.backbone, prompts=prompts, device="cpu")
    clf = load_classifier(base)

    te_x, te_y = load_fashion_mnist("test", args.data_dir)
    real = torch.from_numpy(te_x).float().div(255).unsqueeze(1)
    real_feats = clf.embed(real).numpy()
    n = args.per_class * k
    tr_x, _ = load_fashion_mnist("train", args.data_dir)
    pick = np.random.default_rng(0).choice(len(tr_x), n, replace=False)
    fd_real = frechet_distance(clf.embed(torch.from_numpy(tr_x[pick]).float().div(255).unsqueeze(1)).numpy(),
                               real_feats)
    real_acc = (clf.predict(real) == torch.from_numpy(te_y).long()).float().mean().item()

    # class agreement of the bare class prompts (condition ids 0..9)
    conds = [i % k for i in range(n)]
    want = torch.tensor(conds)
    agreement, bare_images = {}, None
    for g in [float(v) for v in args.guidances.split(",")]:
        t0 = time.time()
        out = sample(backbone, conds, list(range(n)),
                     SamplerConfig(num_steps=args.steps, guidance_scale=g, batch_size=args.batch_size))
        secs = time.time() - t0
        pred = clf.predict(out.images)
        hit = (pred == want).float()
        per = {names[c]: hit[want == c].mean().item() for c in range(k)}
        worst = min(per, key=per.get)
        confusion = torch.zeros(k, k, dtype=torch.long)
        confusion.index_put_((want, pred), torch.ones_like(want), accumulate=True)
        fd = frechet_distance(clf.embed(out.images).numpy(), real_feats)
        agreement[f"{g:g}"] = {"guidance_scale": g, "samples": n, "agreement": hit.mean().item(), "per_class": per,
                               "worst_class": worst, "worst_class_agreement": per[worst],
                               "confusion_requested_by_predicted": confusion.tolist(),
                               "frechet_distance_classifier_features": fd, "wall_time_s": round(secs, 1)}
        if g == cfg:
            bare_images = out.images
        print(f"guidance {g:g}: agreement {hit.mean():.4f} (worst {worst} {per[worst]:.3f}), FD {fd:.3f} "
              f"(real-vs-real floor {fd_real:.3f}), {secs:.0f}s", flush=True)
    if bare_images is None:
        bare_images = sample(backbone, conds, list(range(n)),
                             SamplerConfig(num_steps=args.steps, guidance_scale=cfg, batch_size=args.batch_size)).images

    # attribute agreement: "<word> <class>" prompts at the model's guidance
    m = args.per_attribute
    attributes = {}
    for j, (group, side, word) in enumerate(attr_words):
        a_conds = [k + j * k + c for c in range(k) for _ in range(m)]
        classes = torch.arange(k).repeat_interleave(m)
        out = sample(backbone, a_conds, [50_000 + i for i in range(len(a_conds))],
                     SamplerConfig(num_steps=args.steps, guidance_scale=cfg, batch_size=args.batch_size))
        ok = thresholds.agrees(out.images, classes, group, torch.full_like(classes, side)).float()
        cls_ok = (clf.predict(out.images) == classes).float()
        baseline = thresholds.agrees(bare_images, want, group, torch.full_like(want, side)).float().mean().item()
        attributes[word] = {"group": group, "samples": len(a_conds), "attribute_agreement": ok.mean().item(),
                            "class_agreement": cls_ok.mean().item(),
                            "both_agree": (ok * cls_ok).mean().item(),
                            "bare_prompt_baseline": baseline,
                            "per_class": {names[c]: ok[classes == c].mean().item() for c in range(k)}}
        print(f"'{word} <class>': attribute agreement {ok.mean():.3f} (bare prompts {baseline:.3f}), "
              f"class agreement {cls_ok.mean():.3f}", flush=True)
    attr_mean = float(np.mean([v["attribute_agreement"] for v in attributes.values()]))

    # sampling time
    t_conds = [i % k for i in range(args.timing_images)]
    t_cfg = SamplerConfig(num_steps=args.steps, guidance_scale=cfg, batch_size=args.timing_images)
    sample(backbone, t_conds, list(range(len(t_conds))), t_cfg)  # warm-up
    times = []
    for _ in range(args.timing_runs):
        t0 = time.perf_counter()
        sample(backbone, t_conds, list(range(len(t_conds))), t_cfg)
        times.append(time.perf_counter() - t0)

    # grid: per class, two seeds of each prompt kind
    cols = [None] + [w for _, _, w in attr_words]
    g_conds = []
    for c in range(k):
        for col in cols:
            idx = c if col is None else k + [w for _, _, w in attr_words].index(col) * k + c
            g_conds += [idx, idx]
    grid = sample(backbone, g_conds, [10_000 + (i % (2 * len(cols))) for i in range(len(g_conds))],
                  SamplerConfig(num_steps=args.steps, guidance_scale=cfg, batch_size=args.batch_size))
    grid_path = save_grid(grid.images, args.grid, nrow=2 * len(cols), row_labels=names,
                          title=f"{base.name}: columns (2 seeds each) bare class, " + ", ".join(c for c in cols if c)
                          + f"; DPM-Solver {args.steps} steps, guidance {cfg:g}")
    print(f"wrote {grid_path}", flush=True)

    asset_dir = Path(base.meta["path"])
    result = {
        "backbone": base.describe(),
        "asset_size_bytes": sum(f.stat().st_size for f in asset_dir.rglob("*") if f.is_file()),
        "training": {k_: v for k_, v in base.meta.get("training", {}).items() if k_ != "loss_curve"},
        "classifier_real_test_accuracy": real_acc,
        "sampler": {"scheduler": type(base.scheduler).__name__, "num_steps": args.steps,
                    "seeds": f"0..{n - 1}", "condition_of_sample_i": "bare class prompt i mod 10"},
        "class_agreement": agreement,
        "default_guidance_scale": cfg,
        "frechet_distance_real_train_vs_test_same_size": fd_real,
        "attribute_agreement": attributes,
        "attribute_agreement_mean": attr_mean,
        "attribute_rule": "measure on the requested word's side of the class median (tide.eval.attributes)",
        "sampling_time": {"images": args.timing_images, "num_steps": args.steps, "guidance_scale": cfg,
                          "runs_s": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
                          "device": "cpu", "torch_threads": torch.get_num_threads()},
        "grid": str(Path(args.grid).resolve().relative_to(ROOT)) if Path(args.grid).resolve().is_relative_to(ROOT)
        else str(args.grid),
        "machine": machine(),
        "total_wall_time_s": round(time.time() - t_all, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"attribute agreement, mean over words: {attr_mean:.3f}; wrote {args.json}", flush=True)


if __name__ == "__main__":
    main()
