"""Names and dtypes of the activation dataset format (docs/FORMAT.md), as the reader checks them."""

from __future__ import annotations

import numpy as np

SCHEMA = "tide.activations"
"""The ``schema`` value of every manifest and shard."""
SCHEMA_VERSION = 1
"""The ``schema_version`` this reader understands."""

MANIFEST_NAME = "manifest.json"
STATS_NAME = "stats.h5"

ACTS_GROUP = "acts"
"""Shard group holding one ``(rows, d_model)`` dataset per hook."""
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
"""Per-row metadata datasets at the shard root, with their dtypes."""

BRANCHES = {"cond": 0, "uncond": 1}
"""``cfg_branch`` values: the conditional and the unconditional (null-condition) half."""


def dtype_attr(hook: str) -> str:
    """Root attribute holding the storage dtype actually used for ``hook`` in a shard."""
    return f"dtype/{hook}"
