"""Tiny pipeline directories shaped like the published checkpoints, written by diffusers' own pipeline
classes: the same transformer classes and config keys (learned sigma, micro-conditions, dual attention,
qk-norm, guidance embedding, packed latents), the same scheduler classes and settings, the same VAE
latent channels and scaling/shift factors — only the widths and depths are tiny.

``build(name, path)`` writes the pipeline directory (plus tide's ``prompt_embeds.safetensors`` and
``tide.json`` for the text families) and returns a :class:`Checkpoint` that knows how to call the
diffusers pipeline on it with the same noise and prompt embeddings as tide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, DDIMScheduler, DiTTransformer2DModel,
                       DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                       PixArtTransformer2DModel, QwenImageTransformer2DModel, SanaTransformer2DModel,
                       SD3Transformer2DModel)

from tide.models import PromptBank
from tide.models.loading import PROMPTS_FILE, TIDE_META

TEXT_DIM, POOLED_DIM, TEXT_LEN, NUM_PROMPTS = 12, 6, 6, 2


def vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None) -> AutoencoderKL:
    """A 2x AutoencoderKL (8x8 latents -> 16x16 RGB) with the checkpoint's latent channels and factors."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1, sample_size=16,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def prompt_bank(pooled: bool, mask: bool) -> PromptBank:
    """Two prompts (the first padded) and a negative prompt, as precomputed text-encoder outputs."""
    g = torch.Generator().manual_seed(7)
    tensors = {"prompt_embeds": torch.randn(NUM_PROMPTS, TEXT_LEN, TEXT_DIM, generator=g),
               "negative_prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)}
    if pooled:
        tensors["pooled_prompt_embeds"] = torch.randn(NUM_PROMPTS, POOLED_DIM, generator=g)
        tensors["negative_pooled_prompt_embeds"] = torch.randn(1, POOLED_DIM, generator=g)
    if mask:
        m = torch.ones(NUM_PROMPTS, TEXT_LEN, dtype=torch.int64)
        m[0, 4:] = 0
        tensors["prompt_attention_mask"] = m
        tensors["negative_prompt_attention_mask"] = torch.ones(1, TEXT_LEN, dtype=torch.int64)
    return PromptBank(tensors, texts=["a red boat", "a cat on a wall"])


@dataclass
class Checkpoint:
    name: str
    path: Path
    pipeline_class: type
    run: Callable
    """run(pipe, conds, noise_BCHW, seeds, steps, guidance | None, output_type) -> latents (B, C, H, W) or images"""
    prompts: PromptBank | None = None
    legacy: bool = False
    """Saved in the Hub's legacy layout (``Transformer2DModel``)."""
    extra: dict = field(default_factory=dict)

    def pipeline(self, dtype: torch.dtype = torch.float32):
        """The pipeline as diffusers itself loads the directory (its text encoders were saved as absent)."""
        index = json.loads((self.path / "model_index.json").read_text())
        expected, _ = self.pipeline_class._get_signature_keys(self.pipeline_class)
        absent = {k: None for k in expected if index.get(k, [None, None])[0] is None}
        return self.pipeline_class.from_pretrained(self.path, local_files_only=True, torch_dtype=dtype, **absent)


def _legacy(path: Path, extra_keys: dict) -> None:
    """Rewrite a saved pipeline into the Hub's pre-0.28 layout: ``Transformer2DModel`` with its old keys."""
    index = json.loads((path / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    (path / "model_index.json").write_text(json.dumps(index))
    cfg_path = path / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"_class_name": "Transformer2DModel", "num_vector_embeds": None, "only_cross_attention": False,
                "use_linear_projection": False, "double_self_attention": False, **extra_keys})
    cfg.pop("use_additional_conditions", None)  # unknown to the legacy class: decided by sample_size == 128
    cfg_path.write_text(json.dumps(cfg))


def _np(images) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _text_call(pipe, bank, conds, pooled, mask):
    """The pipeline's prompt-embedding arguments for ``conds``, in the pipeline's dtype (as its text encoder
    would return them)."""
    idx = torch.tensor(conds)
    t = {k: v.to(pipe.transformer.dtype) if v.is_floating_point() else v for k, v in bank.tensors.items()}
    kw = {"prompt_embeds": t["prompt_embeds"][idx],
          "negative_prompt_embeds": t["negative_prompt_embeds"].expand(len(conds), -1, -1)}
    if pooled:
        kw["pooled_prompt_embeds"] = t["pooled_prompt_embeds"][idx]
        kw["negative_pooled_prompt_embeds"] = t["negative_pooled_prompt_embeds"].expand(len(conds), -1)
    if mask:
        kw["prompt_attention_mask"] = t["prompt_attention_mask"][idx]
        kw["negative_prompt_attention_mask"] = t["negative_prompt_attention_mask"].expand(len(conds), -1)
    return kw


# ------------------------------------------------------------------------------------------------ families
def _dit(path: Path) -> Checkpoint:
    from diffusers import DiTPipeline

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_type="ada_norm_zero")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                              clip_sample=False)
    labels = {i: f"class {i}" for i in range(1000)}
    DiTPipeline(transformer=transformer, vae=vae(4, 0.18215), scheduler=scheduler, id2label=labels).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in labels.items()}  # as the Hub's DiT-XL-2-256 model_index.json
    (path / "model_index.json").write_text(json.dumps(index))
    _legacy(path, {"cross_attention_dim": None})

    def run(pipe, conds, noise, seeds, steps, guidance, output_type):
        kw = {} if guidance is None else {"guidance_scale": guidance}
        # DiTPipeline draws its own noise: per-sample generators give tide's initial noise row by row
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe(class_labels=conds, generator=gens, num_inference_steps=steps, output_type="np", **kw).images
        return _np(out)

    return Checkpoint("dit-xl-2-256", path, DiTPipeline, run, legacy=True, extra={"latents": False})


