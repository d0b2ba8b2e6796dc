"""Every backbone family (DiT, PixArt, SD3, FLUX) behind one interface, built tiny from real diffusers
classes: one denoising step with a CFG batch, decoding, pipeline directories written by diffusers'
own pipeline classes and loaded back, and the errors users meet."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from tide.errors import TideError
from tide.models import FAMILIES, NULL_CONDITION, PromptBank, load_backbone
from tide.models.loading import PROMPTS_FILE, TIDE_META

# Helpers live here rather than in a tests/models/conftest.py: a second module named `conftest` would
# shadow tests/conftest.py for the test files that import from it.
TEXT_DIM, POOLED_DIM, TEXT_LEN, NUM_PROMPTS = 12, 6, 5, 3

TINY_CONFIGS = {
    # latent 4x8x8, learned sigma (8 output channels) as DiT-XL/2
    "dit": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=3, norm_type="ada_norm_zero"),
    "pixart": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=TEXT_DIM),
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
                pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16),
    # packed channels 16 = 4 latent channels x 2x2; sum(axes_dims_rope) == attention_head_dim
    "flux": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
                 guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
}
TINY_META = {"flux": {"latent_size": 8}}
"""FLUX's config has no sample size: tide.json's ``latent_size`` sets it."""


def make_vae() -> AutoencoderKL:
    """A 2x AutoencoderKL with 4 latent channels (decodes 8x8 latents to 16x16 RGB images)."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=16)


def make_prompts() -> PromptBank:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(NUM_PROMPTS, TEXT_LEN, dtype=torch.int64)
    mask[0, 3:] = 0  # a short prompt, padded
    return PromptBank({"prompt_embeds": torch.randn(NUM_PROMPTS, TEXT_LEN, TEXT_DIM, generator=g),
                       "pooled_prompt_embeds": torch.randn(NUM_PROMPTS, POOLED_DIM, generator=g),
                       "prompt_attention_mask": mask},
                      texts=["a cat", "a dog", "a boat"])


def make_backbone(family: str, device="cpu", **overrides):
    cls = FAMILIES[family]
    torch.manual_seed(0)
    backbone = cls.from_config({**TINY_CONFIGS[family], **overrides}, vae=make_vae(), meta=TINY_META.get(family),
                               prompts=make_prompts() if cls.text_conditioned else None)
    return backbone.to(device)


@pytest.fixture
def tiny_backbone(device):
    """Factory: ``tiny_backbone(family, **config_overrides)`` -> a randomly initialised tiny backbone
    with a VAE (and prompts)."""
    return lambda family, **overrides: make_backbone(family, device, **overrides)


FAMILY_NAMES = ["dit", "pixart", "sd3", "flux"]
BLOCK_KINDS = {
    "dit": ["BasicTransformerBlock"] * 2,
    "pixart": ["BasicTransformerBlock"] * 2,
    "sd3": ["JointTransformerBlock"] * 2,
    "flux": ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 2,
}


def _cfg_batch(backbone):
    """A classifier-free-guidance batch: latents [x0, x1, x0, x1] with conditions [0, 1, null, null]."""
    c, h, w = backbone.latent_shape()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, c, h, w, generator=g).repeat(2, 1, 1, 1).to(backbone.device)
    conds = torch.tensor([0, 1, NULL_CONDITION, NULL_CONDITION], device=backbone.device)
    return x, conds


def _first_step(backbone):
    """The scheduler's first timestep, set up the way the sampler does it."""
    backbone.scheduler.set_timesteps(4, **backbone.scheduler_kwargs(4))
    return backbone.scheduler.timesteps[0]


