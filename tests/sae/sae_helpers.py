"""Builders shared by the SAE tests: small SAEs with every parameter randomised, statistics, dense references."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from tide.sae import SAE, SAEConfig

TIMESTEPS = [0.0, 250.0, 500.0, 750.0, 999.0]


def stats(d: int, seed: int = 0) -> SimpleNamespace:
    """Statistics shaped like :class:`tide.data.TimestepStats` (only the fields the SAE reads)."""
    rng = np.random.default_rng(seed)
    var_D = rng.uniform(0.5, 8.0, d)
    var_TD = rng.uniform(0.5, 8.0, (len(TIMESTEPS), d))
    return SimpleNamespace(mean_D=rng.normal(size=d), var=float(d * 4.0), timesteps_T=np.array(TIMESTEPS, dtype=np.float32),
                           mean_TD=rng.normal(size=(len(TIMESTEPS), d)), var_T=rng.uniform(0.5, 8.0, len(TIMESTEPS)) * d,
                           var_D=var_D, var_TD=var_TD)


def make_sae(sparsity: str = "topk", conditioning: str = "none", normalization: str = "none", d: int = 8, f: int = 32,
             k: int = 4, seed: int = 0, randomise: bool = True, **kw) -> SAE:
    """An SAE whose every parameter and buffer is random, so that folding, modulation and normalisation all matter."""
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=d, d_sae=f, k=k, sparsity=sparsity, conditioning=conditioning, normalization=normalization,
                    t_embed_dim=16, t_hidden=16, **kw)
    sae = SAE(cfg)
    sae.set_normalization(stats(d, seed))
    if randomise:
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.5)
            sae.b_dec.normal_(0, 0.5)
            sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
            if sae.modulation is not None:
                for p in sae.modulation.parameters():
                    p.normal_(0, 0.2)
            if sparsity == "jumprelu":
                sae.log_threshold.copy_(torch.empty_like(sae.log_threshold).uniform_(-3, 0))
            if sparsity == "batchtopk":
                sae.threshold.fill_(0.2)
    return sae


def batch(sae: SAE, n: int = 32, seed: int = 1, t: float | None = None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows around the SAE's normalisation statistics, at timestep ``t`` or spread over [0, t_max]."""
    g = torch.Generator().manual_seed(seed)
    d = sae.cfg.d_in
    x = 2.0 * torch.randn(n, d, generator=g, dtype=dtype) + sae.norm_mean_TD[0].cpu().to(dtype)
    t_B = torch.full((n,), float(t), dtype=dtype) if t is not None else torch.rand(n, generator=g, dtype=dtype) * sae.cfg.t_max
    device = sae.W_enc.device
    return x.to(device), t_B.to(device)


def fvu(x_hat, x):
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def dense_reference_loss(sae: SAE, x_BD, t_B, dead_NF=None, k_aux: int = 256, aux_coefficient: float = 1 / 32):
    """The TopK training loss by plain autograd through dense (B, F) codes: no sparse kernel anywhere."""
    mu, sigma = sae._norm(t_B)
    x_n = (x_BD - mu) / sigma
    if sae.modulation is not None:
        s, h = sae.modulation(t_B)
        x_in, out_scale = x_n * (1 + s) + h, 1 + s
    else:
        x_in, h, out_scale = x_n, 0.0, 1.0
    pre = torch.addmm(sae.b_enc[0], x_in - sae.b_dec[0], sae.W_enc[0].T)
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    x_hat_n = (z @ sae.W_dec[0] + sae.b_dec[0] - h) / out_scale
    loss = fvu(x_hat_n, x_n)
    if dead_NF is not None and dead_NF.any():
        residual = (x_n - x_hat_n).detach()
        k = min(k_aux, int(dead_NF.sum()))
        v, i = pre.masked_fill(~dead_NF[0], float("-inf")).topk(k, dim=-1)
        e = torch.zeros_like(pre).scatter(1, i, torch.relu(v)) @ sae.W_dec[0] / out_scale
        loss = loss + aux_coefficient * fvu(e, residual)
    return loss
