"""Tiny real diffusers models of every backbone family, a tiny VAE and a prompt bank."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from tide.models import FAMILIES, PromptBank

TEXT_DIM, POOLED_DIM, TEXT_LEN, NUM_PROMPTS = 12, 6, 5, 3

TINY_CONFIGS = {
    # latent 4x8x8, learned sigma (8 output channels) as DiT-XL/2
    "dit": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=3, norm_type="ada_norm_zero"),
    "pixart": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=TEXT_DIM),
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
                pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16),
    # packed channels 16 = 4 latent channels x 2x2; sum(axes_dims_rope) == attention_head_dim
    "flux": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
                 guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
}
TINY_META = {"flux": {"latent_size": 8}}
"""FLUX's config has no sample size: tide.json's ``latent_size`` sets it."""


def make_vae() -> AutoencoderKL:
    """A 2x AutoencoderKL with 4 latent channels (decodes 8x8 latents to 16x16 RGB images)."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=16)


def make_prompts() -> PromptBank:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(NUM_PROMPTS, TEXT_LEN, dtype=torch.int64)
    mask[0, 3:] = 0  # a short prompt, padded
    return PromptBank({"prompt_embeds": torch.randn(NUM_PROMPTS, TEXT_LEN, TEXT_DIM, generator=g),
                       "pooled_prompt_embeds": torch.randn(NUM_PROMPTS, POOLED_DIM, generator=g),
                       "prompt_attention_mask": mask},
                      texts=["a cat", "a dog", "a boat"])


def make_backbone(family: str, device="cpu", **overrides):
    cls = FAMILIES[family]
    torch.manual_seed(0)
    backbone = cls.from_config({**TINY_CONFIGS[family], **overrides}, vae=make_vae(), meta=TINY_META.get(family),
                               prompts=make_prompts() if cls.text_conditioned else None)
    return backbone.to(device)


@pytest.fixture
def tiny_vae():
    return make_vae()


@pytest.fixture
def tiny_prompts():
    return make_prompts()


@pytest.fixture
def tiny_backbone(device):
    """Factory: ``tiny_backbone(family, **config_overrides)`` -> a randomly initialised tiny backbone
    with a VAE (and prompts)."""
    return lambda family, **overrides: make_backbone(family, device, **overrides)
