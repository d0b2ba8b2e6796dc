"""Loading checkpoints offline: dtypes, local files only, safetensors only, and one clear line for each
thing a user can get wrong (through the CLI, exit status 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

from tide.cli import main
from tide.errors import TideError
from tide.models import PromptBank, load_backbone
from tide.models.loading import PROMPTS_FILE
from tide.sampling import SamplerConfig, sample

from tiny_checkpoints import build


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_loads_transformer_and_vae_in_it_and_samples_close_to_float32(dtype, tmp_path):
    ckpt = build("sd3-medium", tmp_path / "sd3")
    full = load_backbone(ckpt.path, device="cpu")
    half = load_backbone(ckpt.path, device="cpu", dtype=dtype)
    want = getattr(torch, dtype)
    assert half.dtype == want and next(half.vae.parameters()).dtype == want
    assert full.dtype == torch.float32
    cfg = SamplerConfig(num_steps=3)
    a, b = sample(full, [0, 1], [3, 4], cfg), sample(half, [0, 1], [3, 4], cfg)
    assert torch.isfinite(b.images).all() and b.images.dtype == torch.float32
    assert (a.images - b.images).abs().mean() < 0.05  # the same pictures, up to half-precision rounding
    assert (a.latents - b.latents).abs().max() > 0  # and really computed in the lower precision


def test_cli_dtype_flag_reaches_the_backbone_and_a_bad_one_is_one_line(tiny_dit_dir, capsys):
    assert main(["hooks", "--backbone", str(tiny_dit_dir), "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert "blocks.0.hook_resid_post" in capsys.readouterr().out
    assert main(["hooks", "--backbone", str(tiny_dit_dir), "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "unknown dtype 'int8': choose one of float32, bfloat16, float16" in err
    assert len(err.strip().splitlines()) == 1


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_a_relative_directory_without_weights_is_one_line_and_never_a_hub_lookup(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("tide tried to reach a model hub")

    for name in ("hf_hub_download", "snapshot_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, no_network)
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "my-dit"
    model.mkdir()
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=1, sample_size=8,
                          patch_size=2, num_embeds_ada_norm=2).save_config(model)
    err = _cli_error(["hooks", "--backbone", "my-dit", "--device", "cpu"], capsys)
    assert "my-dit" in err and "nothing is downloaded" in err
    # a Hub id is not a directory here: named as such, not fetched
    err = _cli_error(["hooks", "--backbone", "facebook/DiT-XL-2-256"], capsys)
    assert "no embedded model or checkpoint directory named 'facebook/DiT-XL-2-256'" in err


def test_pickled_weights_are_refused_not_unpickled(tmp_path, capsys):
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=1,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=2)
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "diffusion_pytorch_model.bin").exists()
    err = _cli_error(["hooks", "--backbone", str(tmp_path / "pickled"), "--device", "cpu"], capsys)
    assert "pickled (diffusion_pytorch_model.bin) and tide never unpickles" in err


def test_a_damaged_model_index_is_one_line(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text("{not json")
    assert "model_index.json is not valid JSON" in _cli_error(["hooks", "--backbone", str(tmp_path)], capsys)


def test_a_legacy_transformer2dmodel_of_another_norm_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "Transformer2DModel", "norm_type": "layer_norm"}))
    with pytest.raises(TideError, match="norm_type 'layer_norm' is neither a DiT .* nor a PixArt"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"negative_prompt_embeds": torch.zeros(1, 6, 7)},
     r"`negative_prompt_embeds` has shape \(1, 6, 7\) but `prompt_embeds` is \(2, 6, 12\).* must be \(1, 6, 12\)"),
    ({"negative_pooled_prompt_embeds": torch.zeros(2, 6)}, r"`negative_pooled_prompt_embeds` has shape \(2, 6\)"),
    ({"pooled_prompt_embeds": torch.zeros(3, 6)}, r"`pooled_prompt_embeds` must be \(2, width\) for 2 prompts"),
    ({"prompt_embeds": torch.zeros(2, 12)}, r"`prompt_embeds` must be \(prompts, tokens, width\)"),
    ({"prompt_mask": torch.zeros(2, 6)}, r"unknown tensor\(s\) \['prompt_mask'\]"),
])
def test_a_prompt_file_whose_tensors_do_not_fit_together_is_one_line(change, message, tmp_path, capsys):
    ckpt = build("sd3-medium", tmp_path / "sd3")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({**ckpt.prompts.tensors, **change}, str(bad))
    with pytest.raises(TideError, match=message):
        PromptBank.load(bad)
    err = _cli_error(["hooks", "--backbone", str(ckpt.path), "--prompts", str(bad), "--device", "cpu"], capsys)
    assert "prompt" in err and "Traceback" not in err
    assert (ckpt.path / PROMPTS_FILE).exists()  # the checkpoint's own prompt file is untouched
