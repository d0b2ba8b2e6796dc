"""The activation dataset format (docs/FORMAT.md): names, constants, and the manifest's shard entry
(``ShardRecord``, written by the capture and read by ``tide.data``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tide.branches import BRANCHES  # noqa: F401  (the values of the cfg_branch column)
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
