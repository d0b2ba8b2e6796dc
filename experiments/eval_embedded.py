"""Quality report of the embedded model (``fmnist-dit``), run on the CPU.

Measures
  * the evaluation classifier's accuracy on the 10k real Fashion-MNIST test images;
  * class agreement: the classifier's prediction on generated samples against the requested class,
    ``--per-class`` samples per class (seeds 0..N-1, sample i asks for class i mod 10), without
    classifier-free guidance (scale 1.0) and with it (``--cfg``), per class and overall;
  * a Fréchet distance in the classifier's feature space between those samples and the real test
    set, beside the same distance for an equally large set of real training images (the floor a
    sample set of that size can reach);
  * sampling wall time: median of ``--timing-runs`` timed runs of ``--timing-images`` images
    (DDIM, ``--steps`` steps, with CFG) after one warm-up run;
and writes a 10 × 10 sample grid (with CFG, class names as row labels).

    python experiments/eval_embedded.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tide.eval.classifier import load_classifier  # noqa: E402
from tide.eval.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist  # noqa: E402
from tide.eval.frechet import frechet_distance  # noqa: E402
from tide.images import save_grid  # noqa: E402
from tide.models import load_backbone  # noqa: E402
from tide.sampling import SamplerConfig, sample  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="fmnist-dit")
    p.add_argument("--per-class", type=int, default=50, help="samples per class for agreement")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the CFG rows, grid and timing")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--timing-images", type=int, default=80)
    p.add_argument("--timing-runs", type=int, default=3)
    p.add_argument("--data-dir", default=str(DEFAULT_ROOT))
    p.add_argument("--json", default=str(RESULTS / "embedded_model.json"))
    p.add_argument("--grid", default=str(RESULTS / "fmnist_dit_samples.png"))
    return p.parse_args(argv)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def main(argv=None):
    args = parse_args(argv)
    t_all = time.time()
    backbone = load_backbone(args.backbone, device="cpu")
    clf = load_classifier(backbone)
    names = backbone.condition_names
    k = backbone.num_classes

    # real images
    te_x, te_y = load_fashion_mnist("test", args.data_dir)
    real = torch.from_numpy(te_x).float().div(255).unsqueeze(1)
    real_y = torch.from_numpy(te_y).long()
    pred = clf.predict(real)
    real_acc = (pred == real_y).float().mean().item()
    real_per_class = {names[c]: (pred[real_y == c] == c).float().mean().item() for c in range(k)}
    print(f"classifier accuracy on {len(real_y)} real test images: {real_acc:.4f}", flush=True)
    real_feats = clf.embed(real).numpy()
    n = args.per_class * k
    tr_x, _ = load_fashion_mnist("train", args.data_dir)
    pick = np.random.default_rng(0).choice(len(tr_x), n, replace=False)
    fd_real = frechet_distance(clf.embed(torch.from_numpy(tr_x[pick]).float().div(255).unsqueeze(1)).numpy(),
                               real_feats)

    # agreement with and without guidance
    conds = [i % k for i in range(n)]
    seeds = list(range(n))
    agreement = {}
    for g in (1.0, args.cfg):
        t0 = time.time()
        out = sample(backbone, conds=conds, seeds=seeds,
                     config=SamplerConfig(num_steps=args.steps, guidance_scale=g, batch_size=args.batch_size))
        secs = time.time() - t0
        pred = clf.predict(out.images)
        want = torch.tensor(conds)
        hit = (pred == want).float()
        per = {names[c]: hit[want == c].mean().item() for c in range(k)}
        worst = min(per, key=per.get)
        confusion = torch.zeros(k, k, dtype=torch.long)
        confusion.index_put_((want, pred), torch.ones_like(want), accumulate=True)
        fd = frechet_distance(clf.embed(out.images).numpy(), real_feats)
        agreement[f"{g:g}"] = {"guidance_scale": g, "samples": n, "agreement": hit.mean().item(),
                               "per_class": per, "worst_class": worst, "worst_class_agreement": per[worst],
                               "confusion_requested_by_predicted": confusion.tolist(),
                               "frechet_distance_classifier_features": fd, "wall_time_s": round(secs, 1)}
        print(f"guidance {g:g}: agreement {hit.mean():.4f} (worst {worst} {per[worst]:.3f}), "
              f"FD {fd:.3f} (real-vs-real floor {fd_real:.3f}), {secs:.0f}s", flush=True)

    # sampling time
    t_conds = [i % k for i in range(args.timing_images)]
    t_cfg = SamplerConfig(num_steps=args.steps, guidance_scale=args.cfg, batch_size=args.timing_images)
    sample(backbone, conds=t_conds, seeds=list(range(len(t_conds))), config=t_cfg)  # warm-up
    times = []
    for _ in range(args.timing_runs):
        t0 = time.perf_counter()
        sample(backbone, conds=t_conds, seeds=list(range(len(t_conds))), config=t_cfg)
        times.append(time.perf_counter() - t0)
    print(f"sampling {args.timing_images} images, {args.steps} DDIM steps, CFG {args.cfg:g}: "
          f"median {statistics.median(times):.2f}s over {len(times)} runs "
          f"({torch.get_num_threads()} threads)", flush=True)

    # grid: 10 samples per class, with guidance
    per_row = 10
    g_conds = [c for c in range(k) for _ in range(per_row)]
    grid_out = sample(backbone, conds=g_conds, seeds=[10_000 + i for i in range(len(g_conds))],
                      config=SamplerConfig(num_steps=args.steps, guidance_scale=args.cfg))
    grid_path = save_grid(grid_out.images, args.grid, nrow=per_row, row_labels=names,
                          title=f"{backbone.name}: DDIM {args.steps} steps, guidance {args.cfg:g}")
    print(f"wrote {grid_path}", flush=True)

    meta = backbone.meta
    asset_dir = Path(meta["path"])
    asset_bytes = sum(f.stat().st_size for f in asset_dir.rglob("*") if f.is_file())
    result = {
        "backbone": backbone.describe(),
        "asset_size_bytes": asset_bytes,
        "training": {k_: v for k_, v in meta.get("training", {}).items() if k_ != "loss_curve"},
        "classifier": {"real_test_accuracy": real_acc, "real_test_images": int(len(real_y)),
                       "per_class": real_per_class},
        "sampler": {"scheduler": type(backbone.scheduler).__name__, "num_steps": args.steps,
                    "seeds": f"0..{n - 1}", "condition_of_sample_i": "i mod 10"},
        "agreement": agreement,
        "cfg_scale_reported": args.cfg,
        "gap_to_real_accuracy_points": {key: round(100 * (real_acc - v["agreement"]), 2)
                                        for key, v in agreement.items()},
        "frechet_distance_real_train_vs_test_same_size": fd_real,
        "sampling_time": {"images": args.timing_images, "num_steps": args.steps, "guidance_scale": args.cfg,
                          "runs_s": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
                          "device": "cpu", "torch_threads": torch.get_num_threads()},
        "grid": str(Path(args.grid).resolve().relative_to(ROOT)) if Path(args.grid).resolve().is_relative_to(ROOT)
        else str(args.grid),
        "machine": machine(),
        "total_wall_time_s": round(time.time() - t_all, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}", flush=True)


if __name__ == "__main__":
    main()
