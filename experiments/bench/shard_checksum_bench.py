"""Cost of checking each shard's SHA-256 in the training loader (``LoaderConfig.verify_checksums``, which
``TrainConfig.verify_checksums`` turns on for `tide train`).

The check streams every shard file once per process (8 MiB chunks) the first time a loader reads it; an epoch loop
or a second loader in the same process finds it verified and hashes nothing. So its cost is a one-off
``hash time of the dataset`` per training process, and the question is how it compares with an epoch of training.

Measured on a realistic dataset: ``runs/faithful_capture`` when present (10 float16 shards, 784,000 rows of two
128-wide hooks, 396 MB), else a synthetic one of the same shape written to a temporary directory. Per repeat, with
the process-wide verification cache cleared before each arm:

- ``hash``: every shard's SHA-256 alone (``ActivationStore.verify_checksum`` over all shards);
- ``loader_epoch``: one full epoch of the training loader alone (shuffle buffer 262,144 rows, the trainer's
  defaults), verification on and off: the worst case, an SAE step that costs nothing;
- ``train``: a fresh loader and a fresh trainer (TrainConfig defaults: one TopK SAE, d_sae 4096, k 32, batch 4096)
  run ``--steps`` optimiser steps (loader batches + ``Trainer._train_batch``, the step `tide train` runs), on and
  off, at 1 and 2 torch threads. The loader fills its 262,144-row shuffle buffer from blocks of random shards
  before the first batch, so the first steps already open (and hash) nearly every shard: the on-off difference of
  this pass is the whole check.

On and off alternate (which goes first flips each repeat), so drift on this shared machine hits both alike; the
difference is taken per repeat and reported as the median with its range. The amortised cost is that difference
over one epoch of training: epoch rows / batch steps at the measured SAE step time plus the loader-only epoch.

    python experiments/bench/shard_checksum_bench.py                    # writes experiments/results/shard_checksum_bench.json
    python experiments/bench/shard_checksum_bench.py --repeats 3 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tide  # noqa: E402,F401  (first, as the `tide` command does: it sets OMP_WAIT_POLICY=PASSIVE before torch loads)
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import tide.data.store as store_module  # noqa: E402
from tide.capture.schema import SCHEMA, SCHEMA_VERSION, ShardRecord, shard_name  # noqa: E402
from tide.data import ActivationLoader, ActivationStore, LoaderConfig  # noqa: E402
from tide.io import atomic_write_json, sha256_file  # noqa: E402
from tide.train import SAESpec, TrainConfig, Trainer  # noqa: E402

DEFAULT_DATA = ROOT / "runs" / "faithful_capture"
OUT = ROOT / "experiments" / "results" / "shard_checksum_bench.json"


def build_synthetic(path: Path, shards: int = 10, rows: int = 78_400, hooks=("blocks.4.hook_resid_pre",
                    "blocks.4.hook_resid_post"), width: int = 128, steps: int = 20) -> Path:
    """A dataset shaped like runs/faithful_capture (float16 activations, the format's metadata columns)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    timesteps = [float(999 - 50 * i) for i in range(steps)]
    records = []
    for s in range(shards):
        step = np.repeat(np.arange(steps, dtype=np.int16), rows // steps + 1)[:rows]
        with h5py.File(path / shard_name(s), "w") as f:
            f.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "shard_index": s, "rows": rows,
                            "first_sample": 40 * s, "num_samples": 40})
            for h in hooks:
                f.create_dataset(f"acts/{h}", data=rng.standard_normal((rows, width), dtype=np.float32).astype(np.float16))
                f.attrs[f"dtype/{h}"] = "float16"
            f["timestep"] = np.array(timesteps, np.float32)[step]
            f["step_index"] = step
            f["sample_id"] = (40 * s + np.arange(rows) % 40).astype(np.int32)
            f["token"] = (np.arange(rows) % 49).astype(np.int16)
            f["cond"] = (np.arange(rows) % 10).astype(np.int32)
            f["cfg_branch"] = (np.arange(rows) % 2).astype(np.int8)
        file = path / shard_name(s)
        records.append(ShardRecord(s, file.name, rows, file.stat().st_size, sha256_file(file), 40 * s, 40, 0,
                                   {h: "float16" for h in hooks}).to_dict())
    atomic_write_json(path / "manifest.json", {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": True, "config": {},
        "backbone": {"name": "synthetic", "family": "pixart"}, "hooks": {h: {"d_model": width} for h in hooks},
        "condition_names": [str(c) for c in range(10)], "num_tokens": 49, "tokens_kept": 49, "patch_grid": [7, 7],
        "schedule": {"timesteps": timesteps, "recorded_steps": list(range(steps)), "num_steps": steps},
        "num_samples": 40 * shards, "num_shards": shards, "shards": records, "total_rows": rows * shards})
    return path


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": xs}


