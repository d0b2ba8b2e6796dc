"""`tide capture`: sample images while hooks record activations into HDF5 shards.

The capture is split into work units of ``samples_per_shard`` samples; unit ``s`` is denoised as
one batch and becomes ``shard-{s}.h5``. Units are dealt round-robin to ranks under ``torchrun``;
a resumed capture skips the finished ones. See docs/FORMAT.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import tide
from tide.capture.schema import (MANIFEST, PROGRESS_DIR, SCHEMA, SCHEMA_VERSION, TMP_SUFFIX, ShardRecord,
                                 check_shard_entry, progress_name, read_manifest, token_dtype)
from tide.capture.writer import ShardDone, ShardWriter, StepChunk
from tide.branches import CfgBranch, check_branch
from tide.config import GenerationConfig, to_dict
from tide.errors import TideError
from tide.io import atomic_write_json, canonical_hash
from tide.memory import check_capture
from tide.hooks import BRANCH_NAMES, HookedBackbone, current_step, is_text_hook
from tide.models.base import Backbone
from tide.models.loading import BackboneConfig
from tide.sampling import Intervention, SamplerConfig, sample


@dataclass
class CaptureConfig(GenerationConfig, BackboneConfig):
    """`tide capture`: which activations to record, from which samples, into which directory."""

    out: str = "runs/capture"
    """Dataset directory (manifest.json + shards)."""
    hooks: list[str] | None = None
    """Hook names to record (image-stream hooks); default: the middle block's residual stream."""
    classes: list[int] | None = None
    """Condition ids to cycle through (class ids, or prompt ids for text families); default: all."""
    num_samples: int = 160
    """Samples to generate; sample i has condition classes[i % len(classes)] and seed seed + i."""
    record_steps: str = "all"
    """Steps to record: 'all', 'every:K' (every K-th step from 0), or a list of step indices '0,10,49'."""
    token_fraction: float = 1.0
    """Fraction of image tokens kept per (sample, step), chosen at random from the sample's seed (TIDE kept 1/16)."""
    cfg_branch: CfgBranch = "cond"
    """CFG rows to record: cond, uncond or both (uncond/both need classifier-free guidance)."""
    storage_dtype: str = "float16"
    """Storage dtype: float16 or float32."""
    on_overflow: str = "float32"
    """When float16 would overflow: 'float32' (store that hook's shard in float32) or 'error'."""
    samples_per_shard: int = 16
    """Samples per shard; a shard's samples are denoised as one batch."""
    resume: bool = False
    """Continue an interrupted capture in `out` (refused if the config differs)."""
    overwrite: bool = False
    """Replace an existing dataset in `out`."""
    queue_size: int = 64
    """Step chunks the writer queue holds before sampling waits for the disk."""

    # fields that do not change the data (excluded from the config hash)
    RUNTIME_FIELDS = ("out", "resume", "overwrite", "queue_size", "device")

    def defining(self) -> dict:
        return {k: v for k, v in to_dict(self).items() if k not in self.RUNTIME_FIELDS}

    def validate(self) -> None:
        if self.num_samples < 1 or self.samples_per_shard < 1 or self.num_steps < 1:
            raise TideError("num_samples, samples_per_shard and num_steps must all be >= 1")
        if not 0 < self.token_fraction <= 1:
            raise TideError(f"token_fraction must be in (0, 1], got {self.token_fraction}")
        if self.storage_dtype not in ("float16", "float32"):
            raise TideError(f"storage_dtype must be float16 or float32, got {self.storage_dtype!r}")
        if self.on_overflow not in ("float32", "error"):
            raise TideError(f"on_overflow must be 'float32' or 'error', got {self.on_overflow!r}")
        check_branch(self.cfg_branch)
        if self.resume and self.overwrite:
            raise TideError("choose one of --resume and --overwrite")


