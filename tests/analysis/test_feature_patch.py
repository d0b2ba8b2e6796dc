import pytest
import torch

from tide.analysis.feature_patch import sample_patched
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


def one_step_reference(backbone, sae, conds, targets, seeds, keep=None):
    """One patched step computed another way: both activations from run_with_cache, the patch as the difference of
    the SAE's reconstructions (restricted to ``keep`` features by zeroing the others' latents), set by a plain
    replacing hook, guidance and the scheduler step from the Trajectory."""
    cfg = SamplerConfig(num_steps=1, guidance_scale=2.0)
    hooked = HookedBackbone.of(backbone)
    traj = Trajectory(backbone, conds, seeds, list(range(len(conds))), cfg)
    other = Trajectory(backbone, targets, seeds, list(range(len(conds))), cfg)
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
    assert main(base + ["--remove", "2", "--recipe", "patch"] + out) == 2
    assert main(base + ["--toward", "3", "--recipe", "stir"] + out) == 2
    assert main(base + ["--toward", "3", "--branch", "both"] + out) == 2
    assert main(base + ["--toward", "3", "--top-features", "99"] + out) == 2
    assert not (tmp_path / "r.png").exists() and not list(tmp_path.glob("*.tmp*"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("tide steer: error: ") for line in err)
    assert "one of --toward and --remove" in err[0] and "--recipe profile" in err[1] and "patch or profile" in err[2]
    assert "conditional rows only" in err[3] and "top_features must lie in 1..32" in err[4]
