"""The embedded text-conditioned model ``fmnist-pixart``: it loads offline exactly like a user's PixArt
checkpoint, samples what diffusers' own PixArtSigmaPipeline samples from the same directory, and its
vocabulary text encoder encodes any prompt over its words."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import PixArtSigmaPipeline

from tide.cli import main
from tide.config import EMBEDDED
from tide.errors import TideError
from tide.eval.fashion_mnist import CLASS_NAMES
from tide.hooks import HookedBackbone
from tide.models import PromptBank, load_backbone
from tide.models.pixart import PixArtBackbone
from tide.sampling import SamplerConfig, initial_noise, sample

ROOT = EMBEDDED["fmnist-pixart"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("fmnist-pixart", device="cpu")


def test_the_pipeline_directory_has_the_documented_layout_and_size():
    index = json.loads((ROOT / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    for part in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "text_encoder/vocab.json", "text_encoder/model.safetensors",
                 "prompt_embeds.safetensors", "classifier/model.safetensors", "tide.json"):
        assert (ROOT / part).is_file(), part
    assert not [p for p in ROOT.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    size = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert size <= 10_000_000


def test_it_loads_offline_as_a_pixart_text_backbone(backbone):
    assert isinstance(backbone, PixArtBackbone) and backbone.text_conditioned
    assert backbone.num_conditions == 10 and backbone.condition_names == CLASS_NAMES
    assert backbone.latent_shape() == (1, 28, 28) and backbone.num_tokens == 49
    assert len(backbone.blocks()) == 8 and backbone.vae is None
    cfg = backbone.transformer.config
    assert cfg.norm_type == "ada_norm_single" and not backbone.transformer.use_additional_conditions
    meta = json.loads((ROOT / "tide.json").read_text())
    assert backbone.default_guidance_scale == meta["guidance_scale"]


def test_condition_ids_are_the_bare_class_prompts_and_the_null_row_is_the_empty_prompt(backbone):
    bank = PromptBank.load(ROOT / "prompt_embeds.safetensors")
    words = backbone.vocabulary.groups["class"]
    assert bank.texts == words and [w for w in words] == [n.lower() for n in CLASS_NAMES]
    embeds, mask = backbone.vocabulary.encode(words)
    torch.testing.assert_close(bank.tensors["prompt_embeds"], embeds.float())
    assert torch.equal(bank.tensors["prompt_attention_mask"], mask)
    null_e, null_m = backbone.vocabulary.encode([""])
    torch.testing.assert_close(bank.tensors["negative_prompt_embeds"], null_e.float())
    assert null_m.tolist() == [[1] + [0] * (null_m.shape[1] - 1)]  # only the end token


def test_the_vocabulary_is_a_bag_of_words_with_aliases_and_clear_errors(backbone):
    vocab = backbone.vocabulary
    a, _ = vocab.encode(["dark small trouser"])
    b, _ = vocab.encode(["Trousers, small   DARK"])
    assert set(map(tuple, a[0].tolist())) == set(map(tuple, b[0].tolist()))
    c, _ = vocab.encode(["ankle boot"])
    d, _ = vocab.encode(["boot"])
    torch.testing.assert_close(c, d)
    with pytest.raises(TideError, match="unknown word 'red'"):
        vocab.encode(["red trouser"])
    with pytest.raises(TideError, match="2 brightness words"):
        vocab.encode(["dark light bag"])
    with pytest.raises(TideError, match="2 class words"):
        vocab.encode(["bag coat"])


def test_prompts_as_text_replace_the_condition_ids(backbone):
    custom = load_backbone("fmnist-pixart", prompts="dark trouser; light bag", device="cpu")
    assert custom.num_conditions == 2 and custom.condition_names == ["dark trouser", "light bag"]
    same = load_backbone("fmnist-pixart", prompts=["trouser"], device="cpu")
    out_a = sample(same, [0], [3], SamplerConfig(num_steps=3))
    out_b = sample(backbone, [1], [3], SamplerConfig(num_steps=3))  # condition 1 is the bare "trouser" prompt
    torch.testing.assert_close(out_a.latents, out_b.latents)
    with pytest.raises(TideError, match="unknown word"):
        load_backbone("fmnist-pixart", prompts="a purple hat", device="cpu")


@pytest.mark.parametrize("guidance", [None, 1.0])
def test_multi_step_samples_equal_diffusers_pixart_sigma_pipeline(backbone, guidance):
    """diffusers' own PixArtSigmaPipeline, loading the embedded directory itself, samples the same latents."""
    pipe = PixArtSigmaPipeline.from_pretrained(ROOT, local_files_only=True, text_encoder=None, tokenizer=None,
                                               vae=None)
    assert type(pipe.scheduler) is type(backbone.scheduler)
    prompts = ["sandal", "dark small coat", "light bag"]
    custom = load_backbone("fmnist-pixart", prompts=prompts, device="cpu")
    seeds, steps = [5, 6, 7], 6
    g = custom.resolve_guidance(guidance)
    ours = sample(custom, [0, 1, 2], seeds, SamplerConfig(num_steps=steps, guidance_scale=guidance))
    embeds, mask = custom.vocabulary.encode(prompts)
    null_e, null_m = custom.vocabulary.encode([""])
    ref = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
               negative_prompt_embeds=null_e.expand(3, -1, -1), negative_prompt_attention_mask=null_m.expand(3, -1),
               latents=initial_noise(custom, seeds), num_inference_steps=steps, guidance_scale=g,
               height=28 * 8, width=28 * 8, use_resolution_binning=False, output_type="latent").images
    torch.testing.assert_close(ours.latents, ref.float(), atol=1e-5, rtol=1e-5)
    assert ours.images.min() >= 0 and ours.images.max() <= 1 and ours.images.std() > 0.05