def parse_record_steps(spec: str, num_steps: int) -> list[int]:
    """'all' | 'every:K' | '0,10,49' -> sorted step indices, checked against the schedule."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(num_steps))
    if spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise TideError(f"record_steps {spec!r}: K in 'every:K' must be a positive integer")
        return list(range(0, num_steps, k))
    try:
        steps = sorted({int(s) for s in spec.replace(" ", "").split(",") if s})
    except ValueError:
        raise TideError(f"record_steps {spec!r} is not 'all', 'every:K' or a list of step indices") from None
    bad = [s for s in steps if not 0 <= s < num_steps]
    if bad or not steps:
        raise TideError(f"record_steps {spec!r}: step indices must lie in 0..{num_steps - 1} (got {bad or 'none'})")
    return steps


@dataclass(frozen=True)
class CaptureResult:
    """What a capture produced: the dataset directory and its final manifest (docs/FORMAT.md)."""

    path: Path
    """The dataset directory."""
    manifest: dict
    """The manifest as written (shards with row counts and checksums, schedule, hooks, config, ...)."""

    @property
    def rows(self) -> int:
        """Rows captured (every hook has this many)."""
        return int(self.manifest["total_rows"])

    @property
    def shards(self) -> int:
        """Finished shards."""
        return len(self.manifest["shards"])

    @property
    def complete(self) -> bool:
        """True when every shard of the run is finished."""
        return bool(self.manifest["complete"])


class Recorder:
    """The hook functions of one shard: select rows and tokens, hand aligned chunks to the writer."""

    def __init__(self, config: CaptureConfig, hooks: list[str], num_tokens: int, record_steps: list[int],
                 writer: ShardWriter, shard: int, sample_conds: dict[int, int], on_rows=None):
        self.config, self.hooks, self.writer, self.shard = config, hooks, writer, shard
        self.sample_conds = sample_conds
        """sample id -> its condition (stored for both CFG branches; `cfg_branch` says what the model saw)"""
        self.num_tokens = num_tokens
        self.keep = max(1, round(num_tokens * config.token_fraction))
        self.record_steps = set(record_steps)
        self.on_rows = on_rows
        self._step: int | None = None
        self._acts: dict[str, np.ndarray] = {}
        self._select = None

    def interventions(self) -> list[Intervention]:
        return [Intervention(h, self._hook_fn(h)) for h in self.hooks]

    def _selection(self, ctx):
        """(row indices (n,), token indices (n, keep)) for this step, shared by every hook."""
        branch = self.config.cfg_branch
        rows = torch.arange(len(ctx.cfg_branch_B)) if branch == "both" else \
            torch.nonzero(ctx.cfg_branch_B == BRANCH_NAMES[branch]).flatten()
        if self.keep == self.num_tokens:
            tokens = torch.arange(self.num_tokens).expand(len(rows), -1)
        else:
            tokens = torch.stack([
                torch.randperm(self.num_tokens, generator=torch.Generator().manual_seed(
                    (self.config.seed + int(ctx.sample_ids_B[r])) * 100_003 + ctx.step_index))[:self.keep].sort().values
                for r in rows.tolist()])
        return rows, tokens

    def _hook_fn(self, name: str):
        def fn(act_BTD: torch.Tensor, hook) -> None:
            ctx = current_step()
            if ctx.step_index not in self.record_steps:
                return None
            if ctx.step_index != self._step:
                self._step, self._acts = ctx.step_index, {}
                self._select = self._selection(ctx)
                self._meta = self._metadata(ctx)
            rows, tokens = self._select
            sel = act_BTD[rows.to(act_BTD.device)]
            if self.keep != self.num_tokens:
                sel = torch.gather(sel, 1, tokens.to(act_BTD.device)[..., None].expand(-1, -1, sel.shape[-1]))
            self._acts[name] = sel.reshape(-1, sel.shape[-1]).float().cpu().numpy()
            if len(self._acts) == len(self.hooks):
                self.writer.put(StepChunk(self.shard, self._acts, self._meta))
                if self.on_rows:
                    self.on_rows(len(self._meta["sample_id"]))
            return None
        return fn

    def _metadata(self, ctx) -> dict[str, np.ndarray]:
        rows, tokens = self._select
        n, k = tokens.shape
        rep = lambda v: np.repeat(np.asarray(v), k)  # noqa: E731  (one value per row -> per token)
        return {
            "timestep": np.full(n * k, ctx.timestep, np.float32),
            "step_index": np.full(n * k, ctx.step_index, np.int16),
            "sample_id": rep(ctx.sample_ids_B[rows].numpy()).astype(np.int32),
            "token": tokens.reshape(-1).numpy().astype(token_dtype(self.num_tokens)),
            "cond": rep([self.sample_conds[int(i)] for i in ctx.sample_ids_B[rows]]).astype(np.int32),
            "cfg_branch": rep(ctx.cfg_branch_B[rows].numpy()).astype(np.int8),
        }


# ------------------------------------------------------------------------------------ the run
def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _prepare_output(config: CaptureConfig, out: Path) -> dict | None:
    """Create, check or clear the output directory; returns the existing manifest on resume."""
    if out.exists() and not out.is_dir():
        raise TideError(f"output {out} exists and is a file: choose a directory path")
    existing = out.exists() and any(out.iterdir())
    manifest_path = out / MANIFEST
    if config.resume:
        if not manifest_path.exists():
            raise TideError(f"cannot resume: {out} holds no {MANIFEST} (nothing was captured there yet); "
                            "run without --resume")
        # schema, version, entry types and confined shard paths: refused before anything in `out` changes
        manifest, _, _ = read_manifest(out)
        _read_progress(out)  # the progress files' shard entries too
        old, new = manifest.get("config", {}), config.defining()
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        if diff:
            what = "; ".join(f"{k}: captured with {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise TideError(f"cannot resume {out} with a different config ({what}): use the original settings, "
                            "or --overwrite to start over")
        return manifest
    if existing:
        if not config.overwrite:
            raise TideError(f"output directory {out} is not empty: pass --resume to continue its capture "
                            "or --overwrite to replace it")
        if not manifest_path.exists():
            raise TideError(f"refusing to --overwrite {out}: it is not a tide dataset (no {MANIFEST}); "
                            "choose an empty or new directory")
        shutil.rmtree(out)
    return None


def _cleanup_partial(out: Path, finished: set[int]) -> None:
    """Drop temp files and shards that no progress file lists (a kill between rename and record)."""
    for path in out.glob("*" + TMP_SUFFIX):
        path.unlink()
    for path in (out / PROGRESS_DIR).glob("*" + TMP_SUFFIX):
        path.unlink()
    for path in out.glob("shard-*.h5"):
        index = path.stem.split("-", 1)[1]
        if index.isdigit() and int(index) not in finished:  # only names the writer gives (shard_name)
            path.unlink()


def _read_progress(out: Path) -> dict[int, dict]:
    """The finished shards' entries by index: the manifest's, then the progress files' (each checked as a
    manifest's shard entry, its file confined to ``out``)."""
    records: dict[int, dict] = {}
    if (out / MANIFEST).exists():
        for rec in read_manifest(out)[0]["shards"]:
            records[rec["index"]] = rec
    for path in sorted((out / PROGRESS_DIR).glob("rank-*.json")):
        try:
            progress = json.loads(path.read_bytes())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise TideError(f"capture progress file {path} cannot be read ({' '.join(str(exc).split())}); "
                            f"it is damaged: restart the capture with --overwrite") from None
        entries = progress.get("shards") if isinstance(progress, dict) else None
        if not isinstance(entries, list):
            raise TideError(f"capture progress file {path} holds no list of shards; it is damaged: "
                            "restart the capture with --overwrite")
        for i, rec in enumerate(entries):
            records[check_shard_entry(rec, i, path, out).index] = rec
    return records


