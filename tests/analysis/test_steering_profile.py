import json

import h5py
import numpy as np
import pytest
import torch

from tide.analysis.steering_profile import (ConditionShift, SteeringProfile, load_profile, measure_profile,
                                           profile_intervention)
from tide.errors import TideError
from tide.hooks import COND, UNCOND, HookedBackbone, StepContext, step_context
from tide.models.base import NULL_CONDITION
from tide.sae.config import SAEConfig
from tide.sae.model import SAE
from tide.sampling import SamplerConfig, Trajectory, sample

HOOK = "blocks.1.hook_resid_post"
CFG = SamplerConfig(num_steps=3, guidance_scale=2.0)


def make_sae(device, conditioning="none", target="activation"):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=8, normalization="none", conditioning=conditioning, hook=HOOK,
                        target=target))
    with torch.no_grad():
        sae.W_enc.normal_()
        if sae.modulation is not None:
            for p in sae.modulation.parameters():
                p.normal_(std=0.3)
    return sae.to(device).eval()


def cond_rows_at_first_step(backbone, sae, cond, seeds):
    """The SAE's latents of the conditional rows at step 0 (latents = the initial noise), computed directly."""
    traj = Trajectory(backbone, [cond] * len(seeds), seeds, list(range(len(seeds))), CFG)
    step = next(iter(traj))
    got = {}
    hooked = HookedBackbone.of(backbone)
    with step_context(step.ctx), torch.no_grad():
        _, cache = hooked.run_with_cache(traj.model_input(step), step.t, traj.cond, names_filter=sae.cfg.input_hooks)
    for h in sae.cfg.input_hooks:
        got[h] = cache[h][: len(seeds)]
    x = sae.cfg.rows(got)
    n, t, d = x.shape
    z = sae.encode(x.reshape(-1, d), torch.full((n * t,), float(step.t), device=x.device)).reshape(n, t, -1)
    return z.detach().cpu(), got[sae.cfg.hook].detach().cpu()


@pytest.mark.parametrize("target,source", [("activation", NULL_CONDITION), ("update", NULL_CONDITION), ("activation", 0)])
def test_first_step_shift_is_the_paired_latent_difference(tiny_dit, device, target, source):
    sae = make_sae(device, "tide", target)
    seeds = [7, 8, 9]
    prof = measure_profile(tiny_dit, sae, [2], CFG, num_samples=3, seed=7, keep=5, progress=False, sources=[source])
    cs = prof.condition(2, source)
    assert (cs.source, cs.condition) == (source, 2) and list(prof.shifts) == [(source, 2)]
    z_c, h_c = cond_rows_at_first_step(tiny_dit, sae, 2, seeds)
    z_n, h_n = cond_rows_at_first_step(tiny_dit, sae, source, seeds)
    dz_TF = (z_c - z_n).mean(0)
    mass_F = dz_TF.abs()  # step 0 only: the ranking uses every step, so compare the kept features' values
    torch.testing.assert_close(cs.shift_STM[0], dz_TF[:, cs.features_M], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cs.act_shift_STD[0], (h_c - h_n).mean(0), atol=1e-5, rtol=1e-4)
    assert cs.shift_STM.shape == (3, 16, 5) and cs.act_shift_STD.shape == (3, 16, 16)
    assert torch.all(cs.mass_M[:-1] >= cs.mass_M[1:]) and mass_F.sum() > 0
    torch.testing.assert_close(cs.mass_M, cs.shift_STM.abs().sum((0, 1)))
    assert prof.timesteps_S.shape == (3,) and prof.hook == HOOK and cs.name == tiny_dit.condition_names[2]


def test_kept_features_are_those_of_largest_mass(tiny_dit, device):
    sae = make_sae(device)
    full = measure_profile(tiny_dit, sae, [1], CFG, num_samples=2, keep=32, progress=False).condition(1)
    top = measure_profile(tiny_dit, sae, [1], CFG, num_samples=2, keep=4, progress=False).condition(1)
    assert top.features_M.tolist() == full.features_M[:4].tolist()
    all_mass = full.shift_STM.abs().sum((0, 1))
    assert float(top.mass_M.min()) >= float(all_mass[4:].max()) - 1e-6


