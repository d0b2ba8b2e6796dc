"""Parity with diffusers' own pipelines: for every supported checkpoint layout, tide's multi-step
sampling from a pipeline directory gives the latents and images that the diffusers pipeline class,
loading the same directory itself, gives from the same initial noise and prompt embeddings.

The directories are tiny but shaped like the published checkpoints (see ``tiny_checkpoints.py``): DiT-XL/2
(the Hub's legacy ``Transformer2DModel`` layout, learned sigma, 1000 classes, CFG), PixArt-α (legacy
layout, micro-conditions, attention mask, DPM-Solver), PixArt-Σ, SANA (linear attention, DC-AE,
flow DPM-Solver), SD3 and SD3.5 (flow matching,
dual attention, qk-norm), FLUX.1-dev (guidance embedding, dynamic shifting, packed latents) and
FLUX.1-schnell (fixed shift, "true CFG"), Qwen-Image (packed latents, text padding mask, dynamic
shifting with a terminal sigma, norm-rescaled "true CFG", a one-frame video VAE).
"""

from __future__ import annotations

import json

import pytest
import torch

from tide.cli import main
from tide.errors import TideError
from tide.hooks import HookedBackbone
from tide.models import PromptBank, load_backbone
from tide.sampling import SamplerConfig, initial_noise, sample

from tiny_checkpoints import BUILDERS, build

CHECKPOINTS = list(BUILDERS)
STEPS = 4
CONDS, SEEDS = [0, 1], [11, 12]
FAMILY = {"dit-xl-2-256": "dit", "pixart-alpha-1024-ms": "pixart", "pixart-sigma-1024-ms": "pixart",
          "sana-1600m-1024px": "sana",
          "sd3-medium": "sd3", "sd3.5-medium": "sd3", "flux.1-dev": "flux", "flux.1-schnell": "flux",
          "qwen-image": "qwenimage"}
DEFAULT_GUIDANCE = {"dit": 4.0, "pixart": 4.5, "sana": 4.5, "sd3": 7.0, "flux.1-dev": 3.5, "flux.1-schnell": 1.0,
                    "qwenimage": 4.0}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build(name, root / name) for name in CHECKPOINTS}


def _compare(ckpt, backbone, pipe, guidance):
    """tide's samples vs the pipeline's, at one guidance setting (None = both use their defaults)."""
    out = sample(backbone, CONDS, SEEDS, SamplerConfig(num_steps=STEPS, guidance_scale=guidance))
    noise = initial_noise(backbone, SEEDS)
    if ckpt.extra.get("latents", True):  # DiTPipeline has no latent output
        ref = ckpt.run(pipe, CONDS, noise, SEEDS, STEPS, guidance, "latent")
        torch.testing.assert_close(out.latents, ref.float(), atol=1e-5, rtol=1e-5)
    images = ckpt.run(pipe, CONDS, noise, SEEDS, STEPS, guidance, "np")
    torch.testing.assert_close(out.images, images.float(), atol=1e-5, rtol=1e-5)
    return out


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_multi_step_samples_equal_the_diffusers_pipeline_with_and_without_guidance(name, checkpoints):
    ckpt = checkpoints[name]
    backbone = load_backbone(ckpt.path, device="cpu")
    pipe = ckpt.pipeline()
    assert type(backbone.transformer) is type(pipe.transformer)
    assert type(backbone.scheduler) is type(pipe.scheduler)
    default = DEFAULT_GUIDANCE.get(name, DEFAULT_GUIDANCE.get(FAMILY[name]))
    assert backbone.default_guidance_scale == default  # the pipeline's own default
    guided = _compare(ckpt, backbone, pipe, None)
    plain = _compare(ckpt, backbone, pipe, 1.0)
    assert guided.images.std() > 0.01  # not a degenerate picture
    if default != 1.0:  # guidance reached the model: the two settings give different samples
        assert (guided.latents - plain.latents).abs().max() > 1e-3


