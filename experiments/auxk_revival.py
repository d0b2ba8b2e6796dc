"""Does AuxK on a subsample of each batch's rows revive dead latents as well as AuxK on every row?

    python experiments/auxk_revival.py          # about 3 minutes on 2 CPU cores

Half of a TopK SAE's latents are killed at the start (encoder rows scaled by 0.1: they never reach the
top k, though about half their pre-activations stay positive, which AuxK needs)
and the SAE trains on synthetic sparse data (rows are sums of a few of 4096 ground-truth directions with
Zipf-like frequencies, plus noise) with the trainer's step and the trainer's dead-latent bookkeeping,
under AuxK off and AuxK with ``aux_row_stride`` 1, 2 and 4, two seeds each. Every configuration sees the
same rows. Records the dead fraction (the trainer's definition) along the run, the fraction of latents
that never fire on held-out rows at the end, held-out FVU, and the step time.
Writes experiments/results/auxk_revival.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from tide.plots import new_figure, save_figure
from tide.sae import SAE, SAEConfig
from tide.train.objective import fired, make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]


class SparseData:
    """Rows x = sum of a few ground-truth unit directions (Zipf-like frequencies) with positive weights, plus noise."""

    def __init__(self, d: int, n_true: int, active: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.dirs = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=-1)
        p = 1.0 / (torch.arange(n_true) + 10.0) ** 0.8
        self.cdf = (p.cumsum(0) / p.sum()).contiguous()
        self.active = active

    def rows(self, n: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, self.active, generator=g)
        idx = torch.searchsorted(self.cdf, u).clamp_max(len(self.cdf) - 1)  # inverse CDF (repeats allowed)
        w = torch.rand(n, self.active, generator=g) * 2 + 0.5
        x = torch.einsum("nk,nkd->nd", w, self.dirs[idx])
        return x + 0.05 * torch.randn(x.shape, generator=g)


def run(cfg: dict, args, data: SparseData, held_out: torch.Tensor) -> dict:
    torch.manual_seed(cfg["seed"])
    sae = SAE(SAEConfig(d_in=args.d, d_sae=args.f, k=args.k, normalization="none"))
    killed = torch.zeros(args.f, dtype=torch.bool)
    killed[torch.randperm(args.f, generator=torch.Generator().manual_seed(cfg["seed"]))[: args.f // 2]] = True
    with torch.no_grad():  # small pre-activations: about half of them positive, none near the top k
        sae.W_enc[0, killed] *= args.kill_scale
        sae.b_dec[0] = data.rows(args.batch, torch.Generator().manual_seed(500 + cfg["seed"])).mean(0)  # as b_dec_init: mean
    opt = make_optimizer(sae.parameters(), args.lr)
    since = torch.zeros(1, args.f, dtype=torch.long)
    g = torch.Generator().manual_seed(1000 + cfg["seed"])  # the same rows for every configuration of a seed
    t_B = torch.zeros(args.batch)
    curve, times = [], []
    for step in range(args.steps):
        x = data.rows(args.batch, g)
        dead = since >= args.dead_after_rows
        start = time.perf_counter()
        _, out = train_step(sae, opt, x, t_B, dead if cfg["stride"] else None, k_aux=args.k_aux,
                            aux_coefficient=1 / 32, aux_row_stride=cfg["stride"] or 1)
        times.append(time.perf_counter() - start)
        since = torch.where(fired(sae, out, t_B), 0, since + args.batch)
        if step % 10 == 0 or step == args.steps - 1:
            curve.append([step, float(dead.float().mean()), sum(times)])  # step, dead fraction, step time so far (s)
    with torch.no_grad():
        never = torch.ones(args.f, dtype=torch.bool)
        sq = tot = 0.0
        for chunk in held_out.split(4096):
            out = sae(chunk, torch.zeros(len(chunk)))
            never[out.latents.idx[out.latents.acts > 0]] = False
            sq += float((out.x_hat_BD - chunk).pow(2).sum())
        tot = float((held_out - held_out.mean(0)).pow(2).sum())
    return {**cfg, "dead_curve": curve, "final_dead_fraction": curve[-1][1],
            "never_fired_on_held_out": float(never.float().mean()),
            "killed_latents_firing_on_held_out": float((~never[killed]).float().mean()),
            "held_out_fvu": sq / tot, "median_step_s": statistics.median(times[5:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--f", type=int, default=2048)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--k-aux", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kill-scale", type=float, default=0.1, help="the killed latents' encoder rows are scaled by this")
    p.add_argument("--dead-after-rows", type=int, default=20_480, help="the trainer's dead_after_rows (10 steps here)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--strides", default="0,1,2,4", help="aux_row_stride values; 0 = AuxK off")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "auxk_revival"))
    args = p.parse_args()

    data = SparseData(args.d, 4096, 12, seed=0)
    held_out = data.rows(16384, torch.Generator().manual_seed(99))
    runs = []
    started = time.time()
    for seed in range(args.seeds):
        for stride in (int(s) for s in args.strides.split(",")):
            r = run({"seed": seed, "stride": stride}, args, data, held_out)
            runs.append(r)
            print(f"seed {seed} stride {stride or 'off':>3}: dead {r['final_dead_fraction']:.3f}, never fired "
                  f"{r['never_fired_on_held_out']:.3f}, killed now firing {r['killed_latents_firing_on_held_out']:.3f}, "
                  f"FVU {r['held_out_fvu']:.4f}, {r['median_step_s'] * 1e3:.0f} ms/step", flush=True)
    report = {"what": __doc__.split("\n\n")[0], "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
              "wall_s": round(time.time() - started, 1), "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    fig, ax = new_figure((6.5, 3.8))
    colors = {0: "tab:gray", 1: "tab:blue", 2: "tab:green", 4: "tab:orange"}
    for r in runs:
        steps, dead, _ = zip(*r["dead_curve"])
        names = {0: "AuxK off", 1: "AuxK, every row", 2: "AuxK, every 2nd row", 4: "AuxK, every 4th row"}
        label = names.get(r["stride"], f"AuxK, row stride {r['stride']}") if r["seed"] == 0 else None
        ax.plot(steps, dead, color=colors.get(r["stride"]), ls="-" if r["seed"] == 0 else "--", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("dead fraction (trainer's window)")
    ax.set_title(f"Reviving {args.f // 2} of {args.f} killed latents (dashed: second seed)")
    ax.legend()
    save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
