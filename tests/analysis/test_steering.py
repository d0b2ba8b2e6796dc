import json

import pytest
import torch

from tide.analysis.steering import FeatureEdit, HookScale, edit_generation, save_before_after, steering_intervention
from tide.errors import TideError
from tide.hooks import COND, UNCOND, StepContext, step_context
from tide.sae.config import SAEConfig
from tide.sae.model import SAE
from tide.sampling import Intervention, SamplerConfig, sample

HOOK = "blocks.1.hook_resid_post"
CFG = SamplerConfig(num_steps=4, guidance_scale=2.0)


def make_sae(device, conditioning="none", d_in=16, hook=HOOK):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=32, k=4, normalization="none", conditioning=conditioning, hook=hook))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_dec.normal_(std=0.1)
    return sae.to(device).eval()


@pytest.fixture
def sae(device):
    return make_sae(device)


def ctx(t=500.0, branches=(COND, COND)):
    b = len(branches)
    return StepContext(1, 4, t, torch.tensor(branches, dtype=torch.int8), torch.arange(b), torch.zeros(b, dtype=torch.long))


def call(iv, x, t=500.0, branches=(COND, COND)):
    c = ctx(t, branches)
    with step_context(c), torch.no_grad():
        return iv.bound_fn(c)(x, None)


def recorder(store):
    from tide.hooks import current_step

    return Intervention(HOOK, lambda a, hook: store.append((current_step().step_index, a.detach().clone())))


def test_noop_edit_reproduces_the_clean_samples(tiny_dit, sae):
    clean = sample(tiny_dit, [0, 3], seeds=[4, 5], config=CFG)
    iv = steering_intervention(sae, [FeatureEdit(3, "add", alpha=0.0), FeatureEdit(7, "add", alpha=0.0)])
    same = sample(tiny_dit, [0, 3], seeds=[4, 5], config=CFG, interventions=[iv])
    torch.testing.assert_close(same.latents, clean.latents, atol=1e-6, rtol=0)


def test_ablate_changes_the_output(tiny_dit, sae):
    clean = sample(tiny_dit, [1], seeds=[2], config=CFG)
    iv = steering_intervention(sae, [FeatureEdit(f, "ablate") for f in range(32)])
    edited = sample(tiny_dit, [1], seeds=[2], config=CFG, interventions=[iv])
    assert (edited.latents - clean.latents).abs().max() > 1e-4


@pytest.mark.parametrize("conditioning", ["none", "tide"])
def test_add_adds_exactly_alpha_times_the_folded_decoder_row(device, conditioning):
    sae = make_sae(device, conditioning)
    if sae.modulation is not None:  # make the folded directions depend on t
        with torch.no_grad():
            for p in sae.modulation.parameters():
                p.normal_(std=0.3)
    x = torch.randn(2, 16, 16, device=device)
    iv = steering_intervention(sae, [FeatureEdit(5, "add", alpha=2.5), FeatureEdit(9, "add", alpha=-1.0)])
    for t in (900.0, 100.0, 900.0):  # the second 900 comes from the fold cache
        out = call(iv, x, t)
        W = sae.fold(t).W_dec[0]
        torch.testing.assert_close(out - x, (2.5 * W[5] - W[9]).expand_as(x), atol=1e-5, rtol=1e-5)


def test_clamp_and_ablate_keep_the_error_term(device, sae):
    x = torch.randn(2, 16, 16, device=device)
    t = 300.0
    z = sae.encode(x.reshape(-1, 16), torch.full((32,), t, device=device)).detach()
    f = int(z.ne(0).sum(0).argmax())  # a feature active on some tokens
    W = sae.fold(t).W_dec[0]
    out = call(steering_intervention(sae, [FeatureEdit(f, "ablate")]), x, t)
    expect = x.reshape(-1, 16) - z[:, f:f + 1] * W[f]
    torch.testing.assert_close(out.reshape(-1, 16), expect, atol=1e-5, rtol=1e-5)
    # clamp plus add at once: one delta each
    out = call(steering_intervention(sae, [FeatureEdit(f, "clamp", value=3.0), FeatureEdit(0, "add", alpha=1.5)]), x, t)
    expect = x.reshape(-1, 16) + (3.0 - z[:, f:f + 1]) * W[f] + 1.5 * W[0]
    torch.testing.assert_close(out.reshape(-1, 16), expect, atol=1e-5, rtol=1e-5)


