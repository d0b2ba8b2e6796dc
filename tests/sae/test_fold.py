"""Folding: at a fixed timestep every SAE is an exactly equivalent plain SAE on raw activations."""

from __future__ import annotations

import json

import pytest
import torch

from tide.sae import SAE, export_folded, load_folded
from tide.sae.config import CONDITIONINGS, NORMALIZATIONS, SPARSITIES

from sae_helpers import batch, make_sae

T = 437.0  # between recorded timesteps 250 and 500, inside bucket 1 of 4


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_temporal_sae_gives_same_results_after_folding_at_fixed_t(sparsity, conditioning, normalization):
    sae = make_sae(sparsity, conditioning, normalization).double().eval()
    x, t_B = batch(sae, t=T, dtype=torch.float64)
    folded = sae.fold(T)
    assert folded.cfg.conditioning == "none" and folded.cfg.normalization == "none"
    other_t = torch.zeros_like(t_B)  # the folded SAE ignores t
    with torch.no_grad():
        want, got = sae(x, t_B), folded(x, other_t)
    assert want.latents.l0().float().mean() > 0
    torch.testing.assert_close(got.latents.dense(sae.cfg.d_sae), want.latents.dense(sae.cfg.d_sae), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.x_hat_BD, want.x_hat_BD, rtol=1e-9, atol=1e-9)
    ids = torch.tensor([3, 0, 7])
    torch.testing.assert_close(sae.fold_decoder(T, ids), folded.W_dec[0][ids], rtol=0, atol=0)


def test_fold_is_not_trivial_when_modulation_and_normalisation_are_random():
    sae = make_sae("topk", "tide", "per_timestep").double().eval()
    folded = sae.fold(T)
    assert not torch.allclose(folded.W_enc, sae.W_enc)
    assert not torch.allclose(folded.b_dec, sae.b_dec)
    x, t_B = batch(sae, t=T, dtype=torch.float64)
    with torch.no_grad():  # the same SAE at another timestep reconstructs differently
        assert not torch.allclose(sae(x, t_B).x_hat_BD, sae(x, torch.full_like(t_B, 900.0)).x_hat_BD)


def plain_sae_forward(tensors: dict, cfg: dict, sparsity: str, k: int, x_BD: torch.Tensor) -> torch.Tensor:
    """The common plain-SAE forward written out by hand: W_enc is (d_in, d_sae) and b_dec is applied to the input."""
    pre = (x_BD - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    if sparsity == "topk":
        vals, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    elif sparsity == "relu":
        z = torch.relu(pre)
    else:  # jumprelu, and batchtopk at inference: keep what exceeds the per-latent threshold
        z = pre * (pre > tensors["threshold"])
    assert cfg["apply_b_dec_to_input"] and cfg["d_sae"] == z.shape[-1]
    return z @ tensors["W_dec"] + tensors["b_dec"]


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_folded_export_reproduces_reconstruction_with_a_plain_sae_forward(tmp_path, sparsity, conditioning):
    sae = make_sae(sparsity, conditioning, "per_timestep").eval()
    dirs = export_folded(sae, tmp_path, [T, 900.0])
    assert len(dirs) == 2
    for d, t in zip(dirs, (T, 900.0)):
        tensors = load_folded(d)
        cfg = json.loads((d / "cfg.json").read_text())
        assert cfg["timestep"] == t and cfg["d_in"] == sae.cfg.d_in
        assert tensors["W_enc"].shape == (sae.cfg.d_in, sae.cfg.d_sae) and tensors["W_dec"].shape == (sae.cfg.d_sae, sae.cfg.d_in)
        x, t_B = batch(sae, t=t)
        with torch.no_grad():
            want = sae.reconstruct(x, t_B)
        got = plain_sae_forward(tensors, cfg, sparsity, sae.cfg.k, x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_tide_modulation_starts_as_a_plain_sae():
    tide = make_sae("topk", "tide", "global", randomise=False)
    plain = SAE(make_sae("topk", "none", "global", randomise=False).cfg)
    plain.load_state_dict({k: v for k, v in tide.state_dict().items() if not k.startswith("modulation.")})
    x, t_B = batch(tide)
    out_tide, out_plain = tide(x, t_B), plain(x, t_B)
    torch.testing.assert_close(out_tide.x_hat_BD, out_plain.x_hat_BD, rtol=0, atol=0)
    assert torch.equal(out_tide.latents.idx, out_plain.latents.idx)
    # and it is the zero-initialised last layer that makes it so
    with torch.no_grad():
        tide.modulation.mlp[-1].bias.fill_(0.1)
    assert not torch.allclose(tide(x, t_B).x_hat_BD, out_plain.x_hat_BD)
