"""A captured dataset's summary: ``dataset_info`` (JSON-able, ``ActivationStore.info``) and
``format_info`` (the human-readable text ``tide data info DIR`` prints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tide.capture.schema import ACTS_GROUP
from tide.errors import TideError

if TYPE_CHECKING:
    from tide.data.store import ActivationStore


def dataset_info(store: ActivationStore) -> dict:
    """A summary of the dataset (JSON-able): hooks, storage dtypes, rows, shards, samples, schedule."""
    m = store.manifest
    backbone = m.get("backbone", {}) or {}
    present = [s for s in store.shards if s.path.is_file()]
    timesteps = store.recorded_timesteps
    steps = store.recorded_steps
    dtypes: dict[str, set[str]] = {h: set() for h in store.hooks}
    for i, shard in enumerate(store.shards):
        if shard.path.is_file():
            try:
                group = store.open_shard(i)[ACTS_GROUP]
                for h in store.hooks:
                    if h in group:
                        dtypes[h].add(group[h].dtype.name)
            except (TideError, KeyError, OSError):
                pass
    samples = m.get("num_samples")
    tokens = m.get("tokens_kept", m.get("num_tokens"))
    branches = None
    done_samples = sum(s.num_samples for s in store.shards)
    if tokens and steps and done_samples > 0 and store.rows % (done_samples * len(steps) * tokens) == 0:
        branches = store.rows // (done_samples * len(steps) * tokens)
    return {
        "path": str(store.path),
        "complete": store.complete,
        "backbone": {"name": backbone.get("name"), "family": backbone.get("family")},
        "backbone_hash": m.get("backbone_hash"),
        "hooks": dict(store.hooks),
        "dtypes": {h: sorted(d) for h, d in dtypes.items()},
        "rows": store.rows,
        "shards": len(store.shards),
        "shards_expected": m.get("num_shards"),
        "shards_missing": len(store.shards) - len(present),
        "bytes": sum(s.path.stat().st_size for s in present),
        "samples": samples,
        "samples_done": done_samples,
        "conditions": list(m.get("condition_names") or []),
        "num_steps": m.get("schedule", {}).get("num_steps"),
        "recorded_steps": steps,
        "timesteps": timesteps,
        "timestep_range": [min(timesteps), max(timesteps)] if timesteps else None,
        "num_tokens": m.get("num_tokens"),
        "tokens_kept": m.get("tokens_kept"),
        "patch_grid": m.get("patch_grid"),
        "cfg_branches": branches,
        "config_hash": m.get("config_hash"),
        "created": m.get("created"),
        "tide_version": m.get("tide_version"),
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_info(i: dict) -> str:
    """A :func:`dataset_info` summary as human-readable lines."""
    status = "complete" if i["complete"] else f"INCOMPLETE ({i['shards']} of {i['shards_expected']} shards)"
    lines = [f"{i['path']}  [{status}]",
             f"  backbone     {i['backbone']['name']} ({i['backbone']['family']})",
             f"  rows         {i['rows']:,} in {i['shards']} shards, {_size(i['bytes'])} on disk"
             + (f", {i['shards_missing']} shard file(s) MISSING" if i["shards_missing"] else ""),
             f"  samples      {i['samples_done']}"
             + (f" of {i['samples']}" if i["samples"] != i["samples_done"] else "")]
    conds = i["conditions"]
    if conds:
        shown = ", ".join(map(str, conds[:8])) + (f", ... ({len(conds)} in all)" if len(conds) > 8 else "")
        lines.append(f"  conditions   {shown}")
    steps = i["recorded_steps"]
    if steps:
        lines.append(f"  steps        {len(steps)} recorded of {i['num_steps']}"
                     + (f", timesteps {i['timestep_range'][1]:g} .. {i['timestep_range'][0]:g}"
                        if i["timestep_range"] else ""))
    if i["tokens_kept"] is not None:
        lines.append(f"  tokens       {i['tokens_kept']} kept of {i['num_tokens']} per image"
                     + (f" (patch grid {'x'.join(map(str, i['patch_grid']))}"
                        f"{', frames x rows x cols' if len(i['patch_grid']) == 3 else ''})" if i["patch_grid"] else "")
                     + (f", {i['cfg_branches']} CFG branch(es)" if i["cfg_branches"] else ""))
    lines.append("  hooks")
    width = max(len(h) for h in i["hooks"])
    for h, d in i["hooks"].items():
        lines.append(f"    {h:<{width}}  d_model {d}  {'/'.join(i['dtypes'][h]) or '?'}")
    return "\n".join(lines)
