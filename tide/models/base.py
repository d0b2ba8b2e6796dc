"""The small interface every backbone family implements.

A backbone owns a diffusers transformer, the scheduler it was trained with, and (for latent models)
the VAE that turns latents into pictures. It knows how to run *one* denoising step with its
conditioning; the sampling loop lives in :mod:`tide.sampling`.

Conditions are integers everywhere in tide: a class id for class-conditional families, an index
into a prompt-embedding file for text families. ``NULL_CONDITION`` (-1) is the unconditional input
used by classifier-free guidance.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from tide.errors import TideError

NULL_CONDITION = -1
"""Condition id of the unconditional (null) input used for classifier-free guidance."""


def patch_dims(patch_size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """``patch_size`` as one entry per latent axis after the channels: an int repeats ``ndim`` times."""
    if isinstance(patch_size, int):
        return (patch_size,) * ndim
    dims = tuple(int(p) for p in patch_size)
    if len(dims) != ndim:
        raise TideError(f"patch size {dims} has {len(dims)} axes but the latents have {ndim} after the channels")
    return dims


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block of a backbone, as the hooks see it."""

    index: int
    """Position in tide's block numbering (``blocks.{index}``)."""
    module: nn.Module
    """The diffusers block module."""
    kind: str
    """Block class name, e.g. ``BasicTransformerBlock`` or ``FluxSingleTransformerBlock``."""
    joint: bool
    """True for two-stream (MMDiT) blocks that carry image and text streams."""
    attn_name: str | None = "attn1"
    """Attribute of the block holding its self-attention (``hook_attn_out``); None = not hooked."""
    mlp_name: str | None = "ff"
    """Attribute of the block holding its feed-forward network (``hook_mlp_out``), e.g. ``ff`` in
    diffusers' image blocks, ``ffn`` in Wan's; None = not hooked."""


def reader_block(hook: str, num_blocks: int) -> int:
    """The block whose first norm reads the residual stream at ``hook`` (``num_blocks``: the output norm)."""
    parts = hook.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in ("hook_resid_pre", "hook_resid_post"):
        raise TideError(f"hook {hook!r} is not read by an adaLN norm: use a blocks.N.hook_resid_pre or "
                        "blocks.N.hook_resid_post hook, or modulation_init: zero")
    block = int(parts[1]) + (parts[2] == "hook_resid_post")
    if block > num_blocks:
        raise TideError(f"hook {hook!r} names block {parts[1]}, but the backbone has {num_blocks} blocks")
    return block


