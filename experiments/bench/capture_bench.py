"""Capture and data-layer benchmark, measured side by side in one run.

1. plain sampling vs capture of the same samples (ratio; median of alternating repeats);
2. HDF5 shard write MB/s vs a raw numpy write of the same bytes to the same disk (both fsynced);
3. loader vectors/s and peak RSS for two dataset sizes (each in a fresh process).

    python experiments/bench/capture_bench.py --out experiments/results/bench_capture.json

Results are JSON with a machine description; the README quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_capture(backbone_name: str, num_samples: int, num_steps: int, repeats: int, device: str, work: Path) -> dict:
    from tide.capture import CaptureConfig, capture
    from tide.hooks import HookedBackbone
    from tide.models import load_backbone
    from tide.sampling import SamplerConfig, sample

    backbone = load_backbone(backbone_name, device=device)
    hook = HookedBackbone.of(backbone).default_hook()
    conds = [i % backbone.num_conditions for i in range(num_samples)]
    sampler = SamplerConfig(num_steps=num_steps, batch_size=16)
    plain, captured, rows = [], [], 0
    sample(backbone, conds[:4], config=SamplerConfig(num_steps=2))  # warm-up
    for r in range(repeats):
        t0 = time.perf_counter()
        sample(backbone, conds, seeds=range(num_samples), config=sampler, decode=False)
        plain.append(time.perf_counter() - t0)
        out = work / f"capture-{r}"
        t0 = time.perf_counter()
        manifest = capture(CaptureConfig(backbone=backbone_name, out=str(out), hooks=[hook], num_samples=num_samples,
                                         num_steps=num_steps, samples_per_shard=16, overwrite=True),
                           backbone, progress=False).manifest
        captured.append(time.perf_counter() - t0)
        rows = manifest["total_rows"]
        nbytes = sum(s["bytes"] for s in manifest["shards"])
        shutil.rmtree(out)
    ratios = [c / p for c, p in zip(captured, plain)]
    return {"backbone": backbone_name, "hook": hook, "num_samples": num_samples, "num_steps": num_steps,
            "rows": rows, "dataset_bytes": nbytes, "plain_s": plain, "capture_s": captured,
            "median_plain_s": statistics.median(plain), "median_capture_s": statistics.median(captured),
            "median_ratio": statistics.median(ratios), "ratios": ratios}


def bench_write(mb: int, repeats: int, work: Path) -> dict:
    rows = mb * 2**20 // (128 * 2)
    data = np.random.default_rng(0).standard_normal((rows, 128), dtype=np.float32).astype(np.float16)
    h5_s, raw_s = [], []
    for r in range(repeats):
        path = work / f"w{r}.h5"
        t0 = time.perf_counter()
        with h5py.File(path, "w", libver="latest") as f:
            f.create_dataset("acts", data=data, track_times=False)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        h5_s.append(time.perf_counter() - t0)
        path.unlink()
        path = work / f"w{r}.npy"
        t0 = time.perf_counter()
        with open(path, "wb") as fh:
            np.save(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        raw_s.append(time.perf_counter() - t0)
        path.unlink()
    nbytes = data.nbytes
    return {"bytes": nbytes, "h5py_MBps": nbytes / 1e6 / statistics.median(h5_s), "raw_numpy_MBps": nbytes / 1e6 / statistics.median(raw_s),
            "h5py_s": h5_s, "raw_s": raw_s}


LOADER_PROBE = r"""
import json, sys, time
from tide.data import ActivationStore, ActivationLoader, LoaderConfig
def vm(key):  # this process's own peak (VmHWM) or current (VmRSS) resident set, MB
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
store = ActivationStore(sys.argv[1])
base = vm("VmHWM")
loader = ActivationLoader(store, LoaderConfig(batch_size=4096, shuffle_buffer=int(sys.argv[2]), seed=0))
n, t0 = 0, time.perf_counter()
for batch in loader:
    n += batch.acts.shape[0]
