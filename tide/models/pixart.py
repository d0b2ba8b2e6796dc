"""PixArt-α/Σ (Chen et al.): text via cross-attention, adaLN-single blocks — ``PixArtTransformer2DModel``.

Blocks: ``transformer.transformer_blocks`` (``BasicTransformerBlock``, one image stream), numbered
``blocks.0..N-1``. Conditions index a prompt bank with ``prompt_embeds`` (P, L, caption_channels)
and, optionally, ``prompt_attention_mask`` (P, L).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, PixArtTransformer2DModel

from tide.models.base import reader_block
from tide.models.text import TextBackbone


class PixArtBackbone(TextBackbone):
    family = "pixart"
    transformer_class = PixArtTransformer2DModel
    pipeline_guidance_scale = 4.5  # PixArtAlphaPipeline, PixArtSigmaPipeline
    prompt_keys = {"prompt_embeds": "encoder_hidden_states"}
    optional_prompt_keys = {"prompt_attention_mask": "encoder_attention_mask"}

    @staticmethod
    def default_scheduler():
        # PixArt is trained with the linear DDPM schedule (DDIM's default betas); clip_sample ruins CFG.
        return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)

    def prompt_dims(self):
        cfg = self.transformer.config
        return {"prompt_embeds": int(cfg.caption_channels or cfg.cross_attention_dim)}

    def denoise(self, latents_BCHW, t, cond):
        b, c, h, w = latents_BCHW.shape
        device = latents_BCHW.device
        t_B = torch.as_tensor(t, device=device).reshape(-1).expand(b)
        # micro-conditions (PixArt-α 1024px): image size in pixels and aspect ratio, as the pipeline passes
        added = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            s = self.vae_scale_factor
            added = {
                "resolution": torch.tensor([[h * s, w * s]], dtype=self.dtype, device=device).repeat(b, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=self.dtype, device=device).repeat(b, 1),
            }
        out = self.transformer(latents_BCHW, encoder_hidden_states=cond["encoder_hidden_states"],
                               encoder_attention_mask=cond.get("encoder_attention_mask"), timestep=t_B,
                               added_cond_kwargs=added, return_dict=False)[0]
        # PixArt checkpoints predict [noise, learned variance]: keep the noise
        return out[:, :c] if out.shape[1] == 2 * c else out

    def reader_modulation(self, hook, t_B):
        tr = self.transformer
        reader = reader_block(hook, len(tr.transformer_blocks))
        t_B = t_B.to(self.device)
        added = {"resolution": None, "aspect_ratio": None}
        if tr.use_additional_conditions:  # the modulation then also reads the image size: the default size
            h, w = self.latent_shape()[1:]
            s = self.vae_scale_factor
            added = {"resolution": torch.tensor([[h * s, w * s]], dtype=self.dtype, device=self.device).repeat(len(t_B), 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=self.dtype, device=self.device).repeat(len(t_B), 1)}
        t_mod, embedded = tr.adaln_single(t_B, added, batch_size=len(t_B), hidden_dtype=self.dtype)
        if reader == len(tr.transformer_blocks):  # the output norm: (shift, scale) = table + embedded timestep
            shift, scale = (tr.scale_shift_table[None] + embedded[:, None]).unbind(1)
            return scale, shift
        table = tr.transformer_blocks[reader].scale_shift_table  # (6, D): shift_msa, scale_msa, ...
        mods = table[None] + t_mod.reshape(len(t_B), 6, -1)
        return mods[:, 1], mods[:, 0]
