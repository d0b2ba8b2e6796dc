"""Small activation datasets written with h5py exactly as docs/FORMAT.md describes, plus the same
rows in memory as a reference.

(A module rather than tests/data/conftest.py: a second module named ``conftest`` would shadow
tests/conftest.py for the test files that import from it.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

HOOKS = {"blocks.0.hook_resid_post": 8, "blocks.2.hook_resid_post": 12}
META = {"timestep": np.float32, "step_index": np.int16, "sample_id": np.int32, "token": np.int16,
        "cond": np.int32, "cfg_branch": np.int8}


class FixtureData(NamedTuple):
    """The dataset directory and every row in memory, in shard order."""

    path: Path
    acts: dict[str, np.ndarray]
    """hook -> (rows, d) as stored (cast back to float64 for references)."""
    meta: dict[str, np.ndarray]
    """column -> (rows,), plus ``shard`` and ``row`` (position inside the shard)."""
    manifest: dict


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(path: Path, manifest: dict) -> None:
    (Path(path) / "manifest.json").write_text(json.dumps(manifest, indent=1))


def refresh_shard_record(path: Path, manifest: dict, index: int) -> None:
    """Re-record a shard's size and hash after editing it (so only the content checks can catch it)."""
    rec = manifest["shards"][index]
    file = Path(path) / rec["file"]
    rec["bytes"], rec["sha256"] = file.stat().st_size, sha256(file)
    write_manifest(path, manifest)


def write_fixture_dataset(path, *, num_samples: int = 10, samples_per_shard: int = 4, hooks: dict | None = None,
                          num_steps: int = 10, recorded_steps=(0, 2, 5, 9), num_tokens: int = 16,
                          tokens_kept: int = 8, cfg: bool = True, num_classes: int = 4, dtype: str = "float16",
                          seed: int = 0, complete: bool = True) -> FixtureData:
    """Write a dataset of ``ceil(num_samples / samples_per_shard)`` shards and return its rows.

    Activations depend on the step (scale and offset grow with noise), so per-timestep statistics
    differ from step to step.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hooks = dict(HOOKS if hooks is None else hooks)
    rng = np.random.default_rng(seed)
    timesteps = [float((num_steps - 1 - i) * (1000 // num_steps) + 1) for i in range(num_steps)]
    branches = (0, 1) if cfg else (0,)
    kept = np.sort(np.random.default_rng(seed + 1).choice(num_tokens, tokens_kept, replace=False))
    conds_of = [i % num_classes for i in range(num_samples)]
    num_shards = -(-num_samples // samples_per_shard)
    records, all_acts, all_meta = [], {h: [] for h in hooks}, {c: [] for c in (*META, "shard", "row")}
    for s in range(num_shards):
        ids = list(range(s * samples_per_shard, min((s + 1) * samples_per_shard, num_samples)))
        # rows ordered by (step, branch-major batch row, token)
        grid = [(step, b, i, tok) for step in recorded_steps for b in branches for i in ids for tok in kept]
        step_R = np.array([g[0] for g in grid])
        meta = {
            "timestep": np.array([timesteps[g[0]] for g in grid], np.float32),
            "step_index": step_R.astype(np.int16),
            "sample_id": np.array([g[2] for g in grid], np.int32),
            "token": np.array([g[3] for g in grid], np.int16),
            "cond": np.array([conds_of[g[2]] for g in grid], np.int32),
            "cfg_branch": np.array([g[1] for g in grid], np.int8),
        }
        rows = len(grid)
        acts = {h: ((1 + step_R[:, None] / 3) * rng.standard_normal((rows, d)) + step_R[:, None] * 0.5
                    + np.arange(d) * 0.1).astype(dtype) for h, d in hooks.items()}
        name = f"shard-{s:06d}.h5"
        with h5py.File(path / name, "w") as f:
            f.attrs.update({"schema": "tide.activations", "schema_version": 1, "shard_index": s,
                            "first_sample": ids[0], "num_samples": len(ids), "rows": rows,
                            "backbone_hash": "0" * 64})
            for h, a in acts.items():
                f.create_dataset(f"acts/{h}", data=a)
                f.attrs[f"dtype/{h}"] = str(a.dtype)
            for c, v in meta.items():
                f.create_dataset(c, data=v)
        records.append({"index": s, "file": name, "rows": rows, "bytes": (path / name).stat().st_size,
                        "sha256": sha256(path / name), "first_sample": ids[0], "num_samples": len(ids), "rank": 0})
        for h in hooks:
            all_acts[h].append(acts[h])
        for c in META:
            all_meta[c].append(meta[c])
        all_meta["shard"].append(np.full(rows, s))
        all_meta["row"].append(np.arange(rows))
    manifest = {
        "schema": "tide.activations", "schema_version": 1, "complete": complete,
        "config": {"seed": 0, "num_samples": num_samples, "samples_per_shard": samples_per_shard},
        "config_hash": "1" * 64,
        "backbone": {"family": "dit", "name": "fixture-dit", "latent_shape": [1, 8, 8], "d_model": 16},
        "backbone_hash": "0" * 64,
        "hooks": {h: {"d_model": d} for h, d in hooks.items()},
        "condition_names": [f"class {c}" for c in range(num_classes)],
        "schedule": {"timesteps": timesteps, "recorded_steps": list(recorded_steps), "num_steps": num_steps},
        "num_tokens": num_tokens, "tokens_kept": tokens_kept, "patch_grid": [4, 4],
        "num_samples": num_samples, "samples_per_shard": samples_per_shard, "num_shards": num_shards,
        "shards": records if complete else records[:-1],
        "total_rows": sum(r["rows"] for r in (records if complete else records[:-1])),
        "created": "2026-11-22T22:00:00+00:00", "tide_version": "0.1.0",
    }
    write_manifest(path, manifest)
    return FixtureData(path, {h: np.concatenate(v) for h, v in all_acts.items()},
                       {c: np.concatenate(v) for c, v in all_meta.items()}, manifest)
