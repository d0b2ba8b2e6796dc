import pytest
import torch

from tide.analysis.feature_patch import feature_effects, sample_patched, sample_removed, sample_transferred
from tide.errors import TideError
from tide.hooks import HookedBackbone, step_context
from tide.models.base import NULL_CONDITION
from tide.sae.config import SAEConfig
from tide.sae.model import SAE
from tide.sampling import SamplerConfig, Trajectory, sample

HOOK = "blocks.1.hook_resid_post"
CFG = SamplerConfig(num_steps=3, guidance_scale=2.0)


def make_sae(device, conditioning="tide", target="activation", k=8):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=k, normalization="none", conditioning=conditioning, hook=HOOK,
                        target=target))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_dec.normal_(std=0.2)
        if sae.modulation is not None:
            for p in sae.modulation.parameters():
                p.normal_(std=0.3)
    return sae.to(device).eval()


def one_step_reference(backbone, sae, conds, targets, seeds, keep=None, ref_seeds=None):
    """One patched step computed another way: both activations from run_with_cache, the patch as the difference of
    the SAE's reconstructions (restricted to ``keep`` features by zeroing the others' latents), set by a plain
    replacing hook, guidance and the scheduler step from the Trajectory."""
    cfg = SamplerConfig(num_steps=1, guidance_scale=2.0)
    hooked = HookedBackbone.of(backbone)
    traj = Trajectory(backbone, conds, seeds, list(range(len(conds))), cfg)
    other = Trajectory(backbone, targets, ref_seeds or seeds, list(range(len(conds))), cfg)
    step, o_step = next(iter(traj)), next(iter(other))
    n = len(conds)
    with step_context(o_step.ctx), torch.no_grad():
        _, cache_b = hooked.run_with_cache(other.model_input(o_step), o_step.t, other.cond, names_filter=[HOOK])
    with step_context(step.ctx), torch.no_grad():
        _, cache_a = hooked.run_with_cache(traj.model_input(step), step.t, traj.cond, names_filter=[HOOK])
    h_b, h_a = cache_b[HOOK][:n], cache_a[HOOK][:n]
    t = torch.full((h_a.shape[0] * h_a.shape[1],), float(step.t), device=h_a.device)

    def latents(h):
        z = sae.encode(h.reshape(-1, h.shape[-1]), t)
        if keep is not None:
            z = z * torch.isin(torch.arange(z.shape[-1], device=z.device), keep.to(z.device))
        return z

    with torch.no_grad():
        folded = sae.fold(float(step.t))
        delta = ((latents(h_b) - latents(h_a)) @ folded.W_dec[0]).reshape(h_a.shape)
    patched = h_a + delta

    def swap(act, hook):
        act = act.clone()
        act[:n] = patched
        return act

    traj.advance(step, traj.predict(step, [(HOOK, swap)]))
    return traj.x


@pytest.mark.parametrize("conditioning", ["none", "tide"])
def test_one_step_patch_equals_the_reconstruction_difference(tiny_dit, device, conditioning):
    sae = make_sae(device, conditioning)
    conds, targets, seeds = [0, 1, NULL_CONDITION], [2, 2, 3], [5, 6, 7]
    want = one_step_reference(tiny_dit, sae, conds, targets, seeds)
    got = sample_patched(tiny_dit, sae, conds, targets, seeds, SamplerConfig(num_steps=1, guidance_scale=2.0),
                         decode=False).latents
    plain = sample(tiny_dit, conds, seeds, SamplerConfig(num_steps=1, guidance_scale=2.0), decode=False).latents
    torch.testing.assert_close(got, want.float().cpu(), atol=2e-5, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the patch did something


def test_fixed_features_patch_only_those(tiny_dit, device):
    sae = make_sae(device)
    keep = torch.tensor([0, 3, 5, 17])
    conds, targets, seeds = [0, 1], [2, 2], [5, 6]
    want = one_step_reference(tiny_dit, sae, conds, targets, seeds, keep=keep)
    got = sample_patched(tiny_dit, sae, conds, targets, seeds, SamplerConfig(num_steps=1, guidance_scale=2.0),
                         features=keep.tolist(), decode=False).latents
    torch.testing.assert_close(got, want.float().cpu(), atol=2e-5, rtol=1e-4)


def test_own_condition_zero_strength_and_empty_mask_reproduce_the_plain_samples(tiny_dit, device):
    sae = make_sae(device)
    conds, seeds = [0, 2, NULL_CONDITION, 1], [1, 2, 3, 4]
    plain = sample(tiny_dit, conds, seeds, CFG, decode=False).latents
    own = sample_patched(tiny_dit, sae, conds, conds, seeds, CFG, decode=False).latents
    torch.testing.assert_close(own, plain, atol=1e-5, rtol=1e-4)
    for kw in (dict(strength=0.0), dict(mask=torch.zeros(16, dtype=torch.bool))):
        got = sample_patched(tiny_dit, sae, conds, [3, 3, 3, 3], seeds, CFG, decode=False, **kw).latents
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-4)


