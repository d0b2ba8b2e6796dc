"""Why an SAE with a small FVU breaks the generation: three measurements with figures.

    python experiments/faithful_diagnosis.py --sae-dir runs/faithful/fmnist-pixart/saes

Reads the SAEs and the held-out capture written by experiments/faithful.py (default: at block 4, the
activation-MSE ``tide`` SAE, with per-dimension normalisation, with the downstream-aware term, and on the
block's update), and measures:

1. **Which directions move the denoiser.** Principal directions of the hook's activations (held-out
   capture), each added at every token with the same norm (10% of the activations' RMS) to denoiser
   inputs along real trajectories: the guided output's relative change per direction, against the
   direction's share of the variance. Then where each SAE's error lies in that basis: its error energy
   per direction, and that energy weighted by the direction's measured sensitivity.
2. **In-loop FVU.** The SAE's FVU per step on the activations it replaces, along clean trajectories
   (observed) and along the trajectories it steers itself (spliced at every step).
3. **Compounding.** Per step, the denoiser's relative error from one spliced call on the clean trajectory,
   against the relative distance between spliced and clean latents when the splice runs at every step.

Writes experiments/results/faithful_diagnosis.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tide.data import ActivationStore  # noqa: E402
from tide.eval.splice import denoiser_error, splice_fns  # noqa: E402
from tide.hooks import HookedBackbone, current_step  # noqa: E402
from tide.models import load_backbone  # noqa: E402
from tide.sae import load_sae  # noqa: E402
from tide.sampling import SamplerConfig, Trajectory  # noqa: E402
from tide.train.downstream import collect_contexts  # noqa: E402


def principal_directions(store: ActivationStore, hook: str, max_rows: int = 200_000):
    """(mean_D, directions_KD, variance share_K) of the hook's activations."""
    rows = []
    n = 0
    for _, _, acts, _ in store.iter_blocks([hook], ("timestep",), store.rows_per_chunk(store.hooks[hook], 8)):
        rows.append(acts[hook].astype(np.float64))
        n += len(rows[-1])
        if n >= max_rows:
            break
    x = np.concatenate(rows)[:max_rows]
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    var, vec = np.linalg.eigh(cov)
    order = np.argsort(var)[::-1]
    return mean, vec[:, order].T, var[order] / var.sum(), float(np.sqrt((x ** 2).sum(1).mean()))


@torch.no_grad()
def sensitivity(backbone, hook: str, contexts, directions_KD: np.ndarray, norm: float, rows_per_step: int = 8) -> np.ndarray:
    """Mean over steps of ||guided eps(act + norm * v_k) - guided eps(act)|| / ||guided eps(act)|| per direction k."""
    hooked = HookedBackbone.of(backbone)
    steps = sorted(set(contexts.step_N.tolist()))
    out = np.zeros(len(directions_KD))
    for step in steps:
        rows = torch.nonzero(contexts.step_N == step).flatten()[:rows_per_step]
        x_in = contexts.x_in_NCHW[rows]
        conds = contexts.cond_N[rows]
        x_in, conds = torch.cat([x_in, x_in]), torch.cat([conds, torch.full_like(conds, -1)])
        cond = backbone.encode_conditions(conds)
        t = contexts.timesteps[step]
        clean = contexts.out_NCHW[rows]
        for k, v in enumerate(directions_KD):
            delta = torch.as_tensor(v * norm, dtype=torch.float32)
            with hooked.hooks(fwd_hooks=[(hook, lambda act, hook=None: act + delta)]):
                o = hooked(x_in, t, cond)
            o = backbone.combine_guidance(*o.chunk(2), contexts.guidance_scale)
            out[k] += float((o - clean).norm() / clean.norm()) / len(steps)
    return out


@torch.no_grad()
def error_energy(sae, store: ActivationStore, hook: str, directions_KD: np.ndarray, max_rows: int = 100_000) -> np.ndarray:
    """Share of the SAE's squared error along each direction (held-out rows)."""
    energy = np.zeros(len(directions_KD))
    n = 0
    basis = torch.as_tensor(directions_KD, dtype=torch.float32)
    for _, _, acts, meta in store.iter_blocks(sae.cfg.input_hooks, ("timestep",), 16384):
        x = torch.as_tensor(sae.cfg.rows(acts), dtype=torch.float32)  # the activation, or the block's update
        t = torch.as_tensor(meta["timestep"], dtype=torch.float32)
        e = sae.reconstruct(x, t) - x
        energy += ((e @ basis.T) ** 2).sum(0).numpy()
        n += len(x)
        if n >= max_rows:
            break
    return energy / energy.sum()