def _pixart(path: Path, sigma: bool) -> Checkpoint:
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    torch.manual_seed(0)
    # sample_size 128 as both 1024-MS checkpoints: PixArt-alpha then uses micro-conditions (resolution, aspect
    # ratio); Sigma's config turns them off. tide.json's latent_size runs them at 8x8 latents.
    cfg = dict(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
               sample_size=128, patch_size=2, cross_attention_dim=24, caption_channels=TEXT_DIM,
               norm_type="ada_norm_single", num_embeds_ada_norm=1000)
    if sigma:
        cfg.update(use_additional_conditions=False, interpolation_scale=2)
    transformer = PixArtTransformer2DModel(**cfg)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                                            beta_end=0.02, prediction_type="epsilon", algorithm_type="dpmsolver++",
                                            solver_order=2, lower_order_final=True)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    cls(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae(4, 0.18215),
        scheduler=scheduler).save_pretrained(path)
    if not sigma:
        _legacy(path, {})
    bank = prompt_bank(pooled=False, mask=True)

    def run(pipe, conds, noise, seeds, steps, guidance, output_type):
        kw = {} if guidance is None else {"guidance_scale": guidance}
        out = pipe(**_text_call(pipe, bank, conds, False, True), negative_prompt=None, latents=noise.clone(),
                   num_inference_steps=steps,
                   height=16, width=16, use_resolution_binning=False, output_type=output_type, **kw).images
        return out if output_type == "latent" else _np(out)

    return Checkpoint("pixart-sigma-1024-ms" if sigma else "pixart-alpha-1024-ms", path, cls, run, bank,
                      legacy=not sigma, extra={"meta": {"latent_size": 8}})


