"""The activation dataset format (docs/FORMAT.md): names, constants, and the manifest's shard entry
(``ShardRecord``, written by the capture and read by ``tide.data``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tide.branches import BRANCHES  # noqa: F401  (the values of the cfg_branch column)
from tide.errors import TideError
from tide.io import TMP_SUFFIX  # noqa: F401  (the format's temporary-file suffix)

SCHEMA = "tide.activations"
"""The ``schema`` value of every manifest and shard."""
SCHEMA_VERSION = 1
"""The ``schema_version`` written (and understood) by this version of tide."""
MANIFEST = "manifest.json"
PROGRESS_DIR = "progress"
STATS_FILE = "stats.h5"
FP16_MAX = 65504.0

ACTS_GROUP = "acts"
"""HDF5 group holding one (rows, d_model) dataset per hook."""
ACTS_DTYPES = (np.dtype("float16"), np.dtype("float32"))
"""Storage dtypes an activation dataset may have."""
META_COLUMNS: dict[str, np.dtype] = {
    "timestep": np.dtype("float32"),
    "step_index": np.dtype("int16"),
    "sample_id": np.dtype("int32"),
    "token": np.dtype("int16"),
    "cond": np.dtype("int32"),
    "cfg_branch": np.dtype("int8"),
}
"""Per-row metadata datasets at the shard root, with their dtypes (``token``: the narrowest one, see
:data:`COLUMN_DTYPES`)."""
COLUMN_DTYPES: dict[str, tuple[np.dtype, ...]] = {
    **{name: (dtype,) for name, dtype in META_COLUMNS.items()},
    "token": (np.dtype("int16"), np.dtype("int32")),
}
"""Dtypes a metadata column may have: ``token`` is int16, or int32 when the patch grid has more
tokens than int16 holds (video: frames x rows x cols; see :func:`token_dtype`)."""


def token_dtype(num_tokens: int) -> np.dtype:
    """Dtype of the ``token`` column for ``num_tokens`` tokens per sample: int16 while the indices
    0..num_tokens-1 fit, else int32."""
    return np.dtype("int16") if num_tokens - 1 <= np.iinfo(np.int16).max else np.dtype("int32")
"""``cfg_branch`` values: the conditional and the unconditional (null-condition) half."""


def dtype_attr(hook: str) -> str:
    """Root attribute holding the storage dtype actually used for ``hook`` in a shard."""
    return f"dtype/{hook}"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.h5"


def progress_name(rank: int) -> str:
    return f"{PROGRESS_DIR}/rank-{rank}.json"


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard as the manifest lists it: an entry of ``manifest["shards"]`` (docs/FORMAT.md).

    The shard writer creates it and the capture writes :meth:`to_dict` into the manifest; readers
    build it with :meth:`from_dict`, giving the dataset directory as ``root`` so that :attr:`path`
    locates the file.
    """

    index: int
    file: str
    rows: int
    bytes: int
    sha256: str
    first_sample: int = -1
    """First sample id in the shard; -1 when the entry does not say."""
    num_samples: int = -1
    """Samples in the shard; -1 when the entry does not say."""
    rank: int = -1
    """Capture rank that wrote the shard; -1 when the entry does not say."""
    dtypes: dict[str, str] = field(default_factory=dict, hash=False)
    """Storage dtype used for each hook in this shard (``float32`` where float16 would overflow)."""
    root: Path | None = field(default=None, repr=False, compare=False)
    """The dataset directory (not part of the entry); None for a record not yet placed in one."""

    @property
    def path(self) -> Path:
        """The shard file: ``root / file``."""
        return Path(self.file) if self.root is None else self.root / self.file

    def to_dict(self) -> dict:
        """The manifest entry (JSON-able; key order as written by the capture)."""
        return {"index": self.index, "file": self.file, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256,
                "first_sample": self.first_sample, "num_samples": self.num_samples, "rank": self.rank,
                "dtypes": dict(self.dtypes)}

    @classmethod
    def from_dict(cls, entry: dict, root: str | Path | None = None) -> "ShardRecord":
        """A manifest entry as a record; raises KeyError, TypeError or ValueError when it is malformed
        (``index``, ``file``, ``rows``, ``bytes`` and ``sha256`` are required)."""
        dtypes = entry.get("dtypes")
        return cls(index=int(entry["index"]), file=str(entry["file"]), rows=int(entry["rows"]),
                   bytes=int(entry["bytes"]), sha256=str(entry["sha256"]),
                   first_sample=int(entry.get("first_sample", -1)), num_samples=int(entry.get("num_samples", -1)),
                   rank=int(entry.get("rank", -1)),
                   dtypes={str(k): str(v) for k, v in dtypes.items()} if isinstance(dtypes, dict) else {},
                   root=None if root is None else Path(root))


