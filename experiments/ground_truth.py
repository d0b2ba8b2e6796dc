"""Ground-truth interpretability on the embedded class-conditional model (fmnist-dit, 10 classes):
per class and per recorded denoising step, the best single-feature one-vs-rest AUROC for detecting
the class, for a TIDE SAE, a plain TopK SAE and the raw residual dimensions (neuron baseline).

    python experiments/ground_truth.py                 # the committed table (CPU, ~10 min on 2 cores)
    python experiments/ground_truth.py --smoke         # a 1-minute check of the pipeline

1. capture blocks.4.hook_resid_post at every 5th of 50 DDIM steps (10 recorded steps), no CFG, for a
   training set (seeds 0..N-1) and a held-out set (seeds 1_000_000..);
2. train a TIDE and a plain TopK SAE together on the training set;
3. image-level activation of a feature at a step = max over the image's 49 tokens at that step;
   per (class, step), one-vs-rest AUROC over samples.
   - SAEs: tide.analysis.compute_feature_stats (auroc_step) on each set. Latents are non-negative and
     mostly zero, so a feature "detects" a class by firing more on it: one-sided AUROC only.
   - raw dims: image-level max over tokens of each of the 128 dimensions, read straight from the
     shards, AND of each negated dimension (max over tokens of -x_d = -min_d), i.e. 256 signed
     candidates, one-sided AUROC. (A residual dimension has no preferred sign, so both directions
     are fair "neurons"; max over tokens of -x is not the same as 1 - AUROC of max over tokens of x.)
     For reference the table also gives the raw dims with max(a, 1-a) on the max-pooled dims.
4. selection: the best feature per (class, step) is chosen on the training set and its AUROC is
   reported on the held-out set (unbiased); the held-out in-sample max over all features is
   reported alongside for reference (optimistically biased by the max over 1024 features).

Writes experiments/results/ground_truth.{json,md,png}.
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

from tide.analysis.feature_stats import compute_feature_stats
from tide.analysis.ranking import auroc_one_vs_rest
from tide.capture import CaptureConfig, capture
from tide.data import ActivationStore
from tide.models import load_backbone
from tide.train import SAESpec, TrainConfig, train

HOOK = "blocks.4.hook_resid_post"
METHODS = ("tide", "plain", "raw")
THRESHOLD = 0.9


def raw_image_acts(path: Path, hook: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, S, D) max over tokens, (N, S, D) min over tokens of each raw dimension; (N,) classes; (S,) timesteps."""
    store = ActivationStore(path)
    steps = store.recorded_steps
    pos = {s: i for i, s in enumerate(steps)}
    N, S, D = int(store.manifest["num_samples"]), len(steps), store.hooks[hook]
    mx = np.full((N, S, D), -np.inf, dtype=np.float32)
    mn = np.full((N, S, D), np.inf, dtype=np.float32)
    cond = np.full(N, -1, dtype=np.int64)
    ts = np.full(S, np.nan)
    for _, _, acts, meta in store.iter_blocks([hook], ("timestep", "step_index", "sample_id", "cond"), 65536):
        x = np.asarray(acts[hook], dtype=np.float32)
        sp = np.array([pos[int(s)] for s in meta["step_index"]])
        sid = meta["sample_id"].astype(np.int64)
        cond[sid] = meta["cond"]
        ts[sp] = meta["timestep"]
        flat = sid * S + sp
        np.maximum.at(mx.reshape(N * S, D), flat, x)
        np.minimum.at(mn.reshape(N * S, D), flat, x)
    return mx, mn, cond, ts


def per_step_auroc(img_NSF: np.ndarray, labels: np.ndarray, C: int) -> np.ndarray:
    return np.stack([auroc_one_vs_rest(img_NSF[:, s], labels, C) for s in range(img_NSF.shape[1])])  # (S, C, F)


