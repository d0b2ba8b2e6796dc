"""DiT (Peebles & Xie): class-conditional, adaLN-Zero blocks — ``DiTTransformer2DModel``."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from tide.models.base import NULL_CONDITION, Backbone, BlockSpec, reader_block


class DiTBackbone(Backbone):
    family = "dit"
    transformer_class = DiTTransformer2DModel
    pipeline_guidance_scale = 4.0  # DiTPipeline

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # diffusers' label embedder drops labels on its own in train mode; tide drops them
        # explicitly (to the null id) so classifier-free guidance stays under the caller's control.
        for block in self.transformer.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0

    @staticmethod
    def default_scheduler():
        return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)

    def latent_shape(self):
        cfg = self.transformer.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    def blocks(self):
        return [BlockSpec(i, b, type(b).__name__, joint=False)
                for i, b in enumerate(self.transformer.transformer_blocks)]

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def encode_conditions(self, conds_B):
        labels = torch.where(conds_B == NULL_CONDITION, torch.full_like(conds_B, self.num_classes), conds_B)
        return {"class_labels": labels.to(self.device)}

    def denoise(self, latents_BCHW, t, cond):
        b, c = latents_BCHW.shape[:2]
        t_B = torch.as_tensor(t, device=latents_BCHW.device).reshape(-1).expand(b)
        out = self.transformer(latents_BCHW, timestep=t_B, class_labels=cond["class_labels"],
                               return_dict=False)[0]
        # checkpoints with learned sigma (DiT-XL/2) predict [noise, variance]: keep the noise
        return out[:, :c] if out.shape[1] == 2 * c else out

    def reader_modulation(self, hook, t_B):
        tr = self.transformer
        reader = reader_block(hook, len(tr.transformer_blocks))
        t_B = t_B.to(self.device)
        labels = torch.full((len(t_B),), self.num_classes, device=self.device)  # the null class
        if reader == len(tr.transformer_blocks):  # the output norm, modulated from block 0's embedding
            emb = tr.transformer_blocks[0].norm1.emb(t_B, labels, hidden_dtype=self.dtype)
            shift, scale = tr.proj_out_1(torch.nn.functional.silu(emb)).chunk(2, dim=1)
            return scale, shift
        norm = tr.transformer_blocks[reader].norm1
        emb = norm.linear(norm.silu(norm.emb(t_B, labels, hidden_dtype=self.dtype)))
        shift_msa, scale_msa = emb.chunk(6, dim=1)[:2]
        return scale_msa, shift_msa
