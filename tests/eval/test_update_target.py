"""SAEs on the block's update (resid_post - resid_pre): training rows, normalisation, reconstruction metrics and the
splice all read the difference; analysis that reads raw activations refuses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tide.data import ActivationStore
from tide.errors import TideError
from tide.eval.metrics import reconstruction_metrics
from tide.eval.splice import denoiser_error, splice_intervention, spliced_samples
from tide.sae import SAE, SAEConfig
from tide.sampling import Intervention, SamplerConfig, sample
from tide.train import SAESpec, TrainConfig, train

from eval_helpers import D, HOOK, capture_tiny, identity_sae

PRE = "blocks.1.hook_resid_pre"
CONDS, SEEDS = [0, 1, 2, 3], [10, 11, 12, 13]
CFG = SamplerConfig(num_steps=5, guidance_scale=2.0)


def _update(sae: SAE) -> SAE:
    sae.cfg.target = "update"
    sae.cfg.validate()
    return sae


def test_an_exact_update_sae_changes_nothing_and_a_zero_one_skips_the_block(tiny_dit):
    exact = _update(identity_sae())
    out = spliced_samples(tiny_dit, exact, HOOK, CONDS, SEEDS, CFG)
    torch.testing.assert_close(out.spliced.images, out.clean.images, rtol=0, atol=1e-6)
    err = denoiser_error(tiny_dit, exact, HOOK, CONDS, SEEDS, CFG)
    assert np.all(err.relative_error_T <= 1e-6) and np.all(err.fvu_T <= 1e-12)
    zero = _update(identity_sae())
    with torch.no_grad():
        zero.W_dec.zero_()  # reconstruction 0: the block's update is dropped, resid_post = resid_pre
    spliced = spliced_samples(tiny_dit, zero, HOOK, CONDS, SEEDS, CFG).spliced
    saved = {}
    skip = [Intervention(PRE, lambda a, hook=None: saved.__setitem__("x", a)),
            Intervention(HOOK, lambda a, hook=None: saved["x"])]
    reference = sample(tiny_dit, CONDS, SEEDS, CFG, interventions=skip)
    torch.testing.assert_close(spliced.images, reference.images, rtol=0, atol=1e-6)
    assert (reference.images - out.clean.images).abs().max() > 1e-3
    with pytest.raises(TideError, match="splice_interventions"):
        splice_intervention(exact, HOOK)


def test_training_and_metrics_read_the_difference(tiny_dit, tmp_path):
    data = capture_tiny(tiny_dit, tmp_path / "ds", hooks=[PRE, HOOK])
    store = ActivationStore(data)
    cfg = TrainConfig(data=data, out=str(tmp_path / "run"), steps=5, batch_size=64, progress=False, device="cpu",
                      saes=[SAESpec(name="u", hook=HOOK, d_sae=32, k=4, target="update", normalization="per_dimension")])
    result = train(cfg)
    from tide.sae import load_sae

    sae = load_sae(result.sae_dir("u"))
    assert sae.cfg.target == "update" and sae.cfg.input_hooks == [PRE, HOOK]
    rows = {h: [] for h in (PRE, HOOK)}
    for _, _, block, _ in store.iter_blocks([PRE, HOOK]):
        for h in rows:
            rows[h].append(block[h].astype(np.float64))
    diff = np.concatenate(rows[HOOK]) - np.concatenate(rows[PRE])
    np.testing.assert_allclose(sae.norm_mean_TD[0].numpy(), diff.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sae.norm_scale_TD[0].numpy(), diff.std(0), rtol=1e-3)
    metrics = reconstruction_metrics(sae, store)
    x = torch.as_tensor(diff, dtype=torch.float32)
    t = torch.as_tensor(np.concatenate([m["timestep"] for *_, m in store.iter_blocks([HOOK])]))
    x_hat = sae.reconstruct(x, t).detach().double()
    fvu = float(((x_hat - x.double()) ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum())
    assert metrics.overall.fvu == pytest.approx(fvu, rel=1e-4)


def test_update_targets_need_both_hooks_and_a_resid_post_hook(tiny_dit, tmp_path):
    data = capture_tiny(tiny_dit, tmp_path / "ds")  # HOOK only
    cfg = TrainConfig(data=data, out=str(tmp_path / "run"), steps=1, batch_size=16, progress=False,
                      saes=[SAESpec(name="u", hook=HOOK, d_sae=32, k=4, target="update")])
    with pytest.raises(TideError, match="blocks.1.hook_resid_pre"):
        train(cfg)
    with pytest.raises(TideError, match="resid_post"):
        SAEConfig(d_in=D, hook="blocks.1.hook_attn_out", target="update").validate()


def test_feature_stats_and_steering_read_the_update(tiny_dit, tmp_path):
    """Feature statistics encode resid_post - resid_pre; add edits work (adding to the block's output adds to its
    update), edits that encode the activation are refused."""
    from tide.analysis.feature_stats import compute_feature_stats
    from tide.analysis.steering import FeatureEdit, steering_intervention

    data = capture_tiny(tiny_dit, tmp_path / "ds", hooks=[PRE, HOOK])
    sae = _update(identity_sae())
    stats = compute_feature_stats(sae, data)
    store = ActivationStore(data)
    rows = [(b[HOOK] - b[PRE])[m["cfg_branch"] == 0] for _, _, b, m in store.iter_blocks([PRE, HOOK], ("cfg_branch",))]
    diff = np.concatenate(rows)
    # the identity SAE's feature i fires with |update_i| (i < D on positive, D + i on negative values)
    np.testing.assert_allclose(stats.topk_value[:D, 0], np.maximum(diff, 0).max(0), rtol=1e-5)
    np.testing.assert_allclose(stats.topk_value[D:, 0], np.maximum(-diff, 0).max(0), rtol=1e-5)
    post = np.concatenate([b[HOOK][m["cfg_branch"] == 0] for _, _, b, m in store.iter_blocks([HOOK], ("cfg_branch",))])
    rms_all = np.sqrt((post.astype(np.float64) ** 2).sum(-1).mean())  # R(t) is the output's scale, not the update's
    weights = stats.rows_per_step / stats.rows_per_step.sum()
    assert np.sqrt((weights * stats.act_rms_step ** 2).sum()) == pytest.approx(rms_all, rel=1e-6)
    steering_intervention(sae, [FeatureEdit(0, "add", alpha=1.0)])
    with pytest.raises(TideError, match="update"):
        steering_intervention(sae, [FeatureEdit(0, "clamp", value=1.0)])
