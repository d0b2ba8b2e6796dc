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


# ------------------------------------------------------------------------------------------ the checks before loading
def _tiny_transformer_dir(path):
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=1,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=2)
    model.save_pretrained(path)
    return path / "diffusion_pytorch_model.safetensors"


def test_check_safetensors_reads_only_the_header_and_names_each_damage(tmp_path):
    from tide.models.loading import check_safetensors

    good = _tiny_transformer_dir(tmp_path / "m")
    check_safetensors(good)  # a real file passes
    data = good.read_bytes()
    cases = {
        b"": r"not a safetensors file \(empty\)",
        b"\x00" * 3: r"no valid safetensors header",
        (10**9).to_bytes(8, "little") + b"{}": r"no valid safetensors header",  # header longer than the file
        (8).to_bytes(8, "little") + b"not json": r"its header is not JSON",
        (2).to_bytes(8, "little") + b"[]": r"its header is not a JSON object",
        (13).to_bytes(8, "little") + b'{"w": {"a": 1}}'[:13]: r"header is not JSON|lists no tensor offsets",
        data[: len(data) - 10]: r"is truncated \(\d+ bytes; its header needs \d+\)",
    }
    for i, (content, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(TideError, match=message):
            check_safetensors(bad)


def test_check_weights_prefers_safetensors_refuses_pickles_and_checks_shards(tmp_path):
    from tide.models.loading import check_weights

    weights = _tiny_transformer_dir(tmp_path / "m")
    (tmp_path / "m" / "stale.bin").write_bytes(b"pickle")
    check_weights(tmp_path / "m", "transformer")  # safetensors present: a stray .bin is never looked at
    weights.unlink()
    with pytest.raises(TideError, match=r"pickled \(stale\.bin\) and tide never unpickles"):
        check_weights(tmp_path / "m", "transformer")
    (tmp_path / "m" / "stale.bin").unlink()
    with pytest.raises(TideError, match=r"holds no transformer weights .*found: config\.json"):
        check_weights(tmp_path / "m", "transformer")
    index = tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json"
    for weight_map, message in [({}, "no weight_map"), ({"a": "../../etc/passwd"}, "outside"),
                                ({"a": "shard-1.safetensors"}, r"shard\(s\) \['shard-1\.safetensors'\] .* missing")]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(TideError, match=message):
            check_weights(tmp_path / "m", "transformer")


@pytest.mark.parametrize("content, message", [
    ("{", "is not valid JSON"), ("[]", "holds a JSON list, not an object"), ("3", "holds a JSON int"),
    (b"\xff\xfe", "is not valid JSON"),
])
def test_read_json_wants_an_object(content, message, tmp_path):
    from tide.models.loading import _read_json

    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TideError, match=message):
        _read_json(path)
    with pytest.raises(TideError, match="is missing: the checkpoint directory is incomplete"):
        _read_json(tmp_path / "nothing.json")


def test_a_pipeline_loads_the_same_after_the_checks(tiny_dit_dir):
    backbone = load_backbone(tiny_dit_dir, device="cpu")
    assert backbone.family == "dit" and backbone.num_conditions == 4
    assert type(backbone.scheduler).__name__ == "DDIMScheduler"


@pytest.mark.parametrize("name, message", [
    ("gpu0", "unknown device 'gpu0'"), ("cuda:x", "unknown device 'cuda:x'"), ("mps", "unknown device 'mps'"),
    ("", "unknown device ''"), ("cuda:-1", "unknown device"), ("cpu0", "unknown device"),
])
def test_resolve_device_names_the_accepted_forms(name, message):
    from tide.device import resolve_device

    with pytest.raises(TideError, match=message + r".*use cpu, cuda, cuda:N \(N a GPU index\) or auto"):
        resolve_device(name)


def test_resolve_device_accepts_its_forms():
    from tide.device import resolve_device

    assert resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == torch.device("cuda:0")
    else:
        with pytest.raises(TideError, match="no CUDA GPU is visible: use --device cpu"):
            resolve_device("cuda:0")


def test_load_backbone_refuses_a_bad_device_before_reading_the_checkpoint(tmp_path):
    # the directory does not even exist: the device is the first thing checked
    with pytest.raises(TideError, match="unknown device 'gpu0'"):
        load_backbone(tmp_path / "nothing", device="gpu0")