def test_top_features_all_equals_every_feature_and_fewer_differ(tiny_dit, device):
    sae = make_sae(device)
    conds, targets, seeds = [0, 1], [3, 3], [8, 9]
    every = sample_patched(tiny_dit, sae, conds, targets, seeds, CFG, decode=False).latents
    top_all = sample_patched(tiny_dit, sae, conds, targets, seeds, CFG, top_features=32, decode=False).latents
    top_2 = sample_patched(tiny_dit, sae, conds, targets, seeds, CFG, top_features=2, decode=False).latents
    torch.testing.assert_close(top_all, every, atol=1e-5, rtol=1e-4)
    assert (top_2 - every).abs().max() > 1e-4


def test_window_leaves_the_steps_before_it_alone(tiny_dit, device):
    sae = make_sae(device)
    conds, targets, seeds = [0, 1], [3, 3], [8, 9]
    cfg = SamplerConfig(num_steps=3, guidance_scale=2.0)
    late = sample_patched(tiny_dit, sae, conds, targets, seeds, cfg, steps=(2, 3), decode=False).latents
    full = sample_patched(tiny_dit, sae, conds, targets, seeds, cfg, decode=False).latents
    plain = sample(tiny_dit, conds, seeds, cfg, decode=False).latents
    assert (late - plain).abs().max() > 1e-4 and (late - full).abs().max() > 1e-4


def test_update_target_sae_own_condition_is_the_plain_sample(tiny_dit, device):
    sae = make_sae(device, target="update")
    conds, seeds = [0, 1], [3, 4]
    plain = sample(tiny_dit, conds, seeds, CFG, decode=False).latents
    torch.testing.assert_close(sample_patched(tiny_dit, sae, conds, conds, seeds, CFG, decode=False).latents, plain,
                               atol=1e-5, rtol=1e-4)
    moved = sample_patched(tiny_dit, sae, conds, [2, 2], seeds, CFG, decode=False).latents
    assert (moved - plain).abs().max() > 1e-4