def test_clamping_a_latent_to_its_current_value_returns_the_activation_exactly(device, sae):
    x = torch.randn(1, 1, 16, device=device)
    t = 300.0
    z = sae.encode(x.reshape(-1, 16), torch.full((1,), t, device=device)).detach()[0]
    f = int(z.argmax())
    assert z[f] > 0
    out = call(steering_intervention(sae, [FeatureEdit(f, "clamp", value=float(z[f]))]), x, t)
    assert torch.equal(out, x)
    out = call(steering_intervention(sae, [FeatureEdit(f, "add", alpha=0.0), FeatureEdit((f + 1) % 32, "add", alpha=0.0,
                                                                                         scale="norm")],
                                     hook_scale=HookScale(HOOK, (t,), (2.0,))), x, t)
    assert torch.equal(out, x)


def test_edits_keep_the_error_term_with_its_sign(device, sae):
    """Ablating every feature leaves the decoder bias plus the SAE's error x - x^ (not 2 x^ - x or x^ - x)."""
    x = torch.randn(2, 16, 16, device=device)
    t = 700.0
    x_ND = x.reshape(-1, 16)
    recon = sae.reconstruct(x_ND, torch.full((len(x_ND),), t, device=device)).detach()
    bias = sae.fold(t).b_dec[0]
    out = call(steering_intervention(sae, [FeatureEdit(f, "ablate") for f in range(32)]), x, t)
    torch.testing.assert_close(out.reshape(-1, 16) - bias, x_ND - recon, atol=1e-5, rtol=1e-5)


