"""Time one feature-statistics pass over a synthetic dataset: 2048 samples x 10 steps x 49 tokens
(1,003,520 rows, d_model 128, float16) with a 4096-feature TopK SAE (k=32).

    python experiments/bench/feature_stats_bench.py [--dir /tmp/fs-bench] [--rows-scale 1.0]

Writes experiments/results/bench_feature_stats.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from tide.analysis import compute_feature_stats, save_feature_stats
from tide.sae import SAE, SAEConfig

HOOK = "blocks.4.hook_resid_post"


def write_dataset(out: Path, samples: int, steps: int, grid=(7, 7), d=128, per_shard=256, classes=10) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens = grid[0] * grid[1]
    timesteps = np.linspace(999, 0, steps).astype(np.float32)
    shards = []
    for s, first in enumerate(range(0, samples, per_shard)):
        n = min(per_shard, samples - first)
        step = np.repeat(np.arange(steps), n * tokens)
        sid = np.tile(np.repeat(np.arange(first, first + n), tokens), steps)
        tok = np.tile(np.arange(tokens), n * steps)
        rows = len(step)
        path = out / f"shard-{s:06d}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset(f"acts/{HOOK}", data=rng.standard_normal((rows, d), dtype=np.float32).astype(np.float16))
            f["timestep"] = timesteps[step]
            f["step_index"] = step.astype(np.int16)
            f["sample_id"] = sid.astype(np.int32)
            f["token"] = tok.astype(np.int16)
            f["cond"] = (sid % classes).astype(np.int32)
            f["cfg_branch"] = np.zeros(rows, np.int8)
        shards.append(dict(index=s, file=path.name, rows=rows, bytes=path.stat().st_size, sha256="",
                           first_sample=first, num_samples=n, rank=0))
    manifest = dict(schema="tide.activations", schema_version=1, complete=True, config={}, hooks={HOOK: {"d_model": d}},
                    condition_names=[f"class{c}" for c in range(classes)],
                    schedule=dict(timesteps=timesteps.tolist(), recorded_steps=list(range(steps)), num_steps=steps),
                    num_tokens=tokens, tokens_kept=tokens, patch_grid=list(grid), num_samples=samples,
                    samples_per_shard=per_shard, num_shards=len(shards), shards=shards,
                    total_rows=sum(s["rows"] for s in shards))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest["total_rows"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fs-bench")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="experiments/results/bench_feature_stats.json")
    args = ap.parse_args()
    rows = write_dataset(Path(args.dir), args.samples, 10)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, d_sae=4096, k=32, normalization="none", hook=HOOK))
    t0 = time.perf_counter()
    stats = compute_feature_stats(sae, args.dir, top_k=16, batch_size=4096, device=args.device, progress=False)
    if args.device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    save_feature_stats(stats, Path(args.dir) / "feature_stats.h5")
    save_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    with torch.no_grad():  # the SAE forward alone over the same rows, for comparison
        x = torch.randn(4096, 128)
        t = torch.full((4096,), 500.0)
        for _ in range(rows // 4096):
            sae(x, t)
    forward_s = time.perf_counter() - t2
    result = dict(rows=rows, features=4096, k=32, top_k=16, batch_size=4096, device=args.device,
                  pass_seconds=round(elapsed, 2), rows_per_second=round(rows / elapsed), save_seconds=round(save_s, 2),
                  sae_forward_only_seconds=round(forward_s, 2), torch_threads=torch.get_num_threads(),
                  cpu_count=os.cpu_count(), machine=platform.processor() or platform.machine())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
