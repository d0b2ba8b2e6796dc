"""Image grids: the upscaling follows the image size, so a 1024-px sample is never blown up 4x."""

import torch
from PIL import Image

from tide.images import grid_scale, save_grid


def test_grid_scale_upscales_small_images_only():
    assert grid_scale(28, 28) == 4 and grid_scale(16, 16) == 7
    assert grid_scale(128, 128) == 1 and grid_scale(1024, 1024) == 1 and grid_scale(1024, 64) == 1


def test_saved_grid_size_follows_the_image_size(tmp_path):
    small = save_grid(torch.rand(4, 1, 28, 28), tmp_path / "small.png", nrow=2)
    large = save_grid(torch.rand(2, 3, 256, 256), tmp_path / "large.png", nrow=2)
    assert Image.open(small).size == (2 * (28 * 4 + 2), 2 * (28 * 4 + 2))
    assert Image.open(large).size == (2 * (256 + 2), 256 + 2)
    forced = save_grid(torch.rand(2, 3, 32, 32), tmp_path / "forced.png", nrow=2, scale=1)
    assert Image.open(forced).size == (2 * 34, 34)
