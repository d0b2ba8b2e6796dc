"""Qwen-Image (Alibaba Qwen): a two-stream MMDiT over packed latents — ``QwenImageTransformer2DModel``.

Everything here reproduces what ``QwenImagePipeline.__call__`` (diffusers 0.42.1) feeds the transformer.

Blocks: ``transformer.transformer_blocks`` (``QwenImageTransformerBlock``), numbered ``blocks.0..N-1``. Each
takes ``hidden_states`` (image) and ``encoder_hidden_states`` (text) and returns
``(encoder_hidden_states, hidden_states)``, as SD3's and FLUX's blocks do, so all are ``joint`` with the
four ``hook_{img,txt}_resid_{pre,post}`` hooks.

Latents: the sampler sees unpacked latents ``(in_channels // 4, H, W)`` (16 channels for Qwen-Image);
:meth:`QwenImageBackbone.denoise` packs them into 2x2 patch tokens and back with the pipeline's own
``_pack_latents``/``_unpack_latents``, so the token grid is ``(H/2, W/2)`` (``patch_size`` 2). ``H = W =
latent_size`` from ``tide.json`` (int or ``[H, W]``), default 128 (the pipeline's 1024x1024 images through
the 8x VAE). The pipeline draws its noise as ``(B, 1, C, H, W)`` — one generator per row — and packs it; the
frame axis of size 1 does not change the draw, so tide's per-row ``(C, H, W)`` noise is the same numbers.
The transformer also gets ``img_shapes = [[(1, H/2, W/2)]] * B`` (its rotary grid) and ``timestep / 1000``
(the timestep cast to the latents' dtype first, as the pipeline does).

Text padding and masking: the prompt bank holds ``prompt_embeds`` (P, L, joint_attention_dim) padded to one
length ``L`` and the padding mask as ``prompt_attention_mask`` (P, L), passed as the transformer's
``encoder_hidden_states_mask`` (``negative_prompt_attention_mask`` for the null condition), exactly the
``prompt_embeds_mask`` ``QwenImagePipeline.encode_prompt`` returns. In diffusers 0.42.1 the
transformer honours this mask: ``QwenDoubleStreamAttnProcessor2_0`` turns it into a boolean key mask over
``[text, image]`` for the joint attention, and the text rotary positions are ``0..L-1`` whatever the padding,
so padded text tokens reach no image token. Padding a prompt *with* its mask therefore gives the output of
the trimmed prompt up to float rounding (one forward of a tiny model: 2.4e-7 apart in float32), while padding
*without* a mask changes it (3.5e-2): a bank of zero-padded embeddings needs its mask. This is why tide may
batch what the pipeline runs apart: under true CFG the pipeline calls the transformer twice per step (prompt
rows, then negative rows, each with its own mask — or none when it is all ones, as ``encode_prompt`` drops
an all-ones mask; given embeddings it does not trim, a text encoder pads each call to its longest prompt),
while tide's sampler makes one call on the cond rows followed by the null-condition rows, all padded to the
bank's ``L`` under one mask. ``denoise`` therefore makes the one call the hooks expect (no split per CFG
half); like the pipeline it passes no mask when the batch's whole mask is all ones. Measured on CPU with the
tiny test checkpoint, 4 steps: tide equals ``QwenImagePipeline`` given the same padded embeddings and masks
exactly (0.0 in float32 and bfloat16, also when the negative mask is all ones and the pipeline drops it), and
equals the pipeline given each prompt trimmed alone, unmasked, to 9e-7 in float32 (0.0 in bfloat16).
Embeddings longer than 512 tokens are cut to 512, the pipeline's default ``max_sequence_length``.

Guidance: the pipeline's "true CFG", default ``true_cfg_scale=4.0`` (active when a negative prompt is given;
tide's null condition is the bank's ``negative_*`` rows, zeros when absent). It combines the two predictions
in packed form and rescales each token back to the conditional prediction's norm::

    comb = neg + s * (cond - neg);   out = comb * ||cond|| / ||comb||   (norms over each packed token)

:meth:`QwenImageBackbone.combine_guidance` computes exactly this on tide's unpacked tensors (it packs them,
combines as the pipeline does, and unpacks). ``guidance_scale`` 1.0 runs the prompt rows alone.
Guidance-distilled configs (``guidance_embeds``) are refused: ``QwenImageTransformer2DModel`` 0.42.1 has no
guidance embedder and its forward fails when given ``guidance``, so ``QwenImagePipeline`` cannot run them
either; ``use_additional_t_cond`` (Qwen-Image-Layered) needs inputs ``QwenImagePipeline`` does not give.

Scheduler: the pipeline directory's ``FlowMatchEulerDiscreteScheduler`` (Qwen-Image: dynamic shifting,
``base_shift`` 0.5, ``max_shift`` 0.9, ``max_image_seq_len`` 8192, ``shift_terminal`` 0.02), set as the
pipeline sets it: ``sigmas = linspace(1, 1/n, n)``, ``mu`` from ``calculate_shift`` over the packed sequence
length with the scheduler config, and ``set_begin_index(0)``.

Decoding: ``AutoencoderKLQwenImage`` (a video VAE run on one frame): latents de-normalised with the VAE
config's ``latents_mean``/``latents_std``, decoded as ``(B, C, 1, H, W)``, frame 0 kept, ``x / 2 + 0.5``.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

from tide.errors import TideError
from tide.models.base import BlockSpec
from tide.models.text import TextBackbone, calculate_shift

DEFAULT_LATENT_SIZE = 128
"""Latent height and width when ``tide.json`` sets no ``latent_size``: QwenImagePipeline's 1024x1024 images."""
DEFAULT_TRUE_CFG = 4.0
"""QwenImagePipeline's default ``true_cfg_scale``."""
MAX_SEQUENCE_LENGTH = 512
"""QwenImagePipeline's default ``max_sequence_length``: longer prompt embeddings are cut to it."""


