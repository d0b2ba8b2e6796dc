import pytest
import torch

from tide.errors import TideError
from tide.hooks import current_step
from tide.sampling import Intervention, SamplerConfig, sample


def test_same_seed_gives_the_same_image_and_other_seeds_differ(tiny_dit):
    cfg = SamplerConfig(num_steps=6, guidance_scale=1.5)
    a = sample(tiny_dit, [1, 2], seeds=[7, 8], config=cfg)
    b = sample(tiny_dit, [1, 2], seeds=[7, 8], config=cfg)
    c = sample(tiny_dit, [1, 2], seeds=[70, 80], config=cfg)
    assert torch.equal(a.images, b.images)
    assert (a.latents - c.latents).abs().max() > 0.1
    assert a.images.shape == (2, 1, 8, 8) and 0 <= a.images.min() and a.images.max() <= 1


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sample_regenerated_alone_equals_its_slot_in_a_batch(tiny_dit, guidance):
    cfg = SamplerConfig(num_steps=6, guidance_scale=guidance, batch_size=3)  # 5 samples -> batches of 3 and 2
    batch = sample(tiny_dit, [0, 1, 2, 3, 0], seeds=[100, 101, 102, 103, 104], config=cfg)
    for i in (0, 2, 4):
        alone = sample(tiny_dit, [batch.conds[i].item()], seeds=[104 if i == 4 else 100 + i], config=cfg)
        # equal up to the float rounding of batched matrix products
        torch.testing.assert_close(alone.latents[0], batch.latents[i], atol=1e-4, rtol=1e-4)


def test_stochastic_scheduler_noise_is_per_sample_too(tiny_dit):
    cfg = SamplerConfig(num_steps=6, eta=1.0)
    batch = sample(tiny_dit, [0, 1], seeds=[5, 6], config=cfg)
    alone = sample(tiny_dit, [1], seeds=[6], config=cfg)
    torch.testing.assert_close(alone.latents[0], batch.latents[1], atol=1e-4, rtol=1e-4)


def test_cfg_changes_the_sample_and_guidance_one_runs_no_null_half(tiny_dit):
    sizes = []
    rec = Intervention("blocks.0.hook_resid_pre", lambda a, hook: sizes.append(a.shape[0]))
    plain = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=4, guidance_scale=1.0), interventions=[rec])
    guided = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=4, guidance_scale=4.0), interventions=[rec])
    assert sizes == [1] * 4 + [2] * 4
    assert (plain.latents - guided.latents).abs().max() > 1e-3


def test_guidance_defaults_to_the_family_pipeline_unless_tide_json_sets_it(tiny_dit):
    assert tiny_dit.default_guidance_scale == 4.0  # DiTPipeline's default
    default = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=3))
    four = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=3, guidance_scale=4.0))
    torch.testing.assert_close(default.latents, four.latents)
    tiny_dit.meta["guidance_scale"] = 1.0
    one = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=3, guidance_scale=1.0))
    torch.testing.assert_close(sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=3)).latents, one.latents)


def test_intervention_acts_only_inside_its_step_window(tiny_dit):
    cfg = SamplerConfig(num_steps=8)
    clean = sample(tiny_dit, [2], seeds=[1], config=cfg)
    active = []

    def zero(act, hook):
        active.append(current_step().step_index)
        return torch.zeros_like(act)

    late = sample(tiny_dit, [2], seeds=[1], config=cfg, interventions=[Intervention("blocks.1.hook_resid_post", zero, steps=(6, 8))])
    assert active == [6, 7]
    assert (late.latents - clean.latents).abs().max() > 1e-4
    # a timestep window selects the same steps by value
    ts = []
    sample(tiny_dit, [2], seeds=[1], config=cfg,
           interventions=[Intervention("blocks.1.hook_resid_post", lambda a, hook: ts.append(current_step().timestep), timesteps=(0, 300))])
    assert ts and all(t <= 300 for t in ts)


def test_branch_restricted_intervention_leaves_the_other_branch_alone(tiny_dit):
    seen = {}

    def zero(act, hook):
        return torch.zeros_like(act)

    def after(act, hook):
        seen["act"] = act.clone()

    cfg = SamplerConfig(num_steps=2, guidance_scale=2.0)
    sample(tiny_dit, [1, 2], seeds=[1, 2], config=cfg,
           interventions=[Intervention("blocks.0.hook_resid_post", zero, branch="uncond"),
                          Intervention("blocks.1.hook_resid_pre", after)])
    act = seen["act"]  # block 1's input = block 0's output, rows [cond, cond, uncond, uncond]
    assert act[2:].abs().max() == 0
    assert act[:2].abs().max() > 0


def test_window_outside_the_schedule_and_bad_conditions_are_refused(tiny_dit):
    cfg = SamplerConfig(num_steps=5)
    with pytest.raises(TideError, match="active at no step of the 5-step schedule"):
        sample(tiny_dit, [0], config=cfg, interventions=[Intervention("blocks.0.hook_resid_post", lambda a, hook: None, steps=(7, 9))])
    with pytest.raises(TideError, match=r"unknown class id\(s\) \[9\]: valid ids are 0..3"):
        sample(tiny_dit, [9], config=cfg)
    with pytest.raises(TideError, match="one seed per sample"):
        sample(tiny_dit, [0, 1], seeds=[1], config=cfg)
    with pytest.raises(TideError, match="branch"):
        Intervention("blocks.0.hook_resid_post", lambda a, hook: None, branch="positive")