def capture(config: CaptureConfig, backbone: Backbone | None = None, progress: bool = True) -> CaptureResult:
    """Run (or resume) a capture; returns the dataset and its final manifest. Under torchrun every rank calls this."""
    config.validate()
    out = Path(config.out)
    backbone = backbone or config.load_backbone()
    # the guidance and weight dtype actually used are part of the data: record them as used
    config = dataclasses.replace(config, guidance_scale=backbone.resolve_guidance(config.guidance_scale),
                                 dtype=str(backbone.dtype).removeprefix("torch."))
    if config.cfg_branch != "cond" and not backbone.uses_cfg(config.guidance_scale):
        raise TideError(f"cfg_branch={config.cfg_branch!r} needs classifier-free guidance, but the {backbone.family} "
                        f"backbone at guidance_scale={config.guidance_scale:g} has no unconditional half: set "
                        "guidance_scale to a value other than 1.0 (guidance-distilled FLUX has none at any scale)")
    check_capture(config, backbone)  # memory of a shard's batch, disk of the dataset: refused before `out` changes
    rank, world = _dist()
    if rank == 0:
        previous = _prepare_output(config, out)
    _barrier(world)
    if rank != 0:
        previous = read_manifest(out)[0] if config.resume else None

    hooked = HookedBackbone.of(backbone)
    hooks = list(config.hooks) if config.hooks else [hooked.default_hook()]
    hooked.check_hook_names(hooks)
    text_hooks = [h for h in hooks if is_text_hook(h)]
    if text_hooks:
        raise TideError(f"text-stream hooks {text_hooks} cannot be captured (rows are image tokens): "
                        "use the matching hook_img_* names")
    conds_all = list(range(backbone.num_conditions)) if config.classes is None else [int(c) for c in config.classes]
    backbone.check_conditions(conds_all)
    sampler = SamplerConfig(num_steps=config.num_steps, guidance_scale=config.guidance_scale,
                            batch_size=config.samples_per_shard)
    timesteps = [float(t) for t in backbone.make_scheduler(config.num_steps).timesteps]
    record_steps = parse_record_steps(config.record_steps, config.num_steps)
    bhash = backbone.identity_hash()
    if previous is not None and previous.get("backbone_hash") != bhash:
        raise TideError(f"cannot resume {out}: it was captured from different model weights "
                        f"({previous.get('backbone', {}).get('name')}); use the same --backbone or --overwrite")

    num_shards = -(-config.num_samples // config.samples_per_shard)
    shapes = hooked.hook_shapes()
    manifest = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": False,
        "config": config.defining(), "config_hash": canonical_hash(config.defining()),
        "backbone": backbone.describe(), "backbone_hash": bhash,
        "hooks": {h: {"d_model": int(shapes[h][-1])} for h in hooks},
        "condition_names": backbone.condition_names,
        "schedule": {"timesteps": timesteps, "recorded_steps": record_steps, "num_steps": config.num_steps,
                     "scheduler": type(backbone.scheduler).__name__},
        "num_tokens": backbone.num_tokens, "tokens_kept": max(1, round(backbone.num_tokens * config.token_fraction)),
        "patch_grid": list(backbone.patch_grid),
        "num_samples": config.num_samples, "samples_per_shard": config.samples_per_shard, "num_shards": num_shards,
        "shards": [], "total_rows": 0,
        "created": (previous or {}).get("created", datetime.now(timezone.utc).isoformat(timespec="seconds")),
        "tide_version": tide.__version__,
    }
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        finished = _read_progress(out)
        _cleanup_partial(out, set(finished))
        _write_manifest(out, manifest, finished, complete=len(finished) == num_shards)
    _barrier(world)
    finished = _read_progress(out)
    mine = [s for s in range(num_shards) if s % world == rank and s not in finished]

    my_records = {i: r for i, r in finished.items() if r.get("rank") == rank}
    rows_per_sample = len(record_steps) * (2 if config.cfg_branch == "both" else 1) * manifest["tokens_kept"]
    total = sum(min(config.samples_per_shard, config.num_samples - s * config.samples_per_shard) for s in mine)
    bar = tqdm(total=total * rows_per_sample, unit="row", unit_scale=True, disable=not progress or rank != 0,
               desc=f"capture {', '.join(hooks)}"[:60])
    started = time.perf_counter()

    def on_shard(rec: ShardRecord) -> None:
        my_records[rec.index] = rec.to_dict()
        atomic_write_json(out / progress_name(rank), {"rank": rank, "shards": sorted(my_records.values(), key=lambda r: r["index"])})
        if rank == 0 and world == 1:
            _write_manifest(out, manifest, {**finished, **my_records}, complete=False)

    writer = ShardWriter(out, config.storage_dtype, config.on_overflow, bhash, rank, on_shard, config.queue_size)

    def on_rows(n: int) -> None:
        bar.update(n)
        elapsed = max(time.perf_counter() - started, 1e-9)
        mb = bar.n * sum(v["d_model"] for v in manifest["hooks"].values()) * np.dtype(config.storage_dtype).itemsize / 1e6
        bar.set_postfix_str(f"{mb / elapsed:.1f} MB/s", refresh=False)

    try:
        for s in mine:
            first = s * config.samples_per_shard
            ids = list(range(first, min(first + config.samples_per_shard, config.num_samples)))
            conds = {i: conds_all[i % len(conds_all)] for i in ids}
            recorder = Recorder(config, hooks, backbone.num_tokens, record_steps, writer, s, conds, on_rows)
            sample(hooked, list(conds.values()), [config.seed + i for i in ids], sampler,
                   interventions=recorder.interventions(), decode=False, sample_ids=ids)
            writer.put(ShardDone(s, first, len(ids)))
    finally:
        writer.close()
        bar.close()
    _barrier(world)
    if rank == 0:
        finished = _read_progress(out)
        manifest = _write_manifest(out, manifest, finished, complete=len(finished) == num_shards)
    _barrier(world)
    return CaptureResult(out, json.loads((out / MANIFEST).read_text()))


def _write_manifest(out: Path, manifest: dict, records: dict[int, dict], complete: bool) -> dict:
    manifest = dict(manifest)
    manifest["shards"] = [records[i] for i in sorted(records)]
    manifest["total_rows"] = int(sum(r["rows"] for r in manifest["shards"]))
    manifest["complete"] = bool(complete)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest
