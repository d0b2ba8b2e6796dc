"""SANA (Xie et al.): linear-attention DiT on a 32× deep-compression autoencoder — ``SanaTransformer2DModel``.

Blocks: ``transformer.transformer_blocks`` (``SanaTransformerBlock``: linear self-attention, cross-
attention to the prompt, a convolutional GLU feed-forward), numbered ``blocks.0..N-1``, single
stream: ``hook_resid_pre``, ``hook_resid_post`` and ``hook_attn_out``. There is no ``hook_mlp_out``:
SANA's feed-forward runs on the (B, D, rows, cols) feature map, not on tokens.

Conditions index a prompt bank with ``prompt_embeds`` (P, L, caption_channels) and, optionally,
``prompt_attention_mask`` (P, L) — the Gemma-2 hidden states ``SanaPipeline`` computes. Sampling
follows ``SanaPipeline``: flow-matching DPM-Solver, the timestep times the config's
``timestep_scale``, CFG with the negative embeddings; latents decode through ``AutoencoderDC``.
SANA-Sprint (``guidance_embeds``, its own consistency scheduler and pipeline) is not supported.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel

from tide.errors import TideError
from tide.models.text import TextBackbone


class SanaBackbone(TextBackbone):
    family = "sana"
    transformer_class = SanaTransformer2DModel
    pipeline_guidance_scale = 4.5  # SanaPipeline
    prompt_keys = {"prompt_embeds": "encoder_hidden_states"}
    optional_prompt_keys = {"prompt_attention_mask": "encoder_attention_mask"}
    block_mlp = None  # its feed-forward sees (D, rows, cols) maps, not tokens: no hook_mlp_out

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.transformer.config.get("guidance_embeds", False):
            raise TideError("this SANA checkpoint embeds guidance (SANA-Sprint), which needs its own consistency "
                            "scheduler; tide supports the SANA / SANA-1.5 text-to-image checkpoints")

    @staticmethod
    def default_scheduler():
        # the SANA 1024px pipelines' scheduler: DPM-Solver++ on flow-matching sigmas, shift 3
        return DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                           use_flow_sigmas=True, flow_shift=3.0, algorithm_type="dpmsolver++",
                                           solver_order=2, lower_order_final=True)

    @property
    def latent_dtype(self) -> torch.dtype:
        return torch.float32  # SanaPipeline: float32 latents, the transformer's output upcast

    def prompt_dims(self):
        return {"prompt_embeds": int(self.transformer.config.caption_channels)}

    def denoise(self, latents_BCHW, t, cond):
        b, c = latents_BCHW.shape[:2]
        t_B = torch.as_tensor(t, device=latents_BCHW.device).reshape(-1).expand(b)
        out = self.transformer(latents_BCHW.to(self.dtype), encoder_hidden_states=cond["encoder_hidden_states"],
                               encoder_attention_mask=cond.get("encoder_attention_mask"),
                               timestep=t_B * self.transformer.config.timestep_scale, return_dict=False)[0].float()
        return out[:, :c] if out.shape[1] == 2 * c else out