def _save_pipeline(backbone, path):
    """A pipeline directory written by the real diffusers pipeline class (text encoders left out)."""
    from diffusers import DiTPipeline, FluxPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline

    parts = dict(transformer=backbone.transformer, vae=backbone.vae, scheduler=backbone.scheduler)
    if backbone.family == "dit":
        pipe = DiTPipeline(**parts)
    elif backbone.family == "pixart":
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, **parts)
    elif backbone.family == "sd3":
        pipe = StableDiffusion3Pipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                        text_encoder_3=None, tokenizer_3=None, **parts)
    else:
        pipe = FluxPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, **parts)
    pipe.save_pretrained(path)
    if backbone.prompts is not None:
        backbone.prompts.save(path / PROMPTS_FILE)
    if backbone.meta:
        (path / TIDE_META).write_text(json.dumps(backbone.meta))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_denoise_step_on_a_cfg_batch_returns_latent_shape_and_decodes_to_unit_range(family, tiny_backbone):
    backbone = tiny_backbone(family)
    c, h, w = backbone.latent_shape()
    assert (c, h, w) == (4, 8, 8)
    x, conds = _cfg_batch(backbone)
    t = _first_step(backbone)
    with torch.no_grad():
        out = backbone.denoise(x, t, backbone.encode_conditions(conds))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    # the condition reaches the model: cond rows differ from null rows on the same latents
    assert not torch.allclose(out[0], out[2])
    x_prev = backbone.scheduler.step(out[:2], t, x[:2]).prev_sample
    images = backbone.decode(x_prev)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_blocks_and_residual_width_match_what_each_block_returns(family, tiny_backbone):
    """The hook contract: block kinds, numbering, and each block's output (tensor, or (text, image))."""
    backbone = tiny_backbone(family)
    blocks = backbone.blocks()
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert [b.kind for b in blocks] == BLOCK_KINDS[family]
    assert all(b.joint == (family in ("sd3", "flux")) for b in blocks)
    outputs = {}
    handles = [b.module.register_forward_hook(lambda m, a, o, i=b.index: outputs.__setitem__(i, o)) for b in blocks]
    x, conds = _cfg_batch(backbone)
    with torch.no_grad():
        backbone.denoise(x, torch.tensor(500.0), backbone.encode_conditions(conds))
    for h in handles:
        h.remove()
    image_shape = (4, backbone.num_tokens, backbone.d_model)
    assert backbone.num_tokens == 16 and backbone.d_model == 16 and backbone.patch_grid == (4, 4)
    for b in blocks:
        out = outputs[b.index]
        if not b.joint:
            assert out.shape == image_shape
            continue
        text, image = out
        assert image.shape == image_shape
        if family == "sd3" and b.index == len(blocks) - 1:
            assert text is None  # context_pre_only: the last SD3 block drops the text stream
        else:
            assert text.shape == (4, 5, backbone.d_model)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pipeline_directory_loads_back_with_same_outputs(family, tiny_backbone, tmp_path, device):
    backbone = tiny_backbone(family)
    _save_pipeline(backbone, tmp_path / family)
    loaded = load_backbone(tmp_path / family, device=device)
    assert type(loaded) is FAMILIES[family]
    assert loaded.vae is not None
    assert type(loaded.scheduler) is type(backbone.scheduler)
    assert loaded.latent_shape() == backbone.latent_shape()
    if backbone.text_conditioned:
        assert loaded.prompts.texts == backbone.prompts.texts
    x, conds = _cfg_batch(backbone)
    t = _first_step(backbone)
    assert _first_step(loaded) == t
    with torch.no_grad():
        expected = backbone.denoise(x, t, backbone.encode_conditions(conds))
        got = loaded.denoise(x, t, loaded.encode_conditions(conds))
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(loaded.decode(x), backbone.decode(x))