def select(train_SCF: np.ndarray, eval_SCF: np.ndarray) -> dict:
    """Best feature per (step, class) on train -> its held-out AUROC; plus held-out in-sample max."""
    best = np.nanargmax(np.nan_to_num(train_SCF, nan=-1.0), axis=2)  # (S, C)
    held = np.take_along_axis(eval_SCF, best[..., None], axis=2)[..., 0]
    return {"feature": best, "train_auroc": np.take_along_axis(train_SCF, best[..., None], axis=2)[..., 0],
            "heldout_auroc": held, "heldout_insample_max": np.nanmax(eval_SCF, axis=2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-samples", type=int, default=300)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--record-steps", default="every:5")
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--workdir", default="runs/ground_truth")
    p.add_argument("--results", default="experiments/results/ground_truth")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--render", action="store_true", help="only re-write the .md/.png from the saved .json")
    args = p.parse_args()
    if args.render:
        out = Path(args.results)
        r = json.loads(out.with_suffix(".json").read_text())
        derive(r)
        r["render_command"] = " ".join([Path(sys.executable).name, *sys.argv])
        out.with_suffix(".json").write_text(json.dumps(r, indent=1, default=str))
        write_table(r, out.with_suffix(".md"))
        plot(r, out.with_suffix(".png"))
        return
    if args.smoke:
        args.train_samples, args.eval_samples, args.steps, args.d_sae = 40, 30, 30, 256
        args.workdir, args.results = "runs/ground_truth_smoke", "runs/ground_truth_smoke/ground_truth"
    work = Path(args.workdir)
    started = time.perf_counter()
    timings = {}

    backbone = load_backbone("fmnist-dit", device=args.device)
    sets = {}
    for split, (n, seed) in {"train": (args.train_samples, 0), "eval": (args.eval_samples, 1_000_000)}.items():
        cfg = CaptureConfig(backbone="fmnist-dit", out=str(work / f"acts-{split}"), hooks=[HOOK], num_samples=n,
                            num_steps=args.num_steps, record_steps=args.record_steps, seed=seed,
                            samples_per_shard=50, device=args.device)
        cfg.resume = (work / f"acts-{split}" / "manifest.json").exists()
        t0 = time.perf_counter()
        sets[split] = capture(cfg, backbone, progress=False).manifest
        timings[f"capture_{split}_s"] = time.perf_counter() - t0
        print(f"captured {split}: {sets[split]['total_rows']} rows in {timings[f'capture_{split}_s']:.0f} s", flush=True)

    specs = [SAESpec(name="tide", hook=HOOK, d_sae=args.d_sae, k=args.k, sparsity="topk", conditioning="tide"),
             SAESpec(name="plain", hook=HOOK, d_sae=args.d_sae, k=args.k, sparsity="topk", conditioning="none")]
    t0 = time.perf_counter()
    summary = train(TrainConfig(data=str(work / "acts-train"), out=str(work / "saes"), saes=specs, steps=args.steps,
                                batch_size=args.batch_size, warmup_steps=min(100, args.steps // 10),
                                checkpoint_every=0, overwrite=True, device=args.device, log_every=100))
    timings["train_s"] = time.perf_counter() - t0
    print(f"trained in {timings['train_s']:.0f} s", flush=True)

    aurocs = {}  # method -> split -> (S, C, F)
    timesteps = names = None
    for spec in specs:
        aurocs[spec.name] = {}
        for split in ("train", "eval"):
            t0 = time.perf_counter()
            fs = compute_feature_stats(str(work / "saes" / spec.name), str(work / f"acts-{split}"), hook=HOOK,
                                       device=args.device, progress=False)
            timings[f"stats_{spec.name}_{split}_s"] = time.perf_counter() - t0
            aurocs[spec.name][split] = fs.auroc_step
            timesteps, names = fs.timesteps, fs.condition_names
    C = len(names)
    t0 = time.perf_counter()
    aurocs["raw"], aurocs["raw_maxpool_2sided"] = {}, {}
    for split in ("train", "eval"):
        mx, mn, cond, ts = raw_image_acts(work / f"acts-{split}", HOOK)
        a_pos = per_step_auroc(mx, cond, C)
        a_neg = per_step_auroc(-mn, cond, C)
        aurocs["raw"][split] = np.concatenate([a_pos, a_neg], axis=2)           # 256 signed candidates
        aurocs["raw_maxpool_2sided"][split] = np.concatenate([a_pos, 1 - a_pos], axis=2)  # max(a, 1-a)
        assert np.allclose(ts, timesteps)
    timings["raw_s"] = time.perf_counter() - t0

    methods = {}
    for m, a in aurocs.items():
        sel = select(a["train"], a["eval"])
        methods[m] = {k: v.tolist() for k, v in sel.items()}
        methods[m]["mean_heldout_per_step"] = np.nanmean(sel["heldout_auroc"], axis=1).tolist()
        methods[m]["mean_insample_per_step"] = np.nanmean(sel["heldout_insample_max"], axis=1).tolist()
        methods[m]["min_heldout_per_step"] = np.nanmin(sel["heldout_auroc"], axis=1).tolist()
        mean = np.array(methods[m]["mean_heldout_per_step"])
        # steps ordered noisy -> clean (high t -> low t); first step from which the mean stays >= threshold
        ok = mean >= THRESHOLD
        first = next((i for i in range(len(ok)) if ok[i:].all()), None)
        methods[m]["readable_from_step"] = first
        methods[m]["readable_from_timestep"] = None if first is None else float(timesteps[first])
        print(m, "mean held-out per step:", " ".join(f"{v:.3f}" for v in mean), flush=True)

    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                          "device": args.device, "threads": torch.get_num_threads()},
              "hook": HOOK, "condition_names": names, "timesteps": [float(t) for t in timesteps],
              "recorded_steps": sets["eval"]["schedule"]["recorded_steps"],
              "datasets": {k: {"rows": v["total_rows"], "samples": v["num_samples"]} for k, v in sets.items()},
              "train": {"steps": summary.steps, "seconds": summary.seconds,
                        "vectors_per_s_all_saes": summary.vectors_per_s, "final": summary.final},
              "protocol": {
                  "image_level": "max over the 49 tokens at one recorded step",
                  "auroc": "one-vs-rest over samples, mid-rank (ties count one half)",
                  "selection": "best feature per (class, step) chosen on the training set; AUROC reported on held-out",
                  "sae_sidedness": "one-sided (latents are non-negative; firing more on the class)",
                  "raw": "256 candidates: max over tokens of x_d and of -x_d for each of the 128 dims; one-sided",
                  "raw_maxpool_2sided": "reference: 128 max-pooled dims with AUROC max(a, 1-a)",
                  "readable_threshold": THRESHOLD,
                  "readable_definition": "first recorded step (noisy -> clean) from which the class-mean held-out "
                                         "AUROC stays >= threshold at all later steps"},
              "timings_s": timings, "total_s": time.perf_counter() - started, "methods": methods}
    derive(result)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    write_table(result, out.with_suffix(".md"))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}.json/.md/.png in {result['total_s']:.0f} s")


