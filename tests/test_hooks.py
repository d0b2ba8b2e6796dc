import pytest
import torch

from tide.errors import TideError
from tide.hooks import COND, UNCOND, HookedBackbone, current_step
from tide.sampling import Intervention, SamplerConfig, sample


def _inputs(backbone, batch=2):
    c, h, w = backbone.latent_shape()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c, h, w, generator=g).to(backbone.device)
    cond = backbone.encode_conditions(torch.arange(batch, device=backbone.device) % backbone.num_classes)
    return x, torch.tensor(500, device=backbone.device), cond


def test_dit_hook_names_follow_transformer_lens_and_shapes_are_tokens_by_width(tiny_dit):
    hooked = HookedBackbone.of(tiny_dit)
    names = set(hooked.hook_names)
    for i in range(3):
        for suffix in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            assert f"blocks.{i}.{suffix}" in names
    assert len(names) == 12
    x, t, cond = _inputs(tiny_dit)
    _, cache = hooked.run_with_cache(x, t, cond)
    assert set(cache.keys()) == names
    for name, act in cache.items():
        assert tuple(act.shape) == (2, tiny_dit.num_tokens, tiny_dit.d_model) == (2, 16, 16), name
    # the residual stream flows: block i's output is block i+1's input
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    assert hooked.hook_shapes()["blocks.2.hook_resid_post"] == (16, 16)


def test_hooked_forward_equals_plain_forward_and_state_dict_is_unchanged(tiny_dit):
    x, t, cond = _inputs(tiny_dit)
    plain = tiny_dit.denoise(x, t, cond)
    keys_before = set(tiny_dit.transformer.state_dict())
    hooked = HookedBackbone.of(tiny_dit)
    assert HookedBackbone.of(tiny_dit) is hooked  # routing hooks are attached once
    torch.testing.assert_close(hooked(x, t, cond), plain)
    assert set(tiny_dit.transformer.state_dict()) == keys_before


def test_run_with_hooks_ablation_changes_the_output_and_only_while_active(tiny_dit):
    hooked = HookedBackbone.of(tiny_dit)
    x, t, cond = _inputs(tiny_dit)
    clean = hooked(x, t, cond)
    ablated = hooked.run_with_hooks(x, t, cond, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: torch.zeros_like(a))])
    assert (ablated - clean).abs().max() > 1e-3
    torch.testing.assert_close(hooked(x, t, cond), clean)


def test_hooks_are_removed_when_the_forward_raises(tiny_dit):
    hooked = HookedBackbone.of(tiny_dit)
    x, t, cond = _inputs(tiny_dit)
    calls = []

    def boom(act, hook):
        calls.append(hook.name)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hooked.run_with_hooks(x, t, cond, fwd_hooks=[("blocks.0.hook_resid_post", boom)])
    assert calls == ["blocks.0.hook_resid_post"]
    assert all(not hp.fwd_hooks for hp in hooked.hook_dict.values())
    hooked(x, t, cond)  # runs clean afterwards
    assert calls == ["blocks.0.hook_resid_post"]


def test_unknown_hook_name_lists_the_valid_ones(tiny_dit):
    hooked = HookedBackbone.of(tiny_dit)
    x, t, cond = _inputs(tiny_dit)
    with pytest.raises(TideError, match=r"unknown hook name\(s\) \['blocks.7.hook_resid_post'\].*blocks\.\{0\.\.2\}\.hook_resid_post"):
        hooked.run_with_hooks(x, t, cond, fwd_hooks=[("blocks.7.hook_resid_post", lambda a, hook: None)])
    with pytest.raises(TideError, match="valid hooks"):
        hooked.run_with_cache(x, t, cond, names_filter=["resid_post"])


def test_hooks_read_timestep_step_and_cfg_branch_from_the_sampler_context(tiny_dit):
    seen = []

    def record(act, hook):
        ctx = current_step()
        seen.append((ctx.step_index, ctx.timestep, ctx.cfg_branch_B.tolist(), ctx.sample_ids_B.tolist(),
                     ctx.conds_B.tolist(), act.shape[0]))

    cfg = SamplerConfig(num_steps=5, guidance_scale=2.0)
    sample(tiny_dit, [3, 1], seeds=[10, 11], config=cfg, interventions=[Intervention("blocks.0.hook_resid_post", record)])
    assert [s[0] for s in seen] == list(range(5))
    timesteps = [s[1] for s in seen]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 5
    for _, _, branch, ids, conds, batch in seen:
        assert batch == 4
        assert branch == [COND, COND, UNCOND, UNCOND]
        assert ids == [0, 1, 0, 1]
        assert conds == [3, 1, -1, -1]
    assert current_step() is None


def test_hook_names_parse_into_block_and_point_and_malformed_ones_name_the_form():
    from tide.hooks import HookName, is_text_hook

    assert HookName.parse("blocks.12.hook_img_resid_post") == HookName(12, "hook_img_resid_post")
    assert is_text_hook("blocks.0.hook_txt_resid_pre") and not is_text_hook("blocks.0.hook_resid_pre")
    for bad in ("blocks.x.hook_resid_post", "block.1.hook_resid_post", "blocks.1", "blocks.1.resid"):
        with pytest.raises(TideError, match="not of the form blocks.<index>.hook_<point>"):
            HookName.parse(bad)
