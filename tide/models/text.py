"""What the text-conditioned latent families (PixArt, SD3, FLUX, Wan) share.

No text encoder runs in tide: conditions are indices into a :class:`~tide.models.base.PromptBank`
(precomputed prompt embeddings). This module turns condition ids into the embedding tensors a
family's transformer takes, checks them against the transformer's config, and holds the latent
geometry rule shared by these families.

Latent size: ``latent_size`` in the checkpoint's ``tide.json`` (an int, or ``[height, width]`` in
latent pixels) overrides the family's default (the transformer's ``sample_size`` for PixArt and SD3;
see :mod:`tide.models.flux` for FLUX, whose config has none).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tide.errors import TideError
from tide.models.base import Backbone, BlockSpec


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift ``mu`` — diffusers' ``calculate_shift`` (FLUX and SD3 pipelines).

    Imported from diffusers lazily: its pipeline modules pull in ``transformers``, which
    ``import tide`` should not pay for.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as _calculate_shift

    return float(_calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))


class TextBackbone(Backbone):
    """A latent transformer conditioned on precomputed prompt embeddings."""

    text_conditioned = True
    prompt_keys: ClassVar[dict[str, str]] = {"prompt_embeds": "encoder_hidden_states"}
    """Prompt-bank tensor name -> transformer keyword argument, for the tensors the family needs."""
    optional_prompt_keys: ClassVar[dict[str, str]] = {}
    """Tensors passed along when the prompt bank has them (e.g. PixArt's attention mask)."""

    def prompt_dims(self) -> dict[str, int]:
        """Last-dimension size the transformer expects for each prompt-bank tensor."""
        return {}

    def prompt_inputs(self, conds_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """Transformer keyword arguments for condition ids, with clear errors for a bad prompt bank."""
        self.check_conditions(conds_B.reshape(-1).tolist())  # also raises when there is no prompt bank
        rows = self.prompts.lookup(conds_B.reshape(-1))
        missing = [k for k in self.prompt_keys if k not in rows]
        if missing:
            raise TideError(
                f"the {self.family} backbone needs {', '.join(f'`{k}`' for k in missing)} in the "
                f"prompt-embedding file (it has {', '.join(sorted(self.prompts.tensors))})")
        for key, dim in self.prompt_dims().items():
            if key in rows and rows[key].shape[-1] != dim:
                raise TideError(
                    f"prompt-embedding `{key}` has width {rows[key].shape[-1]} but this {self.family} "
                    f"transformer expects {dim}: the embeddings were made for a different model")
        out = {}
        for key, arg in {**self.prompt_keys, **self.optional_prompt_keys}.items():
            if key not in rows:
                continue
            value = rows[key].to(self.device)
            out[arg] = value.to(self.dtype) if value.is_floating_point() and not key.endswith("mask") else value
        return out

    def encode_conditions(self, conds_B):
        return self.prompt_inputs(conds_B)

    # ----------------------------------------------------------------------------- geometry
    joint_blocks: ClassVar[bool] = False
    """Whether ``transformer.transformer_blocks`` are two-stream (image + text) blocks."""
    block_mlp: ClassVar[str | None] = "ff"
    """The feed-forward child of a single-stream block that ``hook_mlp_out`` hooks (None: no such hook)."""

    def latent_shape(self):
        """(in_channels, H, W): the transformer's ``sample_size`` unless tide.json sets ``latent_size``."""
        cfg = self.transformer.config
        return (int(cfg.in_channels), *self.latent_hw(int(cfg.sample_size)))

    def blocks(self):
        return [BlockSpec(i, b, type(b).__name__, joint=self.joint_blocks, mlp_name=self.block_mlp)
                for i, b in enumerate(self.transformer.transformer_blocks)]

    def latent_hw(self, default: int) -> tuple[int, int]:
        """(height, width) of the latents: ``meta["latent_size"]`` when set, else ``default``."""
        size = self.meta.get("latent_size", default)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        p = self.patch_size
        ph, pw = (p, p) if isinstance(p, int) else tuple(p)[-2:]  # video: (frames, rows, cols) patches
        if h <= 0 or w <= 0 or h % ph or w % pw:
            raise TideError(f"latent size {h}x{w} of the {self.family} backbone must be positive and "
                            f"divisible by its patch size {ph}x{pw} (set `latent_size` in tide.json)")
        return int(h), int(w)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 when there is no VAE, as diffusers' pipelines assume)."""
        if self.vae is None:
            return 8
        return 2 ** (len(self.vae.config.block_out_channels) - 1)