def _sd3(path: Path, v35: bool) -> Checkpoint:
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(0)
    cfg = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
               pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16)
    if v35:  # SD3.5-medium: MMDiT-X dual attention in the first layers, RMS qk-norm
        cfg.update(dual_attention_layers=(0,), qk_norm="rms_norm")
    transformer = SD3Transformer2DModel(**cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    StableDiffusion3Pipeline(transformer=transformer, vae=vae(16, 1.5305, 0.0609), scheduler=scheduler,
                             text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                             text_encoder_3=None, tokenizer_3=None).save_pretrained(path)
    bank = prompt_bank(pooled=True, mask=False)

    def run(pipe, conds, noise, seeds, steps, guidance, output_type):
        kw = {} if guidance is None else {"guidance_scale": guidance}
        out = pipe(**_text_call(pipe, bank, conds, True, False), latents=noise.clone(), num_inference_steps=steps,
                   height=16, width=16, output_type=output_type, **kw).images
        return out if output_type == "latent" else _np(out)

    return Checkpoint("sd3.5-medium" if v35 else "sd3-medium", path, StableDiffusion3Pipeline, run, bank)


def _flux(path: Path, dev: bool) -> Checkpoint:
    from diffusers import FluxPipeline

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                         pooled_projection_dim=POOLED_DIM, guidance_embeds=dev, axes_dims_rope=(2, 2, 4))
    if dev:  # FLUX.1-dev: resolution-dependent shift
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
    else:  # FLUX.1-schnell: a fixed shift of 1
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, vae=vae(16, 0.3611, 0.1159), scheduler=scheduler, text_encoder=None,
                 tokenizer=None, text_encoder_2=None, tokenizer_2=None).save_pretrained(path)
    bank = prompt_bank(pooled=True, mask=False)

    def run(pipe, conds, noise, seeds, steps, guidance, output_type):
        b, c, h, w = noise.shape
        kw = _text_call(pipe, bank, conds, True, False)
        if dev:  # guidance is an input of the transformer; no negative prompt
            kw = {k: v for k, v in kw.items() if not k.startswith("negative")}
            if guidance is not None:
                kw["guidance_scale"] = guidance
        elif guidance is None or guidance == 1.0:
            kw = {k: v for k, v in kw.items() if not k.startswith("negative")}
        else:  # schnell has no guidance input: classifier-free guidance is the pipeline's "true CFG"
            kw["true_cfg_scale"] = guidance
        packed = FluxPipeline._pack_latents(noise.clone(), b, c, h, w)
        out = pipe(**kw, latents=packed, num_inference_steps=steps, height=2 * h, width=2 * w,
                   output_type=output_type).images
        if output_type == "latent":
            return FluxPipeline._unpack_latents(out, 2 * h, 2 * w, pipe.vae_scale_factor)
        return _np(out)

    return Checkpoint("flux.1-dev" if dev else "flux.1-schnell", path, FluxPipeline, run, bank,
                      extra={"meta": {"latent_size": 8}})


def _sana(path: Path) -> Checkpoint:
    from diffusers import AutoencoderDC, SanaPipeline

    torch.manual_seed(0)
    # SANA-1600M-1024px: linear attention, Gemma-2 captions, DC-AE latents (32 channels there), flow DPM-Solver
    transformer = SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=TEXT_DIM, sample_size=16,
                                         patch_size=1)  # SanaPipeline wants image sizes divisible by 32
    torch.manual_seed(1)
    autoencoder = AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8,
                                encoder_block_types=("ResBlock", "EfficientViTBlock"),
                                decoder_block_types=("ResBlock", "EfficientViTBlock"),
                                encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                                encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                                encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                                decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0, algorithm_type="dpmsolver++",
                                            solver_order=2, lower_order_final=True)
    SanaPipeline(tokenizer=None, text_encoder=None, vae=autoencoder, transformer=transformer,
                 scheduler=scheduler).save_pretrained(path)
    bank = prompt_bank(pooled=False, mask=True)

    def run(pipe, conds, noise, seeds, steps, guidance, output_type):
        kw = {} if guidance is None else {"guidance_scale": guidance}
        out = pipe(**_text_call(pipe, bank, conds, False, True), negative_prompt=None, latents=noise.clone(),
                   num_inference_steps=steps, height=2 * noise.shape[-2], width=2 * noise.shape[-1],
                   use_resolution_binning=False, output_type=output_type, **kw).images
        return out if output_type == "latent" else _np(out)

    return Checkpoint("sana-1600m-1024px", path, SanaPipeline, run, bank)


