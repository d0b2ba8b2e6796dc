"""Wan (``WanTransformer3DModel``, video): parity of tide's sampling loop with ``WanPipeline`` on a tiny
pipeline directory written by diffusers itself, the (frame, row, col) token order, hooks, and a capture
through the CLI whose rows map back to the right space-time patch."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch

from tide.cli import main
from tide.data import ActivationStore, coords_token, token_coords
from tide.errors import TideError
from tide.hooks import HookedBackbone
from tide.models import load_backbone
from tide.models.loading import TIDE_META
from tide.models.wan import WanBackbone
from tide.sampling import SamplerConfig, initial_noise, sample

from wan_checkpoint import (D_MODEL, FRAMES, GRID, HEIGHT, LATENT_FRAMES, LATENT_H, LATENT_W, WIDTH, build,
                            load_pipeline, run_pipeline)

STEPS = 3
CONDS, SEEDS = [0, 1], [11, 12]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny 3-D VAE's many small convolutions run ~10x faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wan_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {kind: build(root / kind, kind) for kind in ("unipc", "flow-euler")}


def _check_parity(path, guidance):
    backbone = load_backbone(path, device="cpu")
    out = sample(backbone, CONDS, SEEDS, SamplerConfig(num_steps=STEPS, guidance_scale=guidance))
    noise = initial_noise(backbone, SEEDS)
    pipe = load_pipeline(path)
    latents = run_pipeline(pipe, path, CONDS, noise, STEPS, guidance, "latent")
    torch.testing.assert_close(out.latents, latents.float(), atol=1e-4, rtol=1e-4)
    video_BFCHW = run_pipeline(pipe, path, CONDS, noise, STEPS, guidance, "pt")
    assert out.images.shape == (2, 3, FRAMES, HEIGHT, WIDTH)  # (B, C, F, H, W)
    torch.testing.assert_close(out.images, video_BFCHW.permute(0, 2, 1, 3, 4).float(), atol=1e-4, rtol=1e-4)
    return out


@pytest.mark.parametrize("kind", ["unipc", "flow-euler"])
def test_wan_sampling_with_cfg_equals_wan_pipeline_latents_and_video(kind, wan_dirs):
    out = _check_parity(wan_dirs[kind], 5.0)
    assert out.latents.shape == (2, 4, LATENT_FRAMES, LATENT_H, LATENT_W)
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_wan_sampling_without_guidance_equals_the_pipeline_and_differs_from_cfg(wan_dirs):
    path = wan_dirs["unipc"]
    plain = _check_parity(path, 1.0)
    guided = sample(load_backbone(path, device="cpu"), CONDS, SEEDS, SamplerConfig(num_steps=STEPS, guidance_scale=5.0))
    assert (plain.latents - guided.latents).abs().max() > 1e-3  # the null condition (negative prompt) matters


def test_wan_22_ti2v_expanded_timesteps_equal_the_pipeline(tmp_path):
    path = build(tmp_path / "ti2v", "unipc", expand_timesteps=True)
    assert load_backbone(path, device="cpu").expand_timesteps
    _check_parity(path, 5.0)


def test_wan_loads_as_its_family_with_pipeline_defaults_and_geometry(wan_dirs):
    wan = load_backbone(wan_dirs["unipc"], device="cpu")
    assert isinstance(wan, WanBackbone) and wan.family == "wan"
    assert type(wan.scheduler).__name__ == "UniPCMultistepScheduler" and wan.scheduler.config.use_flow_sigmas
    assert wan.default_guidance_scale == 5.0 and wan.uses_cfg(5.0)
    assert wan.latent_shape() == (4, LATENT_FRAMES, LATENT_H, LATENT_W) and wan.is_video
    assert wan.patch_size == (1, 2, 2) and wan.patch_grid == GRID and wan.num_tokens == 36
    assert wan.d_model == D_MODEL and wan.pixel_frames == FRAMES
    assert wan.prompts.texts == ["a cat walking", "a boat at sea"]
    assert [b.kind for b in wan.blocks()] == ["WanTransformerBlock"] * 2


def test_wan_default_frames_follow_the_pipeline_and_bad_frames_are_refused(wan_dirs, tmp_path):
    wan = load_backbone(wan_dirs["unipc"], device="cpu")
    wan.meta.pop("latent_frames")
    assert wan.latent_frames == (81 - 1) // 4 + 1  # WanPipeline's 81 frames through the 4x temporal VAE
    wan.meta["latent_frames"] = 0
    with pytest.raises(TideError, match="latent_frames 0 of the wan backbone must be a positive number of latent frames"):
        wan.latent_shape()
    wan.meta.update(latent_frames=3, latent_size=[6, 80])  # 40 token columns > rope_max_seq_len 32
    with pytest.raises(TideError, match="exceeds the transformer's rope_max_seq_len 32"):
        wan.latent_shape()


def test_wan_tokens_are_frame_row_col_row_major(wan_dirs):
    """Perturb one latent patch: only the token at its (frame, row, col) changes after the patch embedding."""
    wan = load_backbone(wan_dirs["unipc"], device="cpu")
    hooked = HookedBackbone.of(wan)
    cond = wan.encode_conditions(torch.tensor([0]))
    x = torch.zeros(1, *wan.latent_shape())
    frame, row, col = 2, 1, 3
    bumped = x.clone()
    bumped[0, :, frame, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = 1.0  # patch (1, 2, 2)
    with torch.no_grad():
        _, base = hooked.run_with_cache(x, torch.tensor(500), cond, names_filter="blocks.0.hook_resid_pre")
        _, hit = hooked.run_with_cache(bumped, torch.tensor(500), cond, names_filter="blocks.0.hook_resid_pre")
    changed = torch.nonzero((hit["blocks.0.hook_resid_pre"] - base["blocks.0.hook_resid_pre"]).abs().amax(-1)[0] > 0)
    token = (frame * GRID[1] + row) * GRID[2] + col
    assert changed.flatten().tolist() == [token] == [coords_token((frame, row, col), GRID)]
    assert token_coords(token, GRID) == (frame, row, col)


def test_wan_hooks_fire_at_the_blocks_attention_and_ffn(wan_dirs, capsys):
    wan = load_backbone(wan_dirs["unipc"], device="cpu")
    hooked = HookedBackbone.of(wan)
    shapes = hooked.hook_shapes()
    for i in range(2):
        for name in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            assert shapes[f"blocks.{i}.{name}"] == (36, D_MODEL)
    block = wan.transformer.blocks[1]
    seen = {}
    handles = [block.ffn.register_forward_hook(lambda m, a, o: seen.__setitem__("ffn", o)),
               block.attn1.register_forward_hook(lambda m, a, o: seen.__setitem__("attn1", o)),
               block.register_forward_hook(lambda m, a, o: seen.__setitem__("block", o))]
    x = torch.randn(1, *wan.latent_shape(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = hooked.run_with_cache(x, torch.tensor(500), wan.encode_conditions(torch.tensor([1])))
    for h in handles:
        h.remove()
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"], seen["ffn"])
    torch.testing.assert_close(cache["blocks.1.hook_attn_out"], seen["attn1"])
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], seen["block"])
    assert hooked.default_hook() == "blocks.1.hook_resid_post"

    assert main(["hooks", "--backbone", str(wan_dirs["unipc"]), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "36 image tokens (3x3x4 patches: frames x rows x cols" in printed
    assert re.search(rf"^blocks\.1\.hook_mlp_out +\(36, {D_MODEL}\) +WanTransformerBlock$", printed, re.M)


def test_wan_capture_through_the_cli_verifies_and_rows_map_to_their_space_time_patch(wan_dirs, tmp_path, capsys):
    path, out = wan_dirs["unipc"], tmp_path / "capture"
    hook = "blocks.0.hook_resid_pre"
    assert main(["capture", "--backbone", str(path), "--out", str(out), "--hooks", hook, "--num-samples", "2",
                 "--samples-per-shard", "2", "--num-steps", "2", "--record-steps", "0", "--token-fraction", "0.5",
                 "--storage-dtype", "float32", "--device", "cpu"]) == 0
    assert main(["data", "verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["patch_grid"] == list(GRID) and manifest["num_tokens"] == 36 and manifest["tokens_kept"] == 18
    assert manifest["backbone"]["family"] == "wan" and manifest["backbone"]["latent_shape"] == [4, 3, 6, 8]
    assert manifest["config"]["guidance_scale"] == 5.0

    # the block-0 input at step 0 is the patch embedding of the initial noise: each stored row must equal
    # the embedding of the patch at (frame, row, col) = token_coords(token)
    store = ActivationStore(out)
    acts, meta = store.read(0, 0, store.shards[0].rows, [hook], ["sample_id", "token"])
    wan = load_backbone(path, device="cpu")
    with torch.no_grad():
        emb_BDFHW = wan.transformer.patch_embedding(initial_noise(wan, [0, 1]))  # seeds = seed 0 + sample id
    frame, row, col = store.token_coords(meta["token"])
    expected = emb_BDFHW[torch.from_numpy(meta["sample_id"].astype(np.int64)), :, frame, row, col].numpy()
    np.testing.assert_allclose(acts[hook], expected, atol=1e-5)
    assert len(set(frame.tolist())) > 1 and len(meta["token"]) == 2 * 18
    with h5py.File(store.shards[0].path) as f:
        assert f["token"].dtype == np.int16  # 36 tokens fit; int32 only past 32768


def test_wan_without_frames_meta_and_two_expert_pipelines_are_explained(wan_dirs, tmp_path):
    path = build(tmp_path / "a14b", "unipc")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    with pytest.raises(TideError, match="two-expert Wan 2.2 pipelines .* are not supported"):
        load_backbone(path, device="cpu")
    (path / "model_index.json").write_text(json.dumps(index))
    (path / TIDE_META).write_text(json.dumps({"latent_frames": 3, "latent_size": [6, 7]}))
    with pytest.raises(TideError, match="latent size 6x7 of the wan backbone must be positive and divisible by its "
                                        "patch size 2x2"):
        load_backbone(path, device="cpu").latent_shape()


def test_wan_sample_command_writes_a_grid_of_film_strips(wan_dirs, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["sample", "--backbone", str(wan_dirs["unipc"]), "--n", "1", "--num-steps", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    width, height = Image.open(out).size
    assert width > 4 * height  # 8 of the 9 frames (64x48 each) side by side, not one frame


def test_wan_bare_transformer_directory_gets_wans_scheduler(wan_dirs, tmp_path):
    wan = load_backbone(wan_dirs["unipc"], device="cpu")
    wan.transformer.save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / TIDE_META).write_text(json.dumps({"latent_frames": 2, "latent_size": 4}))
    bare = load_backbone(tmp_path / "bare", device="cpu")
    assert isinstance(bare, WanBackbone) and bare.vae is None and bare.prompts is None
    assert type(bare.scheduler).__name__ == "UniPCMultistepScheduler" and bare.scheduler.config.flow_shift == 3.0
    assert bare.latent_shape() == (4, 2, 4, 4) and bare.patch_grid == (2, 2, 2)
    with pytest.raises(TideError, match="the wan backbone is text-conditioned and needs prompt embeddings"):
        bare.encode_conditions(torch.tensor([0]))
