"""Shared fixtures: tiny real diffusers models, and the device the suite runs on (the GPU when present)."""

from __future__ import annotations

import json
from pathlib import Path

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


def save_tiny_dit_dir(path: Path) -> Path:
    """The tiny DiT (seed 0) saved as a diffusers pipeline directory: model_index.json, transformer/, scheduler/."""
    torch.manual_seed(0)
    backbone = DiTBackbone.from_config(TINY_DIT)
    backbone.transformer.save_pretrained(path / "transformer")
    backbone.scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"]}))
    return path


@pytest.fixture
def tiny_dit_dir(tmp_path) -> Path:
    return save_tiny_dit_dir(tmp_path / "tiny-dit")