@pytest.mark.parametrize("start", [0, 1])
def test_keep_outside_ends_exactly_on_the_plain_latents_outside_the_mask(tiny_dit, device, start):
    sae = make_sae(device)
    conds, targets, seeds = [0, 1], [3, 3], [8, 9]
    grid = tuple(tiny_dit.patch_grid)
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[: grid[0] // 2] = True  # upper half of the patch grid
    plain = sample(tiny_dit, conds, seeds, CFG, decode=False).latents
    kw = dict(steps=(start, CFG.num_steps), mask=mask, decode=False)
    kept = sample_patched(tiny_dit, sae, conds, targets, seeds, CFG, keep_outside=True, **kw).latents
    free = sample_patched(tiny_dit, sae, conds, targets, seeds, CFG, **kw).latents
    rows = plain.shape[-2] * (grid[0] // 2) // grid[0]  # latent rows of the masked patches
    torch.testing.assert_close(kept[..., rows:, :], plain[..., rows:, :], atol=0, rtol=0)
    assert (kept[..., :rows, :] - plain[..., :rows, :]).abs().max() > 1e-3  # the inside was edited
    assert (free[..., rows:, :] - plain[..., rows:, :]).abs().max() > 1e-4  # without it the edit leaks out


def test_keep_outside_needs_a_mask(tiny_dit, device):
    with pytest.raises(TideError, match="keep_outside needs a mask"):
        sample_patched(tiny_dit, make_sae(device), [0], [1], [1], CFG, keep_outside=True)


def test_one_step_transfer_equals_the_reconstruction_difference_from_the_reference_generation(tiny_dit, device):
    sae = make_sae(device)
    keep = torch.tensor([1, 4, 9, 30])
    conds, seeds, refs, ref_seeds = [0, 1], [5, 6], [2, 2], [40, 41]
    cfg = SamplerConfig(num_steps=1, guidance_scale=2.0)
    want = one_step_reference(tiny_dit, sae, conds, refs, seeds, keep=keep, ref_seeds=ref_seeds)
    got = sample_transferred(tiny_dit, sae, conds, seeds, refs, ref_seeds, features=keep.tolist(), config=cfg,
                             decode=False).latents
    torch.testing.assert_close(got, want.float().cpu(), atol=2e-5, rtol=1e-4)
    same_seed = sample_patched(tiny_dit, sae, conds, refs, seeds, cfg, features=keep.tolist(), decode=False).latents
    assert (got - same_seed).abs().max() > 1e-4  # the reference's own noise, not the sample's, was read


def test_transfer_from_itself_is_the_plain_sample_and_from_another_moves_it(tiny_dit, device):
    sae = make_sae(device)
    conds, seeds = [0, 1], [3, 4]
    plain = sample(tiny_dit, conds, seeds, CFG, decode=False).latents
    same = sample_transferred(tiny_dit, sae, conds, seeds, conds, seeds, config=CFG, decode=False).latents
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-4)
    moved = sample_transferred(tiny_dit, sae, conds, seeds, [2, 2], [7, 8], config=CFG, steps=(1, 3),
                               decode=False).latents
    assert (moved - plain).abs().max() > 1e-4
    with pytest.raises(TideError, match="one reference seed per condition"):
        sample_transferred(tiny_dit, sae, conds, seeds, [2, 2], [7], config=CFG)


def test_removal_of_a_samples_own_condition_is_the_patch_to_the_null_at_strength_one(tiny_dit, device):
    sae = make_sae(device)
    cfg = SamplerConfig(num_steps=1, guidance_scale=2.0)
    conds, seeds = [2, 2], [5, 6]
    want = one_step_reference(tiny_dit, sae, conds, [NULL_CONDITION] * 2, seeds)
    got = sample_removed(tiny_dit, sae, conds, seeds, remove=2, config=cfg, strength=1.0, decode=False).latents
    torch.testing.assert_close(got, want.float().cpu(), atol=2e-5, rtol=1e-4)
    plain = sample(tiny_dit, conds, seeds, cfg, decode=False).latents
    assert (got - plain).abs().max() > 1e-3


def test_removal_gate_leaves_other_conditions_alone(tiny_dit, device):
    sae = make_sae(device)
    conds, seeds = [0, 1, 2, NULL_CONDITION], [1, 2, 3, 4]
    plain = sample(tiny_dit, conds, seeds, CFG, decode=False).latents
    strict = sample_removed(tiny_dit, sae, conds, seeds, remove=2, config=CFG, gate=1.0, decode=False).latents
    others = [0, 1, 3]
    torch.testing.assert_close(strict[others], plain[others], atol=0, rtol=0)  # not C: not edited
    assert (strict[2] - plain[2]).abs().max() > 1e-3  # C's own generation is
    open_gate = sample_removed(tiny_dit, sae, conds, seeds, remove=2, config=CFG, gate=0.0, decode=False).latents
    torch.testing.assert_close(open_gate[2], strict[2], atol=1e-5, rtol=1e-4)
    off = sample_removed(tiny_dit, sae, conds, seeds, remove=2, config=CFG, strength=0.0, decode=False).latents
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=1e-4)


