"""Verify a captured dataset against its manifest (what ``tide data verify DIR`` runs).

Every listed shard is checked: the file exists with the manifest's size and SHA-256, opens as HDF5,
has the format's root attributes, datasets, shapes and dtypes (docs/FORMAT.md); the scan reads every
activation for NaN/inf and checks the metadata values. Problems are listed per shard file (and under
``"manifest"``) in a :class:`VerifyReport`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import h5py
import numpy as np

from tide.capture.schema import (
    ACTS_DTYPES, ACTS_GROUP, BRANCHES, COLUMN_DTYPES, META_COLUMNS, SCHEMA, SCHEMA_VERSION, ShardRecord, dtype_attr,
)
from tide.errors import TideError
from tide.io import sha256_file

if TYPE_CHECKING:
    from tide.data.store import ActivationStore

HASH_CHUNK_BYTES = 8 << 20
"""Bytes read at a time while hashing a shard."""
META_CHUNK_ROWS = 1 << 20
"""Rows of a metadata column held at a time while checking it."""


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


def verify_store(store: ActivationStore, check_hashes: bool = True, scan: bool = True) -> VerifyReport:
    """Check every listed shard of ``store`` against its manifest (see ``ActivationStore.verify``)."""
    store.close()
    problems: dict[str, list[str]] = {}
    manifest_problems = _check_manifest(store)
    if manifest_problems:
        problems["manifest"] = manifest_problems
    rows_checked = 0
    for shard in store.shards:
        found = _check_shard(store, shard, check_hashes, scan)
        if found:
            problems[shard.file] = found
        else:
            rows_checked += shard.rows
    return VerifyReport(store.path, len(store.shards), rows_checked, problems)


def _plain(value):
    """An HDF5 attribute value as a plain Python str/int/float."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_manifest(store: ActivationStore) -> list[str]:
    m = store.manifest
    found = []
    listed = sum(s.rows for s in store.shards)
    if m.get("total_rows") != listed:
        found.append(f"total_rows is {m.get('total_rows')} but the listed shards hold {listed} rows")
    indices = [s.index for s in store.shards]
    if len(set(indices)) != len(indices):
        found.append("a shard index is listed twice")
    if store.complete:
        if m.get("num_shards") != len(store.shards):
            found.append(f"complete, but lists {len(store.shards)} shards of num_shards={m.get('num_shards')}")
        elif indices != list(range(len(indices))):
            found.append(f"complete, but the shard indices are not 0..{len(indices) - 1}")
        if "num_samples" in m and sum(s.num_samples for s in store.shards) != m["num_samples"]:
            found.append(f"shards hold {sum(s.num_samples for s in store.shards)} samples "
                         f"but num_samples is {m['num_samples']}")
    return found


def _check_shard(store: ActivationStore, shard: ShardRecord, check_hashes: bool, scan: bool) -> list[str]:
    if not shard.path.is_file():
        return ["missing (listed in the manifest, not on disk)"]
    found = []
    size = shard.path.stat().st_size
    if size != shard.bytes:
        found.append(f"size is {size} bytes, the manifest says {shard.bytes}"
                     + (" (truncated)" if size < shard.bytes else ""))
    if check_hashes:
        digest = sha256_file(shard.path, HASH_CHUNK_BYTES)
        if digest != shard.sha256:
            found.append(f"SHA-256 is {digest[:16]}..., the manifest says {shard.sha256[:16]}... (corrupted)")
    try:
        with h5py.File(shard.path, "r") as f:
            structure = _check_structure(store, f, shard)
            found += structure
            if scan and not structure:
                found += _scan(store, f, shard)
    except OSError as exc:
        found.append(f"cannot be read as HDF5 ({' '.join(str(exc).split())})")
    except Exception as exc:  # a damaged file can fail inside h5py in many ways
        found.append(f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())})")
    return found


def _check_structure(store: ActivationStore, f: h5py.File, shard: ShardRecord) -> list[str]:
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
    for hook, width in store.hooks.items():
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
    extra = sorted(set(group) - set(store.hooks))
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


def _scan(store: ActivationStore, f: h5py.File, shard: ShardRecord) -> list[str]:
    found = []
    for hook in store.hooks:
        ds = f[ACTS_GROUP][hook]
        step = store.rows_per_chunk(ds.shape[1], ds.dtype.itemsize)
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
    found += _check_metadata(store, f, shard)
    return found


def _check_metadata(store: ActivationStore, f: h5py.File, shard: ShardRecord) -> list[str]:
    m = store.manifest
    steps = set(store.recorded_steps)
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