def _pipeline():
    # imported on use: diffusers' pipeline modules import `transformers`
    from diffusers import QwenImagePipeline

    return QwenImagePipeline


class QwenImageBackbone(TextBackbone):
    family = "qwenimage"
    transformer_class = QwenImageTransformer2DModel
    pipeline_guidance_scale = DEFAULT_TRUE_CFG
    prompt_keys = {"prompt_embeds": "encoder_hidden_states"}
    optional_prompt_keys = {"prompt_attention_mask": "encoder_hidden_states_mask"}

    def __init__(self, transformer, scheduler, vae=None, meta=None, prompts=None):
        cfg = transformer.config
        where = (meta or {}).get("path") or "QwenImageTransformer2DModel"
        if cfg.get("guidance_embeds", False):
            raise TideError(f"{where}: guidance-distilled Qwen-Image transformers (guidance_embeds=true) are not "
                            "supported: diffusers' QwenImageTransformer2DModel has no guidance embedder and "
                            "QwenImagePipeline cannot run them either")
        if cfg.get("use_additional_t_cond", False):
            raise TideError(f"{where}: a Qwen-Image transformer with use_additional_t_cond (Qwen-Image-Layered) "
                            "needs inputs QwenImagePipeline does not give: tide supports text-to-image Qwen-Image")
        super().__init__(transformer, scheduler, vae, meta, prompts)

    @staticmethod
    def default_scheduler():
        # Qwen/Qwen-Image's scheduler config
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                               max_image_seq_len=8192, shift_terminal=0.02,
                                               time_shift_type="exponential")

    # ----------------------------------------------------------------------------- geometry
    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)  # 2: 2x2 latent patches are packed into one token

    def latent_shape(self):
        cfg = self.transformer.config
        return (int(cfg.in_channels) // 4, *self.latent_hw(DEFAULT_LATENT_SIZE))

    @property
    def vae_scale_factor(self) -> int:
        # as QwenImagePipeline: 2 ** len(vae.temperal_downsample), 8 without a VAE
        return 2 ** len(self.vae.config.temperal_downsample) if self.vae is not None else 8

    def blocks(self):
        return [BlockSpec(i, b, type(b).__name__, joint=True)
                for i, b in enumerate(self.transformer.transformer_blocks)]

    def prompt_dims(self):
        return {"prompt_embeds": int(self.transformer.config.joint_attention_dim)}

    def prompt_inputs(self, conds_B):
        out = super().prompt_inputs(conds_B)
        # as QwenImagePipeline.encode_prompt: embeddings (and mask) cut to max_sequence_length
        return {k: v[:, :MAX_SEQUENCE_LENGTH] for k, v in out.items()}

    # ----------------------------------------------------------------------------- guidance, schedule
    def combine_guidance(self, out_cond, out_uncond, guidance_scale):
        pipe = _pipeline()
        b, c, h, w = out_cond.shape
        cond = pipe._pack_latents(out_cond, b, c, h, w)
        neg = pipe._pack_latents(out_uncond, b, c, h, w)
        # QwenImagePipeline.__call__'s true CFG, on the packed predictions
        comb = neg + guidance_scale * (cond - neg)
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb, dim=-1, keepdim=True)
        return self._unpack(comb * (cond_norm / noise_norm), h, w)

    def scheduler_kwargs(self, num_steps):
        # as QwenImagePipeline: sigmas linspace(1, 1/n, n) and mu from the packed sequence length
        params = inspect.signature(self.scheduler.set_timesteps).parameters
        cfg = self.scheduler.config
        out = {}
        if "sigmas" in params:
            out["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        if "mu" in params:
            out["mu"] = calculate_shift(self.num_tokens, cfg.get("base_image_seq_len", 256),
                                        cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                        cfg.get("max_shift", 1.15))
        return out

    def make_scheduler(self, num_steps: int) -> Any:
        scheduler = super().make_scheduler(num_steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as QwenImagePipeline
        return scheduler

    # ----------------------------------------------------------------------------- one step
    @staticmethod
    def _unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, tokens, 4C) -> (B, C, H, W): the pipeline's unpacking in latent pixels, frame axis dropped."""
        return _pipeline()._unpack_latents(packed, h, w, 1)[:, :, 0]

    def denoise(self, latents_BCHW, t, cond):
        b, c, h, w = latents_BCHW.shape
        dtype = latents_BCHW.dtype
        packed = _pipeline()._pack_latents(latents_BCHW, b, c, h, w)
        mask = cond.get("encoder_hidden_states_mask")
        if mask is not None and bool(mask.all()):
            mask = None  # as QwenImagePipeline.encode_prompt: an all-ones mask is dropped
        timestep = torch.as_tensor(t, device=latents_BCHW.device).reshape(-1).expand(b).to(dtype)
        out = self.transformer(hidden_states=packed, timestep=timestep / 1000,
                               encoder_hidden_states=cond["encoder_hidden_states"], encoder_hidden_states_mask=mask,
                               img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return self._unpack(out, h, w)

    # ----------------------------------------------------------------------------- pictures
    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], shape (B, 3, H, W): QwenImagePipeline's decoding (latents de-normalised with the
        VAE's ``latents_mean``/``latents_std``, decoded as one frame, ``x / 2 + 0.5``)."""
        if self.vae is None:
            return super().decode(latents_BCHW)
        cfg = self.vae.config
        latents = latents_BCHW[:, :, None].to(self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        images = self.vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (images * 0.5 + 0.5).clamp(0, 1).float()
