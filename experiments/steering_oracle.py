"""The steering oracle: can a residual edit at ONE block carry a class into a null-condition generation?

For each embedded model and each hooked block, with no SAE involved (the best a one-block edit can do):

  * **patch** (activation patching): generate the null condition (the null class / the empty caption)
    and, at every step, replace the block's residual by the one the class-B condition gives *on the same
    latents* (a second forward pass); the trajectory stays self-consistent, so this asks only whether the
    blocks after the edit, still fed the null condition, carry B's residual through;
  * **swap**: generate class B with seed s while recording that block's residual (conditional branch) at
    every step; then generate the null condition with the same seed, replacing the block's residual at
    every step by the recorded one (once the two trajectories part, the residual no longer belongs to the
    latents being denoised);
  * **mean difference**: add, at every step, the per-token mean residual of class-B generations minus the
    mean residual of null generations (means over ``--mean-seeds`` seeds; applied to other seeds).

Each edit is applied to the conditional CFG branch only (``cond``: guidance amplifies it, as a prompt
would be) and to both branches (``both``: the edit alone, no amplification). The evaluation classifier
says how many edited samples are class B. Baselines: B's own generations (what a perfect edit reaches)
and unedited null generations (how often B appears by chance).

    python experiments/steering_oracle.py                  # both models, blocks 1, 4, 7
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tide.eval.classifier import load_classifier  # noqa: E402
from tide.hooks import current_step  # noqa: E402
from tide.images import save_grid  # noqa: E402
from tide.models import load_backbone  # noqa: E402
from tide.models.base import NULL_CONDITION  # noqa: E402
from tide.sampling import Intervention, SamplerConfig, Trajectory, sample  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="fmnist-dit,fmnist-pixart", help="embedded names or checkpoint directories")
    p.add_argument("--blocks", default="1,4,7")
    p.add_argument("--per-class", type=int, default=10, help="edited samples per target class")
    p.add_argument("--mean-seeds", type=int, default=20, help="generations per class behind each class mean")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", default="fmnist-dit=50,fmnist-pixart=20", help="denoising steps per backbone")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", default=str(RESULTS / "steering_oracle.json"))
    p.add_argument("--md", default=str(RESULTS / "steering_oracle.md"))
    p.add_argument("--grid", default=str(RESULTS / "steering_oracle_{name}.png"))
    return p.parse_args(argv)


def recorder(store: dict[int, list[torch.Tensor]]):
    """A read-only hook keeping the conditional rows' activation per step index."""
    def fn(act, hook):
        ctx = current_step()
        rows = (ctx.cfg_branch_B == 0).to(act.device)
        store.setdefault(ctx.step_index, []).append(act[rows].detach().float().cpu())
        return None
    return fn


def stacked(store) -> torch.Tensor:
    """(steps, B, T, D) from a recorder's store (one list entry per batch)."""
    return torch.stack([torch.cat(store[i]) for i in sorted(store)])


def replacer(table_SBTD: torch.Tensor):
    """Replace every row's activation by table[step, sample] (the sample id indexes the table)."""
    def fn(act, hook):
        ctx = current_step()
        return table_SBTD[ctx.step_index, ctx.sample_ids_B.long()].to(act.device, act.dtype)
    return fn


def adder(delta_STD: torch.Tensor):
    def fn(act, hook):
        return act + delta_STD[current_step().step_index].to(act.device, act.dtype)
    return fn