# ------------------------------------------------------------------------------------ reading a manifest
# Every reader of a dataset (ActivationStore, and through it the loader, `tide data info|verify`, training,
# evaluation; the capture's --resume) goes through read_manifest, so a manifest is checked the same way
# everywhere: JSON object, schema name and version, the types of every entry a reader uses, and shard paths
# confined to the dataset directory. Each refusal is a one-line TideError naming the entry and the fix.

DAMAGED = "the manifest is damaged or hand-edited: recapture the dataset"
"""The fix named by every refusal of a manifest's contents."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _kind(value) -> str:
    """A JSON value's type, as a message names it."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    """A short one-line rendering of a JSON value for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_schema(manifest, where: str | Path) -> None:
    """Refuse a manifest that is not a JSON object, or whose ``schema`` / ``schema_version`` this tide does not read."""
    if not isinstance(manifest, dict):
        raise TideError(f"{where} holds {_kind(manifest)}, not a JSON object; {DAMAGED}")
    schema = manifest.get("schema")
    if schema != SCHEMA:
        what = "has no 'schema' entry" if "schema" not in manifest else f"has schema {_show(schema)}"
        raise TideError(f"{where} {what}, expected {SCHEMA!r}: this directory was not written by `tide capture` "
                        f"(or its manifest was edited); recapture the dataset with `tide capture`")
    version = manifest.get("schema_version")
    if not _is_int(version):
        what = "has no 'schema_version' entry" if "schema_version" not in manifest else \
            f"has schema_version {_show(version)}, not an integer"
        raise TideError(f"{where} {what}; {DAMAGED}")
    if version > SCHEMA_VERSION:
        raise TideError(f"{where} was written by a newer tide (version {version}); upgrade tide to read it "
                        f"(this tide reads schema version {SCHEMA_VERSION})")
    if version < SCHEMA_VERSION:
        raise TideError(f"{where} has schema_version {version}, older than this tide reads ({SCHEMA_VERSION}): "
                        "recapture it with this version of tide")


def confined_path(root: str | Path, file, where: str | Path, entry: str) -> Path:
    """``root / file`` for a shard ``file`` named by a manifest, refused unless it stays inside ``root``: not
    absolute, no ``..`` component, and (following symlinks) resolving to a path below ``root``."""
    root = Path(root)
    reason = None
    parts = str(file).replace("\\", "/").split("/")
    if Path(file).is_absolute() or str(file).startswith(("/", "\\")):
        reason = "is an absolute path"
    elif ".." in parts:
        reason = "contains '..'"
    else:
        resolved, base = (root / file).resolve(), root.resolve()
        if base not in resolved.parents:
            reason = f"resolves to {str(resolved)!r}, outside the dataset directory"
    if reason:
        raise TideError(f"{where}: {entry} names file {_show(file)}, which {reason}; shard files must lie inside "
                        f"the dataset directory: {DAMAGED}")
    return root / file


_ENTRY_INTS = (("index", 0), ("rows", 0), ("bytes", 0))
_ENTRY_OPTIONAL_INTS = (("first_sample", -1), ("num_samples", -1), ("rank", -1))


def check_shard_entry(entry, position: int, where: str | Path, root: str | Path | None) -> ShardRecord:
    """One item of a manifest's (or a capture progress file's) ``shards`` list as a :class:`ShardRecord`, every
    field's type checked and (with ``root``) its file confined to ``root``; a one-line TideError otherwise."""
    name = f"shard entry {position}"
    if not isinstance(entry, dict):
        raise TideError(f"{where}: {name} is {_kind(entry)}, not an object; {DAMAGED}")
    file = entry.get("file")
    if isinstance(file, str) and file:
        name += f" ({file!r})"

    def bad(key: str, want: str):
        got = "missing" if key not in entry else f"{_show(entry[key])}"
        return TideError(f"{where}: {name} has {key} {got}, expected {want}; {DAMAGED}")
    if not isinstance(file, str) or not file or "\x00" in file:
        raise bad("file", "a file name")
    for key, low in _ENTRY_INTS:
        if not _is_int(entry.get(key)) or entry[key] < low:
            raise bad(key, f"an integer >= {low}")
    for key, low in _ENTRY_OPTIONAL_INTS:
        if key in entry and (not _is_int(entry[key]) or entry[key] < low):
            raise bad(key, f"an integer >= {low}")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
        raise bad("sha256", "64 hexadecimal digits")
    dtypes = entry.get("dtypes", {})
    if not isinstance(dtypes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in dtypes.items()):
        raise bad("dtypes", "an object of hook: dtype name")
    if root is not None:
        confined_path(root, file, where, name)
    return ShardRecord.from_dict(entry, root=root)