def _t(v) -> str:
    return "never" if v is None else f"t={v:.0f}"


def write_table(r: dict, path: Path) -> None:
    ts = r["timesteps"]
    head = "| class | " + " | ".join(f"t={t:.0f}" for t in ts) + " |"
    sep = "|---" * (len(ts) + 1) + "|"
    lines = ["# Ground-truth class detection: best single feature per (class, step)", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
             f"Hook: `{r['hook']}`; data: {r['datasets']}; timings (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items()) + f"; total {r['total_s']:.0f} s", "",
             "Protocol: " + "; ".join(f"{k}: {v}" for k, v in r["protocol"].items()), "",
             "## Summary", "", summary_paragraph(r), "",
             "## Class mean per step (held-out AUROC of the train-selected feature; in-sample max in parentheses)", "",
             "| method | " + " | ".join(f"t={t:.0f}" for t in ts) + " | first t with mean >= 0.9 | stays >= 0.9 to the end from |", "|---" * (len(ts) + 3) + "|"]
    for m, d in r["methods"].items():
        rf = d["readable_from_timestep"]
        lines.append(f"| {m} | " + " | ".join(f"{a:.3f} ({b:.3f})" for a, b in
                                               zip(d["mean_heldout_per_step"], d["mean_insample_per_step"]))
                     + f" | {_t(d[f'first_timestep_mean_ge_{THRESHOLD}'])} | {_t(rf)} |")
    for m in r["methods"]:
        d = r["methods"][m]
        lines += ["", f"## {m}: held-out AUROC of the train-selected feature, class × step", "", head, sep]
        for c, name in enumerate(r["condition_names"]):
            lines.append(f"| {name} | " + " | ".join(f"{d['heldout_auroc'][s][c]:.3f}" for s in range(len(ts))) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in d["mean_heldout_per_step"]) + " |")
    path.write_text("\n".join(lines) + "\n")


def derive(r: dict) -> None:
    """Readability summaries per method from the class-mean held-out curve (steps ordered noisy -> clean)."""
    ts = r["timesteps"]
    for d in r["methods"].values():
        mean = np.array(d["mean_heldout_per_step"])
        for thr in (0.85, THRESHOLD):
            hit = np.flatnonzero(mean >= thr)
            d[f"first_timestep_mean_ge_{thr}"] = float(ts[hit[0]]) if len(hit) else None
            d[f"timesteps_mean_ge_{thr}"] = [float(ts[i]) for i in hit]
        d["peak_timestep"] = float(ts[int(np.argmax(mean))])
        d["peak_mean_heldout"] = float(mean.max())
        d["mean_heldout_all_steps"] = float(mean.mean())
        d["mean_insample_all_steps"] = float(np.mean(d["mean_insample_per_step"]))