def test_norm_relative_add_is_alpha_times_r_of_t_along_the_unit_direction(device, sae):
    x = torch.randn(2, 16, 16, device=device)
    scale = HookScale(HOOK, (900.0, 100.0), (3.0, 0.5))
    iv = steering_intervention(sae, [FeatureEdit(5, "add", alpha=0.2, scale="norm")], hook_scale=scale)
    for t, r in ((880.0, 3.0), (150.0, 0.5)):  # the nearest recorded timestep's R(t)
        W = sae.fold(t).W_dec[0]
        torch.testing.assert_close(call(iv, x, t) - x, (0.2 * r * W[5] / W[5].norm()).expand_as(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(TideError, match="need R\\(t\\) of the hook: pass hook_scale="):
        steering_intervention(sae, [FeatureEdit(5, "add", alpha=0.2, scale="norm")])
    with pytest.raises(TideError, match="measured at 'blocks.0.hook_resid_post', not at the edited hook"):
        steering_intervention(sae, [FeatureEdit(5, alpha=0.2, scale="norm")], hook_scale=HookScale("blocks.0.hook_resid_post", (1.0,), (1.0,)))


def test_gated_add_edits_only_where_the_feature_fires(device, sae):
    x = torch.randn(2, 16, 16, device=device)
    t = 400.0
    z = sae.encode(x.reshape(-1, 16), torch.full((32,), t, device=device)).detach()
    f = int(z.ne(0).sum(0).argmax())
    fires = z[:, f] > 0
    assert 0 < int(fires.sum()) < len(fires)
    out = call(steering_intervention(sae, [FeatureEdit(f, "add", alpha=2.0, gate=True)]), x, t).reshape(-1, 16)
    W = sae.fold(t).W_dec[0]
    assert torch.equal(out[~fires], x.reshape(-1, 16)[~fires])
    torch.testing.assert_close(out[fires] - x.reshape(-1, 16)[fires], (2.0 * W[f]).expand(int(fires.sum()), -1),
                               atol=1e-5, rtol=1e-5)


def test_cfg_branch_adds_to_conditional_rows_and_subtracts_from_unconditional_ones(device, sae):
    x = torch.randn(2, 16, 16, device=device)
    iv = steering_intervention(sae, [FeatureEdit(3, "add", alpha=1.5)], branch="cfg")
    out = call(iv, x, t=500.0, branches=(COND, UNCOND))
    d = 1.5 * sae.fold(500.0).W_dec[0][3]
    torch.testing.assert_close(out[0] - x[0], d.expand(16, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1] - x[1], -d.expand(16, -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(TideError, match="branch must be one of"):
        steering_intervention(sae, [FeatureEdit(3, "add", alpha=1.5)], branch="neither")


@pytest.mark.parametrize("flat", [False, True])
def test_masked_edit_leaves_other_tokens_untouched(device, sae, flat):
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 2:] = True
    x = torch.randn(2, 16, 16, device=device)
    iv = steering_intervention(sae, [FeatureEdit(2, "add", alpha=4.0), FeatureEdit(6, "clamp", value=2.0)],
                               mask=mask.flatten() if flat else mask)
    out = call(iv, x)
    m = mask.flatten().to(device)
    assert torch.equal(out[:, ~m], x[:, ~m])
    assert (out[:, m] - x[:, m]).abs().amin(-1).min() > 0


def test_branch_restriction(device, sae):
    x = torch.randn(2, 16, 16, device=device)
    for branch, changed in (("cond", [True, False]), ("uncond", [False, True]), ("both", [True, True])):
        iv = steering_intervention(sae, [FeatureEdit(1, "add", alpha=3.0)], branch=branch)
        out = call(iv, x, branches=(COND, UNCOND))
        assert [not torch.equal(out[i], x[i]) for i in range(2)] == changed


def test_window_edits_only_the_chosen_steps(tiny_dit, sae):
    clean, edited = [], []
    sample(tiny_dit, [2], seeds=[9], config=CFG, interventions=[recorder(clean)])
    iv = steering_intervention(sae, [FeatureEdit(4, "add", alpha=5.0)], steps=(2, 4))
    sample(tiny_dit, [2], seeds=[9], config=CFG, interventions=[iv, recorder(edited)])
    assert [s for s, _ in edited] == [0, 1, 2, 3]
    for (step, a), (_, b) in zip(clean, edited):
        if step < 2:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
        else:
            assert (b - a).abs().max() > 1.0


def test_edit_generation_before_is_the_plain_sample_and_grid_is_written(tiny_dit, sae, tmp_path):
    edits = [FeatureEdit(f, "ablate") for f in range(32)]
    before, after = edit_generation(tiny_dit, sae, [0, 1, 2], [11, 12, 13], CFG, edits, from_step=1)
    plain = sample(tiny_dit, [0, 1, 2], seeds=[11, 12, 13], config=CFG)
    assert torch.equal(before.images, plain.images) and torch.equal(before.latents, plain.latents)
    assert (after.latents - before.latents).abs().max() > 1e-4
    path = save_before_after(before, after, tmp_path / "edit.png", ncol=2)
    assert path.exists() and path.stat().st_size > 0
    with pytest.raises(TideError, match="two labels"):
        save_before_after(before, after, tmp_path / "x.png", row_labels=["a"])


def test_errors(tiny_dit, sae, device):
    with pytest.raises(TideError, match=r"0\.\.31"):
        steering_intervention(sae, [FeatureEdit(32, "add", alpha=1.0)])
    with pytest.raises(TideError, match="mode"):
        FeatureEdit(0, "scale")
    # a window outside the schedule is refused when sampling
    iv = steering_intervention(sae, [FeatureEdit(0, "add", alpha=1.0)], steps=(10, 12))
    with pytest.raises(TideError, match="active at no step"):
        sample(tiny_dit, [0], seeds=[0], config=CFG, interventions=[iv])
    with pytest.raises(TideError, match="outside the 4-step schedule"):
        edit_generation(tiny_dit, sae, [0], [0], CFG, [FeatureEdit(0, "ablate")], from_step=4)
    # wrong mask shape names the expected one
    bad = steering_intervention(sae, [FeatureEdit(0, "add", alpha=1.0)], mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TideError, match=r"\(16,\)"):
        call(bad, torch.randn(2, 16, 16, device=device))
    with pytest.raises(TideError, match=r"\(4, 4\)"):
        edit_generation(tiny_dit, sae, [0], [0], CFG, [FeatureEdit(0, "ablate")], mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TideError, match="bool"):
        steering_intervention(sae, [FeatureEdit(0, "ablate")], mask=torch.ones(4, 4))
    # an SAE trained on another hook
    with pytest.raises(TideError, match="blocks.1.hook_resid_post.*blocks.2.hook_resid_post"):
        steering_intervention(sae, [FeatureEdit(0, "ablate")], hook="blocks.2.hook_resid_post")
    # SAE width differs from the activations': refused at the first call
    narrow = steering_intervention(make_sae(device, d_in=8), [FeatureEdit(0, "ablate")])
    with pytest.raises(TideError, match="width 16.*d_in=8"):
        sample(tiny_dit, [0], seeds=[0], config=CFG, interventions=[narrow])
    # outside the sampler there is no timestep
    with pytest.raises(TideError, match="step context"):
        steering_intervention(sae, [FeatureEdit(0, "ablate")]).fn(torch.randn(1, 16, 16, device=device), None)


def test_steer_command_writes_a_grid_and_names_bad_input(tiny_dit_dir, tmp_path, capsys):
    from tide.cli import main
    from tide.sae import SAE, SAEConfig, save_sae

    torch.manual_seed(0)
    save_sae(SAE(SAEConfig(d_in=16, d_sae=32, k=4, normalization="none", hook="blocks.1.hook_resid_post")),
             tmp_path / "sae")
    args = ["steer", "--sae", str(tmp_path / "sae"), "--backbone", str(tiny_dit_dir), "--classes", "0,1", "--n", "2",
            "--num-steps", "4", "--device", "cpu", "--out", str(tmp_path / "steer.png")]
    assert main(args + ["--features", "3,5", "--alpha", "2", "--mask", "upper"]) == 0
    assert (tmp_path / "steer.png").exists() and (tmp_path / "steer.json").exists()
    written = {p.name: p.read_bytes() for p in tmp_path.glob("steer.*")}
    assert main(args + ["--features", "3"]) == 2  # the outputs exist: refused without --overwrite
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    args.append("--overwrite")
    assert main(args + ["--features", "99"]) == 2
    assert main(args + ["--features", "3", "--mask", "middle"]) == 2
    assert main(args + ["--features", "3", "--from-step", "6"]) == 2
    err = capsys.readouterr().err
    assert "0..31" in err and "unknown mask region 'middle'" in err and "outside the 4-step schedule" in err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("steer.*")} == written  # refusals leave the old outputs
    (tmp_path / "steer.png").unlink()
    assert main(args + ["--features", "3", "--scale", "norm"]) == 2
    assert main(args + ["--features", "3", "--branch", "sideways"]) == 2
    assert not (tmp_path / "steer.png").exists()
    err = capsys.readouterr().err
    assert "--scale norm needs the SAE's feature statistics for R(t): pass --stats" in err and "sideways" in err
    assert main(args + ["--features", "3,5", "--alpha", "2", "--branch", "cfg", "--gate"]) == 0
    assert not list(tmp_path.glob("*.tmp*"))
    assert json.loads((tmp_path / "steer.json").read_text())["config"]["branch"] == "cfg"


def test_steer_run_returns_a_result_whose_dict_is_the_json_summary(tiny_dit_dir, tmp_path):
    import json

    from tide.analysis.steering import SteerConfig, SteerResult
    from tide.sae import SAE, SAEConfig, save_sae

    torch.manual_seed(0)
    save_sae(SAE(SAEConfig(d_in=16, d_sae=32, k=4, normalization="none", hook="blocks.1.hook_resid_post")),
             tmp_path / "sae")
    result = SteerConfig(sae=str(tmp_path / "sae"), backbone=str(tiny_dit_dir), features=[3], alpha=2.0, classes=[0],
                         n=2, num_steps=3, device="cpu", out=str(tmp_path / "steer.png")).run()
    assert isinstance(result, SteerResult) and result.grid_path == tmp_path / "steer.png" and result.grid_path.exists()
    assert result.json_path == tmp_path / "steer.json"
    assert json.loads(result.json_path.read_text()) == json.loads(json.dumps(result.to_dict()))
    assert set(result.to_dict()) == {"config", "grid", "pixel_change"} and result.target_class is None
    assert result.pixel_change == pytest.approx(float((result.after.images - result.before.images).abs().mean()))
