"""The activation dataset format (docs/FORMAT.md): names and constants."""

from __future__ import annotations

import numpy as np

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
BRANCHES = {"cond": 0, "uncond": 1}
"""``cfg_branch`` values: the conditional and the unconditional (null-condition) half."""


def dtype_attr(hook: str) -> str:
    """Root attribute holding the storage dtype actually used for ``hook`` in a shard."""
    return f"dtype/{hook}"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.h5"


def progress_name(rank: int) -> str:
    return f"{PROGRESS_DIR}/rank-{rank}.json"