class Backbone(nn.Module, abc.ABC):
    """A diffusers transformer + scheduler (+ VAE) behind one interface."""

    family: ClassVar[str]
    """Short family name used in configs and the CLI (``dit``, ``pixart``, ``sd3``, ``flux``)."""
    transformer_class: ClassVar[type[nn.Module]]
    """The diffusers transformer class this adapter drives."""
    text_conditioned: ClassVar[bool] = False
    """True when conditions index a prompt-embedding file instead of class labels."""
    pipeline_guidance_scale: ClassVar[float] = 1.0
    """Default guidance scale of the family's diffusers pipeline (1.0 = no classifier-free guidance)."""
    vocabulary: Any = None
    """The checkpoint's vocabulary text encoder (:class:`tide.models.vocabulary.Vocabulary`) when it ships one
    (``fmnist-pixart``): prompts over its words are encoded offline. None for other checkpoints."""

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        vae: nn.Module | None = None,
        meta: dict | None = None,
        prompts: "PromptBank | None" = None,
    ):
        super().__init__()
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.scheduler = scheduler
        self.meta = dict(meta or {})
        self.prompts = prompts
        self.name = self.meta.get("name", self.family)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: dict, scheduler: Any | None = None, vae: nn.Module | None = None,
                    meta: dict | None = None, prompts: "PromptBank | None" = None) -> "Backbone":
        """A randomly initialised backbone from a transformer config dict (tiny models for tests)."""
        transformer = cls.transformer_class.from_config(config)
        return cls(transformer, scheduler if scheduler is not None else cls.default_scheduler(), vae,
                   meta, prompts)

    @staticmethod
    @abc.abstractmethod
    def default_scheduler() -> Any:
        """The scheduler used when a checkpoint ships none."""

    # ----------------------------------------------------------------------------- geometry
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype the sampler keeps the latents in, as the family's pipeline does: the weights' dtype
        (DiT, PixArt, SD3, FLUX), or float32 where the pipeline keeps float32 latents (SANA, Wan)."""
        return self.dtype

    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """(channels, height, width) of the tensor the sampler denoises; (channels, frames, height,
        width) for video families."""

    @property
    def is_video(self) -> bool:
        """True when latents carry a frame axis: (C, F, H, W) latents and a (frames, rows, cols) grid."""
        return len(self.latent_shape()) == 4

    @property
    def num_tokens(self) -> int:
        """Image tokens (patches) per sample in the residual stream: the product of :attr:`patch_grid`."""
        return math.prod(self.patch_grid)

    @property
    def patch_grid(self) -> tuple[int, ...]:
        """(rows, cols) of the image-token grid; (frames, rows, cols) for video. Tokens are flattened
        row-major over it (the last axis varies fastest)."""
        extent = self.latent_shape()[1:]
        return tuple(int(n) // p for n, p in zip(extent, patch_dims(self.patch_size, len(extent))))

    @property
    def patch_size(self) -> int | tuple[int, ...]:
        """Latent pixels per token: an int (square patches) for image families, a tuple
        (frames, rows, cols) for video families."""
        return int(self.transformer.config.patch_size)

    @property
    def d_model(self) -> int:
        cfg = self.transformer.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim)

    @abc.abstractmethod
    def blocks(self) -> list[BlockSpec]:
        """The transformer blocks in tide's numbering."""

    # ----------------------------------------------------------------------------- conditioning
    @property
    def num_conditions(self) -> int:
        """Number of valid condition ids (classes or prompts)."""
        if self.text_conditioned:
            return len(self.prompts) if self.prompts is not None else 0
        return self.num_classes

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def conditions_are_classes(self) -> bool:
        """Whether condition id c asks for class c (class-conditional families, and prompt banks whose i-th prompt is
        class i, as the embedded ``fmnist-pixart``'s own bank): then a classifier's prediction can be checked against it."""
        return not self.text_conditioned or bool(self.meta.get("class_names"))

    @property
    def condition_names(self) -> list[str]:
        """Human-readable name of each condition id."""
        names = self.meta.get("class_names")
        if names:
            return list(names)
        if self.text_conditioned and self.prompts is not None:
            return list(self.prompts.texts)
        return [str(i) for i in range(self.num_conditions)]

    def check_conditions(self, conds: Sequence[int], allow_null: bool = True) -> None:
        """Raise a clear error for condition ids this backbone does not know; ``allow_null``: the null condition
        (-1, the unconditional input) passes too."""
        n = self.num_conditions
        if self.text_conditioned and self.prompts is None:
            raise TideError(
                f"the {self.family} backbone is text-conditioned and needs prompt embeddings: pass a "
                "prompt-embedding file (safetensors with `prompt_embeds`) as `prompts=`/--prompts")
        bad = sorted({int(c) for c in conds if not (allow_null and c == NULL_CONDITION) and not 0 <= int(c) < n})
        if bad:
            what = "prompt" if self.text_conditioned else "class"
            null = f"; {NULL_CONDITION} (the null condition) is not one here" if NULL_CONDITION in bad else ""
            raise TideError(f"unknown {what} id(s) {bad}: valid ids are 0..{n - 1} "
                            f"({', '.join(self.condition_names[:12])}{', ...' if n > 12 else ''}){null}")

    @abc.abstractmethod
    def encode_conditions(self, conds_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batched model inputs (class labels or prompt embeddings) for condition ids ``conds_B``."""

    # ----------------------------------------------------------------------------- one step
    @abc.abstractmethod
    def denoise(self, latents_BCHW: torch.Tensor, t: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model output the scheduler expects (noise or velocity), shaped like the latents.

        ``t`` is the scheduler's timestep (a scalar tensor); ``cond`` comes from
        :meth:`encode_conditions`.
        """

    def forward(self, latents_BCHW: torch.Tensor, t: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.denoise(latents_BCHW, t, cond)

    # ----------------------------------------------------------------------------- adaLN
    def reader_modulation(self, hook: str, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale_BD, shift_BD) of the adaLN that reads the residual stream at ``hook`` (``resid_pre`` of block i, or
        ``resid_post`` of block i - 1): the next norm computes ``LN(x) * (1 + scale) + shift`` at timestep ``t_B``.
        Families whose modulation also reads the condition use the null condition. Not every family has one."""
        raise TideError(f"the {self.family} backbone does not expose the adaLN modulation that reads {hook!r}: "
                        "use modulation_init: zero")

    # ----------------------------------------------------------------------------- guidance
    @property
    def default_guidance_scale(self) -> float:
        """The guidance scale used when none is given: ``guidance_scale`` in tide.json, else the
        default of the family's diffusers pipeline (:attr:`pipeline_guidance_scale`)."""
        return float(self.meta.get("guidance_scale", self.pipeline_guidance_scale))

    def resolve_guidance(self, guidance_scale: float | None) -> float:
        """``guidance_scale``, or the backbone's default when it is None."""
        return self.default_guidance_scale if guidance_scale is None else float(guidance_scale)

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether sampling at this guidance scale doubles the batch with null conditions."""
        return guidance_scale != 1.0

    def combine_guidance(self, out_cond: torch.Tensor, out_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance from the conditional and unconditional outputs, as the family's
        pipeline combines them (``uncond + scale * (cond - uncond)``; a family may rescale)."""
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    def guidance_inputs(self, guidance_scale: float) -> dict[str, Any]:
        """Extra conditioning entries that carry the guidance scale into the model itself
        (guidance-distilled checkpoints); empty for classifier-free guidance."""
        return {}

    def scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        """Extra keyword arguments for ``scheduler.set_timesteps(num_steps, ...)``.

        Empty for most families; flow-matching families with resolution-dependent shifting
        return ``mu`` (and FLUX its custom ``sigmas``), as their diffusers pipelines do.
        """
        return {}

    def make_scheduler(self, num_steps: int) -> Any:
        """A fresh copy of the backbone's scheduler with ``num_steps`` timesteps set, as the family's
        diffusers pipeline sets them."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps, device=self.device, **self.scheduler_kwargs(num_steps))
        return scheduler

    # ----------------------------------------------------------------------------- pictures
    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], shape (B, C, H, W) (video families: (B, C, F, H, W)): through the VAE
        for latent models."""
        if self.vae is None:
            scale = self.meta.get("pixel_scale", 1.0)
            images = latents_BCHW / scale
        else:
            cfg = self.vae.config
            latents = latents_BCHW.to(self.vae.dtype) / cfg.scaling_factor
            if getattr(cfg, "shift_factor", None) is not None:
                latents = latents + cfg.shift_factor
            images = self.vae.decode(latents).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def identity_hash(self) -> str:
        """SHA-256 over the transformer's config and weights: identifies the model a dataset came from."""
        from tide.io import tensors_hash

        config = {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")}
        return tensors_hash(self.transformer.state_dict().items(), config)

    def describe(self) -> dict:
        """A JSON-able description: family, sizes, scheduler; used in provenance records."""
        return {
            "family": self.family,
            "name": self.name,
            "transformer_class": type(self.transformer).__name__,
            "scheduler_class": type(self.scheduler).__name__,
            "latent_shape": list(self.latent_shape()),
            "num_blocks": len(self.blocks()),
            "d_model": self.d_model,
            "num_tokens": self.num_tokens,
            "num_conditions": self.num_conditions,
            "has_vae": self.vae is not None,
        }


class PromptBank:
    """Precomputed prompt embeddings for text-conditioned families (no text encoder runs here).

    File format (safetensors): ``prompt_embeds`` (P, L, D) and, as the family needs,
    ``pooled_prompt_embeds`` (P, Dp) and ``prompt_attention_mask`` (P, L); optional
    ``negative_*`` counterparts with a leading dimension of 1 serve as the null condition
    (zeros when absent). Metadata key ``prompts`` holds a JSON list of the prompt texts.
    """

    KEYS = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")

    def __init__(self, tensors: dict[str, torch.Tensor], texts: Sequence[str] | None = None):
        if "prompt_embeds" not in tensors:
            raise TideError("prompt-embedding file has no `prompt_embeds` tensor (P, L, D)")
        self.check_shapes(tensors)
        self.tensors = tensors
        n = tensors["prompt_embeds"].shape[0]
        self.texts = list(texts) if texts is not None else [f"prompt {i}" for i in range(n)]
        if len(self.texts) != n:
            raise TideError(f"prompt-embedding file lists {len(self.texts)} prompt texts for {n} rows of "
                            "`prompt_embeds`: write one text per row (PromptBank.save does)")

    @classmethod
    def check_shapes(cls, tensors: dict[str, torch.Tensor]) -> None:
        """One clear error for tensors that do not fit together: ``prompt_embeds`` (P, L, D),
        ``pooled_prompt_embeds`` (P, Dp), ``prompt_attention_mask`` (P, L), and each ``negative_*``
        shaped like its positive counterpart with a leading dimension of 1."""
        embeds = tensors["prompt_embeds"]
        if embeds.dim() != 3:
            raise TideError(f"`prompt_embeds` must be (prompts, tokens, width), got shape {tuple(embeds.shape)}")
        p, length, _ = embeds.shape
        expected = {"prompt_attention_mask": (p, length)}
        for key in cls.KEYS:
            if key not in tensors:
                continue
            got = tuple(tensors[key].shape)
            want = expected.get(key)
            if key == "pooled_prompt_embeds" and (len(got) != 2 or got[0] != p):
                raise TideError(f"`pooled_prompt_embeds` must be ({p}, width) for {p} prompts, got {got}")
            if want is not None and got != want:
                raise TideError(f"`{key}` has shape {got} but `prompt_embeds` is {tuple(embeds.shape)}: it must be "
                                f"{want}")
            neg = tensors.get("negative_" + key)
            if neg is not None and tuple(neg.shape) != (1, *got[1:]):
                raise TideError(f"`negative_{key}` has shape {tuple(neg.shape)} but `{key}` is {got}: the negative "
                                f"(unconditional) row must be {(1, *got[1:])}, made by the same text encoder "
                                "with the same padding length")
        unknown = sorted(set(tensors) - set(cls.KEYS) - {"negative_" + k for k in cls.KEYS})
        if unknown:
            raise TideError(f"prompt-embedding file has unknown tensor(s) {unknown}: tide reads "
                            f"{', '.join(cls.KEYS)} and their negative_* counterparts")

    def __len__(self) -> int:
        return self.tensors["prompt_embeds"].shape[0]

    @classmethod
    def load(cls, path) -> "PromptBank":
        import json
        from pathlib import Path

        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise TideError(f"prompt-embedding file {path} does not exist")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises several types for bad files
            raise TideError(f"cannot read prompt-embedding file {path}: {exc} "
                            "(expected a safetensors file)") from exc
        texts = json.loads(meta["prompts"]) if "prompts" in meta else None
        return cls(tensors, texts)

    def save(self, path) -> None:
        import json

        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path),
                  metadata={"prompts": json.dumps(self.texts)})

    def lookup(self, conds_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows for each condition id; ``NULL_CONDITION`` rows take the negative (or zero) embedding."""
        out = {}
        null = conds_B == NULL_CONDITION
        idx = conds_B.clamp(min=0).cpu()
        for key in self.KEYS:
            if key not in self.tensors:
                continue
            rows = self.tensors[key][idx]
            neg = self.tensors.get("negative_" + key)
            if neg is None:
                neg = torch.ones_like(rows[:1]) if key.endswith("mask") else torch.zeros_like(rows[:1])
            rows = torch.where(null.cpu().view(-1, *([1] * (rows.dim() - 1))), neg.to(rows.dtype), rows)
            out[key] = rows
        return out
