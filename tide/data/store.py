"""Open, verify and summarise a captured activation dataset (format: docs/FORMAT.md).

``ActivationStore(path)`` reads ``manifest.json`` and refuses a dataset it cannot serve (no
manifest, another schema, an unfinished capture, a listed shard gone). ``verify()`` checks every
shard against the manifest (size, SHA-256, HDF5 structure, shapes, NaN/inf) and names the bad ones;
``stats(hook)`` computes per-timestep means and norms in one streaming pass and caches them in
``stats.h5`` beside the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import h5py
import numpy as np

from tide.capture.schema import (
    ACTS_DTYPES, ACTS_GROUP, BRANCHES, COLUMN_DTYPES, MANIFEST, META_COLUMNS, SCHEMA, SCHEMA_VERSION, STATS_FILE,
    dtype_attr,
)
from tide.errors import TideError

HASH_CHUNK_BYTES = 8 << 20
"""Bytes read at a time while hashing a shard."""
SCAN_CHUNK_BYTES = 64 << 20
"""Bytes of one activation dataset held at a time while scanning it or computing statistics."""
META_CHUNK_ROWS = 1 << 20
"""Rows of a metadata column held at a time while checking it."""
MAX_OPEN_SHARDS = 16
"""Shard files a store keeps open at once (least recently used are closed)."""
STATS_VERSION = 1
"""Layout version of ``stats.h5``; a cache with another version is recomputed."""


class ShardInfo(NamedTuple):
    """One shard as the manifest lists it."""

    index: int
    file: str
    rows: int
    bytes: int
    sha256: str
    first_sample: int
    num_samples: int
    path: Path


class VerifyReport(NamedTuple):
    """What ``ActivationStore.verify`` found: problems per shard file (and under ``"manifest"``)."""

    path: Path
    shards_checked: int
    rows_checked: int
    problems: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[str]:
        return [name for name in self.problems if name != "manifest"]

    def format(self) -> str:
        if self.ok:
            return f"{self.path}: OK ({self.shards_checked} shards, {self.rows_checked:,} rows)"
        lines = [f"{self.path}: {len(self.bad_shards)} bad shard(s) of {self.shards_checked}"
                 + (", manifest inconsistent" if "manifest" in self.problems else "")]
        for name, probs in self.problems.items():
            lines += [f"  {name}: {p}" for p in probs]
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        """Raise a TideError naming the first bad shard (or the manifest) and what is wrong with it."""
        if self.ok:
            return
        name, probs = next(iter(self.problems.items()))
        more = sum(len(p) for p in self.problems.values()) - 1
        tail = f" (and {more} more problem(s): run `tide data verify {self.path}` for the list)" if more else ""
        if name == "manifest":
            fix = "the manifest does not describe its shards; recapture the dataset"
        else:
            fix = ("restore the file from a copy or recapture the dataset "
                   "(a capture with the same config writes identical shards)")
        raise TideError(f"dataset {self.path}: {name}: {probs[0]}{tail}; {fix}")


class TimestepStats(NamedTuple):
    """Per-timestep statistics of one hook's activations (rows of every CFG branch together)."""

    hook: str
    steps_T: np.ndarray
    """Recorded step indices, ascending (noisiest first), int64."""
    timesteps_T: np.ndarray
    """Scheduler timestep of each step, float32."""
    count_T: np.ndarray
    """Rows per step, int64."""
    mean_TD: np.ndarray
    """Mean activation per step, float64."""
    rms_T: np.ndarray
    """Root-mean-square norm per step: sqrt(E ||x||^2)."""
    var_T: np.ndarray
    """Total variance per step: E ||x - mean_t||^2 (the denominator of FVU at that step)."""
    mean_D: np.ndarray
    """Mean activation over every row."""
    rms: float
    """sqrt(E ||x||^2) over every row."""
    var: float
    """E ||x - mean||^2 over every row."""

    def index_of(self, timesteps) -> np.ndarray:
        """Position in ``steps_T`` of the step whose timestep is nearest to each value given."""
        t = np.asarray(timesteps, dtype=np.float64)
        order = np.argsort(self.timesteps_T)
        sorted_t = self.timesteps_T[order].astype(np.float64)
        pos = np.clip(np.searchsorted(sorted_t, t), 1, max(len(sorted_t) - 1, 1))
        left = sorted_t[pos - 1]
        right = sorted_t[np.minimum(pos, len(sorted_t) - 1)]
        pos = np.where(np.abs(t - left) <= np.abs(right - t), pos - 1, pos)
        return order[np.minimum(pos, len(sorted_t) - 1)]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _plain(value):
    """An HDF5 attribute value as a plain Python str/int/float."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _rows_per_chunk(width: int, itemsize: int, budget: int = SCAN_CHUNK_BYTES) -> int:
    return max(1, budget // max(1, width * itemsize))


def _require(manifest: dict, key: str, where: Path):
    if key not in manifest:
        raise TideError(f"{where} has no {key!r} entry; it was not written by `tide capture` "
                        f"(schema {SCHEMA!r} version {SCHEMA_VERSION}) or is damaged; recapture the dataset")
    return manifest[key]


class ActivationStore:
    """A captured activation dataset on disk: manifest, shards, verification and statistics.

    ``strict=False`` also opens an unfinished capture or one with listed shards missing, for
    inspection (``info``, ``verify``); reading a missing shard still fails.
    """

    def __init__(self, path: str | Path, strict: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise TideError(f"activation dataset {self.path} is not a directory; "
                            f"pass the directory `tide capture` wrote (it holds {MANIFEST})")
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise TideError(f"{self.path} has no {MANIFEST}; it is not a captured activation dataset, "
                            f"or its capture has not finished a shard yet (run `tide capture` to write one)")
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TideError(f"{manifest_path} is not valid JSON ({exc}); the file is damaged: "
                            f"recapture the dataset or restore the manifest from a copy") from None
        if not isinstance(manifest, dict):
            raise TideError(f"{manifest_path} must hold a JSON object; recapture the dataset")
        schema = manifest.get("schema")
        if schema != SCHEMA:
            raise TideError(f"{manifest_path} has schema {schema!r}, expected {SCHEMA!r}; "
                            f"this directory was not written by `tide capture`")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            fix = ("upgrade tide to read it" if isinstance(version, int) and version > SCHEMA_VERSION
                   else "recapture it with this version of tide")
            raise TideError(f"{manifest_path} has schema_version {version!r}; this tide reads version "
                            f"{SCHEMA_VERSION}: {fix}")
        self.manifest: dict = manifest
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.complete = bool(_require(manifest, "complete", manifest_path))
        if strict and not self.complete:
            listed = len(manifest.get("shards", []))
            expected = manifest.get("num_shards", "?")
            raise TideError(f"dataset {self.path} is incomplete ({listed} of {expected} shards finished); "
                            f"finish it with `tide capture --resume` (same config and output directory)")
        hooks = _require(manifest, "hooks", manifest_path)
        if not isinstance(hooks, dict) or not hooks:
            raise TideError(f"{manifest_path} lists no hooks; recapture the dataset")
        try:
            self.hooks: dict[str, int] = {h: int(spec["d_model"]) for h, spec in hooks.items()}
            self.shards: list[ShardInfo] = sorted(
                (ShardInfo(index=int(s["index"]), file=str(s["file"]), rows=int(s["rows"]), bytes=int(s["bytes"]),
                           sha256=str(s["sha256"]), first_sample=int(s.get("first_sample", -1)),
                           num_samples=int(s.get("num_samples", -1)), path=self.path / str(s["file"]))
                 for s in _require(manifest, "shards", manifest_path)),
                key=lambda s: s.index)
        except (KeyError, TypeError, ValueError) as exc:
            raise TideError(f"{manifest_path} has a malformed hook or shard entry ({exc!r}); "
                            f"recapture the dataset") from None
        if strict:
            for shard in self.shards:
                if not shard.path.is_file():
                    raise TideError(f"dataset {self.path}: shard {shard.file} is listed in the manifest but "
                                    f"missing; restore it from a copy or recapture the dataset")
        self._handles: OrderedDict[int, h5py.File] = OrderedDict()
        self._pid = os.getpid()
        self._dtypes: dict[str, np.dtype] | None = None

    # ------------------------------------------------------------------ basics

    @property
    def rows(self) -> int:
        """Rows in the listed shards."""
        return sum(s.rows for s in self.shards)

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, hooks={list(self.hooks)}, rows={self.rows}, "
                f"shards={len(self.shards)})")

    @property
    def patch_grid(self) -> tuple[int, ...]:
        """The backbone's token grid: (rows, cols) for images, (frames, rows, cols) for video; the
        ``token`` column is row-major over it (see :mod:`tide.data.coords`)."""
        return tuple(int(g) for g in self.manifest.get("patch_grid") or [self.manifest["num_tokens"]])

    def token_coords(self, token) -> tuple:
        """Grid coordinates of ``token`` values of this dataset: (frame, row, col) for video,
        (row, col) for images (see :func:`tide.data.token_coords`)."""
        from tide.data.coords import token_coords

        return token_coords(token, self.patch_grid)

    @property
    def recorded_steps(self) -> list[int]:
        return [int(s) for s in self.manifest.get("schedule", {}).get("recorded_steps", [])]

    @property
    def recorded_timesteps(self) -> list[float]:
        """Scheduler timestep of each recorded step, from the manifest's schedule.

        ``schedule.timesteps`` is the full schedule (``num_steps`` values) indexed by step; a list as
        long as ``recorded_steps`` is read as the recorded steps' timesteps already.
        """
        schedule = self.manifest.get("schedule", {})
        timesteps = [float(t) for t in schedule.get("timesteps", [])]
        steps = self.recorded_steps
        if len(timesteps) == schedule.get("num_steps") and all(0 <= s < len(timesteps) for s in steps):
            return [timesteps[s] for s in steps]
        return timesteps

    def check_hooks(self, hooks: Sequence[str] | None) -> list[str]:
        """The hooks asked for (all when None), refusing unknown names with the captured ones listed."""
        if hooks is None:
            return list(self.hooks)
        hooks = list(hooks)
        unknown = [h for h in hooks if h not in self.hooks]
        if unknown:
            raise TideError(f"hook(s) {unknown} were not captured in {self.path}; captured: {list(self.hooks)}")
        if not hooks:
            raise TideError(f"no hooks asked for; captured in {self.path}: {list(self.hooks)}")
        return hooks

    # ------------------------------------------------------------------ reading

    def open_shard(self, i: int) -> h5py.File:
        """Shard ``i`` (position in ``self.shards``) as an open read-only HDF5 file, shared and cached.

        The store closes it when it leaves its small cache of open files or on ``close()``; do not
        close it yourself.
        """
        if os.getpid() != self._pid:  # forked: handles belong to the parent
            self._handles = OrderedDict()
            self._pid = os.getpid()
        handle = self._handles.get(i)
        if handle is not None and handle.id.valid:
            self._handles.move_to_end(i)
            return handle
        shard = self.shards[i]
        if not shard.path.is_file():
            raise TideError(f"dataset {self.path}: shard {shard.file} is missing; restore it or recapture the dataset")
        size = shard.path.stat().st_size
        if size != shard.bytes:
            raise TideError(f"dataset {self.path}: shard {shard.file} is {size} bytes, the manifest says {shard.bytes} "
                            f"({'truncated' if size < shard.bytes else 'changed'}); run `tide data verify {self.path}`")
        try:
            handle = h5py.File(shard.path, "r")
        except OSError as exc:
            raise TideError(f"dataset {self.path}: shard {shard.file} cannot be opened as HDF5 ({exc}); "
                            f"run `tide data verify {self.path}`") from None
        self._handles[i] = handle
        while len(self._handles) > MAX_OPEN_SHARDS:
            _, old = self._handles.popitem(last=False)
            old.close()
        return handle

    def read(self, i: int, start: int, stop: int, hooks: Sequence[str] = (),
             columns: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Rows ``[start, stop)`` of shard ``i``: ({hook: acts_RD in storage dtype}, {column: values_R})."""
        f = self.open_shard(i)
        try:
            acts = {h: f[ACTS_GROUP][h][start:stop] for h in hooks}
            meta = {c: f[c][start:stop] for c in columns}
        except (KeyError, OSError) as exc:
            raise TideError(f"dataset {self.path}: shard {self.shards[i].file} cannot be read ({exc}); "
                            f"run `tide data verify {self.path}`") from None
        return acts, meta

    def iter_blocks(self, hooks: Sequence[str] | None = None, columns: Sequence[str] = ("timestep",),
                    block_rows: int = 65536) -> Iterator[tuple[int, int, dict, dict]]:
        """Every row in order, as (shard position, first row, acts dict, metadata dict) blocks."""
        hooks = self.check_hooks(hooks)
        for i, shard in enumerate(self.shards):
            for start in range(0, shard.rows, block_rows):
                acts, meta = self.read(i, start, min(start + block_rows, shard.rows), hooks, columns)
                yield i, start, acts, meta

    def storage_dtypes(self) -> dict[str, np.dtype]:
        """Widest storage dtype of each hook over the shards (float32 where any shard fell back to it)."""
        if self._dtypes is None:
            dtypes = {h: np.dtype("float16") for h in self.hooks}
            for i, shard in enumerate(self.shards):
                if not shard.path.is_file():
                    continue
                group = self.open_shard(i)[ACTS_GROUP]
                for h in self.hooks:
                    if h in group:
                        dtypes[h] = np.promote_types(dtypes[h], group[h].dtype)
            self._dtypes = dtypes
        return dict(self._dtypes)

    def close(self) -> None:
        for handle in self._handles.values():
            if handle.id.valid:
                handle.close()
        self._handles.clear()

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ verify

    def verify(self, check_hashes: bool = True, scan: bool = True) -> VerifyReport:
        """Check every listed shard against the manifest; problems are listed per shard file.

        ``check_hashes`` compares each file's SHA-256 (reads every byte); ``scan`` reads every
        activation for NaN/inf and checks the metadata values, in chunks of bounded size.
        """
        self.close()
        problems: dict[str, list[str]] = {}
        manifest_problems = self._check_manifest()
        if manifest_problems:
            problems["manifest"] = manifest_problems
        rows_checked = 0
        for shard in self.shards:
            found = self._check_shard(shard, check_hashes, scan)
            if found:
                problems[shard.file] = found
            else:
                rows_checked += shard.rows
        return VerifyReport(self.path, len(self.shards), rows_checked, problems)

    def _check_manifest(self) -> list[str]:
        m = self.manifest
        found = []
        listed = sum(s.rows for s in self.shards)
        if m.get("total_rows") != listed:
            found.append(f"total_rows is {m.get('total_rows')} but the listed shards hold {listed} rows")
        indices = [s.index for s in self.shards]
        if len(set(indices)) != len(indices):
            found.append("a shard index is listed twice")
        if self.complete:
            if m.get("num_shards") != len(self.shards):
                found.append(f"complete, but lists {len(self.shards)} shards of num_shards={m.get('num_shards')}")
            elif indices != list(range(len(indices))):
                found.append(f"complete, but the shard indices are not 0..{len(indices) - 1}")
            if "num_samples" in m and sum(s.num_samples for s in self.shards) != m["num_samples"]:
                found.append(f"shards hold {sum(s.num_samples for s in self.shards)} samples "
                             f"but num_samples is {m['num_samples']}")
        return found

    def _check_shard(self, shard: ShardInfo, check_hashes: bool, scan: bool) -> list[str]:
        if not shard.path.is_file():
            return ["missing (listed in the manifest, not on disk)"]
        found = []
        size = shard.path.stat().st_size
        if size != shard.bytes:
            found.append(f"size is {size} bytes, the manifest says {shard.bytes}"
                         + (" (truncated)" if size < shard.bytes else ""))
        if check_hashes:
            digest = _file_sha256(shard.path)
            if digest != shard.sha256:
                found.append(f"SHA-256 is {digest[:16]}..., the manifest says {shard.sha256[:16]}... (corrupted)")
        try:
            with h5py.File(shard.path, "r") as f:
                structure = self._check_structure(f, shard)
                found += structure
                if scan and not structure:
                    found += self._scan(f, shard)
        except OSError as exc:
            found.append(f"cannot be read as HDF5 ({' '.join(str(exc).split())})")
        except Exception as exc:  # a damaged file can fail inside h5py in many ways
            found.append(f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())})")
        return found

    def _check_structure(self, f: h5py.File, shard: ShardInfo) -> list[str]:
        found = []
        attrs = f.attrs
        for key, want in (("schema", SCHEMA), ("schema_version", SCHEMA_VERSION), ("rows", shard.rows),
                          ("shard_index", shard.index)):
            got = _plain(attrs.get(key))
            if got != want:
                found.append(f"root attribute {key} is {got!r}, expected {want!r}")
        for key, want in (("first_sample", shard.first_sample), ("num_samples", shard.num_samples)):
            got = _plain(attrs.get(key))
            if want >= 0 and got is not None and got != want:
                found.append(f"root attribute {key} is {got!r}, the manifest says {want}")
        group = f.get(ACTS_GROUP)
        if not isinstance(group, h5py.Group):
            return found + [f"has no /{ACTS_GROUP} group"]
        for hook, width in self.hooks.items():
            ds = group.get(hook)
            if not isinstance(ds, h5py.Dataset):
                found.append(f"has no /{ACTS_GROUP}/{hook}")
                continue
            if ds.shape != (shard.rows, width):
                found.append(f"/{ACTS_GROUP}/{hook} has shape {ds.shape}, expected {(shard.rows, width)}")
            if ds.dtype not in ACTS_DTYPES:
                found.append(f"/{ACTS_GROUP}/{hook} has dtype {ds.dtype}, expected float16 or float32")
            recorded = attrs.get(dtype_attr(hook))
            if recorded is not None:
                recorded = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
                if recorded != ds.dtype.name:
                    found.append(f"attribute {dtype_attr(hook)} says {recorded} but the data is {ds.dtype.name}")
        extra = sorted(set(group) - set(self.hooks))
        if extra:
            found.append(f"holds hook(s) {extra} the manifest does not list")
        for name in META_COLUMNS:
            ds = f.get(name)
            allowed = COLUMN_DTYPES[name]
            if not isinstance(ds, h5py.Dataset):
                found.append(f"has no /{name} column")
            elif ds.shape != (shard.rows,):
                found.append(f"/{name} has shape {ds.shape}, expected ({shard.rows},)")
            elif ds.dtype not in allowed:
                found.append(f"/{name} has dtype {ds.dtype}, expected {' or '.join(map(str, allowed))}")
        return found

    def _scan(self, f: h5py.File, shard: ShardInfo) -> list[str]:
        found = []
        for hook in self.hooks:
            ds = f[ACTS_GROUP][hook]
            step = _rows_per_chunk(ds.shape[1], ds.dtype.itemsize)
            bad_count, first_bad = 0, None
            for start in range(0, shard.rows, step):
                chunk = ds[start:start + step]
                if np.isfinite(chunk).all():
                    continue
                bad = ~np.isfinite(chunk)
                bad_count += int(bad.sum())
                if first_bad is None:
                    first_bad = start + int(np.flatnonzero(bad.any(axis=1))[0])
            if bad_count:
                found.append(f"/{ACTS_GROUP}/{hook} holds {bad_count} NaN/inf value(s), first in row {first_bad}")
        found += self._check_metadata(f, shard)
        return found

    def _check_metadata(self, f: h5py.File, shard: ShardInfo) -> list[str]:
        m = self.manifest
        steps = set(self.recorded_steps)
        num_tokens = m.get("num_tokens")
        num_conds = len(m.get("condition_names") or [])
        step_t: dict[int, float] = {}
        problems: dict[str, str] = {}
        for start in range(0, shard.rows, META_CHUNK_ROWS):
            sl = slice(start, start + META_CHUNK_ROWS)
            t, s = f["timestep"][sl], f["step_index"][sl].astype(np.int64)
            if not np.isfinite(t).all():
                problems.setdefault("timestep", "/timestep holds NaN/inf")
            if steps and not np.isin(s, list(steps)).all():
                bad = sorted(set(np.unique(s).tolist()) - steps)[:5]
                problems.setdefault("step_index", f"/step_index holds step(s) {bad} not in the recorded steps")
            for value in np.unique(s):
                ts = t[s == value]
                if ts.min() != ts.max() or step_t.setdefault(int(value), float(ts[0])) != float(ts[0]):
                    problems.setdefault("timestep/step", f"rows of step {int(value)} carry different timesteps")
            br = f["cfg_branch"][sl]
            if not np.isin(br, list(BRANCHES.values())).all():
                problems.setdefault("cfg_branch", "/cfg_branch holds values other than 0 and 1")
            tok = f["token"][sl]
            if tok.size and (tok.min() < 0 or (num_tokens is not None and tok.max() >= num_tokens)):
                problems.setdefault("token", f"/token holds values outside [0, {num_tokens})")
            sid = f["sample_id"][sl]
            if shard.first_sample >= 0 and shard.num_samples >= 0 and sid.size and (
                    sid.min() < shard.first_sample or sid.max() >= shard.first_sample + shard.num_samples):
                problems.setdefault("sample_id", f"/sample_id holds ids outside this shard's samples "
                                                 f"[{shard.first_sample}, {shard.first_sample + shard.num_samples})")
            cond = f["cond"][sl]
            if num_conds and cond.size and (cond.min() < 0 or cond.max() >= num_conds):
                problems.setdefault("cond", f"/cond holds ids outside [0, {num_conds})")
        return list(problems.values())

    # ------------------------------------------------------------------ info

    def info(self) -> dict:
        """A summary of the dataset (JSON-able)."""
        m = self.manifest
        backbone = m.get("backbone", {}) or {}
        present = [s for s in self.shards if s.path.is_file()]
        timesteps = self.recorded_timesteps
        steps = self.recorded_steps
        dtypes: dict[str, set[str]] = {h: set() for h in self.hooks}
        for i, shard in enumerate(self.shards):
            if shard.path.is_file():
                try:
                    group = self.open_shard(i)[ACTS_GROUP]
                    for h in self.hooks:
                        if h in group:
                            dtypes[h].add(group[h].dtype.name)
                except (TideError, KeyError, OSError):
                    pass
        samples = m.get("num_samples")
        tokens = m.get("tokens_kept", m.get("num_tokens"))
        branches = None
        done_samples = sum(s.num_samples for s in self.shards)
        if tokens and steps and done_samples > 0 and self.rows % (done_samples * len(steps) * tokens) == 0:
            branches = self.rows // (done_samples * len(steps) * tokens)
        return {
            "path": str(self.path),
            "complete": self.complete,
            "backbone": {"name": backbone.get("name"), "family": backbone.get("family")},
            "backbone_hash": m.get("backbone_hash"),
            "hooks": dict(self.hooks),
            "dtypes": {h: sorted(d) for h, d in dtypes.items()},
            "rows": self.rows,
            "shards": len(self.shards),
            "shards_expected": m.get("num_shards"),
            "shards_missing": len(self.shards) - len(present),
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

    def format_info(self) -> str:
        """``info()`` as a human-readable multi-line summary."""
        i = self.info()
        def size(n: int) -> str:
            for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
                if n < 1024 or unit == "TiB":
                    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
                n /= 1024
        status = "complete" if i["complete"] else f"INCOMPLETE ({i['shards']} of {i['shards_expected']} shards)"
        lines = [f"{i['path']}  [{status}]",
                 f"  backbone     {i['backbone']['name']} ({i['backbone']['family']})",
                 f"  rows         {i['rows']:,} in {i['shards']} shards, {size(i['bytes'])} on disk"
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

    # ------------------------------------------------------------------ statistics

    def stats(self, hook: str | None = None, recompute: bool = False) -> TimestepStats:
        """Per-timestep mean, RMS norm and variance of ``hook`` (the only hook when None).

        Computed in one streaming pass and cached in ``stats.h5``; the cache is used only while the
        manifest it was computed from is unchanged.
        """
        if hook is None:
            if len(self.hooks) != 1:
                raise TideError(f"{self.path} holds several hooks; name one of {list(self.hooks)}")
            hook = next(iter(self.hooks))
        self.check_hooks([hook])
        if not recompute:
            cached = self._read_stats_cache().get(hook)
            if cached is not None:
                return cached
        result = self._compute_stats(hook)
        self._write_stats_cache(result)
        return result

    def _compute_stats(self, hook: str) -> TimestepStats:
        width = self.hooks[hook]
        sums: dict[int, np.ndarray] = {}
        sumsq: dict[int, float] = {}
        counts: dict[int, int] = {}
        step_t: dict[int, float] = {}
        block = _rows_per_chunk(width, 8)
        for _, _, acts, meta in self.iter_blocks([hook], ("timestep", "step_index"), block):
            x_RD = acts[hook].astype(np.float64)
            s_R, t_R = meta["step_index"], meta["timestep"]
            values, first, inverse = np.unique(s_R, return_index=True, return_inverse=True)
            for k, s in enumerate(values.tolist()):
                x = x_RD if len(values) == 1 else x_RD[inverse == k]
                if s not in sums:
                    sums[s], sumsq[s], counts[s], step_t[s] = np.zeros(width), 0.0, 0, float(t_R[first[k]])
                sums[s] += x.sum(axis=0)
                sumsq[s] += float(np.einsum("rd,rd->", x, x))
                counts[s] += len(x)
        if not counts:
            raise TideError(f"dataset {self.path} holds no rows; capture some first")
        steps = sorted(counts)
        count_T = np.array([counts[s] for s in steps], dtype=np.int64)
        return _finish_stats(hook, np.array(steps, dtype=np.int64), np.array([step_t[s] for s in steps], np.float32),
                             count_T, np.stack([sums[s] for s in steps]), np.array([sumsq[s] for s in steps]))

    def _read_stats_cache(self) -> dict[str, TimestepStats]:
        path = self.path / STATS_FILE
        if not path.is_file():
            return {}
        try:
            with h5py.File(path, "r") as f:
                if (f.attrs.get("manifest_sha256") != self.manifest_sha256
                        or int(f.attrs.get("total_rows", -1)) != self.rows
                        or int(f.attrs.get("stats_version", -1)) != STATS_VERSION):
                    return {}
                out = {}
                for hook in f:
                    g = f[hook]
                    out[hook] = _finish_stats(hook, g["steps"][()], g["timesteps"][()], g["count"][()],
                                              g["sum"][()], g["sumsq"][()])
                return out
        except Exception:  # an unreadable cache is recomputed
            return {}

    def _write_stats_cache(self, result: TimestepStats) -> None:
        entries = self._read_stats_cache()
        entries[result.hook] = result
        final = self.path / STATS_FILE
        tmp = self.path / f"{STATS_FILE}.{os.getpid()}.tmp"
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["manifest_sha256"] = self.manifest_sha256
                f.attrs["total_rows"] = self.rows
                f.attrs["stats_version"] = STATS_VERSION
                for hook, st in entries.items():
                    g = f.create_group(hook)
                    g["steps"], g["timesteps"], g["count"] = st.steps_T, st.timesteps_T, st.count_T
                    g["sum"] = st.mean_TD * st.count_T[:, None]
                    g["sumsq"] = st.rms_T ** 2 * st.count_T
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"could not cache statistics in {final} ({exc}); they will be recomputed next time")


def _finish_stats(hook: str, steps_T, timesteps_T, count_T, sum_TD, sumsq_T) -> TimestepStats:
    count_T = np.asarray(count_T, dtype=np.int64)
    sum_TD = np.asarray(sum_TD, dtype=np.float64)
    sumsq_T = np.asarray(sumsq_T, dtype=np.float64)
    mean_TD = sum_TD / count_T[:, None]
    msq_T = sumsq_T / count_T
    n = count_T.sum()
    mean_D = sum_TD.sum(axis=0) / n
    msq = float(sumsq_T.sum() / n)
    return TimestepStats(
        hook=hook, steps_T=np.asarray(steps_T, dtype=np.int64), timesteps_T=np.asarray(timesteps_T, dtype=np.float32),
        count_T=count_T, mean_TD=mean_TD, rms_T=np.sqrt(msq_T),
        var_T=np.maximum(msq_T - (mean_TD ** 2).sum(axis=1), 0.0),
        mean_D=mean_D, rms=float(np.sqrt(msq)), var=max(msq - float((mean_D ** 2).sum()), 0.0))