def _qwenimage(path: Path) -> Checkpoint:
    from diffusers import QwenImagePipeline

    torch.manual_seed(0)
    # Qwen/Qwen-Image: packed 2x2 latents (in_channels = 4 x latent channels), RMS qk-norm, 3-axis rotary
    # embedding (sum(axes_dims_rope) == attention_head_dim), no guidance embedding
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2,
                                              joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4))
    torch.manual_seed(1)
    # a one-frame video VAE as Qwen-Image's (2x here: one spatial downsampling), non-trivial latents_mean/std
    autoencoder = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                         temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                         latents_std=[1.5, 0.5, 2.0, 1.0])
    # Qwen/Qwen-Image's scheduler config: dynamic (exponential) shifting up to 8192 tokens, terminal sigma 0.02
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential", invert_sigmas=False,
                                                stochastic_sampling=False)
    QwenImagePipeline(scheduler=scheduler, vae=autoencoder, text_encoder=None, tokenizer=None,
                      transformer=transformer).save_pretrained(path)
    # as QwenImagePipeline.encode_prompt returns them: each prompt's hidden states zero-padded to the longest,
    # with the padding mask; prompt 0 has 4 tokens, prompt 1 all 6, the negative prompt 3
    g = torch.Generator().manual_seed(7)
    embeds = torch.randn(NUM_PROMPTS, TEXT_LEN, TEXT_DIM, generator=g)
    negative = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.ones(NUM_PROMPTS, TEXT_LEN, dtype=torch.int64)
    mask[0, 4:] = 0
    negative_mask = torch.ones(1, TEXT_LEN, dtype=torch.int64)
    negative_mask[0, 3:] = 0
    bank = PromptBank({"prompt_embeds": embeds * mask[..., None], "prompt_attention_mask": mask,
                       "negative_prompt_embeds": negative * negative_mask[..., None],
                       "negative_prompt_attention_mask": negative_mask}, texts=["a red boat", "a cat on a wall"])

    def run(pipe, conds, noise, seeds, steps, guidance, output_type):
        b, c, h, w = noise.shape
        kw = {k.replace("attention_mask", "embeds_mask"): v
              for k, v in _text_call(pipe, bank, conds, False, True).items()}
        if guidance == 1.0:  # no true CFG: the prompt rows alone
            kw = {k: v for k, v in kw.items() if not k.startswith("negative")}
        elif guidance is not None:
            kw["true_cfg_scale"] = guidance  # None: the pipeline's default true_cfg_scale
        # the pipeline draws (B, 1, C, H, W) noise and packs it: give it tide's noise, packed
        packed = QwenImagePipeline._pack_latents(noise.clone(), b, c, h, w)
        s = pipe.vae_scale_factor
        out = pipe(**kw, latents=packed, num_inference_steps=steps, height=s * h, width=s * w,
                   output_type=output_type).images
        if output_type == "latent":
            return QwenImagePipeline._unpack_latents(out, s * h, s * w, s)[:, :, 0]
        return _np(out)

    return Checkpoint("qwen-image", path, QwenImagePipeline, run, bank, extra={"meta": {"latent_size": 8}})


BUILDERS = {
    "dit-xl-2-256": _dit,
    "pixart-alpha-1024-ms": lambda p: _pixart(p, sigma=False),
    "pixart-sigma-1024-ms": lambda p: _pixart(p, sigma=True),
    "sana-1600m-1024px": _sana,
    "sd3-medium": lambda p: _sd3(p, v35=False),
    "sd3.5-medium": lambda p: _sd3(p, v35=True),
    "flux.1-dev": lambda p: _flux(p, dev=True),
    "flux.1-schnell": lambda p: _flux(p, dev=False),
    "qwen-image": _qwenimage,
}
"""Checkpoint name -> builder(path) -> Checkpoint."""


def build(name: str, path: Path) -> Checkpoint:
    """Write the tiny pipeline directory ``name`` at ``path`` with tide's prompt file and metadata."""
    ckpt = BUILDERS[name](path)
    if ckpt.prompts is not None:
        ckpt.prompts.save(path / PROMPTS_FILE)
    if ckpt.extra.get("meta"):
        (path / TIDE_META).write_text(json.dumps(ckpt.extra["meta"]))
    return ckpt
