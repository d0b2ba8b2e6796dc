"""Shared fixtures: tiny real diffusers models, and the device the suite runs on (the GPU when present)."""

from __future__ import annotations

import pytest
import torch

from tide.device import resolve_device
from tide.models.dit import DiTBackbone

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=3,
                sample_size=8, patch_size=2, num_embeds_ada_norm=4, norm_type="ada_norm_zero")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return resolve_device("auto")


@pytest.fixture
def tiny_dit(device) -> DiTBackbone:
    """A 3-block, 4-class DiT on 8x8 single-channel images (16 tokens of width 16), randomly initialised."""
    torch.manual_seed(0)
    return DiTBackbone.from_config(TINY_DIT).to(device)
