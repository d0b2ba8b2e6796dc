"""Image grids: tensors in [0, 1] to PNG files, optionally with a label per row; videos as film strips."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from einops import rearrange


def to_uint8(images_BCHW: torch.Tensor) -> np.ndarray:
    """(B, H, W, C) uint8 from (B, C, H, W) floats in [0, 1]; grey images get 3 channels."""
    x = images_BCHW.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (rearrange(x, "b c h w -> b h w c") * 255).round().to(torch.uint8).numpy()


STRIP_FRAMES = 8
"""Frames of a video shown in a grid cell (evenly spaced, first and last included)."""


def film_strip(videos_BCFHW: torch.Tensor, max_frames: int = STRIP_FRAMES) -> torch.Tensor:
    """(B, C, H, k*W) images from (B, C, F, H, W) videos: ``k = min(max_frames, F)`` evenly spaced
    frames of each video side by side, so videos fit wherever images do."""
    f = videos_BCFHW.shape[2]
    idx = torch.linspace(0, f - 1, min(max_frames, f)).round().long()
    return rearrange(videos_BCFHW[:, :, idx], "b c f h w -> b c h (f w)")


def image_grid(images_BCHW: torch.Tensor, nrow: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """A (rows*H, nrow*W, 3) uint8 grid, row-major, padded with white, upscaled ``scale``× (nearest)."""
    imgs = to_uint8(images_BCHW)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    b = imgs.shape[0]
    rows = -(-b // nrow)
    blank = np.full((rows * nrow - b, *imgs.shape[1:]), 255, np.uint8)
    imgs = np.concatenate([imgs, blank])
    imgs = np.pad(imgs, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=255)
    return rearrange(imgs, "(r n) h w c -> (r h) (n w) c", n=nrow)


GRID_CELL_PIXELS = 112
"""Small images are upscaled (nearest) until a grid cell is about this tall; large ones are left as they are."""


def grid_scale(height: int, width: int) -> int:
    """The upscaling factor of a grid cell: 4 for 28-px images, 1 from 112 px on (a 1024-px image stays 1×)."""
    return max(1, GRID_CELL_PIXELS // max(1, min(height, width)))


def save_grid(images_BCHW: torch.Tensor, path: str | Path, nrow: int,
              row_labels: Sequence[str] | None = None, title: str | None = None, scale: int | None = None) -> Path:
    """Write a PNG grid; with ``row_labels`` (one per row) or a title it is drawn as a figure (:mod:`tide.plots`).

    ``scale`` (nearest-neighbour upscaling) defaults to :func:`grid_scale` of the image size. Videos
    (B, C, F, H, W) are drawn as film strips (:func:`film_strip`).
    """
    if images_BCHW.dim() == 5:
        images_BCHW = film_strip(images_BCHW)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scale is None:
        scale = grid_scale(*images_BCHW.shape[-2:])
    grid = image_grid(images_BCHW, nrow, scale=scale)
    if row_labels is None and title is None:
        from PIL import Image

        Image.fromarray(grid).save(path)
        return path
    from tide.plots import new_figure, save_figure

    h, w = grid.shape[:2]
    fig, ax = new_figure((w / 100 + (1.6 if row_labels else 0.2), h / 100 + (0.5 if title else 0.2)), dpi=100)
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        rows = len(row_labels)
        ax.set_yticks([(i + 0.5) * h / rows for i in range(rows)], labels=list(row_labels))
        ax.tick_params(length=0)
    else:
        ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