def test_flux_schnell_classifier_free_guidance_equals_the_pipelines_true_cfg(checkpoints):
    ckpt = checkpoints["flux.1-schnell"]
    backbone = load_backbone(ckpt.path, device="cpu")
    out = _compare(ckpt, backbone, ckpt.pipeline(), 4.0)
    plain = sample(backbone, CONDS, SEEDS, SamplerConfig(num_steps=STEPS, guidance_scale=1.0))
    assert (out.latents - plain.latents).abs().max() > 1e-3


@pytest.mark.parametrize("name,family_class", [("dit-xl-2-256", "DiTTransformer2DModel"),
                                               ("pixart-alpha-1024-ms", "PixArtTransformer2DModel")])
def test_hub_legacy_transformer2dmodel_layout_loads_as_its_family(name, family_class, checkpoints):
    ckpt = checkpoints[name]
    index = json.loads((ckpt.path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "Transformer2DModel"]
    backbone = load_backbone(ckpt.path, device="cpu")
    assert type(backbone.transformer).__name__ == family_class
    if name == "dit-xl-2-256":
        assert backbone.num_classes == 1000 and backbone.condition_names[3] == "class 3"  # from id2label
    else:
        assert backbone.transformer.use_additional_conditions  # sample_size 128: micro-conditions on


def test_pixart_sigma_runs_without_micro_conditions(checkpoints):
    backbone = load_backbone(checkpoints["pixart-sigma-1024-ms"].path, device="cpu")
    assert not backbone.transformer.use_additional_conditions


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-medium"])
def test_sd3_last_block_has_no_text_output_hook_and_asking_for_it_names_the_valid_ones(name, checkpoints):
    hooked = HookedBackbone.of(load_backbone(checkpoints[name].path, device="cpu"))
    last = len(hooked.block_specs) - 1
    shapes = hooked.hook_shapes()
    assert set(shapes) == set(hooked.hook_names)  # every listed hook fires
    assert f"blocks.{last}.hook_txt_resid_post" not in shapes
    assert f"blocks.{last}.hook_txt_resid_pre" in shapes and f"blocks.{last - 1}.hook_txt_resid_post" in shapes
    with pytest.raises(TideError, match=rf"unknown hook name.*blocks.{last}.hook_txt_resid_post.*valid hooks: "):
        hooked.run_with_cache(torch.zeros(1), 0, {}, names_filter=f"blocks.{last}.hook_txt_resid_post")


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_cli_lists_hooks_captures_and_verifies_every_family(name, checkpoints, tmp_path, capsys):
    path = str(checkpoints[name].path)
    assert main(["hooks", "--backbone", path]) == 0
    listing = capsys.readouterr().out
    hooked = HookedBackbone.of(load_backbone(path, device="cpu"))
    hook = hooked.default_hook()
    assert hook in listing and f"{FAMILY[name]} backbone" in listing
    out = tmp_path / "capture"
    assert main(["capture", "--backbone", path, "--out", str(out), "--hooks", hook, "--num-samples", "3",
                 "--num-steps", "3", "--samples-per-shard", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 2
    assert manifest["total_rows"] == 3 * 3 * hooked.backbone.num_tokens
    # the guidance actually used is recorded: the checkpoint's own default
    assert manifest["config"]["guidance_scale"] == hooked.backbone.default_guidance_scale
    capsys.readouterr()
    assert main(["data", "verify", str(out)]) == 0
    assert "ok" in capsys.readouterr().out.lower()


def test_sana_hooks_the_residual_stream_and_attention_but_not_its_convolutional_feed_forward(checkpoints):
    hooked = HookedBackbone.of(load_backbone(checkpoints["sana-1600m-1024px"].path, device="cpu"))
    shapes = hooked.hook_shapes()
    n, d = hooked.backbone.num_tokens, hooked.backbone.d_model
    assert n == 256 and shapes["blocks.1.hook_resid_post"] == (n, d) == shapes["blocks.0.hook_attn_out"]
    assert not any(name.endswith("hook_mlp_out") for name in shapes)  # its FFN sees (D, rows, cols) maps


@pytest.mark.parametrize("name", ["pixart-sigma-1024-ms", "sana-1600m-1024px", "sd3.5-medium", "flux.1-dev",
                                  "qwen-image"])
def test_bfloat16_samples_equal_the_pipeline_loaded_in_bfloat16(name, checkpoints):
    """--dtype bfloat16 runs as the pipeline does with torch_dtype=bfloat16, latents in the dtype the
    pipeline keeps them in (the weights' for PixArt/SD3/FLUX/Qwen-Image, float32 for SANA)."""
    ckpt = checkpoints[name]
    backbone = load_backbone(ckpt.path, device="cpu", dtype="bfloat16")
    pipe = ckpt.pipeline(torch.bfloat16)
    out = sample(backbone, CONDS, SEEDS, SamplerConfig(num_steps=STEPS))
    noise = initial_noise(backbone, SEEDS)
    assert noise.dtype == (torch.float32 if FAMILY[name] == "sana" else torch.bfloat16)
    ref = ckpt.run(pipe, CONDS, noise, SEEDS, STEPS, None, "latent")
    torch.testing.assert_close(out.latents, ref.float(), atol=1e-5, rtol=1e-5)


def test_qwen_image_prompts_padded_with_their_mask_equal_each_prompt_trimmed_and_alone(checkpoints):
    """tide batches prompts of different lengths (and the negative prompt, under CFG) padded to one length with
    the padding mask; QwenImagePipeline given one prompt from its text encoder gets it trimmed, with no mask.
    The transformer masks padded text tokens, so both give the same samples (to float rounding)."""
    from diffusers import QwenImagePipeline

    ckpt = checkpoints["qwen-image"]
    backbone = load_backbone(ckpt.path, device="cpu")
    pipe = ckpt.pipeline()
    t = ckpt.prompts.tensors
    lengths = t["prompt_attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1] and t["negative_prompt_attention_mask"].sum() < t["prompt_embeds"].shape[1]
    out = sample(backbone, CONDS, SEEDS, SamplerConfig(num_steps=STEPS))
    noise = initial_noise(backbone, SEEDS)
    _, c, h, w = noise.shape
    s = pipe.vae_scale_factor
    neg_len = int(t["negative_prompt_attention_mask"].sum())
    for row, cond in enumerate(CONDS):
        ref = pipe(prompt_embeds=t["prompt_embeds"][cond:cond + 1, :lengths[cond]],
                   negative_prompt_embeds=t["negative_prompt_embeds"][:, :neg_len],
                   latents=QwenImagePipeline._pack_latents(noise[row:row + 1].clone(), 1, c, h, w),
                   num_inference_steps=STEPS, height=s * h, width=s * w, output_type="latent").images
        ref = QwenImagePipeline._unpack_latents(ref, s * h, s * w, s)[:, :, 0]
        torch.testing.assert_close(out.latents[row:row + 1], ref, atol=1e-5, rtol=1e-5)
    # without its mask the padding would reach the image: the mask is what makes the two agree
    unmasked = {k: v for k, v in t.items() if "mask" not in k}
    plain = sample(load_backbone(ckpt.path, device="cpu", prompts=PromptBank(unmasked, ckpt.prompts.texts)), CONDS,
                   SEEDS, SamplerConfig(num_steps=STEPS))
    assert (plain.latents - out.latents).abs().max() > 1e-3


def test_qwen_image_refuses_configs_its_pipeline_cannot_run():
    from tide.models.qwenimage import QwenImageBackbone

    cfg = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=12, axes_dims_rope=(2, 2, 4))
    with pytest.raises(TideError, match="guidance_embeds"):
        QwenImageBackbone.from_config({**cfg, "guidance_embeds": True})
    with pytest.raises(TideError, match="use_additional_t_cond"):
        QwenImageBackbone.from_config({**cfg, "use_additional_t_cond": True})