def _check_optional(manifest: dict, where, key: str, ok, want: str) -> None:
    if key in manifest and not ok(manifest[key]):
        raise TideError(f"{where} has {key} {_show(manifest[key])}, expected {want}; {DAMAGED}")


def check_manifest(manifest, where: str | Path, root: str | Path | None = None) -> list[ShardRecord]:
    """Check a parsed manifest (schema, version and the type of every entry a reader uses; shard files confined to
    ``root``) and return its shard records sorted by index. Raises a one-line TideError naming the bad entry."""
    check_schema(manifest, where)
    for key in ("complete", "hooks", "shards"):
        if key not in manifest:
            raise TideError(f"{where} has no {key!r} entry; {DAMAGED}")
    _check_optional(manifest, where, "complete", lambda v: isinstance(v, bool), "true or false")
    hooks = manifest["hooks"]
    if not isinstance(hooks, dict) or not hooks:
        raise TideError(f"{where} has hooks {_show(hooks)}, expected an object of hook name: {{\"d_model\": width}}; "
                        f"{DAMAGED}")
    for hook, spec in hooks.items():
        if not hook or not isinstance(spec, dict) or not _is_int(spec.get("d_model")) or spec["d_model"] < 1:
            raise TideError(f"{where}: hook {hook!r} has {_show(spec)}, expected {{\"d_model\": width >= 1}}; {DAMAGED}")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise TideError(f"{where} has shards {_show(shards)}, expected a list of shard entries; {DAMAGED}")

    def count(v):
        return _is_int(v) and v >= 0

    def positive(v):
        return _is_int(v) and v >= 1

    for key in ("num_shards", "total_rows", "num_samples", "samples_per_shard"):
        _check_optional(manifest, where, key, count, "an integer >= 0")
    for key in ("num_tokens", "tokens_kept"):
        _check_optional(manifest, where, key, positive, "an integer >= 1")
    _check_optional(manifest, where, "patch_grid",
                    lambda v: v is None or (isinstance(v, list) and 1 <= len(v) <= 3 and all(map(positive, v))),
                    "a list of 1 to 3 integers >= 1")
    _check_optional(manifest, where, "condition_names", lambda v: v is None or isinstance(v, list), "a list of names")
    for key in ("backbone", "config", "schedule"):
        _check_optional(manifest, where, key, lambda v: isinstance(v, dict), "an object")
    schedule = manifest.get("schedule", {})
    for key, ok, want in (("timesteps", lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of numbers"),
                          ("recorded_steps", lambda v: isinstance(v, list) and all(map(count, v)),
                           "a list of integers >= 0"),
                          ("num_steps", count, "an integer >= 0")):
        if key in schedule and not ok(schedule[key]):
            raise TideError(f"{where} has schedule.{key} {_show(schedule[key])}, expected {want}; {DAMAGED}")
    records = [check_shard_entry(entry, i, where, root) for i, entry in enumerate(shards)]
    return sorted(records, key=lambda s: s.index)


def read_manifest(root: str | Path) -> tuple[dict, bytes, list[ShardRecord]]:
    """Read and check ``root / manifest.json`` (see :func:`check_manifest`): (manifest, its raw bytes, its shard
    records sorted by index, located in ``root``). The caller checks that the file exists."""
    path = Path(root) / MANIFEST
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TideError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        detail = " ".join(str(exc).split()) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise TideError(f"{path} is not valid JSON ({detail}); the file is damaged: "
                        f"recapture the dataset or restore the manifest from a copy") from None
    return manifest, raw, check_manifest(manifest, path, root)
