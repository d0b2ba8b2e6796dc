"""FLUX.1 (Black Forest Labs): double- then single-stream blocks — ``FluxTransformer2DModel``.

Block numbering: the ``N`` double-stream ``transformer.transformer_blocks``
(``FluxTransformerBlock``) are ``blocks.0..N-1``; the ``M`` single-stream
``transformer.single_transformer_blocks`` (``FluxSingleTransformerBlock``) continue as
``blocks.N..N+M-1``. Every block takes ``hidden_states`` (image) and ``encoder_hidden_states``
(text) and returns ``(encoder_hidden_states, hidden_states)`` — single blocks concatenate the two
streams inside and split them again on return — so all are ``joint``.

Latents: the sampler sees unpacked latents ``(in_channels // 4, H, W)``; :meth:`FluxBackbone.denoise`
packs them into 2×2 patch tokens and back with diffusers' own ``FluxPipeline`` helpers, so the token
grid is ``(H/2, W/2)`` (``patch_size`` 2). The config has no ``sample_size``: ``H = W =
latent_size`` from ``tide.json`` (int or ``[H, W]``), default 64 (512-pixel images through FLUX's
8× VAE).

Guidance: guidance-distilled checkpoints (``guidance_embeds``, FLUX.1-dev) take the guidance scale
as a model input instead of a doubled batch: :meth:`FluxBackbone.uses_cfg` is False for them and
the sampler passes the scale in the conditioning (``guidance_scale``, from
:meth:`FluxBackbone.guidance_inputs`); the default is 3.5 as in ``FluxPipeline``. Checkpoints
without it (FLUX.1-schnell) default to no guidance, as ``FluxPipeline``'s ``true_cfg_scale=1``, and
take ordinary classifier-free guidance with the null condition when asked (the pipeline's
``true_cfg_scale`` with negative prompt embeddings).

Conditions index a prompt bank with ``prompt_embeds`` (P, L, joint_attention_dim) and
``pooled_prompt_embeds`` (P, pooled_projection_dim); text positions (``txt_ids``) are zeros.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from tide.models.base import BlockSpec
from tide.models.text import TextBackbone, calculate_shift

DEFAULT_LATENT_SIZE = 64
"""Latent height and width when ``tide.json`` sets no ``latent_size`` (512 px with an 8× VAE)."""
DEFAULT_GUIDANCE = 3.5
"""Embedded guidance scale of guidance-distilled checkpoints until one is set (FluxPipeline's default)."""


def _pipeline():
    # imported on use: diffusers' pipeline modules import `transformers`
    from diffusers import FluxPipeline

    return FluxPipeline


class FluxBackbone(TextBackbone):
    family = "flux"
    transformer_class = FluxTransformer2DModel
    prompt_keys = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"}

    @staticmethod
    def default_scheduler():
        # FLUX.1-dev's scheduler config: resolution-dependent (dynamic) shifting
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)

    # ----------------------------------------------------------------------------- geometry
    @property
    def patch_size(self) -> int:
        return 2  # 2x2 latent patches are packed into one token

    def latent_shape(self):
        return (int(self.transformer.config.in_channels) // 4, *self.latent_hw(DEFAULT_LATENT_SIZE))

    def blocks(self):
        double = list(self.transformer.transformer_blocks)
        single = list(self.transformer.single_transformer_blocks)
        return [BlockSpec(i, b, type(b).__name__, joint=True) for i, b in enumerate(double + single)]

    def prompt_dims(self):
        cfg = self.transformer.config
        return {"prompt_embeds": int(cfg.joint_attention_dim),
                "pooled_prompt_embeds": int(cfg.pooled_projection_dim)}

    # ----------------------------------------------------------------------------- guidance, schedule
    @property
    def guidance_distilled(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def pipeline_guidance_scale(self) -> float:
        # FluxPipeline: guidance_scale=3.5 (embedded, FLUX.1-dev); true_cfg_scale=1.0 (no CFG, FLUX.1-schnell)
        return DEFAULT_GUIDANCE if self.guidance_distilled else 1.0

    def uses_cfg(self, guidance_scale):
        return False if self.guidance_distilled else super().uses_cfg(guidance_scale)

    def guidance_inputs(self, guidance_scale):
        return {"guidance_scale": float(guidance_scale)} if self.guidance_distilled else {}

    def scheduler_kwargs(self, num_steps):
        # as FluxPipeline: sigmas linspace(1, 1/n, n) and mu from the image sequence length
        params = inspect.signature(self.scheduler.set_timesteps).parameters
        cfg = self.scheduler.config
        out = {}
        if "sigmas" in params and not cfg.get("use_flow_sigmas", False):
            out["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps).tolist()
        if "mu" in params:
            out["mu"] = calculate_shift(self.num_tokens, cfg.get("base_image_seq_len", 256),
                                        cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                        cfg.get("max_shift", 1.15))
        return out

    # ----------------------------------------------------------------------------- one step
    def denoise(self, latents_BCHW, t, cond):
        pipe = _pipeline()
        b, c, h, w = latents_BCHW.shape
        device, dtype = latents_BCHW.device, latents_BCHW.dtype
        packed = pipe._pack_latents(latents_BCHW, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        text = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
        t_B = torch.as_tensor(t, device=device).reshape(-1).expand(b).to(dtype)
        guidance = None
        if self.guidance_distilled:  # as FluxPipeline: a float32 guidance value per row
            scale = cond.get("guidance_scale", self.default_guidance_scale)
            guidance = torch.full([1], scale, device=device, dtype=torch.float32).expand(b)
        out = self.transformer(hidden_states=packed, timestep=t_B / 1000, guidance=guidance,
                               pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        # latent height/width with a scale factor of 1: the pipeline's unpacking, in latent pixels
        return pipe._unpack_latents(out, h, w, 1)
