"""Spliced fidelity on the tiny DiT: an exact SAE changes nothing, a random one does, the trajectory stays clean."""

import json

import numpy as np
import pytest
import torch

from tide.data import ActivationStore
from tide.errors import TideError
from tide.eval import EvalClassifier
from tide.eval.splice import denoiser_error, splice_fn, spliced_samples
from tide.sampling import SamplerConfig, sample

from eval_helpers import HOOK, OTHER_HOOK, capture_tiny, identity_sae, random_sae

CONDS, SEEDS = [0, 1, 2, 3], [10, 11, 12, 13]
CFG = SamplerConfig(num_steps=5, guidance_scale=2.0)


def test_an_exact_sae_gives_zero_denoiser_error_and_identical_samples(tiny_dit, device):
    sae = identity_sae().to(device)
    err = denoiser_error(tiny_dit, sae, HOOK, CONDS, SEEDS, CFG)
    assert err.relative_error_T.shape == (5,) and np.all(err.relative_error_T <= 1e-6)
    assert np.all(err.fvu_T <= 1e-12)
    assert np.all(err.ablation_error_T > 0.01)  # the baseline does change the output
    np.testing.assert_array_equal(err.timesteps_T, [800, 600, 400, 200, 0])
    out = spliced_samples(tiny_dit, sae, HOOK, CONDS, SEEDS, CFG)
    assert out.pixel_mse <= 1e-12
    torch.testing.assert_close(out.spliced.images, out.clean.images, rtol=0, atol=1e-6)
    assert out.classifier is None


def test_a_random_sae_gives_a_positive_error_and_different_samples(tiny_dit, device, tmp_path):
    sae = random_sae().to(device)
    stats = ActivationStore(capture_tiny(tiny_dit, tmp_path / "ds")).stats(HOOK)
    err = denoiser_error(tiny_dit, sae, HOOK, CONDS, SEEDS, CFG, ablation_stats=stats)
    assert np.all(err.relative_error_T > 1e-3) and np.all(np.isfinite(err.fvu_T)) and np.all(err.fvu_T > 0)
    d = json.loads(json.dumps(err.to_dict(), allow_nan=False))
    assert d["ablation"] == "data" and d["mean_relative_error"] > 0 and len(d["per_step"]["timestep"]) == 5
    out = spliced_samples(tiny_dit, sae, HOOK, CONDS, SEEDS, SamplerConfig(num_steps=5))
    assert out.pixel_mse > 1e-6
    assert json.loads(json.dumps(out.to_dict()))["samples"] == 4


def test_the_spliced_output_never_changes_the_clean_trajectory(tiny_dit, device):
    err = denoiser_error(tiny_dit, random_sae().to(device), HOOK, CONDS, SEEDS, CFG)
    clean = sample(tiny_dit, CONDS, SEEDS, CFG, decode=False)
    torch.testing.assert_close(err.latents, clean.latents, rtol=0, atol=1e-5)


def test_spliced_samples_with_a_classifier_report_agreement_and_frechet_distances(tiny_dit, device):
    torch.manual_seed(0)
    clf = EvalClassifier(num_classes=4, channels=(4, 4, 8), feature_dim=8).eval().to(device)
    real = torch.rand(20, 1, 8, 8)
    conds = [c for c in range(4) for _ in range(2)]
    seeds = list(range(8))
    exact = spliced_samples(tiny_dit, identity_sae().to(device), HOOK, conds, seeds, SamplerConfig(num_steps=5),
                            classifier=clf, real_images=real).classifier
    assert exact["agreement_spliced_vs_clean"] == 1.0
    assert exact["agreement_spliced"] == exact["agreement_clean"]
    assert exact["frechet_spliced_vs_clean"] == pytest.approx(0.0, abs=1e-6)
    assert exact["frechet_clean_vs_real"] == pytest.approx(exact["frechet_spliced_vs_real"], rel=1e-6)
    assert exact["real_images"] == 20
    noisy = spliced_samples(tiny_dit, random_sae().to(device), HOOK, conds, seeds, SamplerConfig(num_steps=5),
                            classifier=clf).classifier
    assert noisy["frechet_spliced_vs_clean"] > 0 and "frechet_clean_vs_real" not in noisy
    assert 0 <= noisy["agreement_spliced"] <= 1


def test_a_splice_refuses_an_sae_of_another_hook_or_width(tiny_dit, device):
    for run in (denoiser_error, spliced_samples):
        with pytest.raises(TideError, match=f"{OTHER_HOOK}.*{HOOK}"):
            run(tiny_dit, random_sae(hook=OTHER_HOOK).to(device), HOOK, CONDS, SEEDS, CFG)
        with pytest.raises(TideError, match="width 16.*d_in=8"):
            run(tiny_dit, random_sae(d=8).to(device), HOOK, CONDS, SEEDS, CFG)
        with pytest.raises(TideError, match="unknown hook"):
            run(tiny_dit, random_sae(hook="").to(device), "blocks.9.hook_resid_post", CONDS, SEEDS, CFG)


def test_the_splice_reads_the_timestep_from_the_sampler_context():
    with pytest.raises(TideError, match="step context"):
        splice_fn(random_sae(), HOOK)(torch.zeros(2, 16, 16))
