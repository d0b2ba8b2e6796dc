"""Cost of the downstream-aware objective per training step, beside the SAE step it is added to.

    .venv/bin/python experiments/bench/downstream_bench.py     # about 1 minute on 2 CPU cores

On the embedded ``fmnist-pixart`` (guidance 3, 20 steps), an SAE at ``blocks.4.hook_resid_post`` with
d_sae 2048, k 32: the median time of (a) the SAE's own training step on 2048 activation rows
(``tide.train.objective.train_step``), (b) the downstream term's forward and backward for 8 guided samples
at one timestep (16 denoiser rows) and (c) a plain guided denoiser call on the same 16 rows, at 1 and 2
threads, 3 rounds of 10 timed steps each, interleaved. Writes experiments/results/bench_downstream.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tide.models import load_backbone
from tide.sae import SAE, SAEConfig
from tide.sampling import SamplerConfig
from tide.train.downstream import DownstreamObjective, collect_contexts
from tide.train.objective import train_step

HOOK = "blocks.4.hook_resid_post"


def main() -> None:
    backbone = load_backbone("fmnist-pixart", device="cpu")
    contexts = collect_contexts(backbone, [i % 10 for i in range(16)], list(range(16)), SamplerConfig(num_steps=20, guidance_scale=3.0),
                                "both")
    objective = DownstreamObjective(backbone, contexts, rows_per_step=8)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, d_sae=2048, k=32, normalization="none", hook=HOOK))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x, t = torch.randn(2048, 128), torch.rand(2048) * 1000
    draws = [objective.draw(i) for i in range(40)]

    def sae_step(i):
        train_step(sae, opt, x, t, None)

    def downstream(i):
        objective.loss(sae, HOOK, draws[i % 40]).backward()

    def denoise(i):
        step, rows = draws[i % 40]
        conds = contexts.cond_N[rows]
        cond = backbone.encode_conditions(torch.cat([conds, torch.full_like(conds, -1)]))
        with torch.no_grad():
            backbone.denoise(torch.cat([contexts.x_in_NCHW[rows]] * 2), contexts.timesteps[step], cond)

    out = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                       "load_average_before": list(os.getloadavg())}, "settings": {}}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = {"sae_step": [], "downstream_term": [], "guided_denoise_16_rows": []}
        for _ in range(3):
            for name, fn in (("sae_step", sae_step), ("downstream_term", downstream), ("guided_denoise_16_rows", denoise)):
                for i in range(2):
                    fn(i)
                for i in range(10):
                    t0 = time.perf_counter()
                    fn(i)
                    times[name].append(time.perf_counter() - t0)
        out["settings"][f"threads_{threads}"] = {
            name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "steps": v} for name, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{threads} thread(s): SAE step {med['sae_step'] * 1e3:.0f} ms, downstream term "
              f"{med['downstream_term'] * 1e3:.0f} ms, guided denoiser call {med['guided_denoise_16_rows'] * 1e3:.0f} ms")
    out["machine"]["load_average_after"] = list(os.getloadavg())
    Path("experiments/results/bench_downstream.json").write_text(json.dumps(out, indent=1))
    print("-> experiments/results/bench_downstream.json")


if __name__ == "__main__":
    main()
