"""Wan 2.1 (Alibaba): a text-to-video DiT with space-time tokens — ``WanTransformer3DModel``.

Blocks: ``transformer.blocks`` (``WanTransformerBlock``, one stream: self-attention ``attn1``,
cross-attention to the prompt ``attn2``, feed-forward ``ffn``), numbered ``blocks.0..N-1`` with
``hook_resid_pre/post``, ``hook_attn_out`` (``attn1``, before its adaLN gate) and ``hook_mlp_out``
(``ffn``, before its gate).

Latents are video: ``(C, F, H, W)`` with ``F`` latent frames. The transformer cuts them into
``patch_size`` = (1, 2, 2) (frames, rows, cols) patches with a ``Conv3d`` and flattens its output
``(B, D, F', H', W')`` with ``flatten(2).transpose(1, 2)``, so token ``n`` of the residual stream
(``(B, tokens, d_model)``) is patch ``(frame, row, col)`` in **row-major order over
``patch_grid = (F', H', W')``**: ``n = (frame * H' + row) * W' + col`` (its rotary embedding is
built in the same order). :func:`tide.data.token_coords` inverts this.

Geometry from the checkpoint's ``tide.json``: ``latent_size`` (int or ``[H, W]`` in latent pixels,
default 60x104 = WanPipeline's 480x832 video through the 8x VAE) and ``latent_frames`` — the number
of **latent** frames, ``(pixel_frames - 1) // 4 + 1`` for Wan's VAE (default 21, WanPipeline's 81
frames).

Conditions index a prompt bank with ``prompt_embeds`` (P, L, text_dim) exactly as
``WanPipeline.encode_prompt`` returns them (UMT5 states of the prompt, zero-padded to
``max_sequence_length``, 512 by default: the transformer gets no attention mask, so the padding is
part of the input). The null condition is ``negative_prompt_embeds`` (1, L, text_dim) when the bank
has it — WanPipeline's default negative prompt is ``""``, whose embedding is not zero — else zeros.
No pooled embeddings. Guidance: classifier-free, default 5.0 as ``WanPipeline``.

Scheduler: the pipeline directory's (Wan ships ``UniPCMultistepScheduler`` with flow sigmas,
``flow_shift`` 3.0 at 480p, 5.0 at 720p); ``WanPipeline`` also accepts
``FlowMatchEulerDiscreteScheduler``, whose timesteps it sets with no ``mu``/``sigmas`` (its fixed
``shift``) — so does tide. Wan 2.2 TI2V (``expand_timesteps`` in ``model_index.json``: one timestep
per token) is supported; two-expert Wan 2.2 pipelines (``transformer_2``/``boundary_ratio``) are not.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from tide.errors import TideError
from tide.models.base import BlockSpec
from tide.models.text import TextBackbone

DEFAULT_LATENT_SIZE = (60, 104)
"""Latent (height, width) when ``tide.json`` sets no ``latent_size``: WanPipeline's 480x832 through the 8x VAE."""
DEFAULT_PIXEL_FRAMES = 81
"""WanPipeline's default ``num_frames`` (pixel frames); the default latent frames follow from the VAE."""
DEFAULT_TEMPORAL_SCALE = 4
"""Pixel frames per latent frame when there is no VAE (WanPipeline's fallback)."""
DEFAULT_SPATIAL_SCALE = 8
"""Pixels per latent pixel when there is no VAE (WanPipeline's fallback)."""