@torch.no_grad()
def patched(backbone, hook: str, targets: list[int], seeds: list[int], cfg: SamplerConfig, branch: str):
    """Null-condition generations whose block residual is, at every step, the one the class-B prompt gives
    *on the same latents* (activation patching): the trajectory stays self-consistent."""
    ids = list(range(len(targets)))
    traj = Trajectory(backbone, [NULL_CONDITION] * len(targets), seeds, ids, cfg)
    src = Trajectory(backbone, targets, seeds, ids, cfg)  # only its conditioning is used
    for step, src_step in zip(traj, src):
        src.x = traj.x
        store: dict = {}
        src.predict(src_step, [(hook, recorder(store))])
        resid = torch.cat(store[step.index])                       # (B, T, D): class-B rows on these latents
        rows = traj.branch_B == 0 if branch == "cond" else torch.ones_like(traj.branch_B, dtype=torch.bool)

        def swap(act, hook, rows=rows, resid=resid):
            out = act.clone()
            out[rows.to(act.device)] = resid.repeat(int(rows.sum()) // len(resid), 1, 1).to(act.device, act.dtype)
            return out

        traj.advance(step, traj.predict(step, [(hook, swap)]))
    return backbone.decode(traj.x).cpu()


def run_backbone(name: str, blocks: list[int], args, steps: int) -> dict:
    backbone = load_backbone(name, device="cpu")
    clf = load_classifier(backbone)
    k = 10
    cfg = SamplerConfig(num_steps=steps, guidance_scale=args.guidance, batch_size=args.batch_size)
    hooks = [f"blocks.{b}.hook_resid_post" for b in blocks]
    n = args.per_class
    targets = torch.arange(k).repeat_interleave(n)               # edited sample i aims at class targets[i]
    seeds = [1000 + i for i in range(len(targets))]
    ids = list(range(len(targets)))

    def rate(images, want):
        return (clf.predict(images) == want).float()

    t0 = time.time()
    # sources: class B with the edit seeds (recorded), and class means from other seeds
    rec = {h: {} for h in hooks}
    src = sample(backbone, targets.tolist(), seeds, cfg, [Intervention(h, recorder(rec[h])) for h in hooks],
                 sample_ids=ids)
    src_rate = rate(src.images, targets)
    m = args.mean_seeds
    mean_conds = torch.arange(k).repeat_interleave(m).tolist() + [NULL_CONDITION] * m
    mean_seeds = [5000 + i for i in range(len(mean_conds))]
    rec_m = {h: {} for h in hooks}
    sample(backbone, mean_conds, mean_seeds, cfg, [Intervention(h, recorder(rec_m[h])) for h in hooks])
    null = sample(backbone, [NULL_CONDITION] * len(targets), seeds, cfg)
    null_rate = rate(null.images, targets)
    print(f"[{name}] sources: class agreement {src_rate.mean():.3f}; null generations are the target class "
          f"{null_rate.mean():.3f} of the time ({time.time() - t0:.0f}s)", flush=True)

    result = {"num_steps": steps, "guidance_scale": args.guidance, "samples": len(targets),
              "source_class_agreement": src_rate.mean().item(), "null_is_target_rate": null_rate.mean().item(),
              "blocks": {}}
    grid_rows = [null.images[::n][:k], src.images[::n][:k]]
    for b, h in zip(blocks, hooks):
        table = stacked(rec[h])                                            # (S, B, T, D)
        acts = stacked(rec_m[h])                                           # (S, 11m, T, D)
        means = acts.view(acts.shape[0], k + 1, m, *acts.shape[2:]).mean(2)  # (S, 11, T, D)
        delta = means[:, :k] - means[:, k:]                                # (S, 10, T, D): class - null
        res = {}
        for branch in ("cond", "both"):
            imgs = torch.cat([patched(backbone, h, targets[i:i + args.batch_size].tolist(), seeds[i:i + args.batch_size],
                                      cfg, branch) for i in range(0, len(targets), args.batch_size)])
            patch = rate(imgs, targets)
            res[f"patch_{branch}"] = patch.mean().item()
            res[f"patch_{branch}_per_class"] = patch.view(k, n).mean(1).tolist()
            if branch == "cond":
                grid_rows.append(imgs[::n][:k])
            out = sample(backbone, [NULL_CONDITION] * len(targets), seeds, cfg,
                         [Intervention(h, replacer(table), branch=branch)], sample_ids=ids)
            swap = rate(out.images, targets)
            res[f"swap_{branch}"] = swap.mean().item()
            res[f"swap_{branch}_per_class"] = swap.view(k, n).mean(1).tolist()
            if branch == "cond":
                grid_rows.append(out.images[::n][:k])
            per_class = []
            imgs = []
            for c in range(k):
                o = sample(backbone, [NULL_CONDITION] * n, seeds[c * n:(c + 1) * n], cfg,
                           [Intervention(h, adder(delta[:, c]), branch=branch)])
                per_class.append(rate(o.images, torch.full((n,), c)).mean().item())
                imgs.append(o.images[:1])
            res[f"mean_diff_{branch}"] = sum(per_class) / k
            res[f"mean_diff_{branch}_per_class"] = per_class
            if branch == "cond":
                grid_rows.append(torch.cat(imgs))
        result["blocks"][str(b)] = res
        print(f"[{name}] block {b}: patch cond {res['patch_cond']:.3f} both {res['patch_both']:.3f}; swap cond {res['swap_cond']:.3f} both {res['swap_both']:.3f}; mean diff cond "
              f"{res['mean_diff_cond']:.3f} both {res['mean_diff_both']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    labels = ["null", "class B"] + [f"{kind} b{b}" for b in blocks for kind in ("patch", "swap", "mean diff")]
    grid = save_grid(torch.cat(grid_rows), args.grid.format(name=name), nrow=k, row_labels=labels,
                     title=f"{name}: one-block edits of null generations toward class B (columns: B = "
                           f"{', '.join(backbone.condition_names)}), CFG branch only")
    grid = Path(grid).resolve()
    result["grid"] = str(grid.relative_to(ROOT)) if grid.is_relative_to(ROOT) else str(grid)
    result["wall_time_s"] = round(time.time() - t0, 1)
    return result


def main(argv=None):
    args = parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",")]
    steps = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in args.steps.split(",")}
    results = {"what": "one-block residual edits of null-condition generations toward class B (no SAE)",
               "edits": {"patch": "the block's residual replaced at every step by the one the class-B prompt gives on "
                                  "the same latents (activation patching)",
                         "swap": "the block's residual replaced at every step by the one recorded along class B's own "
                                 "generation (same seed)",
                         "mean_diff": "per-token class-B mean minus null mean added at every step (held-out seeds)",
                         "cond": "edit on the conditional CFG branch only", "both": "edit on both branches"},
               "models": {}}
    for name in args.backbones.split(","):
        results["models"][name] = run_backbone(name, blocks, args, steps.get(name, 50))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# The steering oracle: one-block residual edits toward class B", "",
             "Fraction of edited null-condition generations the evaluation classifier calls class B "
             f"({args.per_class} per class, all 10 classes; guidance {args.guidance:g}). Produced by "
             "`experiments/steering_oracle.py`.", "",
             "| model | block | patch (cond) | patch (both) | swap (cond) | swap (both) | mean diff (cond) | mean diff (both) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        for b, res in r["blocks"].items():
            lines.append(f"| {name} | {b} | {res['patch_cond']:.0%} | {res['patch_both']:.0%} | {res['swap_cond']:.0%} | {res['swap_both']:.0%} | "
                         f"{res['mean_diff_cond']:.0%} | {res['mean_diff_both']:.0%} |")
    lines += ["", "Baselines: " + "; ".join(
        f"{name}: class-B generations agree {r['source_class_agreement']:.0%}, unedited null generations are B "
        f"{r['null_is_target_rate']:.0%}" for name, r in results["models"].items()), ""]
    Path(args.md).write_text("\n".join(lines))
    print(f"wrote {args.json} and {args.md}", flush=True)


if __name__ == "__main__":
    main()