@torch.no_grad()
def spliced_run(backbone, sae, hook: str, conds, seeds, sampler):
    """Per step: FVU of the SAE on what it replaces along its own spliced trajectory, and the relative distance of the
    spliced latents to the clean ones."""
    n = sampler.num_steps
    sse, tot = np.zeros(n), np.zeros(n)

    def observe(x, y):
        i = current_step().step_index
        x2 = x.reshape(-1, x.shape[-1]).double()
        sse[i] += float(((y.reshape_as(x2).double() - x2) ** 2).sum())
        tot[i] += float(((x2 - x2.mean(0)) ** 2).sum())

    hooked = HookedBackbone.of(backbone)
    clean = Trajectory(backbone, conds, seeds, list(range(len(conds))), sampler, hooked)
    spl = Trajectory(backbone, conds, seeds, list(range(len(conds))), sampler, hooked)
    hooks = splice_fns(sae, hook, observe)
    dist = np.zeros(n)
    for step_c, step_s in zip(clean, spl):
        clean.advance(step_c, clean.predict(step_c))
        spl.advance(step_s, spl.predict(step_s, hooks))
        dist[step_c.index] = float((spl.x - clean.x).norm() / clean.x.norm())
    return sse / tot, dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-pixart")
    p.add_argument("--sae-dir", default="runs/faithful/fmnist-pixart/saes")
    p.add_argument("--heldout", default="runs/faithful/fmnist-pixart/acts-heldout")
    p.add_argument("--saes", default="tide-b4,tide-perdim-b4,tide-perdim-down-b4,tide-perdim-update-b4")
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--directions", type=int, default=32, help="principal directions probed (spread over the spectrum)")
    p.add_argument("--results", default="experiments/results/faithful_diagnosis")
    args = p.parse_args()

    backbone = load_backbone(args.model)
    names = args.saes.split(",")
    saes = {n: load_sae(Path(args.sae_dir) / n) for n in names}
    hook = saes[names[0]].cfg.hook
    store = ActivationStore(args.heldout)
    mean, dirs_KD, share_K, rms = principal_directions(store, hook)
    probe = np.unique(np.linspace(0, len(dirs_KD) - 1, args.directions).round().astype(int))
    guidance = backbone.default_guidance_scale
    sampler = SamplerConfig(num_steps=args.num_steps, guidance_scale=guidance, batch_size=50)
    conds = [i % backbone.num_conditions for i in range(args.samples)]
    seeds = [4_000_000 + i for i in range(args.samples)]
    contexts = collect_contexts(backbone, conds[:8], seeds[:8], sampler, "both")
    sens = sensitivity(backbone, hook, contexts, dirs_KD[probe], 0.1 * rms)
    sens_all = np.interp(np.arange(len(dirs_KD)), probe, sens)

    report = {"hook": hook, "model": args.model, "guidance_scale": guidance, "rms": rms,
              "variance_share": share_K.tolist(), "probed": probe.tolist(), "sensitivity": sens.tolist(), "saes": {}}
    for name, sae in saes.items():
        energy = error_energy(sae, store, hook, dirs_KD)
        weighted = energy * sens_all ** 2
        err = denoiser_error(backbone, sae, hook, conds, seeds, sampler)
        fvu_spliced, dist = spliced_run(backbone, sae, hook, conds, seeds, sampler)
        report["saes"][name] = {
            "error_share": energy.tolist(), "sensitivity_weighted_error_share": (weighted / weighted.sum()).tolist(),
            "error_share_top10_directions": float(energy[:10].sum()),
            "weighted_share_top10_directions": float(weighted[:10].sum() / weighted.sum()),
            "timesteps": err.timesteps_T.tolist(), "fvu_observed": err.fvu_T.tolist(), "fvu_spliced": fvu_spliced.tolist(),
            "denoiser_relative_error": err.relative_error_T.tolist(), "latent_distance_spliced": dist.tolist()}
        print(f"{name}: error in the top-10 directions {energy[:10].sum():.1%}, sensitivity-weighted "
              f"{weighted[:10].sum() / weighted.sum():.1%}; final latent distance {dist[-1]:.3f}", flush=True)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    ax.loglog(share_K[probe], sens, "o", color="k", label="output change per direction (norm 0.1 RMS)")
    ax.set_xlabel("variance share of principal direction")
    ax.set_ylabel("relative change of guided ε")
    ax.set_title(f"{hook}: output change per equal-norm push, per principal direction", fontsize=9)
    ax2 = ax.twinx()
    for name in names:
        ax2.loglog(share_K, report["saes"][name]["error_share"], lw=1, label=f"{name}: error share")
    ax2.set_ylabel("share of the SAE's squared error")
    ax2.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1]
    for name in names:
        r = report["saes"][name]
        ax.plot(r["fvu_observed"], marker=".", label=f"{name}: observed (clean trajectory)")
        ax.plot(r["fvu_spliced"], marker="x", ls="--", label=f"{name}: spliced at every step")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("FVU at the hook")
    ax.set_yscale("log")
    ax.set_title("in-loop FVU", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[2]
    for name in names:
        r = report["saes"][name]
        ax.plot(r["denoiser_relative_error"], marker=".", label=f"{name}: one spliced call")
        ax.plot(r["latent_distance_spliced"], marker="x", ls="--", label=f"{name}: latents, spliced every step")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("relative error")
    ax.set_yscale("log")
    ax.set_title("how the error compounds", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(f"{args.results}.png", dpi=110)
    report["command"] = "python " + " ".join(sys.argv)
    Path(f"{args.results}.json").write_text(json.dumps(report, indent=1))
    print(f"-> {args.results}.json, {args.results}.png")


if __name__ == "__main__":
    main()