class WanBackbone(TextBackbone):
    family = "wan"
    transformer_class = WanTransformer3DModel
    pipeline_guidance_scale = 5.0  # WanPipeline
    prompt_keys = {"prompt_embeds": "encoder_hidden_states"}

    def __init__(self, transformer, scheduler, vae=None, meta=None, prompts=None):
        super().__init__(transformer, scheduler, vae, meta, prompts)
        index = self.meta.get("pipeline_index", {})  # model_index.json, as load_backbone read it
        if index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None, None])[1]:
            raise TideError(f"{self.meta.get('path')}: two-expert Wan 2.2 pipelines (transformer_2, boundary_ratio) "
                            "are not supported: load a single-transformer Wan pipeline (Wan 2.1, Wan 2.2 TI2V)")
        self.expand_timesteps = bool(self.meta.get("expand_timesteps", index.get("expand_timesteps", False)))
        """Wan 2.2 TI2V: the transformer takes one timestep per token, as ``WanPipeline(expand_timesteps=True)``."""

    @staticmethod
    def default_scheduler():
        # the scheduler Wan 2.1's diffusers checkpoints ship (480p flow shift)
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       num_train_timesteps=1000, flow_shift=3.0)

    # ----------------------------------------------------------------------------- geometry
    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.transformer.config.patch_size)

    @property
    def temporal_scale(self) -> int:
        """Pixel frames per latent frame (the VAE's ``scale_factor_temporal``)."""
        return int(getattr(self.vae.config, "scale_factor_temporal", None) or DEFAULT_TEMPORAL_SCALE) \
            if self.vae is not None else DEFAULT_TEMPORAL_SCALE

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_spatial", None) or DEFAULT_SPATIAL_SCALE) \
            if self.vae is not None else DEFAULT_SPATIAL_SCALE

    @property
    def latent_frames(self) -> int:
        """Latent frames: ``latent_frames`` in tide.json, else WanPipeline's 81 frames through the VAE."""
        frames = self.meta.get("latent_frames", (DEFAULT_PIXEL_FRAMES - 1) // self.temporal_scale + 1)
        pt = self.patch_size[0]
        if not isinstance(frames, int) or frames <= 0 or frames % pt:
            raise TideError(f"latent_frames {frames!r} of the wan backbone must be a positive number of latent frames "
                            f"divisible by {pt} (set `latent_frames` in tide.json: (pixel frames - 1) // "
                            f"{self.temporal_scale} + 1)")
        return frames

    @property
    def pixel_frames(self) -> int:
        """Frames of the decoded video: ``(latent_frames - 1) * temporal_scale + 1``."""
        return (self.latent_frames - 1) * self.temporal_scale + 1

    def latent_shape(self):
        cfg = self.transformer.config
        shape = (int(cfg.in_channels), self.latent_frames, *self.latent_hw(DEFAULT_LATENT_SIZE))
        grid = [n // p for n, p in zip(shape[1:], self.patch_size)]
        if max(grid) > cfg.rope_max_seq_len:
            raise TideError(f"the wan token grid {'x'.join(map(str, grid))} exceeds the transformer's "
                            f"rope_max_seq_len {cfg.rope_max_seq_len} along an axis: lower `latent_frames` or "
                            "`latent_size` in tide.json")
        return shape

    def blocks(self):
        return [BlockSpec(i, b, type(b).__name__, joint=False, attn_name="attn1", mlp_name="ffn")
                for i, b in enumerate(self.transformer.blocks)]

    def prompt_dims(self):
        return {"prompt_embeds": int(self.transformer.config.text_dim)}

    def describe(self) -> dict:
        return {**super().describe(), "patch_grid": list(self.patch_grid), "pixel_frames": self.pixel_frames}

    # ----------------------------------------------------------------------------- schedule
    @property
    def latent_dtype(self) -> torch.dtype:
        return torch.float32  # WanPipeline keeps float32 latents and casts them for the transformer

    def make_scheduler(self, num_steps: int) -> Any:
        scheduler = super().make_scheduler(num_steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as WanPipeline: steps count from the first timestep
        return scheduler

    # ----------------------------------------------------------------------------- one step
    def denoise(self, latents_BCFHW, t, cond):
        b = latents_BCFHW.shape[0]
        t = torch.as_tensor(t, device=latents_BCFHW.device)
        if self.expand_timesteps:
            # WanPipeline(expand_timesteps=True): (ones mask * t) per token, float32, shape (batch, tokens)
            timestep = (torch.ones(self.num_tokens, device=t.device, dtype=torch.float32) * t)[None].expand(b, -1)
        else:
            timestep = t.reshape(-1).expand(b)
        return self.transformer(hidden_states=latents_BCFHW.to(self.dtype), timestep=timestep,
                                encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    # ----------------------------------------------------------------------------- pictures
    @torch.no_grad()
    def decode(self, latents_BCFHW: torch.Tensor) -> torch.Tensor:
        """Videos in [0, 1], shape (B, C, frames, H, W): WanPipeline's decoding (latents de-normalised
        with the VAE's ``latents_mean``/``latents_std``, then ``vae.decode`` and ``x / 2 + 0.5``)."""
        if self.vae is None:
            return super().decode(latents_BCFHW)
        cfg = self.vae.config
        latents = latents_BCFHW.to(self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return (video * 0.5 + 0.5).clamp(0, 1).float()
