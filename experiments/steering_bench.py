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

``--stage edits`` adds removal by feature patch (tide.analysis.feature_patch.sample_removed; strength chosen on
seeds 60000.. from ``--patch-remove-strengths``, with the same edit ungated as the control, and removal from
"dark C" / "large C" prompts), masked edits with and without ``keep_outside``, and transfer from a reference
generation; ``--stage effects`` adds features chosen by causal effect (feature_effects) and the realism of
removed generations. ``--stage patch-only`` runs the patch and its edits alone on another model, e.g.::

    tide capture --config configs/faithful_capture.yaml --backbone fmnist-dit --hooks blocks.4.hook_resid_post \
        --out runs/dit_capture
    tide train --config configs/steering.yaml --data runs/dit_capture --out runs/dit_steering_saes
    python experiments/steering_bench.py --sae runs/dit_steering_saes/tide --stage patch-only --n 10 \
        --out experiments/results/steering_bench_fmnist-dit

``--stage multi-hook`` adds the feature patch at several hooks at once (``--sae`` and ``--extra-saes``)::

    tide capture --config configs/faithful_capture.yaml --hooks blocks.2.hook_resid_post,blocks.6.hook_resid_post \
        --out runs/multi_capture
    tide train --config configs/steering_multi.yaml --data runs/multi_capture --out runs/multi_saes
    python experiments/steering_bench.py --sae runs/steering_saes/tide --stage multi-hook \
        --extra-saes runs/multi_saes/block2,runs/multi_saes/block6 --patch-strengths 0.7,1,1.5

and on fmnist-dit, beside its patch-only result::

    tide capture --config configs/faithful_capture.yaml --backbone fmnist-dit \
        --hooks blocks.2.hook_resid_post,blocks.6.hook_resid_post --out runs/dit_multi_capture
    tide train --config configs/steering_multi.yaml --data runs/dit_multi_capture --out runs/dit_multi_saes
    python experiments/steering_bench.py --sae runs/dit_steering_saes/tide --stage multi-hook --n 10 \
        --extra-saes runs/dit_multi_saes/block2,runs/dit_multi_saes/block6 --patch-strengths 0.7,1,1.5 \
        --out experiments/results/steering_bench_fmnist-dit

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
    p.add_argument("--stage", choices=("all", "patch", "edits", "effects", "patch-only", "multi-hook"), default="all",
                   help="all: every measurement; patch: add the feature-patch recipe to the results at --out; edits: "
                        "add removal by feature patch, masked edits that keep the outside, and transfer; effects: add "
                        "features chosen by causal effect; multi-hook: add the feature patch at --sae's hook and "
                        "--extra-saes' hooks at once; patch-only: "
                        "the feature patch and its edits alone, a new result (for a second model)")
    p.add_argument("--patch-remove-strengths", default="1.5,2,3")
    p.add_argument("--removal-gate", type=float, default=0.8)
    p.add_argument("--patch-strengths", default="1,1.5,2")
    p.add_argument("--extra-saes", default="", help="--stage multi-hook: SAEs at further hooks, comma-separated")
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

    prefix = "patch_"
    """Key prefix of this recipe's images (``{prefix}null_after``, ``{prefix}pairs_after``)."""

    def patched(self, conds, targets, seeds, strength, **kw):
        from tide.analysis.feature_patch import sample_patched

        saes = [self.sae] + getattr(self, "extra_saes", [])
        return sample_patched(self.backbone, saes, conds, targets, seeds, self.cfg, strength=strength, **kw).images

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
            self.log(f"{self.prefix}selection seeds at strength {st}: {rates[st]:.0%} (null -> B and A -> B)")
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
        self.images[f"{self.prefix}null_after"] = null_after.reshape(k, n, *null_after.shape[1:])
        self.images[f"{self.prefix}pairs_after"] = ab
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