dt = time.perf_counter() - t0
print(json.dumps({"vectors": n, "seconds": dt, "vectors_per_s": n / dt,
                  "peak_rss_MB": vm("VmHWM"), "rss_before_loading_MB": base,
                  "peak_rss_growth_MB": vm("VmHWM") - base}))
"""


def make_dataset(path: Path, rows: int, d: int, shard_rows: int = 200_000) -> None:
    """A synthetic dataset in the capture format (real shards, written by the capture writer)."""
    from tide.capture.writer import ShardDone, ShardWriter, StepChunk
    from tide.capture.schema import MANIFEST, SCHEMA, SCHEMA_VERSION, atomic_write_json
    import dataclasses

    path.mkdir(parents=True)
    records = []
    writer = ShardWriter(path, "float16", "float32", "synthetic", 0, lambda rec: records.append(dataclasses.asdict(rec)))
    rng = np.random.default_rng(0)
    hook = "blocks.4.hook_resid_post"
    for s in range(-(-rows // shard_rows)):
        n = min(shard_rows, rows - s * shard_rows)
        acts = rng.standard_normal((n, d), dtype=np.float32)
        meta = {"timestep": rng.integers(0, 1000, n).astype(np.float32), "step_index": rng.integers(0, 50, n).astype(np.int16),
                "sample_id": np.arange(n, dtype=np.int32) // 49 + s * 10_000, "token": (np.arange(n) % 49).astype(np.int16),
                "cond": rng.integers(0, 10, n).astype(np.int32), "cfg_branch": np.zeros(n, np.int8)}
        writer.put(StepChunk(s, {hook: acts}, meta))
        writer.put(ShardDone(s, s * 10_000, n // 49))
    writer.close()
    steps = list(range(50))
    atomic_write_json(path / MANIFEST, {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": True, "config": {"synthetic": True},
        "config_hash": "synthetic", "backbone": {"name": "synthetic", "family": "dit"}, "backbone_hash": "synthetic",
        "hooks": {hook: {"d_model": d}}, "condition_names": [str(i) for i in range(10)],
        "schedule": {"timesteps": [float(999 - 20 * i) for i in steps], "recorded_steps": steps, "num_steps": 50},
        "num_tokens": 49, "tokens_kept": 49, "patch_grid": [7, 7], "num_samples": rows // 49,
        "samples_per_shard": 10_000, "num_shards": len(records), "shards": sorted(records, key=lambda r: r["index"]),
        "total_rows": rows, "created": "synthetic", "tide_version": "bench"})


def bench_loader(work: Path, sizes: list[int], d: int, buffer: int) -> list[dict]:
    results = []
    for rows in sizes:
        path = work / f"ds-{rows}"
        make_dataset(path, rows, d)
        proc = subprocess.run([sys.executable, "-c", LOADER_PROBE, str(path), str(buffer)], capture_output=True,
                              text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update({"rows": rows, "d_model": d, "dataset_MB": rows * d * 2 / 1e6, "shuffle_buffer": buffer})
        results.append(res)
        shutil.rmtree(path)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="fmnist-dit")
    p.add_argument("--num-samples", type=int, default=80)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--write-mb", type=int, default=256)
    p.add_argument("--loader-rows", default="1000000,4000000")
    p.add_argument("--loader-buffer", type=int, default=262_144)
    p.add_argument("--skip", default="", help="comma list of parts to skip: capture,write,loader")
    p.add_argument("--workdir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    p.add_argument("--out", default="experiments/results/bench_capture.json")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="tide-bench-", dir=args.workdir))
    result = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        if "write" not in skip:
            result["write"] = bench_write(args.write_mb, args.repeats, work)
            print("write", json.dumps(result["write"]), flush=True)
        if "capture" not in skip:
            result["capture"] = bench_capture(args.backbone, args.num_samples, args.num_steps, args.repeats, args.device, work)
            print("capture", json.dumps(result["capture"]), flush=True)
        if "loader" not in skip:
            result["loader"] = bench_loader(work, [int(x) for x in args.loader_rows.split(",")], 128, args.loader_buffer)
            print("loader", json.dumps(result["loader"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