def fake_profile(device, d_sae=32, tokens=16, width=16):
    """Shifts null -> 0, 1, 2 and 0 -> 2, 1 -> 2, 2 -> null."""
    torch.manual_seed(3)
    ts = torch.tensor([900.0, 500.0, 100.0])
    name = {NULL_CONDITION: "null", 0: "class 0", 1: "class 1", 2: "class 2"}
    pairs = [(NULL_CONDITION, 0), (NULL_CONDITION, 1), (NULL_CONDITION, 2), (0, 2), (1, 2), (2, NULL_CONDITION)]
    shifts = {(s, c): ConditionShift(c, name[c], torch.randperm(d_sae)[:6], torch.randn(3, tokens, 6),
                                     torch.arange(6, 0, -1).float(), torch.randn(3, tokens, width), s, name[s])
              for s, c in pairs}
    return SteeringProfile(HOOK, ts, shifts, {"num_steps": 3, "d_sae": d_sae})


def decoded(sae, prof, pair, step, m=None):
    cs = prof.shifts[pair]
    m = m or len(cs.features_M)
    W = sae.fold(float(prof.timesteps_S[step])).W_dec[0].detach()
    return cs.shift_STM[step, :, :m].to(W.device) @ W[cs.features_M[:m]]


def call(iv, x, t, conds, branches=None):
    b = len(conds)
    branches = branches or (COND,) * b
    c = StepContext(0, 3, t, torch.tensor(branches, dtype=torch.int8), torch.arange(b), torch.tensor(conds))
    with step_context(c), torch.no_grad():
        return iv.bound_fn(c)(x, None)


@pytest.mark.parametrize("conditioning", ["none", "tide"])
def test_edit_adds_strength_times_shift_times_folded_decoder(device, conditioning):
    sae, prof = make_sae(device, conditioning), fake_profile(device)
    x = torch.randn(2, 16, 16, device=device)
    iv = profile_intervention(sae, prof, toward=[1], away=[2], strength=1.5, features=4)
    for s, t in ((0, 880.0), (2, 120.0)):  # read at the nearest recorded step
        want = decoded(sae, prof, (NULL_CONDITION, 1), s, 4) - decoded(sae, prof, (NULL_CONDITION, 2), s, 4)
        torch.testing.assert_close(call(iv, x, t, [0, 0]) - x, 1.5 * want.expand_as(x), atol=1e-5, rtol=1e-4)


def test_away_own_subtracts_each_rows_condition_and_only_on_cond_rows(device):
    sae, prof = make_sae(device), fake_profile(device)
    x = torch.randn(4, 16, 16, device=device)
    iv = profile_intervention(sae, prof, toward=[2], away_own=True)
    out = call(iv, x, 900.0, [0, 1, NULL_CONDITION, NULL_CONDITION], (COND, COND, UNCOND, UNCOND))
    d = {c: decoded(sae, prof, (NULL_CONDITION, c), 0) for c in range(3)}
    torch.testing.assert_close(out[0] - x[0], d[2] - d[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1] - x[1], d[2] - d[1], atol=1e-5, rtol=1e-4)
    assert torch.equal(out[2:], x[2:])  # the unconditional rows are untouched
    with pytest.raises(TideError, match="no shift null -> 5"):
        call(iv, x, 900.0, [5, 0, 0, 0])


