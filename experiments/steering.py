"""Steering with SAE features on the embedded class-conditional model (fmnist-dit), CPU.

    python experiments/ground_truth.py --steps 1000   # trains the SAE this script reuses (runs/ground_truth/)
    python experiments/steering.py --n 20 --n-other 4 --mults 0,4,8,16   # the committed run

Uses the TIDE TopK SAE (d_sae 1024, k 16) trained by experiments/ground_truth.py on
blocks.4.hook_resid_post (300 training samples, every 5th of 50 steps, 1000 steps) and its feature
statistics on that capture. All generations: 30 DDIM steps, guidance 1.0, paired seeds 0..n-1;
success is judged by the backbone's evaluation classifier.

1. class steering A -> B: add the top-3 features of B (highest one-vs-rest AUROC, image-level max over
   tokens and steps) while generating A; alpha = m * (the feature's mean activation where it fires),
   m in a grid; success = fraction classified B. Then at a fixed m, windows early/middle/late/all.
2. concept removal: ablate the top-5 features of C while generating C (removal rate = fraction no
   longer classified C) and while generating the other classes (agreement drop vs the same seeds).
3. preservation: add on the upper rows of the 7x7 patch grid only vs everywhere; mean |pixel change|
   inside / outside the (upsampled) mask.
4. transfer: record the chosen features' latents per token and step in a reference generation of B,
   clamp them (per token, per step) into a generation of A within a window.

Writes experiments/results/steering.{json,md,png} and steering_before_after.png.
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
from tide.analysis.steering import FeatureEdit, edit_generation, save_before_after, steering_intervention
from tide.eval.classifier import load_classifier
from tide.eval.splice import eval_mode
from tide.hooks import current_step
from tide.models import load_backbone
from tide.sae.io import load_sae
from tide.sampling import Intervention, SamplerConfig, sample

HOOK = "blocks.4.hook_resid_post"
PAIRS = [("Trouser", "Bag"), ("Sneaker", "Ankle boot"), ("T-shirt/top", "Dress"), ("Sandal", "Sneaker")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", default="runs/ground_truth/saes/tide")
    p.add_argument("--data", default="runs/ground_truth/acts-train")
    p.add_argument("--n", type=int, default=20, help="samples per cell")
    p.add_argument("--n-other", type=int, default=4, help="samples per other class in the removal damage test")
    p.add_argument("--num-steps", type=int, default=30)
    p.add_argument("--mults", default="0,2,4,8")
    p.add_argument("--results", default="experiments/results/steering")
    args = p.parse_args()
    if args.n < 5:
        args.results = "runs/steering_smoke/steering"
    torch.set_num_threads(2)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)

    backbone = load_backbone("fmnist-dit", device="cpu")
    sae = load_sae(args.sae)
    clf = load_classifier(backbone)
    names = backbone.condition_names
    cid = {n: i for i, n in enumerate(names)}
    C = len(names)
    cfg = SamplerConfig(num_steps=args.num_steps, guidance_scale=1.0, batch_size=200)
    n, S = args.n, args.num_steps
    seeds = list(range(n))
    mults = [float(m) for m in args.mults.split(",")]
    windows = {"early": (0, S // 3), "middle": (S // 3, 2 * S // 3), "late": (2 * S // 3, S), "all": (0, S)}

    t0 = time.perf_counter()
    fs = compute_feature_stats(args.sae, args.data, hook=HOOK, device="cpu", progress=False)
    timings["stats_s"] = time.perf_counter() - t0
    auroc = np.nan_to_num(fs.auroc, nan=0.0)  # (C, F)
    act_fire = np.nan_to_num(fs.mean_act_firing, nan=0.0)

    def top(c: int, k: int) -> list[int]:
        return [int(f) for f in np.argsort(-auroc[c])[:k]]

    def feat_info(fl):
        return [{"feature": f, "auroc": {names[c]: round(float(auroc[c, f]), 3) for c in np.argsort(-auroc[:, f])[:2]},
                 "mean_act_firing": float(act_fire[f]), "frequency": float(fs.frequency[f])} for f in fl]

    def gen(conds, sd, ivs=()):
        return sample(backbone, conds, sd, cfg, interventions=list(ivs))

    def pred(o):
        return clf.predict(o.images).numpy()

    def iv_add(fl, m, window=(0, S), mask=None):
        return steering_intervention(sae, [FeatureEdit(f, "add", alpha=m * act_fire[f]) for f in fl],
                                     steps=window, mask=mask)

    # ---------------------------------------------------------------- baseline: every class, seeds 0..n-1
    t0 = time.perf_counter()
    need = {cid[x] for pr in PAIRS for x in pr}
    base = {c: gen([c] * (n if c in need else args.n_other), seeds[:n if c in need else args.n_other]) for c in range(C)}
    base_pred = {c: pred(base[c]) for c in range(C)}
    timings["baseline_s"] = time.perf_counter() - t0
    baseline = {names[c]: float((base_pred[c] == c).mean()) for c in range(C)}
    print("baseline agreement", baseline, flush=True)

    # ---------------------------------------------------------------- 1. class steering
    t0 = time.perf_counter()
    steer = []
    for a_name, b_name in PAIRS:
        a, b = cid[a_name], cid[b_name]
        fl = top(b, 3)
        row = {"A": a_name, "B": b_name, "features": feat_info(fl), "alpha": {}, "window": {}}
        for m in mults:
            pr = base_pred[a] if m == 0 else pred(gen([a] * n, seeds, [iv_add(fl, m)]))
            row["alpha"][str(m)] = {"success_B": float((pr == b).mean()), "still_A": float((pr == a).mean()),
                                    "pred_counts": np.bincount(pr, minlength=C).tolist()}
        succ = {m: row["alpha"][str(m)]["success_B"] for m in mults if m > 0}
        # fixed alpha for the window sweep: the smallest multiple reaching >= 0.5 success, else the best
        ok = [m for m in sorted(succ) if succ[m] >= 0.5]
        m_fix = ok[0] if ok else max(succ, key=lambda m: (succ[m], -m))
        row["window_mult"] = m_fix
        for w, rng in windows.items():
            if w == "all":
                row["window"][w] = row["alpha"][str(m_fix)]
                continue
            pr = pred(gen([a] * n, seeds, [iv_add(fl, m_fix, rng)]))
            row["window"][w] = {"success_B": float((pr == b).mean()), "still_A": float((pr == a).mean()),
                                "pred_counts": np.bincount(pr, minlength=C).tolist()}
        steer.append(row)
        print(a_name, "->", b_name, {m: v["success_B"] for m, v in row["alpha"].items()},
              {w: v["success_B"] for w, v in row["window"].items()}, flush=True)
    timings["steering_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- 2. concept removal
    t0 = time.perf_counter()
    removal = []
    no = args.n_other
    for c in sorted(need):
        fl = top(c, 5)
        iv = steering_intervention(sae, [FeatureEdit(f, "ablate") for f in fl], steps=(0, S))
        pr = pred(gen([c] * n, seeds, [iv]))
        others = [o for o in range(C) if o != c]
        conds = [o for o in others for _ in range(no)]
        pr_o = pred(gen(conds, list(range(no)) * len(others), [iv]))
        base_o = np.concatenate([base_pred[o][:no] for o in others])
        tgt = np.array(conds)
        removal.append({"class": names[c], "features": feat_info(fl),
                        "baseline_agreement": baseline[names[c]],
                        "agreement_ablated": float((pr == c).mean()),
                        "removal_rate": float((pr != c).mean()),
                        "removal_rate_of_baseline_correct": float(((pr != c) & (base_pred[c] == c)).sum()
                                                                  / max((base_pred[c] == c).sum(), 1)),
                        "ablated_pred_counts": np.bincount(pr, minlength=C).tolist(),
                        "others_agreement_baseline": float((base_o == tgt).mean()),
                        "others_agreement_ablated": float((pr_o == tgt).mean()),
                        "others_agreement_drop": float((base_o == tgt).mean() - (pr_o == tgt).mean())})
        print("remove", names[c], removal[-1]["removal_rate"], removal[-1]["others_agreement_drop"], flush=True)
    timings["removal_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- 3. preservation (masked edit)
    t0 = time.perf_counter()
    gh, gw = backbone.patch_grid
    H = base[0].images.shape[-1]
    ph = H // gh
    rows_in = (gh + 1) // 2 - 1 if gh % 2 else gh // 2  # 7 -> upper 3 patch rows
    pmask = torch.zeros(gh, gw, dtype=torch.bool)
    pmask[:rows_in] = True
    pix = pmask.repeat_interleave(ph, 0).repeat_interleave(ph, 1).numpy()
    pres_pair = steer[0]
    a, b = cid[pres_pair["A"]], cid[pres_pair["B"]]
    fl = [f["feature"] for f in pres_pair["features"]]
    m_p = pres_pair["window_mult"]
    edits = [FeatureEdit(f, "add", alpha=m_p * act_fire[f]) for f in fl]
    preservation = {"pair": [pres_pair["A"], pres_pair["B"]], "mult": m_p, "mask_patch_rows": rows_in,
                    "mask_pixel_rows": int(rows_in * ph)}
    before = None
    for kind, mk in (("masked", pmask), ("unmasked", None)):
        before = base[a]  # same seeds, same sampler: the plain generation
        after = sample(backbone, [a] * n, seeds, cfg, interventions=[steering_intervention(sae, edits, steps=(0, S), mask=mk)])
        d = (after.images - before.images).abs().mean(1).numpy()  # (n, H, W)
        pr = pred(after)
        preservation[kind] = {"mean_abs_change_inside": float(d[:, pix].mean()),
                              "mean_abs_change_outside": float(d[:, ~pix].mean()),
                              "success_B": float((pr == b).mean()), "still_A": float((pr == a).mean())}
        if kind == "unmasked":
            save_before_after(before, after, out.parent / (out.name + "_before_after.png"), ncol=min(n, 10),
                              row_labels=[pres_pair["A"], f"+{pres_pair['B']} feats"],
                              title=f"{pres_pair['A']} + top-3 {pres_pair['B']} features (add, {m_p:g}x mean act, all {S} steps)")
    preservation["inside_outside_ratio_masked"] = (preservation["masked"]["mean_abs_change_inside"]
                                                   / max(preservation["masked"]["mean_abs_change_outside"], 1e-9))
    preservation["inside_outside_ratio_unmasked"] = (preservation["unmasked"]["mean_abs_change_inside"]
                                                     / max(preservation["unmasked"]["mean_abs_change_outside"], 1e-9))
    print("preservation", {k: v for k, v in preservation.items()}, flush=True)
    timings["preservation_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- 4. transfer (record + clamp per token/step)
    t0 = time.perf_counter()
    transfer = []
    for row in steer:
        a, b = cid[row["A"]], cid[row["B"]]
        fl = [f["feature"] for f in row["features"]]
        ids = torch.tensor(fl)
        rec: dict[int, torch.Tensor] = {}

        def record(act, hook=None, _rec=rec):
            ctx = current_step()
            t = float(ctx.timestep)
            x = act.reshape(-1, act.shape[-1]).float()
            with torch.no_grad(), eval_mode(sae):
                z = sae.encode(x, torch.full((len(x),), t))[:, ids]
            _rec[ctx.step_index] = z.reshape(act.shape[0], act.shape[1], -1).clone()
            return act

        ref = gen([b] * n, seeds, [Intervention(HOOK, record, steps=(0, S))])
        ref_pred = pred(ref)

        def clamp(act, hook=None, _rec=rec):
            ctx = current_step()
            t = float(ctx.timestep)
            x = act.reshape(-1, act.shape[-1]).float()
            with torch.no_grad(), eval_mode(sae):
                z = sae.encode(x, torch.full((len(x),), t))[:, ids]
                d_KD = sae.fold(t).W_dec[0][ids]
            zr = _rec[ctx.step_index].reshape(-1, len(fl))
            return (x + (zr - z) @ d_KD).reshape(act.shape).to(act.dtype)

        cell = {"A": row["A"], "B": row["B"], "features": fl,
                "reference_agreement_B": float((ref_pred == b).mean()), "window": {}}
        for w in ("early", "all"):
            o = gen([a] * n, seeds, [Intervention(HOOK, clamp, steps=windows[w])])
            pr = pred(o)
            cell["window"][w] = {"classified_as_reference_class": float((pr == b).mean()),
                                 "classified_as_ref_pred_same_seed": float((pr == ref_pred).mean()),
                                 "still_A": float((pr == a).mean()),
                                 "mean_abs_pixel_change_vs_A": float((o.images - base[a].images).abs().mean()),
                                 "mean_abs_pixel_dist_to_reference": float((o.images - ref.images).abs().mean())}
        cell["baseline_A_vs_reference_pixel_dist"] = float((base[a].images - ref.images).abs().mean())
        transfer.append(cell)
        print("transfer", cell, flush=True)
    timings["transfer_s"] = time.perf_counter() - t0

    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads()},
              "hook": HOOK, "sae": args.sae, "stats_data": args.data, "condition_names": names,
              "sampler": {"num_steps": S, "guidance_scale": 1.0, "scheduler": "DDIM (backbone default)", "seeds": f"0..{n - 1}"},
              "windows": windows, "alpha_definition": "alpha_f = mult * mean activation of feature f where it fires "
                                                       "(training capture); add mode over the window",
              "feature_selection": "top features by one-vs-rest AUROC of the image-level activation (max over tokens "
                                   "and recorded steps) on the SAE's training capture",
              "baseline_agreement": baseline, "steering": steer, "removal": removal,
              "preservation": preservation, "transfer": transfer,
              "timings_s": timings, "total_s": time.perf_counter() - started}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    write_md(result, out.with_suffix(".md"))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}.json/.md/.png in {result['total_s']:.0f} s", flush=True)


def write_md(r: dict, path: Path) -> None:
    mults = list(r["steering"][0]["alpha"])
    L = ["# Feature steering on fmnist-dit (TIDE SAE, blocks.4.hook_resid_post)", "",
         f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
         f"SAE: `{r['sae']}`; sampler: {r['sampler']}; n = {r['args']['n']} samples per cell (paired seeds); "
         f"timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items()) + f"; total {r['total_s']:.0f} s", "",
         f"alpha: {r['alpha_definition']}. Features: {r['feature_selection']}.", "",
         "Baseline agreement (plain generation, same seeds): "
         + ", ".join(f"{k} {v:.2f}" for k, v in r["baseline_agreement"].items()), "",
         "## 1. Class steering A → B (top-3 B features, add): fraction classified as B", "",
         "| A → B | features (AUROC for B) | " + " | ".join(f"×{m}" for m in mults)
         + " | window mult | early | middle | late | all |", "|---" * (len(mults) + 7) + "|"]
    for s in r["steering"]:
        feats = ", ".join(f"{f['feature']} ({f['auroc'].get(s['B'], float('nan')):.2f})" for f in s["features"])
        L.append(f"| {s['A']} → {s['B']} | {feats} | "
                 + " | ".join(f"{s['alpha'][m]['success_B']:.2f}" for m in mults)
                 + f" | ×{s['window_mult']:g} | " + " | ".join(f"{s['window'][w]['success_B']:.2f}" for w in ("early", "middle", "late", "all")) + " |")
    L += ["", "Fraction still classified as A at each multiple: "
          + "; ".join(f"{s['A']}→{s['B']}: " + ", ".join(f"×{m} {s['alpha'][m]['still_A']:.2f}" for m in mults) for s in r["steering"]), "",
          "## 2. Concept removal (ablate top-5 features of C, all steps)", "",
          "| class C | baseline agreement | agreement ablated | removal rate | other classes: agreement baseline → ablated (drop) |",
          "|---|---|---|---|---|"]
    for d in r["removal"]:
        L.append(f"| {d['class']} | {d['baseline_agreement']:.2f} | {d['agreement_ablated']:.2f} | {d['removal_rate']:.2f} | "
                 f"{d['others_agreement_baseline']:.2f} → {d['others_agreement_ablated']:.2f} ({d['others_agreement_drop']:+.2f}) |")
    rm = np.mean([d["removal_rate"] for d in r["removal"]])
    dr = np.mean([d["others_agreement_drop"] for d in r["removal"]])
    L += [f"| **mean** | {np.mean([d['baseline_agreement'] for d in r['removal']]):.2f} | "
          f"{np.mean([d['agreement_ablated'] for d in r['removal']]):.2f} | **{rm:.2f}** | drop **{dr:+.2f}** |", ""]
    p = r["preservation"]
    L += ["## 3. Preservation (masked vs unmasked add)", "",
          f"Pair {p['pair'][0]} → {p['pair'][1]}, ×{p['mult']:g}, mask = upper {p['mask_patch_rows']} of 7 patch rows "
          f"(pixel rows 0-{p['mask_pixel_rows'] - 1}).", "",
          "| edit | mean abs pixel change inside mask | outside | inside/outside | success B | still A |", "|---|---|---|---|---|---|"]
    for k in ("masked", "unmasked"):
        L.append(f"| {k} | {p[k]['mean_abs_change_inside']:.4f} | {p[k]['mean_abs_change_outside']:.4f} | "
                 f"{p[f'inside_outside_ratio_{k}']:.2f} | {p[k]['success_B']:.2f} | {p[k]['still_A']:.2f} |")
    L += ["", "## 4. Transfer (reference B latents of the top-3 B features clamped per token and step into A)", "",
          "| A ← B | window | classified as B | still A | pixel change vs plain A | pixel dist to reference (plain A: ) |",
          "|---|---|---|---|---|---|"]
    for t in r["transfer"]:
        for w, v in t["window"].items():
            L.append(f"| {t['A']} ← {t['B']} | {w} | {v['classified_as_reference_class']:.2f} | {v['still_A']:.2f} | "
                     f"{v['mean_abs_pixel_change_vs_A']:.4f} | {v['mean_abs_pixel_dist_to_reference']:.4f} "
                     f"({t['baseline_A_vs_reference_pixel_dist']:.4f}) |")
    L += ["", "## Summary", "", "SUMMARY_PLACEHOLDER", ""]
    path.write_text("\n".join(L) + "\n")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for s in r["steering"]:
        ms = [float(m) for m in s["alpha"]]
        ax[0].plot(ms, [v["success_B"] for v in s["alpha"].values()], marker="o", label=f"{s['A']} → {s['B']}")
    ax[0].set_xlabel("alpha (multiple of mean firing activation)")
    ax[0].set_ylabel("fraction classified as B")
    ax[0].set_title(f"add top-3 B features, all {r['sampler']['num_steps']} steps", fontsize=9)
    ax[0].legend(fontsize=7)
    ws = ["early", "middle", "late", "all"]
    x = np.arange(len(ws))
    wd = 0.8 / len(r["steering"])
    for i, s in enumerate(r["steering"]):
        ax[1].bar(x + i * wd - 0.4 + wd / 2, [s["window"][w]["success_B"] for w in ws], wd,
                  label=f"{s['A']} → {s['B']} (×{s['window_mult']:g})")
    ax[1].set_xticks(x, [f"{w}\n{r['windows'][w]}" for w in ws])
    ax[1].set_ylabel("fraction classified as B")
    ax[1].set_title("timestep window (steps, 0 = noisiest)", fontsize=9)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