def test_feature_effects_are_each_features_own_patch_scored_against_the_plain_samples(tiny_dit, device):
    sae = make_sae(device)
    conds, seeds, cands = [0, 1], [5, 6], [3, 7, 11]

    def score(images):  # any image statistic will do: the mean of the upper half
        return images[:, :, : images.shape[-2] // 2].mean(dim=(1, 2, 3))

    got = feature_effects(tiny_dit, sae, conds, seeds, 2, cands, score, config=CFG)
    base = score(sample(tiny_dit, conds, seeds, CFG).images)
    want = torch.stack([score(sample_patched(tiny_dit, sae, conds, [2, 2], seeds, CFG, features=[f]).images) - base
                        for f in cands]).mean(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert want.abs().max() > 1e-5
    with pytest.raises(TideError, match="at least one candidate"):
        feature_effects(tiny_dit, sae, conds, seeds, 2, [], score, config=CFG)


@pytest.mark.parametrize("kw,msg", [
    (dict(remove=NULL_CONDITION), "null condition cannot be removed"),
    (dict(remove=1, gate=1.5), "gate is a cosine threshold"),
    (dict(remove=1, strength=-1.0), "strength must be >= 0"),
])
def test_removal_refusals(tiny_dit, device, kw, msg):
    with pytest.raises(TideError, match=msg):
        sample_removed(tiny_dit, make_sae(device), [0], [1], config=CFG, **kw)


@pytest.mark.parametrize("kw,msg", [
    (dict(strength=-1.0), "strength must be >= 0"),
    (dict(top_features=0), "top_features must lie in 1..32"),
    (dict(top_features=33), "top_features must lie in 1..32"),
    (dict(top_features=2, features=[1]), "not both"),
    (dict(features=[40]), "features must be ids in 0..31"),
    (dict(steps=(3, 5)), "outside the 3-step schedule"),
])
def test_refusals(tiny_dit, device, kw, msg):
    sae = make_sae(device)
    with pytest.raises(TideError, match=msg):
        sample_patched(tiny_dit, sae, [0], [1], [1], CFG, **kw)


def test_refuses_mismatched_lengths_unknown_conditions_and_a_wrong_mask(tiny_dit, device):
    sae = make_sae(device)
    with pytest.raises(TideError, match="the mask covers 9 tokens but blocks.1.hook_resid_post carries 16"):
        sample_patched(tiny_dit, sae, [0], [1], [1], CFG, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TideError, match="one target and one seed per condition"):
        sample_patched(tiny_dit, sae, [0, 1], [1], [1, 2], CFG)
    with pytest.raises(TideError):
        sample_patched(tiny_dit, sae, [0], [999], [1], CFG)


def test_cli_steer_toward_patches_by_default(tiny_dit_dir, tmp_path, capsys):
    import json

    import numpy as np

    from tide.cli import main
    from tide.models import load_backbone
    from tide.sae import save_sae

    sae = make_sae("cpu")
    save_sae(sae, tmp_path / "sae")
    base = ["steer", "--sae", str(tmp_path / "sae"), "--backbone", str(tiny_dit_dir), "--device", "cpu",
            "--num-steps", "3", "--guidance-scale", "2", "--n", "2", "--seed", "4"]
    npz = tmp_path / "p.npz"
    assert main(base + ["--toward", "3", "--classes", "0,1", "--out", str(tmp_path / "p.png"),
                        "--save-images", str(npz)]) == 0
    backbone = load_backbone(str(tiny_dit_dir), device="cpu")
    want = sample_patched(backbone, sae, [0, 0, 1, 1], [3] * 4, [4, 5, 6, 7], CFG)
    with np.load(npz) as got:
        assert got["conds"].tolist() == [0, 0, 1, 1] and got["seeds"].tolist() == [4, 5, 6, 7]
        np.testing.assert_allclose(got["after"], want.images.numpy(), atol=1e-5)
        assert np.abs(got["after"] - got["before"]).max() > 0
    assert json.loads((tmp_path / "p.json").read_text())["config"]["recipe"] is None
    # refused, one line each, nothing written
    out = ["--out", str(tmp_path / "r.png")]
    assert main(base + ["--toward", "3", "--recipe", "patch", "--remove", "2"] + out) == 2
    assert main(base + ["--remove", "2", "--top-features", "3"] + out) == 2
    assert main(base + ["--toward", "3", "--recipe", "stir"] + out) == 2
    assert main(base + ["--toward", "3", "--branch", "both"] + out) == 2
    assert main(base + ["--toward", "3", "--top-features", "99"] + out) == 2
    assert not (tmp_path / "r.png").exists() and not list(tmp_path.glob("*.tmp*"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("tide steer: error: ") for line in err)
    assert "one of --toward and --remove" in err[0] and "--top-features does not apply" in err[1] and "patch or profile" in err[2]
    assert "conditional rows only" in err[3] and "top_features must lie in 1..32" in err[4]


def test_cli_keep_outside(tiny_dit_dir, tmp_path, capsys):
    import numpy as np

    from tide.analysis.steering import region_mask
    from tide.cli import main
    from tide.models import load_backbone
    from tide.sae import save_sae

    sae = make_sae("cpu")
    save_sae(sae, tmp_path / "sae")
    base = ["steer", "--sae", str(tmp_path / "sae"), "--backbone", str(tiny_dit_dir), "--device", "cpu",
            "--num-steps", "3", "--guidance-scale", "2", "--n", "2", "--seed", "4", "--classes", "0"]
    npz = tmp_path / "k.npz"
    assert main(base + ["--toward", "3", "--mask", "upper", "--keep-outside", "--out", str(tmp_path / "k.png"),
                        "--save-images", str(npz)]) == 0
    backbone = load_backbone(str(tiny_dit_dir), device="cpu")
    mask = region_mask("upper", tuple(backbone.patch_grid))
    want = sample_patched(backbone, sae, [0, 0], [3, 3], [4, 5], CFG, mask=mask, keep_outside=True)
    with np.load(npz) as got:
        np.testing.assert_allclose(got["after"], want.images.numpy(), atol=1e-5)
    out = ["--out", str(tmp_path / "r.png")]
    assert main(base + ["--toward", "3", "--keep-outside"] + out) == 2
    assert main(base + ["--features", "1", "--mask", "upper", "--keep-outside"] + out) == 2
    assert main(base + ["--toward", "3", "--mask", "upper", "--keep-outside", "--recipe", "profile"] + out) == 2
    assert not (tmp_path / "r.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "name a region" in err[0] and "--features edits" in err[1]
    assert "patch recipe" in err[2]


def test_cli_remove_uses_the_feature_removal_by_default(tiny_dit_dir, tmp_path):
    import numpy as np

    from tide.cli import main
    from tide.models import load_backbone
    from tide.sae import save_sae

    sae = make_sae("cpu")
    save_sae(sae, tmp_path / "sae")
    npz = tmp_path / "r.npz"
    assert main(["steer", "--sae", str(tmp_path / "sae"), "--backbone", str(tiny_dit_dir), "--device", "cpu",
                 "--num-steps", "3", "--guidance-scale", "2", "--n", "2", "--seed", "4", "--classes", "2,1",
                 "--remove", "2", "--removal-gate", "0.5", "--out", str(tmp_path / "r.png"), "--save-images", str(npz)]) == 0
    backbone = load_backbone(str(tiny_dit_dir), device="cpu")
    want = sample_removed(backbone, sae, [2, 2, 1, 1], [4, 5, 6, 7], remove=2, config=CFG, strength=2.0, gate=0.5)
    with np.load(npz) as got:
        np.testing.assert_allclose(got["after"], want.images.numpy(), atol=1e-5)
        assert np.abs(got["after"][:2] - got["before"][:2]).max() > 0


# ------------------------------------------------------------------ several hooks at once

HOOK_0 = "blocks.0.hook_resid_post"


def make_sae_at(device, hook, seed):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=8, normalization="none", conditioning="tide", hook=hook))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_dec.normal_(std=0.2)
        for p in sae.modulation.parameters():
            p.normal_(std=0.3)
    return sae.to(device).eval()


def test_two_hooks_one_step_equals_patching_each_hook_by_hand(tiny_dit, device):
    """The reference activations come from an unpatched pass with the target; the sample's later hook is encoded
    after its earlier hook was patched (one forward pass, hooks replaced by plain functions)."""
    saes = [make_sae_at(device, HOOK_0, 2), make_sae_at(device, HOOK, 3)]
    conds, targets, seeds = [0, 1, NULL_CONDITION], [2, 3, 3], [5, 6, 7]
    cfg = SamplerConfig(num_steps=1, guidance_scale=2.0)
    hooked = HookedBackbone.of(tiny_dit)
    traj = Trajectory(tiny_dit, conds, seeds, list(range(3)), cfg)
    other = Trajectory(tiny_dit, targets, seeds, list(range(3)), cfg)
    step, o_step = next(iter(traj)), next(iter(other))
    with step_context(o_step.ctx), torch.no_grad():
        _, cache_b = hooked.run_with_cache(other.model_input(o_step), o_step.t, other.cond,
                                           names_filter=[HOOK_0, HOOK])
    t = float(step.t)

    def replace(sae, h_b):
        def fn(act, hook):
            h = act[:3]
            tt = torch.full((h.shape[0] * h.shape[1],), t, device=h.device)
            z_a = sae.encode(h.reshape(-1, 16), tt)
            z_b = sae.encode(h_b.reshape(-1, 16), tt)
            act = act.clone()
            act[:3] = h + ((z_b - z_a) @ sae.fold(t).W_dec[0]).reshape(h.shape)
            return act
        return fn

    with torch.no_grad():
        fwd = [(HOOK_0, replace(saes[0], cache_b[HOOK_0][:3])), (HOOK, replace(saes[1], cache_b[HOOK][:3]))]
        traj.advance(step, traj.predict(step, fwd))
    got = sample_patched(tiny_dit, saes, conds, targets, seeds, cfg, decode=False).latents
    torch.testing.assert_close(got, traj.x.float().cpu(), atol=2e-5, rtol=1e-4)
    singles = [sample_patched(tiny_dit, s, conds, targets, seeds, cfg, decode=False).latents for s in saes]
    assert all((got - one).abs().max() > 1e-4 for one in singles)  # both hooks contribute


def test_two_hooks_toward_the_own_condition_and_removal_run(tiny_dit, device):
    saes = [make_sae_at(device, HOOK_0, 2), make_sae_at(device, HOOK, 3)]
    conds, seeds = [0, 2, NULL_CONDITION], [1, 2, 3]
    plain = sample(tiny_dit, conds, seeds, CFG, decode=False).latents
    own = sample_patched(tiny_dit, saes, conds, conds, seeds, CFG, decode=False).latents
    # floating-point noise of the first patch reaches the second hook's top-k: zero up to that
    torch.testing.assert_close(own, plain, atol=1e-3, rtol=1e-3)
    strict = sample_removed(tiny_dit, saes, conds, seeds, 1, CFG, gate=1.0, decode=False).latents
    torch.testing.assert_close(strict, plain, atol=1e-5, rtol=1e-4)  # no generation of class 1: nothing edited
    removed = sample_removed(tiny_dit, saes, [1, 1], [1, 2], 1, CFG, gate=0.5, decode=False).latents
    assert (removed - sample(tiny_dit, [1, 1], [1, 2], CFG, decode=False).latents).abs().max() > 1e-4


def test_several_saes_refusals(tiny_dit, device):
    a, b = make_sae_at(device, HOOK, 2), make_sae_at(device, HOOK, 3)
    with pytest.raises(TideError, match="distinct hooks"):
        sample_patched(tiny_dit, [a, b], [0], [1], [0], CFG)
    c = make_sae_at(device, HOOK_0, 4)
    with pytest.raises(TideError, match="one SAE"):
        sample_patched(tiny_dit, [a, c], [0], [1], [0], CFG, features=[1, 2])
    with pytest.raises(TideError, match="one SAE"):
        feature_effects(tiny_dit, [a, c], [0], [0], 1, [1], lambda im: im.mean((1, 2, 3)), CFG)
    with pytest.raises(TideError, match="at least one SAE"):
        sample_patched(tiny_dit, [], [0], [1], [0], CFG)


def test_cli_extra_saes_patch_several_hooks(tiny_dit_dir, tmp_path, capsys):
    import numpy as np

    from tide.cli import main
    from tide.models import load_backbone
    from tide.sae import save_sae

    saes = [make_sae_at("cpu", HOOK, 2), make_sae_at("cpu", HOOK_0, 3)]
    save_sae(saes[0], tmp_path / "a")
    save_sae(saes[1], tmp_path / "b")
    base = ["steer", "--sae", str(tmp_path / "a"), "--backbone", str(tiny_dit_dir), "--device", "cpu",
            "--num-steps", "3", "--guidance-scale", "2", "--n", "2", "--seed", "4", "--classes", "0"]
    npz = tmp_path / "m.npz"
    assert main(base + ["--toward", "3", "--extra-saes", str(tmp_path / "b"), "--out", str(tmp_path / "m.png"),
                        "--save-images", str(npz)]) == 0
    backbone = load_backbone(str(tiny_dit_dir), device="cpu")
    want = sample_patched(backbone, saes, [0, 0], [3, 3], [4, 5], CFG)
    with np.load(npz) as got:
        np.testing.assert_allclose(got["after"], want.images.numpy(), atol=1e-5)
    out = ["--out", str(tmp_path / "r.png")]
    assert main(base + ["--features", "1", "--extra-saes", str(tmp_path / "b")] + out) == 2
    assert main(base + ["--toward", "3", "--recipe", "profile", "--extra-saes", str(tmp_path / "b")] + out) == 2
    assert main(base + ["--toward", "3", "--extra-saes", str(tmp_path / "a")] + out) == 2
    assert not (tmp_path / "r.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("tide steer: error: ") for line in err)
    assert "--features edits" in err[0] and "patch recipe" in err[1] and "distinct hooks" in err[2]


def test_cli_choose_features_by_effect(tmp_path, capsys):
    """On an embedded model (it has an evaluation classifier): the JSON names the chosen features, best first,
    drawn from the candidates, and the edit is the feature patch restricted to them."""
    import json

    import numpy as np

    from tide.cli import main
    from tide.models import load_backbone
    from tide.models.base import NULL_CONDITION
    from tide.sae import save_sae

    backbone = load_backbone("fmnist-pixart", device="cpu")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, d_sae=64, k=8, normalization="none", hook="blocks.4.hook_resid_post",
                        backbone="fmnist-pixart"))
    with torch.no_grad():
        sae.W_enc.normal_()
    save_sae(sae, tmp_path / "sae")
    base = ["steer", "--sae", str(tmp_path / "sae"), "--device", "cpu", "--num-steps", "2", "--guidance-scale", "2",
            "--n", "2", "--seed", "3", "--unconditional", "--toward", "1"]
    npz = tmp_path / "e.npz"
    assert main(base + ["--choose-features", "effect", "--top-features", "3", "--out", str(tmp_path / "e.png"),
                        "--save-images", str(npz)]) == 0
    doc = json.loads((tmp_path / "e.json").read_text())
    chosen = doc["chosen_features"]
    assert len(chosen) == 3 and len({c["feature"] for c in chosen}) == 3
    assert [c["effect"] for c in chosen] == sorted((c["effect"] for c in chosen), reverse=True)
    want = sample_patched(backbone, sae, [NULL_CONDITION] * 2, [1, 1], [3, 4],
                          SamplerConfig(num_steps=2, guidance_scale=2.0), features=[c["feature"] for c in chosen])
    with np.load(npz) as got:
        np.testing.assert_allclose(got["after"], want.images.numpy(), atol=1e-5)
    out = ["--out", str(tmp_path / "r.png")]
    assert main(base + ["--choose-features", "mass"] + out) == 2
    assert main(base + ["--choose-features", "effect", "--recipe", "profile"] + out) == 2
    assert main(base + ["--choose-features", "effect", "--top-features", "40"] + out) == 2
    assert not (tmp_path / "r.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "all or effect" in err[0] and "patch recipe" in err[1] and "1..32" in err[2]