class EditBench(PatchBench):
    """Removal by feature patch, masked edits that keep the outside, and transfer, on the same seeds and classifier."""

    def __init__(self, args):
        super().__init__(args)
        self.compound_words, self.compound = (), {}
        if not self.words:  # a class-conditional model: no prompts to combine
            return
        texts = list(self.backbone.prompts.texts)
        self.compound_words = ("dark", "large")
        compound = [f"{w} {texts[c]}" for w in self.compound_words for c in self.classes]
        from tide.models import load_backbone

        self.backbone = load_backbone(self.sae.cfg.backbone, prompts=texts + compound, device="cpu")
        self.compound = {(w, c): len(texts) + i * self.num_classes + c for i, w in enumerate(self.compound_words)
                         for c in self.classes}

    def removed(self, conds, seeds, c, strength, gate):
        from tide.analysis.feature_patch import sample_removed

        return sample_removed(self.backbone, self.sae, conds, seeds, c, self.cfg, strength=strength, gate=gate).images

    def removal_cells(self, seeds, strength, gate, classes=None):
        """Per C: how many of C's generations stop being C, and the points the others lose."""
        n, k = len(seeds), self.num_classes
        conds = [d for d in self.classes for _ in seeds]
        base = self.predict(self.gen(conds, seeds * k))
        agree0 = np.array([(base[d * n:(d + 1) * n] == d).mean() for d in self.classes])
        out = []
        for c in classes or self.classes:
            pred = self.predict(self.removed(conds, seeds * k, c, strength, gate))
            agree = np.array([(pred[d * n:(d + 1) * n] == d).mean() for d in self.classes])
            lost = np.delete(agree0 - agree, c)
            out.append({"variant": "patch", "strength": strength, "gate": gate, "remove": c, "still_c": float(agree[c]),
                        "still_c_before": float(agree0[c]), "removed": float(1 - agree[c] / max(agree0[c], 1e-9)),
                        "collateral_points": 100 * float(lost.mean()), "collateral_worst": 100 * float(lost.max())})
        return out

    def removal(self):
        sel = [60_000 + i for i in range(4)]
        scores = {}
        for st in (float(v) for v in self.args.patch_remove_strengths.split(",")):
            rows = self.removal_cells(sel, st, self.args.removal_gate)
            col = float(np.mean([r["collateral_points"] for r in rows]))
            scores[st] = (col <= 5, float(np.mean([r["removed"] for r in rows])) if col <= 5 else -col)
            self.log(f"patch removal, selection seeds at strength {st}: removed "
                     f"{np.mean([r['removed'] for r in rows]):.0%}, collateral {col:.1f} points")
        strength = max(scores, key=lambda v: (scores[v], -v))
        rows = self.removal_cells(self.seeds, strength, self.args.removal_gate)
        self.log(f"patch removal at {strength}: removed {np.mean([r['removed'] for r in rows]):.0%}, collateral "
                 f"{np.mean([r['collateral_points'] for r in rows]):.1f} points")
        half = self.seeds[: max(1, len(self.seeds) // 2)]
        ungated = self.removal_cells(half, strength, 0.0)
        self.log(f"patch removal ungated (gate 0): removed {np.mean([r['removed'] for r in ungated]):.0%}, collateral "
                 f"{np.mean([r['collateral_points'] for r in ungated]):.1f} points")
        return {"strength": strength, "gate": self.args.removal_gate, "selection": {str(k): v for k, v in scores.items()},
                "cells": rows, "ungated": ungated,
                "compound": self.removal_compound(strength) if self.compound else []}

    def removal_compound(self, strength):
        """Removal of C from prompts that hold C and another word ("dark C", "large C"): does the gate still see C,
        and does it leave "dark A" alone?"""
        seeds = self.seeds[:5]
        n = len(seeds)
        out = []
        for w in self.compound_words:
            conds = [self.compound[(w, d)] for d in self.classes for _ in seeds]
            base = self.predict(self.gen(conds, seeds * self.num_classes))
            agree0 = np.array([(base[d * n:(d + 1) * n] == d).mean() for d in self.classes])
            for c in self.classes:
                pred = self.predict(self.removed(conds, seeds * self.num_classes, self.compound[(w, c)], strength,
                                                 self.args.removal_gate))
                agree = np.array([(pred[d * n:(d + 1) * n] == d).mean() for d in self.classes])
                lost = np.delete(agree0 - agree, c)
                out.append({"word": w, "remove": c, "still_c_before": float(agree0[c]), "still_c": float(agree[c]),
                            "removed": float(1 - agree[c] / max(agree0[c], 1e-9)),
                            "collateral_points": 100 * float(lost.mean())})
                # the same generations with the plain class C removed (the gate compares against "C", not "w C")
                pred = self.predict(self.removed(conds[c * n:(c + 1) * n], seeds, c, strength, self.args.removal_gate))
                out[-1]["removed_by_plain_c"] = float(1 - (pred == c).mean() / max(agree0[c], 1e-9))
            rows = [r for r in out if r["word"] == w]
            self.log(f"patch removal of '{w} C' from '{w} *': removed {np.mean([r['removed'] for r in rows]):.0%}, "
                     f"collateral {np.mean([r['collateral_points'] for r in rows]):.1f}; of plain C from '{w} C': "
                     f"{np.mean([r['removed_by_plain_c'] for r in rows]):.0%}")
        return out

    def masked_kept(self, strength):
        """Masked A -> A+1 with the outside kept (latent blending): what changes inside, outside, and how often the
        classifier calls the result A+1, beside the same edit without it."""
        n, seeds, k = self.args.n, self.seeds, self.num_classes
        own = self.gen([a for a in self.classes for _ in seeds], seeds * k)  # exact, not the stored uint8 images
        own = own.reshape(k, n, *own.shape[1:])
        out, shown = [], []
        for region in ("left", "upper"):
            tok, pix = self.region(region)
            for start in (0, 4, 8):
                targets = [(a + 1) % k for a in self.classes for _ in seeds]
                for keep in (False, True):
                    after = self.patched([a for a in self.classes for _ in seeds], targets, seeds * k, strength,
                                         steps=(start, self.args.num_steps), mask=tok, keep_outside=keep)
                    d = (after.reshape(k, n, *after.shape[1:]) - own).abs()[:, :, 0]
                    ins, outs = float(d[:, :, pix].mean()), float(d[:, :, ~pix].mean())
                    pred = self.predict(after)
                    if region == "left" and keep:
                        shown.append(after[:8])
                    out.append({"region": region, "from_step": start, "keep_outside": keep, "inside": ins,
                                "outside": outs, "outside_over_inside": outs / ins,
                                "called_target": float((pred == np.asarray(targets)).mean())})
                    self.log(f"patch masked {region} from {start}, keep_outside={keep}: outside/inside "
                             f"{outs / ins:.2f}, called A+1 {out[-1]['called_target']:.0%}")
        self.images["patch_masked_kept_left_0to1"] = torch.stack(shown)
        return out


    def transfer(self):
        """Copy a reference generation's features, token by token and step by step, into a class generation (the
        error term kept): does the reference's attribute arrive? References: "dark A" / "small A" from other seeds,
        or from the same seed. Records how the copied features' magnitude evolves (the sample's mean |z| over the
        reference's, at the first and last edited step)."""
        from tide.analysis import feature_patch as fp
        from tide.hooks import HookedBackbone
        from tide.analysis.steering_profile import measure_profile

        if not self.compound:
            return None
        seeds = [60_000 + i for i in range(6)]
        k = self.num_classes
        conds = [c for c in self.classes for _ in seeds]
        plain = self.gen(conds, seeds * k)
        kept_plain = float((self.predict(plain) == np.asarray(conds)).mean())
        hooked = HookedBackbone.of(self.backbone)
        words = [w for w in self.compound_words]
        vocab_ids = {w: self.words[w] for w in words}
        prof = measure_profile(self.backbone, self.sae, list(vocab_ids.values()), self.cfg, num_samples=8, keep=64,
                               progress=False)
        rows = []
        for w in words:
            group = [g for g, ws in WORDS.items() if w in ws][0]
            meas = MEASURES[group]
            ref_conds = [self.compound[(w, c)] for c in conds]
            top = prof.condition(vocab_ids[w]).features_M.tolist()
            for same_seed in (False, True):
                ref_seeds = seeds * k if same_seed else [s + 500 for s in seeds * k]
                ref = self.gen(ref_conds, ref_seeds)
                m0, mr = meas(plain), meas(ref)
                for feats, label, steps in ((None, "all", (0, self.args.num_steps)),
                                            (None, "all", (self.args.num_steps // 2, self.args.num_steps)),
                                            (top, f"top 64 of the '{w}' shift", (0, self.args.num_steps))):
                    ratio = []

                    def rule(z, z_refs, t, ratio=ratio, feats=feats):
                        sel = slice(None) if feats is None else feats
                        ratio.append(float(z[..., sel].abs().mean() / z_refs[0][..., sel].abs().mean().clamp(min=1e-9)))
                        return z_refs[0] - z

                    fe = None if feats is None else torch.as_tensor(feats)
                    x = fp._patched_batch(self.backbone, hooked, [self.sae], conds, [ref_conds], seeds * k,
                                          list(range(len(conds))), self.cfg, 1.0, None, fe, steps, None,
                                          _NoBar(), rule=rule, ref_seeds=[ref_seeds])
                    after = self.backbone.decode(x)
                    ma = meas(after)
                    moved = (mr - m0).abs() > 1e-6  # the reference differs from the sample in the attribute
                    gap = ((ma - m0) / (mr - m0))[moved]
                    rows.append({"word": w, "group": group, "same_seed": same_seed, "features": label,
                                 "steps": list(steps), "right_way": float(((ma - m0) * (mr - m0) > 0)[moved].float().mean()),
                                 "gap_closed_median": float(gap.median()),
                                 "class_kept": float((self.predict(after) == np.asarray(conds)).mean()),
                                 "class_kept_plain": kept_plain, "pixel_change": float((after - plain).abs().mean()),
                                 "z_over_reference_first": ratio[0], "z_over_reference_last": ratio[-1]})
                    self.log(f"transfer {w} ({'same' if same_seed else 'other'} seed, {label}, steps {steps}): right "
                             f"way {rows[-1]['right_way']:.0%}, class kept {rows[-1]['class_kept']:.0%}, |z| ratio "
                             f"{ratio[0]:.2f} -> {ratio[-1]:.2f}")
        how = ("6 seeds per class (60000..); reference \"w A\" generated from other seeds (+500) or the same seed; "
               "gap closed = (attribute after - before) / (reference - before), per image where the reference differs from the sample. |z| ratio: the sample's "
               "mean |z| of the copied features over the reference's, first -> last edited step.")
        return {"how": how, "rows": rows}


    def effects(self, strength, keep: int = 8, candidates: int = 32):
        """Features chosen by causal effect: for each B, the ``candidates`` features of largest null -> B shift mass
        (a steering profile over 8 null generations) are each patched alone into 4 null generations (seeds 60000..)
        and ranked by how much they raise the classifier's probability of B; then null -> B on the test seeds with
        only the ``keep`` best by effect, against the ``keep`` largest by shift mass."""
        from tide.analysis.feature_patch import feature_effects
        from tide.analysis.steering_profile import measure_profile
        from tide.device import eval_mode

        prof = measure_profile(self.backbone, self.sae, self.classes, self.cfg, num_samples=8, keep=candidates,
                               progress=False)
        sel = [60_000 + i for i in range(4)]
        n, seeds = len(self.seeds), self.seeds
        rows = []
        for b in self.classes:
            cands = prof.condition(b).features_M.tolist()

            def score(images, b=b):
                with eval_mode(self.clf):
                    return torch.softmax(self.clf(images), -1)[:, b].cpu()

            eff = feature_effects(self.backbone, self.sae, [NULL_CONDITION] * len(sel), sel, b, cands, score, self.cfg,
                                  strength=strength)
            by_effect = [cands[i] for i in eff.argsort(descending=True)[:keep].tolist()]
            by_mass = cands[:keep]
            row = {"to": b, "candidates": cands, "effects": eff.tolist(), "by_effect": by_effect, "by_mass": by_mass}
            for name, feats in (("by_effect", by_effect), ("by_mass", by_mass)):
                got = self.patched([NULL_CONDITION] * n, [b] * n, seeds, strength, features=feats)
                row[f"success_{name}"] = float((self.predict(got) == b).mean())
            rows.append(row)
            self.log(f"null -> {b} with {keep} features: by effect {row['success_by_effect']:.0%}, by shift mass "
                     f"{row['success_by_mass']:.0%}; best single-feature effect {float(eff.max()):+.2f}")
        return {"keep": keep, "candidates": candidates, "rows": rows}


    def removal_realism(self, strengths=(1.0, 2.0)):
        """Do removed generations still look like real items? Per image, the distance in the classifier's features to
        its nearest real test image (any class); the median over C's removed generations, over the same median for
        the model's own generations (all classes, the same seeds). Also the Fréchet distance of all removed
        generations to the real test set over the own generations'."""
        real, _ = load_fashion_mnist("test")
        f_real = self.clf.embed(torch.from_numpy(real).float().div(255)[:, None])
        n, k = len(self.seeds), self.num_classes
        own = self.gen([c for c in self.classes for _ in self.seeds], self.seeds * k)
        f_own = self.clf.embed(own)

        def nearest(f):
            return torch.cat([torch.cdist(f[i:i + 200], f_real).min(1).values for i in range(0, len(f), 200)])

        own_nn = float(nearest(f_own).median())
        fd_own = frechet_distance(f_own, f_real)
        out = {"own_nearest_median": own_nn, "fd_own": fd_own, "strengths": {}}
        for st in strengths:
            removed = torch.cat([self.removed([c] * n, self.seeds, c, st, self.args.removal_gate) for c in self.classes])
            f_rem = self.clf.embed(removed)
            nn_ = nearest(f_rem)
            per_c = [float(nn_[c * n:(c + 1) * n].median()) / own_nn for c in self.classes]
            out["strengths"][str(st)] = {"nearest_ratio_per_c": per_c,
                                         "nearest_ratio": float(nn_.median()) / own_nn,
                                         "fd_ratio": frechet_distance(f_rem, f_real) / fd_own,
                                         "still_c": float((self.predict(removed) == np.repeat(self.classes, n)).mean())}
            self.images[f"patch_removed_{st:g}"] = removed.reshape(k, n, *removed.shape[1:])
            self.log(f"removal at {st}: nearest-real distance {out['strengths'][str(st)]['nearest_ratio']:.2f}x the "
                     f"model's own, FD {out['strengths'][str(st)]['fd_ratio']:.2f}x")
        return out


class _NoBar:
    def update(self, *_):
        pass


def _load_result(args, cls):
    """The result and images at ``--out`` (made by a full run), and a ``cls`` bench holding those images."""
    out = Path(args.out)
    res = json.loads(out.with_suffix(".json").read_text())
    bench = cls(args)
    with np.load(out.with_name(out.name + "_images.npz")) as z:
        bench.images = {k: torch.from_numpy(z[k]).float().div(255) for k in z.files if k not in ("seeds", "note")}
    return res, bench


def run_edits_stage(args):
    """Add removal by feature patch, masked edits that keep the outside, and transfer to the results at ``--out``."""
    res, bench = _load_result(args, EditBench)
    started = time.time()
    bench.seeds = [args.seed + i for i in range(args.n)]
    strength = res["patch"]["strength"]
    res["edits"] = {"args": {k: v for k, v in vars(args).items()}, "removal": bench.removal(),
                    "masked_kept": bench.masked_kept(strength), "transfer": bench.transfer()}
    res["edits"]["seconds"] = time.time() - started
    res["summary"] = summarise(res)
    return res, bench


def run_effects_stage(args):
    """Add features chosen by causal effect (against shift mass) and the realism of removed generations to the edits
    of the results at ``--out``."""
    res, bench = _load_result(args, EditBench)
    started = time.time()
    bench.seeds = [args.seed + i for i in range(args.n)]
    res["edits"]["removal_realism"] = bench.removal_realism((1.0, res["edits"]["removal"]["strength"]))
    res["edits"]["effects"] = bench.effects(res["patch"]["strength"])
    res["edits"]["effects"]["seconds"] = time.time() - started
    res["summary"] = summarise(res)
    return res, bench


def patch_section(args, bench) -> dict:
    """The bench's recipe (``bench.prefix``) on the cells: strength chosen on the selection seeds, every null -> B
    and A -> B cell, realism."""
    strength = bench.choose_strength()
    bench.log(f"{bench.prefix}strength {strength}")
    cells = bench.pairs(strength)
    return {"args": dict(vars(args)), "strength": strength, "selection": bench.selection, "cells": cells,
            "realism": {str(b): v for b, v in bench.realism(bench.prefix).items()}}


def run_patch_stage(args):
    """Add the feature-patch recipe to the results at ``--out`` (made by a full run)."""
    res, bench = _load_result(args, PatchBench)
    started = time.time()
    res["patch"] = patch_section(args, bench)
    res["patch"]["masked"] = bench.masked(res["patch"]["strength"])
    res["patch"]["seconds"] = time.time() - started
    res["summary"] = summarise(res)
    return res, bench


class MultiHookBench(PatchBench):
    """The feature patch at several hooks at once: ``--sae`` and ``--extra-saes``, in one forward pass."""

    prefix = "multi_"

    def __init__(self, args):
        super().__init__(args)
        self.extra_saes = [load_sae(p).eval() for p in args.extra_saes.split(",") if p]
        if not self.extra_saes:
            raise SystemExit("--stage multi-hook needs --extra-saes DIR[,DIR...] (SAEs at further hooks)")


def run_multi_hook_stage(args):
    """Add the multi-hook feature patch (null -> B, A -> B, realism) to the results at ``--out``."""
    res, bench = _load_result(args, MultiHookBench)
    started = time.time()
    res["multi_hook"] = {"hooks": [bench.sae.cfg.hook] + [e.cfg.hook for e in bench.extra_saes],
                         **patch_section(args, bench)}
    res["multi_hook"]["seconds"] = time.time() - started
    res["summary"] = summarise(res)
    return res, bench


def run_patch_only(args):
    """The feature-patch recipe and its edits on a model of its own (no profile stage): a new result at ``--out``."""
    bench = EditBench(args)
    started = time.time()
    n, k = args.n, bench.num_classes
    bench.seeds = seeds = [args.seed + i for i in range(n)]
    own = bench.gen([a for a in bench.classes for _ in seeds], seeds * k)
    bench.images = {"own": own.reshape(k, n, *own.shape[1:])}
    res = {"what": __doc__.split("\n\n")[0], "args": vars(args), "backbone": bench.sae.cfg.backbone,
           "own_agreement": {str(a): float((bench.predict(bench.images["own"][a]) == a).mean()) for a in bench.classes}}
    res["patch"] = patch_section(args, bench)
    strength = res["patch"]["strength"]
    res["patch"]["masked"] = bench.masked(strength)
    res["edits"] = {"removal": bench.removal(), "masked_kept": bench.masked_kept(strength), "transfer": bench.transfer(),
                    "effects": bench.effects(strength)}
    res["edits"]["removal_realism"] = bench.removal_realism((1.0, res["edits"]["removal"]["strength"]))
    res["seconds"] = time.time() - started
    res["summary"] = summarise(res)
    return res, bench


def summarise(res: dict) -> dict:
    if "cells" not in res:  # patch-only
        return {**_patch_summary(res), "own_b_agreement": float(np.mean(list(res["own_agreement"].values())))}
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
    return {**_patch_summary(res),
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


def _patch_summary(res: dict) -> dict:
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
    edits = {}
    if "edits" in res:
        R = res["edits"]["removal"]
        edits = {"patch_removal_strength": R["strength"], "patch_removal_gate": R["gate"],
                 "patch_removal_removed": float(np.mean([r["removed"] for r in R["cells"]])),
                 "patch_removal_collateral_points": float(np.mean([r["collateral_points"] for r in R["cells"]])),
                 "patch_removal_ungated_removed": float(np.mean([r["removed"] for r in R["ungated"]])),
                 "patch_removal_ungated_collateral_points": float(np.mean([r["collateral_points"] for r in R["ungated"]])),
                 "patch_masked_kept_outside_over_inside": [m["outside_over_inside"] for m in res["edits"]["masked_kept"]
                                                           if m["keep_outside"]]}
    multi = {}
    if "multi_hook" in res:
        M = res["multi_hook"]
        mab = [c for c in M["cells"] if c["from"] != "null"]
        multi = {"multi_hook_hooks": M["hooks"], "multi_hook_strength": M["strength"],
                 "multi_hook_null_to_b_success": float(np.mean([c["success"] for c in M["cells"] if c["from"] == "null"])),
                 "multi_hook_a_to_b_success": float(np.mean([c["success"] for c in mab])),
                 "multi_hook_a_to_b_neither": float(np.mean([c["neither"] for c in mab])),
                 "multi_hook_a_to_b_pairs_at_least_70": int(sum(c["success"] >= 0.7 for c in mab)),
                 "multi_hook_realism_ratio_median": float(np.median([v["ratio"] for v in M["realism"].values()])),
                 "multi_hook_realism_ratio_max": float(np.max([v["ratio"] for v in M["realism"].values()]))}
    return {**patch, **edits, **multi}


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
             "| masked edits, outside / inside (left, upper × from step 0, 4, 8) | "
             + ", ".join(f"{m['outside_over_inside']:.2f}" for m in res["masked"]) + " | "
             + (", ".join(f"{v:.2f}" for v in ps["masked_outside_over_inside"]) if ps else "–") + " | ≤ 0.15 |",
             "| masked edits keeping the outside (latent blending), outside / inside | – | "
             + (", ".join(f"{v:.3f}" for v in ps["masked_kept_outside_over_inside"])
                if "masked_kept_outside_over_inside" in ps else "–") + " | ≤ 0.15 |",
             f"| removal of C (profile: {s['removal_best']}; patch: strength {ps.get('removal_strength', '–')}, gate "
             f"{ps.get('removal_gate', '–')}) | {s['removal_removed']:.1%} removed | "
             + (f"{ps['removal_removed']:.1%} removed" if "removal_removed" in ps else "–") + " | ≥ 90% |",
             f"| removal collateral on other classes | {s['removal_collateral_points']:.1f} points | "
             + (f"{ps['removal_collateral_points']:.1f} points (ungated: {ps['removal_ungated_collateral_points']:.1f}, "
                f"removing {ps['removal_ungated_removed']:.0%})" if "removal_removed" in ps else "–") + " | ≤ 5 |", "",
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
        lines += ["", "## Success per cell, feature patch (rows: from; columns: toward B)", ""]
        lines += patch_matrix(P["cells"], names)
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
    E = res.get("edits")
    if E:
        lines += edits_markdown(E, names)
    if "multi_hook" in res:
        lines += multi_hook_markdown(res, names)
    lines += ["", "## Realism per target class", "", "| B | FD own | FD profile-steered | ratio | FD patch-steered | ratio |",
              "|---|---|---|---|---|---|"]
    for b, v in res["realism"].items():
        pv = P["realism"][b] if P else None
        lines.append(f"| {names[int(b)]} | {v['fd_own']:.2f} | {v['fd_steered']:.2f} | {v['ratio']:.2f} | "
                     + (f"{pv['fd_steered']:.2f} | {pv['ratio']:.2f} |" if pv else "– | – |"))
    path.write_text("\n".join(lines) + "\n")


def multi_hook_markdown(res: dict, names: list[str]) -> list[str]:
    """The feature patch at several hooks at once, beside the one-hook patch on the same seeds."""
    M, s = res["multi_hook"], res["summary"]
    hooks = ", ".join(f"`{h}`" for h in M["hooks"])
    lines = ["", "## Several hooks at once", "",
             f"The feature patch at {hooks} together (one SAE per hook, each trained the same way; every hook patched "
             f"in the same forward pass, the reference passes unedited). Strength {M['strength']}, chosen on seeds "
             f"60000.. from {M['selection']}; {M['seconds'] / 60:.0f} min on 2 CPU threads.", "",
             f"| measure | one hook (block {M['hooks'][0].split('.')[1]}) | several hooks | aim |", "|---|---|---|---|",
             f"| null → B success | {s['patch_null_to_b_success']:.1%} | {s['multi_hook_null_to_b_success']:.1%} | ≥ 90% |",
             f"| A → B success, 90 pairs | {s['patch_a_to_b_success']:.1%} | {s['multi_hook_a_to_b_success']:.1%} | ≥ 70% |",
             f"| A → B neither-class rate | {s['patch_a_to_b_neither']:.1%} | {s['multi_hook_a_to_b_neither']:.1%} | ≤ 15% |",
             f"| pairs reaching 70% | {s['patch_a_to_b_pairs_at_least_70']} / 90 | "
             f"{s['multi_hook_a_to_b_pairs_at_least_70']} / 90 | |",
             f"| realism, median over B | {s['patch_realism_ratio_median']:.2f} | "
             f"{s['multi_hook_realism_ratio_median']:.2f} | ≤ 2 |",
             f"| realism, worst B | {s['patch_realism_ratio_max']:.2f} | {s['multi_hook_realism_ratio_max']:.2f} | |",
             ""]
    own = res.get("own_agreement")
    if own:
        null = {c["to"]: c["success"] for c in M["cells"] if c["from"] == "null"}
        worst = min(own, key=lambda b: own[b])
        rest = [null[b] for b in null if str(b) != worst]
        lines += [f"The model's own {names[int(worst)]} generations are called {names[int(worst)]} only "
                  f"{own[worst]:.0%} of the time, and null → {names[int(worst)]} reaches {null[int(worst)]:.0%}; over "
                  f"the other {len(rest)} classes null → B is {np.mean(rest):.1%}. The model's own B generations are "
                  f"called B {np.mean(list(own.values())):.1%} of the time on these seeds: the ceiling of any edit "
                  "that imitates the prompt (the null → B aim is 90%).", ""]
    lines += ["Success per cell, several hooks (rows: from; columns: toward B):", ""]
    return lines + patch_matrix(M["cells"], names)


def patch_matrix(cells: list[dict], names: list[str]) -> list[str]:
    """The success table of the feature patch: rows from (null, then each class), columns toward B."""
    lines = ["| from \\ to | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in ["null"] + list(range(len(names))):
        row = []
        for b in range(len(names)):
            c = [x for x in cells if x["from"] == a and x["to"] == b]
            row.append(f"{c[0]['success']:.0%}" if c else "–")
        lines.append(f"| {a if a == 'null' else names[a]} | " + " | ".join(row) + " |")
    return lines


def write_patch_only_markdown(res: dict, path: Path, names: list[str]):
    s, P = res["summary"], res["patch"]
    ps = {k[len("patch_"):]: v for k, v in s.items() if k.startswith("patch_")}
    lines = [f"# Steering benchmark, feature patch only: `{res['backbone']}` (`experiments/steering_bench.py --stage "
             "patch-only`)", "",
             f"SAE `{res['args']['sae']}`; {res['args']['n']} generations per cell (seeds {res['args']['seed']}..). Patch "
             f"strength {P['strength']} chosen on seeds 60000.. from {P['selection']}. The model's own B generations are "
             f"called B {s['own_b_agreement']:.1%} of the time (the ceiling of every success rate).", "",
             "| measure | patch | aim |", "|---|---|---|",
             f"| null → B success | {ps['null_to_b_success']:.1%} | ≥ 90% |",
             f"| A → B success, 90 pairs | {ps['a_to_b_success']:.1%} ({ps['a_to_b_pairs_at_least_70']} pairs ≥ 70%) | ≥ 70% |",
             f"| A → B neither-class rate | {ps['a_to_b_neither']:.1%} | ≤ 15% |",
             f"| realism: FD ratio to the model's own B, median [worst] | {ps['realism_ratio_median']:.2f} "
             f"[{ps['realism_ratio_max']:.2f}] | ≤ 2 |",
             "| masked edits, outside / inside | " + ", ".join(f"{v:.2f}" for v in ps["masked_outside_over_inside"])
             + " | ≤ 0.15 |",
             "| masked edits keeping the outside | " + ", ".join(f"{v:.3f}" for v in ps["masked_kept_outside_over_inside"])
             + " | ≤ 0.15 |",
             f"| removal (strength {ps['removal_strength']}, gate {ps['removal_gate']}) | {ps['removal_removed']:.1%} removed, "
             f"{ps['removal_collateral_points']:.1f} points collateral (ungated: {ps['removal_ungated_removed']:.0%}, "
             f"{ps['removal_ungated_collateral_points']:.1f} points) | ≥ 90%, ≤ 5 |", "",
             "## Success per cell (rows: from; columns: toward B)", ""]
    lines += patch_matrix(P["cells"], names)
    lines += edits_markdown(res["edits"], names)
    if "multi_hook" in res:
        lines += multi_hook_markdown(res, names)
    lines += ["", "## Realism per target class", "", "| B | FD own | FD patch-steered | ratio |", "|---|---|---|---|"]
    for b, v in P["realism"].items():
        lines.append(f"| {names[int(b)]} | {v['fd_own']:.2f} | {v['fd_steered']:.2f} | {v['ratio']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def edits_markdown(E: dict, names: list[str]) -> list[str]:
    R = E["removal"]
    lines = ["", f"## Removal by feature patch (strength {R['strength']}, gate {R['gate']}; chosen on seeds 60000.. from "
             f"{R['selection']})", "",
             "Each generation's features are compared with C's, relative to the null condition, on its own latents "
             "(cosine over tokens and features); above the gate they are pushed through the null's features and "
             "beyond. The gate is a detector, so the collateral below is what it lets through; the ungated row "
             "edits every generation the same way (half the seeds).", "",
             "| C | still C before | still C after | removed | collateral (mean / worst points) | ungated: removed | "
             "ungated: collateral |", "|---|---|---|---|---|---|---|"]
    for r, u in zip(R["cells"], R["ungated"]):
        lines.append(f"| {names[r['remove']]} | {r['still_c_before']:.0%} | {r['still_c']:.0%} | {r['removed']:.0%} | "
                     f"{r['collateral_points']:.1f} / {r['collateral_worst']:.0f} | {u['removed']:.0%} | "
                     f"{u['collateral_points']:.1f} |")
    m = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    lines.append(f"| **mean** | {m(R['cells'], 'still_c_before'):.0%} | {m(R['cells'], 'still_c'):.0%} | "
                 f"**{m(R['cells'], 'removed'):.1%}** | **{m(R['cells'], 'collateral_points'):.1f}** / "
                 f"{max(r['collateral_worst'] for r in R['cells']):.0f} | {m(R['ungated'], 'removed'):.0%} | "
                 f"{m(R['ungated'], 'collateral_points'):.1f} |")
    RR = E.get("removal_realism")
    if RR:
        lines += ["", "Do removed generations still look like real items? Median distance, in the classifier's features, "
                  "from each removed generation of C to its nearest real test image (any class), over the same median "
                  f"for the model's own generations ({RR['own_nearest_median']:.2f}); and the Fréchet distance of all "
                  "removed generations to the real test set over the own generations':", "",
                  "| strength | " + " | ".join(names) + " | all | FD ratio | still C |", "|---" * (len(names) + 4) + "|"]
        for st, v in RR["strengths"].items():
            lines.append(f"| {st} | " + " | ".join(f"{x:.2f}" for x in v["nearest_ratio_per_c"])
                         + f" | **{v['nearest_ratio']:.2f}** | {v['fd_ratio']:.2f} | {v['still_c']:.0%} |")
    lines += [] if not R["compound"] else ["", "Beyond the exact prompt: C removed from generations of \"w C\" (5 seeds per class), as \"w C\" "
              "and as the plain class C; collateral on the other \"w A\":", "",
              "| word | removed (gate vs \"w C\") | collateral | removed (gate vs plain C) |", "|---|---|---|---|"]
    for w in sorted({r["word"] for r in R["compound"]}):
        rows = [r for r in R["compound"] if r["word"] == w]
        lines.append(f"| {w} | {m(rows, 'removed'):.0%} | {m(rows, 'collateral_points'):.1f} | "
                     f"{m(rows, 'removed_by_plain_c'):.0%} |")
    lines += ["", "## Masked edits that keep the outside (feature patch A → A+1, with and without latent blending)",
              "", "| region | from step | keep outside | |Δpixel| inside | outside | outside / inside | called A+1 |",
              "|---|---|---|---|---|---|---|"]
    for r in E["masked_kept"]:
        lines.append(f"| {r['region']} | {r['from_step']} | {'yes' if r['keep_outside'] else 'no'} | {r['inside']:.3f} | "
                     f"{r['outside']:.4f} | {r['outside_over_inside']:.3f} | {r['called_target']:.0%} |")
    F = E.get("effects")
    if F:
        lines += ["", f"## Features chosen by causal effect (null → B patched in {F['keep']} features only)", "",
                  f"Candidates: the {F['candidates']} features of largest null → B shift mass; each patched alone into 4 "
                  "null generations (seeds 60000..) and ranked by the rise in the classifier's probability of B. "
                  "Success on the test seeds with the best by effect, against the largest by shift mass:", "",
                  "| B | by effect | by shift mass | best single-feature effect (probability) |", "|---|---|---|---|"]
        for r in F["rows"]:
            lines.append(f"| {names[r['to']]} | {r['success_by_effect']:.0%} | {r['success_by_mass']:.0%} | "
                         f"{max(r['effects']):+.2f} |")
        lines.append(f"| **mean** | **{np.mean([r['success_by_effect'] for r in F['rows']]):.1%}** | "
                     f"{np.mean([r['success_by_mass'] for r in F['rows']]):.1%} | |")
    T = E.get("transfer")
    if T:
        lines += ["", "## Transfer (a reference generation's features copied token by token into another, error term "
                  "kept)", "", T["how"], "",
                  "| reference | seed | steps | features | moved toward the reference | gap closed (median) | "
                  "class kept (plain) | mean |Δpixel| | |z| ratio first → last |", "|---|---|---|---|---|---|---|---|---|"]
        for r in T["rows"]:
            lines.append(f"| {r['word']} A | {'same' if r['same_seed'] else 'other'} | {r['steps'][0]}–{r['steps'][1]} | "
                         f"{r['features']} | {r['right_way']:.0%} | {r['gap_closed_median']:.2f} | {r['class_kept']:.0%} "
                         f"({r['class_kept_plain']:.0%}) | {r['pixel_change']:.3f} | {r['z_over_reference_first']:.2f} → "
                         f"{r['z_over_reference_last']:.2f} |")
    return lines


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
               res["summary"]["a_to_b_success"], res["summary"]["a_to_b_neither"])] if "cells" in res else []
    if "patch" in res:
        s = res["summary"]
        panels.append(("feature patch", matrix(res["patch"]["cells"], "patch"), s["patch_null_to_b_success"],
                       s["patch_a_to_b_success"], s["patch_a_to_b_neither"]))
    if "multi_hook" in res:
        s = res["summary"]
        blocks = ", ".join(h.split(".")[1] for h in res["multi_hook"]["hooks"])
        panels.append((f"feature patch, blocks {blocks}", matrix(res["multi_hook"]["cells"], "patch"),
                       s["multi_hook_null_to_b_success"], s["multi_hook_a_to_b_success"], s["multi_hook_a_to_b_neither"]))
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
    rows, labels = [], []
    if "null_before" in images:
        rows += [torch.stack([images["null_before"][b % len(images["null_before"])] for b in range(k)]),
                 torch.stack([images["null_after"][b, 0] for b in range(k)])]
        labels += ["null", "null→B"]
        for a in range(4):
            rows.append(torch.stack([images["own"][a, 0] if b == a else images["pairs_after"][a, b, 0]
                                     for b in range(k)]))
            labels.append(f"{names[a]}→B")
    for prefix, tag in (("patch_", "patch"), ("multi_", "hooks")):  # the feature patch at one hook, at several
        if f"{prefix}pairs_after" not in images:
            continue
        rows.append(torch.stack([images[f"{prefix}null_after"][b, 0] for b in range(k)]))
        labels.append(f"null→B {tag}")
        for a in range(4):
            rows.append(torch.stack([images["own"][a, 0] if b == a else images[f"{prefix}pairs_after"][a, b, 0]
                                     for b in range(k)]))
            labels.append(f"{names[a]}→B {tag}")
    save_grid(torch.cat(rows), path.with_name(path.stem + "_examples.png"), nrow=k, row_labels=labels,
              title="steered toward B (columns B = " + ", ".join(names) + "); diagonal: the unedited generation")


def main(argv=None):
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.stage in ("patch", "edits", "effects", "patch-only", "multi-hook"):
        res, bench = {"patch": run_patch_stage, "edits": run_edits_stage, "effects": run_effects_stage,
                      "patch-only": run_patch_only, "multi-hook": run_multi_hook_stage}[args.stage](args)
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
    (write_markdown if "cells" in res else write_patch_only_markdown)(res, out.with_suffix(".md"), names)
    figure(res, bench.images, out.with_suffix(".png"), names)
    np.savez_compressed(out.with_name(out.name + "_images.npz"),
                        **{k: (v.clamp(0, 1) * 255).round().to(torch.uint8).numpy() for k, v in bench.images.items()},
                        seeds=np.asarray(bench.seeds), note=np.asarray(
                            "uint8 images (value / 255 in [0, 1]); null_before (n, C, H, W); null_after (B, n, ...); "
                            "own (A, n, ...): the model's own class-A generations; pairs_after (A, B, n, ...): A -> B "
                            "(the A -> B shift), zeros on the diagonal; masked_left_0to1: class 0 -> 1 inside the left half, "
                            "one row per start step 0, 4, 8; patch_*: the same cells by the feature patch; multi_*: by the feature patch at several hooks"))
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