def clear_cache() -> None:
    store_module._VERIFIED.clear()


def time_hash(store: ActivationStore) -> float:
    clear_cache()
    start = time.perf_counter()
    for i in range(len(store.shards)):
        store.verify_checksum(i)
    return time.perf_counter() - start


def loader_config(hook: str, verify: bool, seed: int, batch: int, epochs: int | None) -> LoaderConfig:
    tc = TrainConfig()
    return LoaderConfig(hooks=[hook], batch_size=batch, shuffle_buffer=tc.shuffle_buffer, seed=seed, epochs=epochs,
                        drop_last=True, verify_checksums=verify)


def time_loader_epoch(store: ActivationStore, hook: str, verify: bool, seed: int, batch: int) -> tuple[float, int]:
    clear_cache()
    start = time.perf_counter()
    n = 0
    for _ in ActivationLoader(store, loader_config(hook, verify, seed, batch, epochs=1)):
        n += 1
    return time.perf_counter() - start, n


def time_train(store: ActivationStore, hook: str, verify: bool, seed: int, batch: int, steps: int,
               out: Path) -> dict:
    """A fresh loader and trainer, ``steps`` optimiser steps: total seconds, and per-step SAE / loader seconds."""
    clear_cache()
    cfg = TrainConfig(data=str(store.path), out=str(out), saes=[SAESpec(name="sae", hook=hook, d_in=store.hooks[hook])],
                      steps=steps, batch_size=batch, seed=seed, device="cpu", progress=False, checkpoint_every=0,
                      verify_checksums=verify)
    start = time.perf_counter()
    trainer = Trainer(cfg, batches=[])
    batches = iter(ActivationLoader(store, loader_config(hook, verify, seed, batch, epochs=None)))
    sae_s, load_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch_ = next(batches)
        t1 = time.perf_counter()
        trainer._train_batch(batch_)
        trainer.step += 1
        t2 = time.perf_counter()
        load_s.append(t1 - t0)
        sae_s.append(t2 - t1)
    total = time.perf_counter() - start
    return {"total_s": total, "first_batch_s": load_s[0], "sae_step_s": statistics.median(sae_s[2:]),
            "loader_batch_s": statistics.median(load_s[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="dataset directory (built synthetic if missing)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per training pass")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="checksum-bench-"))
    data = Path(args.data)
    source = str(data)
    if not (data / "manifest.json").is_file():
        data, source = build_synthetic(tmp / "data"), "synthetic (shaped like runs/faithful_capture)"
    store = ActivationStore(data)
    hook = list(store.hooks)[-1]
    size = sum(s.bytes for s in store.shards)
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    print(f"dataset {data}: {len(store.shards)} shards, {store.rows:,} rows, {size / 1e6:.0f} MB; hook {hook}", flush=True)

    time_hash(store)  # warm the page cache: every arm then reads from memory
    hashes = [time_hash(store) for _ in range(args.repeats)]
    print(f"hash all shards: median {statistics.median(hashes):.3f} s "
          f"({size / 1e6 / statistics.median(hashes):.0f} MB/s)", flush=True)

    epoch_on, epoch_off, epoch_steps = [], [], 0
    time_loader_epoch(store, hook, False, 99, args.batch)  # warm-up
    for r in range(args.repeats):
        for verify in ((True, False) if r % 2 == 0 else (False, True)):
            seconds, epoch_steps = time_loader_epoch(store, hook, verify, r, args.batch)
            (epoch_on if verify else epoch_off).append(seconds)
        print(f"loader epoch {r}: on {epoch_on[-1]:.2f} s, off {epoch_off[-1]:.2f} s", flush=True)

    train = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        runs = {True: [], False: []}
        time_train(store, hook, False, 99, args.batch, 3, tmp / f"warmup-{threads}")  # first-use costs (torch, kernels)
        for r in range(args.repeats):
            for verify in ((True, False) if r % 2 == 0 else (False, True)):
                runs[verify].append(time_train(store, hook, verify, r, args.batch, args.steps,
                                               tmp / f"run-{threads}-{r}-{verify}"))
            print(f"{threads} thread(s), pass {r}: on {runs[True][-1]['total_s']:.2f} s, "
                  f"off {runs[False][-1]['total_s']:.2f} s, SAE step {runs[False][-1]['sae_step_s'] * 1e3:.0f} ms",
                  flush=True)
        delta = [a["total_s"] - b["total_s"] for a, b in zip(runs[True], runs[False])]
        sae_step = statistics.median([x["sae_step_s"] for x in runs[True] + runs[False]])
        loader_epoch_off = statistics.median(epoch_off)
        epoch_train_s = loader_epoch_off + epoch_steps * sae_step
        train[str(threads)] = {
            "pass_on_s": summary([x["total_s"] for x in runs[True]]),
            "pass_off_s": summary([x["total_s"] for x in runs[False]]),
            "delta_s": summary(delta),
            "sae_step_s": sae_step,
            "loader_batch_s": statistics.median([x["loader_batch_s"] for x in runs[False]]),
            "first_batch_on_s": summary([x["first_batch_s"] for x in runs[True]]),
            "first_batch_off_s": summary([x["first_batch_s"] for x in runs[False]]),
            "epoch_steps": epoch_steps,
            "epoch_train_s_estimate": epoch_train_s,
            "amortised_pct_of_epoch": 100 * statistics.median(delta) / epoch_train_s,
            "amortised_pct_range": [100 * min(delta) / epoch_train_s, 100 * max(delta) / epoch_train_s],
            "amortised_pct_from_hash_time": 100 * statistics.median(hashes) / epoch_train_s,
        }
        print(f"{threads} thread(s): verification adds {statistics.median(delta):.2f} s "
              f"[{min(delta):.2f}, {max(delta):.2f}] per training process = "
              f"{train[str(threads)]['amortised_pct_of_epoch']:.1f}% of one epoch "
              f"({epoch_steps} steps, about {epoch_train_s:.0f} s)", flush=True)

    epoch_delta = [a - b for a, b in zip(epoch_on, epoch_off)]
    result = {
        "what": "one-off cost of the training loader's per-shard SHA-256 check (LoaderConfig.verify_checksums)",
        "dataset": {"path": source, "shards": len(store.shards), "rows": store.rows, "bytes": size, "hook": hook,
                    "dtype": "float16"},
        "settings": {"repeats": args.repeats, "train_steps_per_pass": args.steps, "batch_size": args.batch,
                     "shuffle_buffer": TrainConfig.shuffle_buffer, "sae": "TrainConfig default SAESpec: topk, d_sae 4096, "
                     "k 32, d_in = hook width", "page_cache": "warm (the dataset is read once before timing)"},
        "hash_all_shards_s": summary(hashes),
        "hash_MB_per_s": size / 1e6 / statistics.median(hashes),
        "loader_epoch_on_s": summary(epoch_on),
        "loader_epoch_off_s": summary(epoch_off),
        "loader_epoch_delta_s": summary(epoch_delta),
        "loader_epoch_pct": 100 * statistics.median(epoch_delta) / statistics.median(epoch_off),
        "train": train,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
