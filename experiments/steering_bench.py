"""Steering benchmark: every ordered class pair, the null condition, removal, masked edits and attributes.

    tide capture --config configs/faithful_capture.yaml --out runs/faithful_capture
    tide train --config configs/steering.yaml --data runs/faithful_capture --out runs/steering_saes
    python experiments/steering_bench.py --sae runs/steering_saes/tide

The edit is the steering profile's (tide.analysis.steering_profile): the paired per-step, per-token latent shift
source -> target that a condition causes in the SAE's features, measured along ``--calibration`` generations of the
source (seeds from 50000), added to the conditional rows. Cells (``--n`` generations each, the same seeds 10000.. in
every cell, so "before" and "after" are paired):

* null -> B: null-condition generations plus the null -> B shift (10 cells);
* A -> B: class-A generations plus the A -> B shift measured along A's generations (90 cells); as an ablation,
  the null -> B minus null -> A shifts (``+B-A``);
* removal of C: every class's generations plus ``--remove-strengths`` times the C -> null shift measured along C's
  generations: how many of C's stop being C, and what the same edit costs the other classes (collateral, in
  points of classifier agreement);
* masked edits: A -> A+1 inside half of the token grid from a later step: mean |pixel change| outside the
  mask over inside;
* attributes (models with a vocabulary): class generations plus the null -> word shift for dark / light / small /
  large, measured on the images (tide.eval.attributes).

A second recipe, the feature patch (tide.analysis.feature_patch: each sample's SAE features set, step by step, to
what prompt B gives on the same latents, the error term kept), is measured on the same cells, seeds and classifier
by ``--stage patch``, which adds its section to an existing result (null -> B, A -> B, realism, masked edits; its
strength is chosen the same way from ``--patch-strengths``).

Success = the evaluation classifier says B; neither = it says neither A nor B. Realism = Fréchet distance, in the
classifier's features, of all images steered toward B to real Fashion-MNIST test images of B, over the same
distance for the model's own B generations (``--n`` x 10 seeds). The strengths of null -> B and A -> B are chosen
on separate seeds (60000..) from ``--strengths``; every reported number uses the test seeds only.
Writes experiments/results/steering_bench{.json,.md,.png,_images.npz}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tide.analysis.steering_profile import measure_profile, profile_intervention  # noqa: E402
from tide.eval.attributes import MEASURES, WORDS  # noqa: E402
from tide.eval.classifier import load_classifier  # noqa: E402
from tide.eval.fashion_mnist import load_fashion_mnist  # noqa: E402
from tide.eval.frechet import frechet_distance  # noqa: E402
from tide.images import save_grid  # noqa: E402
from tide.models import load_backbone  # noqa: E402
from tide.models.base import NULL_CONDITION  # noqa: E402
from tide.sae import load_sae  # noqa: E402
from tide.sampling import SamplerConfig, sample  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True)
    p.add_argument("--n", type=int, default=20, help="generations per cell")
    p.add_argument("--calibration", type=int, default=32, help="null-condition generations behind each profile")
    p.add_argument("--strengths", default="1,1.5,2", help="candidate strengths, chosen on separate seeds")
    p.add_argument("--remove-strengths", default="1,2,3")
    p.add_argument("--select-n", type=int, default=8, help="generations per target when choosing the strength")
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--out", default=str(RESULTS / "steering_bench"))
    p.add_argument("--stage", choices=("all", "patch"), default="all",
                   help="all: every measurement; patch: add the feature-patch recipe to the results at --out")
    p.add_argument("--patch-strengths", default="1,1.5,2")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        self.args = args
        self.sae = load_sae(args.sae).eval()
        spec = self.sae.cfg.backbone
        base = load_backbone(spec, device="cpu")
        self.num_classes = base.num_conditions
        words = [w for pair in WORDS.values() for w in pair] if base.vocabulary is not None else []
        prompts = list(base.prompts.texts) + words if words else None
        self.backbone = load_backbone(spec, prompts=prompts, device="cpu") if words else base
        self.words = {w: self.num_classes + i for i, w in enumerate(words)}
        self.clf = load_classifier(self.backbone)
        self.cfg = SamplerConfig(num_steps=args.num_steps, guidance_scale=args.guidance, batch_size=args.batch_size)
        self.classes = list(range(self.num_classes))
        self.started = time.time()

    def log(self, msg):
        print(f"[{time.time() - self.started:6.0f}s] {msg}", flush=True)

    def gen(self, conds, seeds, iv=None):
        return sample(self.backbone, conds, seeds, self.cfg, interventions=[iv] if iv is not None else []).images

    def predict(self, images):
        return self.clf.predict(images).numpy()

    def steer(self, toward=(), away=(), strength=1.0, **kw):
        return profile_intervention(self.sae, self.profile, toward=list(toward), away=list(away), strength=strength, **kw)

    # ------------------------------------------------------------------ stages
    def measure(self):
        words = list(self.words.values())
        self.profile = measure_profile(self.backbone, self.sae, self.classes + [NULL_CONDITION] + words, self.cfg,
                                       num_samples=self.args.calibration, sources=[NULL_CONDITION] + self.classes)
        self.log(f"profile of {len(self.profile.shifts)} (source, target) pairs over {self.args.calibration} "
                 "calibration generations each")

    def choose_strength(self) -> dict:
        """Per use (null -> B, A -> B), the strength of ``--strengths`` with the most success on separate seeds."""
        seeds = [60_000 + i for i in range(self.args.select_n)]
        rates = {"null": {}, "own": {}}
        for s in (float(v) for v in self.args.strengths.split(",")):
            hits = [float((self.predict(self.gen([NULL_CONDITION] * len(seeds), seeds, self.steer([b], strength=s)))
                           == b).mean()) for b in self.classes]
            rates["null"][s] = float(np.mean(hits))
            hits = []
            for b in self.classes:
                a = (b + 3) % self.num_classes
                pred = self.predict(self.gen([a] * len(seeds), seeds, self.steer([b], strength=s, source="own")))
                hits.append(float((pred == b).mean()))
            rates["own"][s] = float(np.mean(hits))
            self.log(f"selection seeds at strength {s}: null -> B {rates['null'][s]:.0%}, A -> B {rates['own'][s]:.0%}")
        self.selection = rates
        return {k: max(v, key=lambda s: (v[s], -s)) for k, v in rates.items()}

    def pairs(self, strengths):
        n, seeds = self.args.n, [self.args.seed + i for i in range(self.args.n)]
        self.seeds = seeds
        null_before = self.gen([NULL_CONDITION] * n, seeds)
        own = {a: self.gen([a] * n, seeds) for a in self.classes}  # the model's own class-A generations
        self.own = own
        cells, images = [], {"null_before": null_before, "own": torch.stack([own[a] for a in self.classes])}
        null_after = []
        for b in self.classes:
            after = self.gen([NULL_CONDITION] * n, seeds, self.steer([b], strength=strengths["null"]))
            pred = self.predict(after)
            null_after.append(after)
            cells.append({"from": "null", "to": b, "variant": "+B", "success": float((pred == b).mean()),
                          "neither": float((pred != b).mean()), "before_b": float((self.predict(null_before) == b).mean())})
        images["null_after"] = torch.stack(null_after)
        self.log(f"null -> B: {np.mean([c['success'] for c in cells]):.0%}")
        ab = torch.zeros(self.num_classes, self.num_classes, n, *null_before.shape[1:])
        for variant in ("A->B", "+B-A"):
            for b in self.classes:  # every A at once: each row gets its own condition's shift
                sources = [a for a in self.classes if a != b]
                iv = self.steer([b], strength=strengths["own"], source="own") if variant == "A->B" else \
                    self.steer([b], strength=strengths["null"], away_own=True)
                after = self.gen([a for a in sources for _ in range(n)], seeds * len(sources), iv)
                for i, a in enumerate(sources):
                    got = after[i * n:(i + 1) * n]
                    pred = self.predict(got)
                    if variant == "A->B":
                        ab[a, b] = got
                    cells.append({"from": a, "to": b, "variant": variant, "success": float((pred == b).mean()),
                                  "neither": float(((pred != a) & (pred != b)).mean()),
                                  "still_a": float((pred == a).mean()),
                                  "before_b": float((self.predict(own[a]) == b).mean())})
            self.log(f"A -> B ({variant}): {np.mean([c['success'] for c in cells if c['variant'] == variant]):.0%}")
        images["pairs_after"] = ab
        self.images = images
        return cells

    def patch_ceiling(self):
        """A -> B by activation patching (no SAE, sample by sample): at every step the hook's conditional rows are
        replaced by what prompt B gives on the same latents. What a one-hook edit that follows each sample reaches."""
        from tide.sampling import Trajectory

        n, seeds, hook = self.args.n, self.seeds, self.sae.cfg.hook
        out = []
        for b in self.classes:
            sources = [a for a in self.classes if a != b]
            conds, ss = [a for a in sources for _ in range(n)], seeds * len(sources)
            ids = list(range(len(conds)))
            traj = Trajectory(self.backbone, conds, ss, ids, self.cfg)
            other = Trajectory(self.backbone, [b] * len(conds), ss, ids, self.cfg)
            for step, o_step in zip(traj, other):
                other.x = traj.x
                store = {}

                def keep(act, hook, store=store):
                    store["x"] = act[(other.branch_B == 0).to(act.device)].clone()

                other.predict(o_step, [(hook, keep)])
                rows = (traj.branch_B == 0)

                def swap(act, hook, rows=rows, resid=store["x"]):
                    act = act.clone()
                    act[rows.to(act.device)] = resid.to(act.dtype)
                    return act

                traj.advance(step, traj.predict(step, [(hook, swap)]))
            images = self.backbone.decode(traj.x).cpu()
            for i, a in enumerate(sources):
                pred = self.predict(images[i * n:(i + 1) * n])
                out.append({"from": a, "to": b, "success": float((pred == b).mean()),
                            "neither": float(((pred != a) & (pred != b)).mean())})
        self.log(f"A -> B by patching the hook: {np.mean([c['success'] for c in out]):.0%}")
        return out

    def realism(self, prefix: str = ""):
        """Per target B: FD of the images steered toward B (``{prefix}null_after``, ``{prefix}pairs_after``) to real B
        images, over the FD of as many of the model's own B generations."""
        real, labels = load_fashion_mnist("test")
        real = torch.from_numpy(real).float().div(255)[:, None]
        out = {}
        for b in self.classes:
            steered = torch.cat([self.images[f"{prefix}null_after"][b]] + [self.images[f"{prefix}pairs_after"][a, b]
                                                                           for a in self.classes if a != b])
            f_real = self.clf.embed(real[torch.from_numpy(labels == b)])
            fd_steer = frechet_distance(self.clf.embed(steered), f_real)
            extra = [s + 1000 * k for k in range(1, len(self.classes)) for s in self.seeds]
            own = torch.cat([self.own[b], self.gen([b] * len(extra), extra)])[: len(steered)]
            fd_own = frechet_distance(self.clf.embed(own), f_real)
            out[b] = {"fd_steered": fd_steer, "fd_own": fd_own, "ratio": fd_steer / fd_own,
                      "n_steered": len(steered), "n_own": len(own)}
        self.log(f"{prefix}realism: FD ratio steered / own, median {np.median([v['ratio'] for v in out.values()]):.2f}")
        return out

    def removal(self):
        n, seeds = self.args.n, self.seeds
        base = {d: self.predict(self.own[d]) for d in self.classes}
        out = []
        for s in (float(v) for v in self.args.remove_strengths.split(",")):
            for c in self.classes:
                iv = self.steer([NULL_CONDITION], strength=s, source=c)  # C -> null, measured along C's generations
                after = self.gen([d for d in self.classes for _ in range(n)], seeds * len(self.classes), iv)
                pred = {d: self.predict(after[d * n:(d + 1) * n]) for d in self.classes}
                kept = float((pred[c] == c).mean())
                lost = [float((base[d] == d).mean() - (pred[d] == d).mean()) for d in self.classes if d != c]
                before = float((base[c] == c).mean())
                out.append({"variant": "C->null", "strength": s, "remove": c, "still_c": kept, "still_c_before": before,
                            "removed": 1 - kept / max(before, 1e-9), "collateral_points": 100 * float(np.mean(lost)),
                            "collateral_worst": 100 * float(np.max(lost))})
            rows = [r for r in out if r["strength"] == s]
            self.log(f"removal at {s}: still C {np.mean([r['still_c'] for r in rows]):.0%}, collateral "
                     f"{np.mean([r['collateral_points'] for r in rows]):.1f} points")
        return out

    def region(self, region: str):
        """(token mask over the patch grid, the same mask over the image's pixels) of one half of the image."""
        from tide.analysis.steering import region_mask

        grid = tuple(self.backbone.patch_grid)
        tok = region_mask(region, grid)
        size = self.backbone.decode(torch.zeros(1, *self.backbone.latent_shape())).shape[-2:]
        return tok, tok.repeat_interleave(size[0] // grid[0], 0).repeat_interleave(size[1] // grid[1], 1)

    def masked(self, strength):
        n, seeds = self.args.n, self.seeds
        out, shown = [], []
        for region in ("left", "upper"):
            tok, pix = self.region(region)
            for start in (0, 4, 8):
                ins, outs = [], []
                for a in self.classes:
                    b = (a + 1) % self.num_classes
                    iv = self.steer([b], strength=strength, source="own", steps=(start, self.args.num_steps), mask=tok)
                    after = self.gen([a] * n, seeds, iv)
                    d = (after - self.own[a]).abs()[:, 0]
                    ins.append(float(d[:, pix].mean()))
                    outs.append(float(d[:, ~pix].mean()))
                    if a == 0 and region == "left":
                        shown.append(after[:8])
                out.append({"region": region, "from_step": start, "inside": float(np.mean(ins)),
                            "outside": float(np.mean(outs)), "outside_over_inside": float(np.mean(outs) / np.mean(ins))})
                self.log(f"masked {region} from step {start}: outside/inside {out[-1]['outside_over_inside']:.2f}")
        self.images["masked_left_0to1"] = torch.stack(shown)
        return out

    def attributes(self, strength):
        if not self.words:
            return []
        seeds = self.seeds[: max(self.args.n // 2, 4)]
        out = []
        for group, (low, high) in WORDS.items():
            measure = MEASURES[group]
            for word, sign in ((low, -1.0), (high, 1.0)):
                moved, deltas, kept = [], [], []
                for a in self.classes:
                    before = self.own[a][: len(seeds)]
                    after = self.gen([a] * len(seeds), seeds, self.steer([self.words[word]], strength=strength))
                    dv = (measure(after) - measure(before)).numpy()
                    moved.append(float((sign * dv > 0).mean()))
                    deltas.append(float(dv.mean()))
                    kept.append(float((self.predict(after) == a).mean()))
                out.append({"word": word, "group": group, "moved_right_way": float(np.mean(moved)),
                            "mean_change": float(np.mean(deltas)), "class_kept": float(np.mean(kept)), "n": len(seeds) * 10})
                self.log(f"toward {word}: moved the right way {out[-1]['moved_right_way']:.0%}, change "
                         f"{out[-1]['mean_change']:+.3f}, class kept {out[-1]['class_kept']:.0%}")
        return out


class PatchBench(Bench):
    """The feature-patch recipe on the cells, seeds and classifier of the profile benchmark."""

    def patched(self, conds, targets, seeds, strength, **kw):
        from tide.analysis.feature_patch import sample_patched

        return sample_patched(self.backbone, self.sae, conds, targets, seeds, self.cfg, strength=strength, **kw).images

    def choose_strength(self) -> float:
        seeds = [60_000 + i for i in range(self.args.select_n)]
        n = len(seeds)
        rates = {}
        for st in (float(v) for v in self.args.patch_strengths.split(",")):
            k = self.num_classes
            conds = [NULL_CONDITION] * (n * k) + [(b + 3) % k for b in self.classes for _ in seeds]
            targets = [b for b in self.classes for _ in seeds] * 2
            pred = self.predict(self.patched(conds, targets, seeds * 2 * k, st))
            rates[st] = float((pred == np.asarray(targets)).mean())
            self.log(f"patch, selection seeds at strength {st}: {rates[st]:.0%} (null -> B and A -> B)")
        self.selection = rates
        return max(rates, key=lambda v: (rates[v], -v))

    def pairs(self, strength):
        n, seeds = self.args.n, [self.args.seed + i for i in range(self.args.n)]
        self.seeds = seeds
        cells = []
        k = self.num_classes
        null_after = self.patched([NULL_CONDITION] * n * k, [b for b in self.classes for _ in seeds], seeds * k,
                                  strength)
        for b in self.classes:
            pred = self.predict(null_after[b * n:(b + 1) * n])
            cells.append({"from": "null", "to": b, "variant": "patch", "success": float((pred == b).mean()),
                          "neither": float((pred != b).mean())})
        self.log(f"patch null -> B: {np.mean([c['success'] for c in cells]):.0%}")
        ab = torch.zeros(k, k, n, *null_after.shape[1:])
        for b in self.classes:
            sources = [a for a in self.classes if a != b]
            after = self.patched([a for a in sources for _ in seeds], [b] * (n * len(sources)), seeds * len(sources),
                                 strength)
            for i, a in enumerate(sources):
                got = after[i * n:(i + 1) * n]
                ab[a, b] = got
                pred = self.predict(got)
                cells.append({"from": a, "to": b, "variant": "patch", "success": float((pred == b).mean()),
                              "neither": float(((pred != a) & (pred != b)).mean()), "still_a": float((pred == a).mean())})
        self.log(f"patch A -> B: {np.mean([c['success'] for c in cells if c['from'] != 'null']):.0%}, neither "
                 f"{np.mean([c['neither'] for c in cells if c['from'] != 'null']):.0%}")
        self.own = self.images["own"][:, :n]  # the model's own generations on these seeds, for realism
        self.images["patch_null_after"] = null_after.reshape(k, n, *null_after.shape[1:])
        self.images["patch_pairs_after"] = ab
        return cells

    def masked(self, strength):
        n, seeds, k = self.args.n, self.seeds, self.num_classes
        own = self.images["own"][:, :n]
        out, shown = [], []
        for region in ("left", "upper"):
            tok, pix = self.region(region)
            for start in (0, 4, 8):
                after = self.patched([a for a in self.classes for _ in seeds], [(a + 1) % k for a in self.classes
                                                                               for _ in seeds], seeds * k, strength,
                                     steps=(start, self.args.num_steps), mask=tok)
                d = (after.reshape(k, n, *after.shape[1:]) - own).abs()[:, :, 0]
                ins, outs = float(d[:, :, pix].mean()), float(d[:, :, ~pix].mean())
                if region == "left":
                    shown.append(after[:8])
                out.append({"region": region, "from_step": start, "inside": ins, "outside": outs,
                            "outside_over_inside": outs / ins})
                self.log(f"patch masked {region} from step {start}: outside/inside {outs / ins:.2f}")
        self.images["patch_masked_left_0to1"] = torch.stack(shown)
        return out


def run_patch_stage(args):
    """Add the feature-patch recipe to the results at ``--out`` (made by a full run)."""
    out = Path(args.out)
    res = json.loads(out.with_suffix(".json").read_text())
    bench = PatchBench(args)
    with np.load(out.with_name(out.name + "_images.npz")) as z:
        bench.images = {k: torch.from_numpy(z[k]).float().div(255) for k in z.files if k not in ("seeds", "note")}
    started = time.time()
    strength = bench.choose_strength()
    bench.log(f"patch strength {strength}")
    cells = bench.pairs(strength)
    res["patch"] = {"args": {k: v for k, v in vars(args).items()}, "strength": strength, "selection": bench.selection,
                    "cells": cells, "realism": {str(b): v for b, v in bench.realism("patch_").items()},
                    "masked": bench.masked(strength)}
    res["patch"]["seconds"] = time.time() - started
    res["summary"] = summarise(res)
    return res, bench


def summarise(res: dict) -> dict:
    cells = res["cells"]
    null = [c for c in cells if c["from"] == "null"]
    ab = [c for c in cells if c["from"] != "null" and c["variant"] == "A->B"]
    ab_only = [c for c in cells if c["from"] != "null" and c["variant"] == "+B-A"]
    own = [res["own_agreement"][str(b)] for b in range(10)] if "own_agreement" in res else []
    rem = res["removal"]
    groups = {(r["variant"], r["strength"]) for r in rem}

    def score(g):  # most removal among settings that keep collateral within 5 points, else least collateral
        rows = [r for r in rem if (r["variant"], r["strength"]) == g]
        col = np.mean([r["collateral_points"] for r in rows])
        return (col <= 5, np.mean([r["removed"] for r in rows]) if col <= 5 else -col)

    best = max(groups, key=score)
    chosen = [r for r in rem if (r["variant"], r["strength"]) == best]
    patch = {}
    if "patch" in res:
        pc = res["patch"]["cells"]
        pab = [c for c in pc if c["from"] != "null"]
        patch = {"patch_strength": res["patch"]["strength"],
                 "patch_null_to_b_success": float(np.mean([c["success"] for c in pc if c["from"] == "null"])),
                 "patch_a_to_b_success": float(np.mean([c["success"] for c in pab])),
                 "patch_a_to_b_neither": float(np.mean([c["neither"] for c in pab])),
                 "patch_a_to_b_pairs_at_least_70": int(sum(c["success"] >= 0.7 for c in pab)),
                 "patch_realism_ratio_median": float(np.median([v["ratio"] for v in res["patch"]["realism"].values()])),
                 "patch_realism_ratio_max": float(np.max([v["ratio"] for v in res["patch"]["realism"].values()])),
                 "patch_masked_outside_over_inside": [m["outside_over_inside"] for m in res["patch"]["masked"]]}
    return {**patch,
        "null_to_b_success": float(np.mean([c["success"] for c in null])),
        "a_to_b_success": float(np.mean([c["success"] for c in ab])),
        "a_to_b_neither": float(np.mean([c["neither"] for c in ab])),
        "a_to_b_null_shifts_success": float(np.mean([c["success"] for c in ab_only])),
        "a_to_b_null_shifts_neither": float(np.mean([c["neither"] for c in ab_only])),
        "own_b_agreement": float(np.mean(own)) if own else None,
        "a_to_b_patch_success": float(np.mean([c["success"] for c in res["patch_ceiling"]])),
        "a_to_b_patch_neither": float(np.mean([c["neither"] for c in res["patch_ceiling"]])),
        "realism_ratio_median": float(np.median([v["ratio"] for v in res["realism"].values()])),
        "realism_ratio_max": float(np.max([v["ratio"] for v in res["realism"].values()])),
        "removal_best": f"{best[0]} at strength {best[1]}",
        "removal_removed": float(np.mean([r["removed"] for r in chosen])),
        "removal_collateral_points": float(np.mean([r["collateral_points"] for r in chosen])),
    }


def write_markdown(res: dict, path: Path, names: list[str]):
    s = res["summary"]
    P = res.get("patch")
    ps = {k[len("patch_"):]: v for k, v in s.items() if k.startswith("patch_")}

    def both(key, fmt="{:.1%}"):
        return fmt.format(s[key]) + " | " + (fmt.format(ps[key]) if key in ps else "–")

    lines = ["# Steering benchmark (`experiments/steering_bench.py`)", "",
             f"SAE `{res['args']['sae']}`; {res['args']['n']} generations per cell (seeds {res['args']['seed']}..). "
             "Two recipes: the **profile** (the mean paired feature shift, added) and the **patch** (each sample's "
             "features set to what prompt B gives on its latents, step by step). Profile strengths "
             f"{res['strengths']} chosen on separate seeds (60000..) from {res['selection']}"
             + (f"; patch strength {P['strength']} chosen the same way from {P['selection']}." if P else "."), "",
             "| measure | profile | patch | aim |", "|---|---|---|---|",
             f"| null → B success | {both('null_to_b_success')} | ≥ 90% |",
             f"| A → B success, 90 pairs | {both('a_to_b_success')} | ≥ 70% |",
             f"| A → B neither-class rate | {both('a_to_b_neither')} | ≤ 15% |",
             f"| realism: FD(steered B, real B) / FD(own B, real B), median over B | "
             f"{both('realism_ratio_median', '{:.2f}')} | ≤ 2 |",
             f"| realism, worst B | {both('realism_ratio_max', '{:.2f}')} | |",
             f"| masked edits, outside / inside (left, upper × from step 0, 4, 8) | "
             + ", ".join(f"{m['outside_over_inside']:.2f}" for m in res["masked"]) + " | "
             + (", ".join(f"{v:.2f}" for v in ps["masked_outside_over_inside"]) if ps else "–") + " | ≤ 0.15 |",
             f"| removal of C ({s['removal_best']}) | {s['removal_removed']:.1%} removed | – | ≥ 90% |",
             f"| removal collateral on other classes | {s['removal_collateral_points']:.1f} points | – | ≤ 5 |", "",
             "References on the same seeds:", "",
             f"- A → B with the null → B minus null → A profile shifts: {s['a_to_b_null_shifts_success']:.1%} "
             f"(neither {s['a_to_b_null_shifts_neither']:.1%});",
             f"- the model's own B generations called B: {s['own_b_agreement']:.1%} (the ceiling of every success rate);",
             f"- A → B by patching the hook with prompt B's whole activation, sample by sample (no SAE): "
             f"{s['a_to_b_patch_success']:.1%} (neither {s['a_to_b_patch_neither']:.1%}), the one-hook ceiling"
             + (f"; the feature patch, which keeps the SAE's error term, reaches {ps['a_to_b_success']:.1%}, and "
                f"{ps['a_to_b_pairs_at_least_70']} of its 90 pairs reach 70%." if ps else "."), ""]
    lines += ["## Success per cell (rows: from; columns: toward B)", "",
              "| from \\ to | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    cells = res["cells"]
    for a in ["null"] + list(range(len(names))):
        row = []
        for b in range(len(names)):
            c = [x for x in cells if x["from"] == a and x["to"] == b and x["variant"] == ("+B" if a == "null" else "A->B")]
            row.append(f"{c[0]['success']:.0%}" if c else "–")
        lines.append(f"| {a if a == 'null' else names[a]} | " + " | ".join(row) + " |")
    if P:
        lines += ["", "## Success per cell, feature patch (rows: from; columns: toward B)", "",
                  "| from \\ to | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for a in ["null"] + list(range(len(names))):
            row = []
            for b in range(len(names)):
                c = [x for x in P["cells"] if x["from"] == a and x["to"] == b]
                row.append(f"{c[0]['success']:.0%}" if c else "–")
            lines.append(f"| {a if a == 'null' else names[a]} | " + " | ".join(row) + " |")
    lines += ["", "## Removal", "", "| edit | strength | still C (before) | removed | collateral (mean / worst points) |",
              "|---|---|---|---|---|"]
    for v_, s_ in sorted({(r["variant"], r["strength"]) for r in res["removal"]}):
        rows = [r for r in res["removal"] if r["strength"] == s_ and r["variant"] == v_]
        lines.append(f"| {v_} | {s_} | {np.mean([r['still_c'] for r in rows]):.1%} ({np.mean([r['still_c_before'] for r in rows]):.1%}) "
                     f"| {np.mean([r['removed'] for r in rows]):.1%} | {np.mean([r['collateral_points'] for r in rows]):.1f} / "
                     f"{np.max([r['collateral_worst'] for r in rows]):.1f} |")
    lines += ["", "## Masked edits (A → A+1 inside the mask, from a later step)", "",
              "| region | from step | mean |Δpixel| inside | outside | outside / inside |", "|---|---|---|---|---|"]
    for m in res["masked"]:
        lines.append(f"| {m['region']} | {m['from_step']} | {m['inside']:.3f} | {m['outside']:.3f} | {m['outside_over_inside']:.2f} |")
    if res["attributes"]:
        lines += ["", "## Attributes (class generations steered toward a word)", "",
                  "| toward | moved the right way | mean change | class kept |", "|---|---|---|---|"]
        for a in res["attributes"]:
            lines.append(f"| {a['word']} ({a['group']}) | {a['moved_right_way']:.0%} | {a['mean_change']:+.3f} | {a['class_kept']:.0%} |")
    if P:
        lines += ["", "## Masked edits, feature patch", "",
                  "| region | from step | mean |Δpixel| inside | outside | outside / inside |", "|---|---|---|---|---|"]
        for m in P["masked"]:
            lines.append(f"| {m['region']} | {m['from_step']} | {m['inside']:.3f} | {m['outside']:.3f} | "
                         f"{m['outside_over_inside']:.2f} |")
    lines += ["", "## Realism per target class", "", "| B | FD own | FD profile-steered | ratio | FD patch-steered | ratio |",
              "|---|---|---|---|---|---|"]
    for b, v in res["realism"].items():
        pv = P["realism"][b] if P else None
        lines.append(f"| {names[int(b)]} | {v['fd_own']:.2f} | {v['fd_steered']:.2f} | {v['ratio']:.2f} | "
                     + (f"{pv['fd_steered']:.2f} | {pv['ratio']:.2f} |" if pv else "– | – |"))
    path.write_text("\n".join(lines) + "\n")


def figure(res: dict, images: dict, path: Path, names: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(names)

    def matrix(cells, variant):
        m = np.full((k + 1, k), np.nan)
        for c in cells:
            if c["from"] == "null":
                m[0, c["to"]] = c["success"]
            elif c["variant"] == variant:
                m[1 + c["from"], c["to"]] = c["success"]
        return m

    panels = [("profile (mean shift)", matrix(res["cells"], "A->B"), res["summary"]["null_to_b_success"],
               res["summary"]["a_to_b_success"], res["summary"]["a_to_b_neither"])]
    if "patch" in res:
        s = res["summary"]
        panels.append(("feature patch", matrix(res["patch"]["cells"], "patch"), s["patch_null_to_b_success"],
                       s["patch_a_to_b_success"], s["patch_a_to_b_neither"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6.5), squeeze=False)
    for ax, (title, m, nb, ab, nei) in zip(axes[0], panels):
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i in range(k + 1):
            for j in range(k):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.0%}".replace("%", ""), ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < 0.6 else "black")
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k + 1), ["null"] + names)
        ax.set_xlabel("steered toward B")
        if ax is axes[0][0]:
            ax.set_ylabel("generations of")
        ax.set_title(f"{title}: classifier says B (%)\nnull→B {nb:.0%}, A→B {ab:.0%}, neither {nei:.0%}", fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    # example images: null before, null -> B, then for A = 0..3 the A generation and A -> each B
    rows, labels = [torch.stack([images["null_before"][b % len(images["null_before"])] for b in range(k)]),
                    torch.stack([images["null_after"][b, 0] for b in range(k)])], ["null", "null→B"]
    for a in range(4):
        rows.append(torch.stack([images["own"][a, 0] if b == a else images["pairs_after"][a, b, 0] for b in range(k)]))
        labels.append(f"{names[a]}→B")
    if "patch_pairs_after" in images:
        rows.append(torch.stack([images["patch_null_after"][b, 0] for b in range(k)]))
        labels.append("null→B patch")
        for a in range(4):
            rows.append(torch.stack([images["own"][a, 0] if b == a else images["patch_pairs_after"][a, b, 0]
                                     for b in range(k)]))
            labels.append(f"{names[a]}→B patch")
    save_grid(torch.cat(rows), path.with_name(path.stem + "_examples.png"), nrow=k, row_labels=labels,
              title="steered toward B (columns B = " + ", ".join(names) + "); diagonal: the unedited generation")


def main(argv=None):
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.stage == "patch":
        res, bench = run_patch_stage(args)
        return write(res, bench, args)
    bench = Bench(args)
    bench.measure()
    strengths = bench.choose_strength()
    bench.log(f"strengths {strengths}")
    res = {"what": __doc__.split("\n\n")[0], "args": vars(args), "strengths": strengths, "selection": bench.selection,
           "profile_meta": bench.profile.meta}
    res["cells"] = bench.pairs(strengths)
    res["patch_ceiling"] = bench.patch_ceiling()
    res["own_agreement"] = {str(a): float((bench.predict(bench.own[a]) == a).mean()) for a in bench.classes}
    res["realism"] = {str(k): v for k, v in bench.realism().items()}
    res["removal"] = bench.removal()
    res["masked"] = bench.masked(strengths["own"])
    res["attributes"] = bench.attributes(strengths["null"])
    res["summary"] = summarise(res)
    res["seconds"] = time.time() - bench.started
    return write(res, bench, args)


def write(res, bench, args):
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    names = bench.clf.class_names
    write_markdown(res, out.with_suffix(".md"), names)
    figure(res, bench.images, out.with_suffix(".png"), names)
    np.savez_compressed(out.with_name(out.name + "_images.npz"),
                        **{k: (v.clamp(0, 1) * 255).round().to(torch.uint8).numpy() for k, v in bench.images.items()},
                        seeds=np.asarray(bench.seeds), note=np.asarray(
                            "uint8 images (value / 255 in [0, 1]); null_before (n, C, H, W); null_after (B, n, ...); "
                            "own (A, n, ...): the model's own class-A generations; pairs_after (A, B, n, ...): A -> B "
                            "(the A -> B shift), zeros on the diagonal; masked_left_0to1: class 0 -> 1 inside the left half, "
                            "one row per start step 0, 4, 8; patch_*: the same cells by the feature patch"))
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
