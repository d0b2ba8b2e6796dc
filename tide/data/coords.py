"""Where a captured row sits in the picture: flat ``token`` index <-> patch-grid coordinates.

Every backbone flattens its patch grid row-major (the last axis varies fastest), and a dataset's
manifest records that grid as ``patch_grid``: ``[rows, cols]`` for image backbones,
``[frames, rows, cols]`` for video backbones (Wan), so for video

    token = (frame * rows + row) * cols + col.

:func:`token_coords` and :func:`coords_token` convert between the two (vectorised, numpy);
:meth:`tide.data.ActivationStore.token_coords` applies the dataset's own grid.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tide.errors import TideError


def _grid(patch_grid: Sequence[int]) -> tuple[int, ...]:
    grid = tuple(int(g) for g in patch_grid)
    if not grid or min(grid) < 1:
        raise TideError(f"patch grid {list(patch_grid)} must list one or more positive sizes "
                        "(the manifest's `patch_grid`: [rows, cols] or [frames, rows, cols])")
    return grid


def token_coords(token, patch_grid: Sequence[int]) -> tuple:
    """Grid coordinates of flat token indices: ``(frame, row, col)`` for a 3-D grid, ``(row, col)``
    for a 2-D one — one array per axis shaped like ``token`` (plain ints for a scalar ``token``)."""
    grid = _grid(patch_grid)
    tok = np.asarray(token, dtype=np.int64)
    n = math.prod(grid)
    if tok.size and (tok.min() < 0 or tok.max() >= n):
        bad = tok[(tok < 0) | (tok >= n)].reshape(-1)[:4].tolist()
        raise TideError(f"token index(es) {bad} lie outside the {'x'.join(map(str, grid))} patch grid "
                        f"(valid: 0..{n - 1}): use the patch_grid of the dataset the tokens came from")
    coords = np.unravel_index(tok, grid)
    return tuple(int(c) for c in coords) if tok.ndim == 0 else tuple(coords)


def coords_token(coords: Sequence, patch_grid: Sequence[int]):
    """Flat token indices of grid coordinates (one array or int per axis of ``patch_grid``)."""
    grid = _grid(patch_grid)
    if len(coords) != len(grid):
        raise TideError(f"got {len(coords)} coordinate axes for the {len(grid)}-D patch grid {list(grid)}")
    arrays = [np.asarray(c, dtype=np.int64) for c in coords]
    for axis, (a, size) in enumerate(zip(arrays, grid)):
        if a.size and (a.min() < 0 or a.max() >= size):
            raise TideError(f"coordinate(s) on axis {axis} lie outside 0..{size - 1} of the patch grid {list(grid)}")
    flat = np.ravel_multi_index(arrays, grid)
    return int(flat) if np.ndim(flat) == 0 else flat