def test_flux_packs_2x2_patches_and_embeds_guidance_instead_of_doubling_the_batch(tiny_backbone):
    from diffusers import FluxPipeline

    flux = tiny_backbone("flux")
    x = torch.randn(2, 4, 8, 8, device=flux.device)
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
    assert packed.shape == (2, flux.num_tokens, 16)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 8, 8, 1), x)

    assert flux.uses_cfg(5.0) is False and flux.default_guidance_scale == 3.5  # FluxPipeline's default
    assert flux.guidance_inputs(5.0) == {"guidance_scale": 5.0}
    cond = flux.encode_conditions(torch.tensor([0, 0], device=flux.device))
    with torch.no_grad():
        a = flux.denoise(x, torch.tensor(500.0), {**cond, **flux.guidance_inputs(5.0)})
        b = flux.denoise(x, torch.tensor(500.0), {**cond, **flux.guidance_inputs(1.0)})
        default = flux.denoise(x, torch.tensor(500.0), cond)
        c = flux.denoise(x, torch.tensor(500.0), {**cond, **flux.guidance_inputs(3.5)})
    assert not torch.allclose(a, b)
    torch.testing.assert_close(default, c)

    kwargs = flux.scheduler_kwargs(4)
    assert kwargs["sigmas"] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert "mu" in kwargs  # dynamic shifting from the image sequence length (16 tokens)


def test_flux_without_guidance_embeds_uses_ordinary_cfg(tiny_backbone):
    flux = tiny_backbone("flux", guidance_embeds=False)
    assert flux.uses_cfg(5.0) is True and flux.uses_cfg(1.0) is False
    assert flux.default_guidance_scale == 1.0 and flux.guidance_inputs(5.0) == {}  # schnell: no CFG by default
    x, conds = _cfg_batch(flux)
    with torch.no_grad():
        out = flux.denoise(x, _first_step(flux), flux.encode_conditions(conds))
    assert out.shape == x.shape


def test_pixart_micro_conditions_are_passed_when_the_config_uses_them(tiny_backbone):
    # the micro-condition embedders split the width in three: 3 heads of 8
    pixart = tiny_backbone("pixart", use_additional_conditions=True, num_attention_heads=3, cross_attention_dim=24)
    assert pixart.transformer.use_additional_conditions
    x, conds = _cfg_batch(pixart)
    with torch.no_grad():
        out = pixart.denoise(x, torch.tensor(999), pixart.encode_conditions(conds))
    assert out.shape == x.shape
    assert not torch.allclose(out[0], out[2])


# ------------------------------------------------------------------------------------------------ errors
def test_loading_a_missing_directory_names_it(tmp_path):
    with pytest.raises(TideError, match="no embedded model or checkpoint directory named .*nowhere"):
        load_backbone(tmp_path / "nowhere")


def test_loading_a_pipeline_with_an_unsupported_transformer_class_names_the_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "transformer": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(TideError, match="unsupported model class 'UNet2DConditionModel'.*SD3Transformer2DModel"):
        load_backbone(tmp_path)


def test_loading_a_unet_pipeline_says_a_transformer_is_needed(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(TideError, match="lists no transformer"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_text_family_without_prompts_asks_for_prompt_embeddings(family, tiny_backbone, tmp_path):
    backbone = tiny_backbone(family)
    backbone.prompts = None
    _save_pipeline(backbone, tmp_path / family)
    loaded = load_backbone(tmp_path / family)
    assert loaded.prompts is None
    with pytest.raises(TideError, match=f"the {family} backbone is text-conditioned and needs prompt embeddings"):
        loaded.encode_conditions(torch.tensor([0, NULL_CONDITION]))


def test_prompt_bank_without_pooled_embeddings_or_of_the_wrong_width_is_refused(tiny_backbone):
    sd3 = tiny_backbone("sd3")
    bank = sd3.prompts
    sd3.prompts = PromptBank({"prompt_embeds": bank.tensors["prompt_embeds"]})
    with pytest.raises(TideError, match="needs `pooled_prompt_embeds`"):
        sd3.encode_conditions(torch.tensor([0]))
    sd3.prompts = PromptBank({**bank.tensors, "prompt_embeds": torch.zeros(3, 5, 7)})
    with pytest.raises(TideError, match="width 7 but this sd3 transformer expects 12"):
        sd3.encode_conditions(torch.tensor([0]))
    sd3.prompts = bank
    with pytest.raises(TideError, match=r"unknown prompt id\(s\) \[3\]"):
        sd3.encode_conditions(torch.tensor([3]))
