"""Input normalisation: global statistics, or the statistics of the nearest recorded timestep."""

from __future__ import annotations

import pytest
import torch

from tide.errors import TideError
from tide.sae import SAE

from sae_helpers import TIMESTEPS, make_sae, stats


def test_per_timestep_normalisation_uses_the_nearest_recorded_timestep():
    sae = make_sae("topk", "none", "per_timestep", d=8)
    st = stats(8)
    t_B = torch.tensor([0.0, 120.0, 130.0, 499.0, 620.0, 999.0, 2000.0])
    nearest = [0, 0, 1, 2, 2, 4, 4]  # recorded timesteps 0, 250, 500, 750, 999
    x = torch.randn(len(t_B), 8)
    out = sae(x, t_B)
    for row, i in enumerate(nearest):
        mean = torch.as_tensor(st.mean_TD[i], dtype=torch.float32)
        scale = float((st.var_T[i] / 8) ** 0.5)
        torch.testing.assert_close(out.x_n_BD[row], (x[row] - mean) / scale)
    # the reconstruction is mapped back with the same statistics
    x_hat_n = out.x_hat_n_BD[2]
    torch.testing.assert_close(out.x_hat_BD[2], x_hat_n * float((st.var_T[1] / 8) ** 0.5)
                               + torch.as_tensor(st.mean_TD[1], dtype=torch.float32))
    assert sae.norm_t_T.tolist() == TIMESTEPS


def test_global_normalisation_uses_one_mean_and_scale():
    sae = make_sae("topk", "none", "global", d=8)
    st = stats(8)
    x = torch.randn(3, 8)
    out = sae(x, torch.tensor([0.0, 500.0, 999.0]))
    torch.testing.assert_close(out.x_n_BD, (x - torch.as_tensor(st.mean_D, dtype=torch.float32)) / (st.var / 8) ** 0.5)


def test_normalisation_statistics_of_another_width_are_refused():
    sae = SAE(make_sae("topk", "none", "global", d=8).cfg)
    with pytest.raises(TideError, match="width 6"):
        sae.set_normalization(stats(6))


def test_per_dimension_normalisation_standardises_each_dimension():
    st = stats(8)
    sae = make_sae("topk", "none", "per_dimension", d=8)
    x = torch.randn(5, 8)
    out = sae(x, torch.tensor([0.0, 100.0, 500.0, 800.0, 999.0]))
    want = (x - torch.as_tensor(st.mean_D, dtype=torch.float32)) / torch.as_tensor(st.var_D, dtype=torch.float32).sqrt()
    torch.testing.assert_close(out.x_n_BD, want)
    per_t = make_sae("topk", "none", "per_timestep_dimension", d=8)
    out = per_t(x, torch.tensor([499.0] * 5))  # nearest recorded timestep: 500 (row 2)
    want = (x - torch.as_tensor(st.mean_TD[2], dtype=torch.float32)) / torch.as_tensor(st.var_TD[2], dtype=torch.float32).sqrt()
    torch.testing.assert_close(out.x_n_BD, want)


def test_saes_saved_with_one_scale_per_timestep_still_load(tmp_path):
    """Files written before per-dimension scales hold ``norm_scale_T`` (T,): it loads as the same scale on every dimension."""
    from safetensors.torch import load_file, save_file

    from tide.sae import load_sae, save_sae

    sae = make_sae("topk", "none", "per_timestep", d=8)
    save_sae(sae, tmp_path / "s")
    state = load_file(str(tmp_path / "s" / "sae.safetensors"))
    scale_TD = state.pop("norm_scale_TD")
    state["norm_scale_T"] = scale_TD[:, 0].contiguous()
    save_file(state, str(tmp_path / "s" / "sae.safetensors"))
    loaded = load_sae(tmp_path / "s")
    x, t = torch.randn(4, 8), torch.tensor([0.0, 260.0, 740.0, 999.0])
    torch.testing.assert_close(loaded(x, t).x_hat_BD, sae(x, t).x_hat_BD)
