"""A tiny Wan pipeline directory written by diffusers' own ``WanPipeline`` (no text encoder or tokenizer):
a real ``WanTransformer3DModel`` (patch (1, 2, 2), qk-norm, cross-attention norm), a real
``AutoencoderKLWan`` (4x temporal, 8x spatial, non-trivial ``latents_mean``/``latents_std``) and the
scheduler Wan ships (``UniPCMultistepScheduler`` with flow sigmas) or ``FlowMatchEulerDiscreteScheduler``.

Video: 9 frames of 48x64 pixels -> latents (4, 3, 6, 8) -> a (3, 3, 4) grid of 36 tokens. The grid is
deliberately not square so that frame, row and column cannot be confused.

Used by tests/models/test_wan.py and tests/analysis/test_video_maps.py (loaded by path).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline,
                       WanTransformer3DModel)

from tide.models import PromptBank
from tide.models.loading import PROMPTS_FILE, TIDE_META

TEXT_DIM, TEXT_LEN, NUM_PROMPTS = 16, 6, 2
HEIGHT, WIDTH, FRAMES = 48, 64, 9
"""Pixel size of the tiny videos."""
LATENT_FRAMES, LATENT_H, LATENT_W = 3, 6, 8
GRID = (3, 3, 4)
"""(frames, rows, cols) of the token grid."""
D_MODEL = 24


def scheduler(kind: str = "unipc"):
    if kind == "unipc":  # Wan 2.1's diffusers checkpoints (480p)
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       num_train_timesteps=1000, flow_shift=3.0)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)


def pipeline(kind: str = "unipc", expand_timesteps: bool = False) -> WanPipeline:
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 0.5, 2.0, 1.0])
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler(kind), transformer=transformer,
                       expand_timesteps=expand_timesteps)


def prompt_bank() -> PromptBank:
    """Two prompts and a (non-zero) negative prompt, as ``WanPipeline.encode_prompt`` outputs."""
    g = torch.Generator().manual_seed(7)
    return PromptBank({"prompt_embeds": torch.randn(NUM_PROMPTS, TEXT_LEN, TEXT_DIM, generator=g),
                       "negative_prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)},
                      texts=["a cat walking", "a boat at sea"])


def build(path: Path, kind: str = "unipc", expand_timesteps: bool = False) -> Path:
    """Write the pipeline directory with tide's prompt bank and tide.json (latent frames and size)."""
    path = Path(path)
    pipeline(kind, expand_timesteps).save_pretrained(path)
    prompt_bank().save(path / PROMPTS_FILE)
    (path / TIDE_META).write_text(json.dumps({"latent_frames": LATENT_FRAMES, "latent_size": [LATENT_H, LATENT_W]}))
    return path


def load_pipeline(path: Path) -> WanPipeline:
    """``WanPipeline.from_pretrained`` on the saved directory (no text encoder: embeddings are passed in)."""
    pipe = WanPipeline.from_pretrained(path, tokenizer=None, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe: WanPipeline, path: Path, conds, latents: torch.Tensor, steps: int, guidance: float,
                 output_type: str):
    """``WanPipeline.__call__`` with the bank's embeddings for ``conds`` (and its negative prompt under CFG)."""
    bank = PromptBank.load(path / PROMPTS_FILE)
    prompt = bank.tensors["prompt_embeds"][list(conds)]
    negative = bank.tensors["negative_prompt_embeds"].expand(len(conds), -1, -1) if guidance > 1 else None
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=latents.clone(),
                num_inference_steps=steps, guidance_scale=guidance, output_type=output_type, height=HEIGHT,
                width=WIDTH, num_frames=FRAMES).frames