def summary_paragraph(r: dict) -> str:
    d = r["methods"]
    ts = r["timesteps"]

    def when(m):
        rf = d[m]["readable_from_timestep"]
        return "never (at no recorded step onwards)" if rf is None else f"t={rf:.0f}"

    def at(m, i):
        return f"{d[m]['mean_heldout_per_step'][i]:.3f}"

    first, last = 0, len(ts) - 1
    def first(m, thr):
        v = d[m][f"first_timestep_mean_ge_{thr}"]
        return "never" if v is None else f"t={v:.0f}"

    def span(m, thr):
        v = d[m][f"timesteps_mean_ge_{thr}"]
        return "no step" if not v else ", ".join(f"{x:.0f}" for x in v)

    def pk(m):
        return f"{d[m]['peak_mean_heldout']:.3f} at t={d[m]['peak_timestep']:.0f}"

    def gap(m):
        g = np.array(d[m]["mean_heldout_per_step"][1:]) - np.array(d["raw"]["mean_heldout_per_step"][1:])
        return f"{g.min():.2f}-{g.max():.2f}"

    lo, hi = len(ts) - 1, 0
    return (f"Best single feature per (class, step), chosen on the {r['datasets']['train']['samples']} training "
            f"samples and scored on the {r['datasets']['eval']['samples']} held-out samples. The class-mean held-out "
            f"AUROC first reaches {THRESHOLD} at {first('tide', THRESHOLD)} for the TIDE SAE "
            f"(>= {THRESHOLD} at t = {span('tide', THRESHOLD)}), {first('plain', THRESHOLD)} for the plain SAE "
            f"(t = {span('plain', THRESHOLD)}) and {first('raw', THRESHOLD)} for the raw residual dimensions "
            f"(signed; {first('raw_maxpool_2sided', THRESHOLD)} with the max(a, 1-a) reference); at 0.85 the "
            f"first steps are {first('tide', 0.85)}, {first('plain', 0.85)} and {first('raw', 0.85)}. "
            f"The curves are not monotone in t: readability peaks early in sampling (TIDE {pk('tide')}, plain "
            f"{pk('plain')}, raw {pk('raw')}) and then declines towards the clean end (t={ts[lo]:.0f}: TIDE "
            f"{at('tide', lo)}, plain {at('plain', lo)}, raw {at('raw', lo)}), and no method stays above "
            f"{THRESHOLD} to the end of sampling. At the noisiest recorded step (t={ts[hi]:.0f}) the raw "
            f"dimensions are on par with or above the SAEs (TIDE {at('tide', hi)}, plain {at('plain', hi)}, raw "
            f"{at('raw', hi)}); from the next step on the TIDE SAE is above them by {gap('tide')} and the plain SAE by {gap('plain')}. Averaged over steps: "
            f"TIDE {d['tide']['mean_heldout_all_steps']:.3f}, plain {d['plain']['mean_heldout_all_steps']:.3f}, raw "
            f"{d['raw']['mean_heldout_all_steps']:.3f} held-out (in-sample max "
            f"{d['tide']['mean_insample_all_steps']:.3f}, {d['plain']['mean_insample_all_steps']:.3f}, "
            f"{d['raw']['mean_insample_all_steps']:.3f}): both SAEs beat the neuron baseline, but the TIDE-vs-plain "
            f"difference is within the noise of this one run. The hard classes for every method are the upper-body "
            f"garments (T-shirt/top, Shirt, Coat), where no single feature separates one class from the other "
            f"three. Caveat: the class label is an input of this class-conditional DiT (adaLN-Zero "
            f"conditioning), so class information can sit in the residual stream at any noise level independent "
            f"of the image content; a high AUROC at large t reflects the conditioning signal, not a recognised "
            f"shape. One run, one seed; with 20 held-out positives per class, a single AUROC has a standard "
            f"error of roughly 0.03-0.06 (Hanley-McNeil), the class mean about 0.015.")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = np.array(r["timesteps"])
    names = r["condition_names"]
    colors = {"tide": "C0", "plain": "C1", "raw": "C2", "raw_maxpool_2sided": "C2"}
    fig = plt.figure(figsize=(15, 6.5))
    gs = fig.add_gridspec(2, 7)
    ax = fig.add_subplot(gs[:, :2])
    for m, d in r["methods"].items():
        ls = ":" if m == "raw_maxpool_2sided" else "-"
        ax.plot(ts, d["mean_heldout_per_step"], ls, marker="o", ms=3, color=colors[m], label=f"{m} (held-out)")
        if m != "raw_maxpool_2sided":
            ax.plot(ts, d["mean_insample_per_step"], "--", color=colors[m], alpha=0.5, lw=1)
    ax.axhline(THRESHOLD, color="grey", lw=0.7)
    ax.set_xlabel("timestep (noisy → clean)")
    ax.set_ylabel("mean over classes of best single-feature AUROC")
    ax.set_title(f"{r['hook']}\nsolid: train-selected, held-out; dashed: held-out in-sample max", fontsize=8)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    for c, name in enumerate(names):
        a = fig.add_subplot(gs[c // 5, 2 + c % 5])
        for m in METHODS:
            a.plot(ts, [row[c] for row in r["methods"][m]["heldout_auroc"]], color=colors[m], lw=1)
        a.set_title(name, fontsize=8)
        a.set_ylim(0.45, 1.02)
        a.invert_xaxis()
        a.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