def test_own_source_uses_each_rows_shift_toward_the_target(device):
    sae, prof = make_sae(device), fake_profile(device)
    x = torch.randn(4, 16, 16, device=device)
    iv = profile_intervention(sae, prof, toward=["class 2"], source="own", strength=2.0)
    out = call(iv, x, 500.0, [0, 1, 2, NULL_CONDITION])
    torch.testing.assert_close(out[0] - x[0], 2 * decoded(sae, prof, (0, 2), 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1] - x[1], 2 * decoded(sae, prof, (1, 2), 1), atol=1e-5, rtol=1e-4)
    assert torch.equal(out[2], x[2])  # already the target
    torch.testing.assert_close(out[3] - x[3], 2 * decoded(sae, prof, (NULL_CONDITION, 2), 1), atol=1e-5, rtol=1e-4)
    removal = profile_intervention(sae, prof, toward=["null"], source=2)
    out = call(removal, x, 100.0, [2, 0, 1, 2])
    torch.testing.assert_close(out - x, decoded(sae, prof, (2, NULL_CONDITION), 2).expand_as(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(TideError, match="no shift 0 -> null"):
        profile_intervention(sae, prof, toward=["null"], source=0)
    with pytest.raises(TideError, match="source='own'"):
        profile_intervention(sae, prof, toward=[2], source="own", away_own=True)


def test_baseline_takes_the_shared_shift_out(device):
    sae, prof = make_sae(device), fake_profile(device)
    x = torch.randn(1, 16, 16, device=device)
    out = call(profile_intervention(sae, prof, away=[0], baseline=[0, 1, 2]), x, 900.0, [1])
    d = {c: decoded(sae, prof, (NULL_CONDITION, c), 0) for c in range(3)}
    torch.testing.assert_close(out[0] - x[0], -d[0] + (d[0] + d[1] + d[2]) / 3, atol=1e-5, rtol=1e-4)


def test_mask_confines_the_edit_and_with_error_adds_the_activation_shift(device):
    sae, prof = make_sae(device), fake_profile(device)
    x = torch.randn(1, 16, 16, device=device)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2] = True
    out = call(profile_intervention(sae, prof, toward=[0], mask=mask), x, 500.0, [0])
    assert torch.equal(out[0, 8:], x[0, 8:]) and (out[0, :8] - x[0, :8]).abs().max() > 1e-3
    out = call(profile_intervention(sae, prof, toward=[0], with_error=True, strength=2.0), x, 500.0, [0])
    torch.testing.assert_close(out - x, 2.0 * prof.shifts[(NULL_CONDITION, 0)].act_shift_STD[1].to(device)[None],
                               atol=1e-5, rtol=1e-5)


def test_zero_strength_reproduces_the_clean_samples(tiny_dit, device):
    sae = make_sae(device)
    prof = measure_profile(tiny_dit, sae, [1, 3], CFG, num_samples=2, progress=False)
    clean = sample(tiny_dit, [0, NULL_CONDITION], seeds=[4, 5], config=CFG)
    iv = profile_intervention(sae, prof, toward=[1], away=[3], strength=0.0)
    same = sample(tiny_dit, [0, NULL_CONDITION], seeds=[4, 5], config=CFG, interventions=[iv])
    torch.testing.assert_close(same.latents, clean.latents, atol=1e-6, rtol=0)
    moved = sample(tiny_dit, [0, NULL_CONDITION], seeds=[4, 5], config=CFG,
                   interventions=[profile_intervention(sae, prof, toward=[1], strength=3.0)])
    assert (moved.latents - clean.latents).abs().max() > 1e-4


def test_save_load_round_trip_and_refusals(tmp_path, device):
    prof = fake_profile(device)
    path = prof.save(tmp_path / "p.h5")
    back = load_profile(path)
    assert back.hook == HOOK and back.meta == prof.meta and sorted(back.shifts) == sorted(prof.shifts)
    for key, a in prof.shifts.items():
        b = back.shifts[key]
        assert (a.name, a.source, a.source_name) == (b.name, b.source, b.source_name)
        assert torch.equal(a.features_M, b.features_M)
        torch.testing.assert_close(a.shift_STM, b.shift_STM)
        torch.testing.assert_close(a.act_shift_STD, b.act_shift_STD)
    assert back.find("CLASS 1") is back.shifts[(NULL_CONDITION, 1)] and back.find("2", "class 0") is back.shifts[(0, 2)]
    re = back.reindexed({7: "class 2", 5: "class 0"})
    assert sorted(re.shifts) == [(NULL_CONDITION, 5), (NULL_CONDITION, 7), (5, 7), (7, NULL_CONDITION)]
    assert torch.equal(re.shifts[(5, 7)].shift_STM, back.shifts[(0, 2)].shift_STM) and re.shifts[(5, 7)].source == 5
    with pytest.raises(TideError, match="no condition named 'dark'"):
        back.find("dark")
    with pytest.raises(TideError, match="does not exist"):
        load_profile(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something"
    with pytest.raises(TideError, match="is not a steering profile"):
        load_profile(tmp_path / "other.h5")
    with h5py.File(path, "a") as f:
        f.attrs["version"] = 99
    with pytest.raises(TideError, match="version 99"):
        load_profile(path)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(TideError, match="cannot be read"):
        load_profile(tmp_path / "junk.h5")


def test_intervention_refuses_a_profile_of_another_hook_or_width(device):
    sae, prof = make_sae(device), fake_profile(device)
    with pytest.raises(TideError, match="measured at"):
        profile_intervention(sae, SteeringProfile("blocks.0.hook_resid_post", prof.timesteps_S, prof.shifts, prof.meta),
                             toward=[0])
    with pytest.raises(TideError, match="64 features"):
        profile_intervention(sae, SteeringProfile(HOOK, prof.timesteps_S, prof.shifts, {"d_sae": 64}), toward=[0])
    with pytest.raises(TideError, match="branches"):
        profile_intervention(sae, prof, toward=[0], branch="cfg")
    with pytest.raises(TideError, match="no shift null -> 9"):
        profile_intervention(sae, prof, toward=[9])


def test_cli_profile_and_steer_toward(tiny_dit_dir, tmp_path, capsys):
    from tide.cli import main
    from tide.sae import save_sae

    save_sae(make_sae("cpu"), tmp_path / "sae")
    base = ["--sae", str(tmp_path / "sae"), "--backbone", str(tiny_dit_dir), "--device", "cpu"]
    prof = tmp_path / "profile.h5"
    assert main(["profile", *base, "--conditions", "1,2,null", "--sources", "null,2", "--num-samples", "2",
                 "--num-steps", "3", "--out", str(prof)]) == 0
    assert sorted(load_profile(prof).shifts) == [(NULL_CONDITION, 1), (NULL_CONDITION, 2), (2, NULL_CONDITION), (2, 1)]
    before = prof.read_bytes()
    assert main(["profile", *base, "--conditions", "1", "--num-steps", "3", "--out", str(prof)]) == 2
    assert prof.read_bytes() == before and "already exists: pass --overwrite" in capsys.readouterr().err

    steer = ["steer", *base, "--num-steps", "3", "--n", "2", "--profile", str(prof), "--out", str(tmp_path / "s.png")]
    npz = tmp_path / "s.npz"
    assert main(steer + ["--toward", "1", "--classes", "2", "--save-images", str(npz)]) == 0
    with np.load(npz) as got:
        assert set(got.files) == {"before", "after", "conds", "seeds"}
        assert got["before"].shape == got["after"].shape == (2, 1, 8, 8)
        assert 0 <= got["after"].min() and got["after"].max() <= 1 and got["conds"].tolist() == [2, 2]
        assert np.abs(got["after"] - got["before"]).max() > 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["config"]["toward"] == "1" and summary["config"]["branch"] is None
    assert main(steer + ["--remove", "2", "--classes", "2,1"]) == 2  # s.png and s.json exist
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    steer.insert(1, "--overwrite")
    assert main(steer + ["--remove", "2", "--classes", "2,1"]) == 0
    assert main(steer + ["--toward", "1", "--unconditional"]) == 0
    assert not list(tmp_path.glob("*.tmp*"))
    # measured on the fly when no profile is given
    assert main(["steer", *base, "--num-steps", "3", "--n", "1", "--profile-samples", "1", "--toward", "3",
                 "--recipe", "profile", "--classes", "0,1", "--out", str(tmp_path / "t.png")]) == 0
    # refused, one line each, nothing written
    (tmp_path / "s.png").unlink()
    assert main(steer + ["--toward", "1", "--features", "3"]) == 2
    assert main(steer + ["--toward", "3", "--unconditional"]) == 2   # not in the profile
    assert main(steer + ["--toward", "1", "--classes", "3"]) == 2    # A -> B needs the shift along A's generations
    assert main(steer + ["--toward", "1", "--unconditional", "--classes", "2"]) == 2
    assert main(steer[:-4] + ["--num-steps", "5", "--profile", str(prof), "--out", str(tmp_path / "s.png"),
                              "--toward", "1", "--unconditional"]) == 2
    assert main(steer + ["--toward", "1", "--unconditional", "--save-images", str(tmp_path / "x.png")]) == 2
    assert main(steer + ["--toward", "1", "--remove", "2", "--classes", "2"]) == 2
    assert not (tmp_path / "s.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 7 and all(line.startswith("tide steer: error: ") for line in err)
    assert "not both" in err[0] and "no shift null -> 3" in err[1] and "no shift 3 -> 1" in err[2]
    assert "--unconditional" in err[3] and "3-step" in err[4] and ".npz" in err[5] and "one of --toward and --remove" in err[6]


def test_targets_measured_together_equal_each_measured_alone(tiny_dit, device):
    sae = make_sae(device)
    both = measure_profile(tiny_dit, sae, [1, 2, NULL_CONDITION], CFG, num_samples=2, progress=False, sources=[0])
    assert sorted(both.shifts) == [(0, NULL_CONDITION), (0, 1), (0, 2)]
    for c in (1, 2):
        alone = measure_profile(tiny_dit, sae, [c], CFG, num_samples=2, progress=False, sources=[0]).condition(c, 0)
        torch.testing.assert_close(both.condition(c, 0).shift_STM, alone.shift_STM, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(both.condition(c, 0).act_shift_STD, alone.act_shift_STD, atol=1e-5, rtol=1e-4)
