"""Stable Diffusion 3 / 3.5 (Esser et al.): MMDiT joint blocks — ``SD3Transformer2DModel``.

Blocks: ``transformer.transformer_blocks`` (``JointTransformerBlock``, image and text streams),
numbered ``blocks.0..N-1``. Each returns ``(encoder_hidden_states, hidden_states)``; the last block
is ``context_pre_only`` and returns ``None`` for the text stream. SD3.5's dual-attention layers are
the same class. Conditions index a prompt bank with ``prompt_embeds`` (P, L, joint_attention_dim)
and ``pooled_prompt_embeds`` (P, pooled_projection_dim).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from tide.models.text import TextBackbone, calculate_shift


class SD3Backbone(TextBackbone):
    family = "sd3"
    transformer_class = SD3Transformer2DModel
    pipeline_guidance_scale = 7.0  # StableDiffusion3Pipeline
    prompt_keys = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"}

    @staticmethod
    def default_scheduler():
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    joint_blocks = True  # JointTransformerBlock: image and text streams

    def prompt_dims(self):
        cfg = self.transformer.config
        return {"prompt_embeds": int(cfg.joint_attention_dim),
                "pooled_prompt_embeds": int(cfg.pooled_projection_dim)}

    def scheduler_kwargs(self, num_steps):
        # StableDiffusion3Pipeline: ``mu`` only for schedulers with dynamic shifting (SD3.5 variants)
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return {}
        return {"mu": calculate_shift(self.num_tokens, cfg.get("base_image_seq_len", 256),
                                      cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                      cfg.get("max_shift", 1.16))}

    def denoise(self, latents_BCHW, t, cond):
        b = latents_BCHW.shape[0]
        # as StableDiffusion3Pipeline: the scheduler's timestep (0..1000), broadcast to the batch
        t_B = torch.as_tensor(t, device=latents_BCHW.device).reshape(-1).expand(b)
        return self.transformer(hidden_states=latents_BCHW, timestep=t_B,
                                encoder_hidden_states=cond["encoder_hidden_states"],
                                pooled_projections=cond["pooled_projections"], return_dict=False)[0]