def test_hooks_see_the_image_tokens_of_every_block(backbone):
    shapes = HookedBackbone.of(backbone).hook_shapes()
    assert shapes["blocks.0.hook_resid_pre"] == (49, 128) and shapes["blocks.7.hook_resid_post"] == (49, 128)


def test_cli_samples_prompts_given_as_text(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--backbone", "fmnist-pixart", "--prompts", "dark sneaker; large bag", "--n", "2",
                 "--num-steps", "3", "--out", str(out), "--device", "cpu"]) == 0
    assert out.exists()
    capsys.readouterr()
    assert main(["sample", "--backbone", "fmnist-pixart", "--prompts", "dark hat", "--out", str(tmp_path / "x.png"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown word 'hat'" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_prompts_given_at_capture_follow_the_sae_into_steering(tmp_path):
    """An SAE trained on a capture of custom prompts records them; `tide steer` then reuses them, so condition
    ids keep meaning the captured prompts (not the checkpoint's ten class prompts)."""
    from tide.analysis.steering import SteerConfig
    from tide.capture import CaptureConfig, capture
    from tide.sae import load_sae
    from tide.train import SAESpec, TrainConfig, train

    prompts = "dark trouser; light bag"
    cap = CaptureConfig(backbone="fmnist-pixart", prompts=prompts, out=str(tmp_path / "ds"), num_samples=2,
                        num_steps=2, hooks=["blocks.4.hook_resid_post"], device="cpu")
    capture(cap, progress=False)
    train(TrainConfig(data=cap.out, out=str(tmp_path / "sae"), saes=[SAESpec(name="s", d_sae=32, k=4)], steps=2,
                      batch_size=32, warmup_steps=1, checkpoint_every=0, device="cpu"))
    assert load_sae(tmp_path / "sae" / "s").cfg.prompts == prompts
    result = SteerConfig(sae=str(tmp_path / "sae" / "s"), features=[0], alpha=1.0, n=1, num_steps=2, device="cpu",
                         out=str(tmp_path / "steer.png")).run()
    assert result.before.conds.tolist() == [0, 1]  # the two captured prompts, not ten class prompts
