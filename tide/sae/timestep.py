"""Timestep conditioning: sinusoidal embedding -> MLP -> (scale, shift), zero-initialised (adaLN-Zero)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tide.timesteps import bucket_index  # noqa: F401  (equal-width buckets; defined with the other timestep lookups)


def sinusoidal_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B, dim) sin/cos features of the timestep values (as in DiT's timestep embedder)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
    args = t_B.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class TimestepModulation(nn.Module):
    """t -> (scale_BD, shift_BD). The last layer starts at zero, so training starts as a plain SAE."""

    def __init__(self, d_in: int, embed_dim: int, hidden: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * d_in))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = sinusoidal_embedding(t_B, self.embed_dim).to(self.mlp[0].weight.dtype)
        scale_BD, shift_BD = self.mlp(emb).chunk(2, dim=-1)
        return scale_BD, shift_BD


def fit_modulation(modulation: TimestepModulation, t_T: torch.Tensor, scale_TD: torch.Tensor, shift_TD: torch.Tensor,
                   steps: int = 400, lr: float = 3e-3) -> float:
    """Fit ``modulation`` so that its (scale, shift) at timesteps ``t_T`` match the given ones (e.g. the adaLN of the
    block that reads the hook); returns the final relative squared error."""
    target = torch.cat([scale_TD, shift_TD], dim=-1).detach().float().to(modulation.mlp[0].weight.device)
    emb = sinusoidal_embedding(t_T.to(target.device), modulation.embed_dim)
    opt = torch.optim.Adam(modulation.parameters(), lr=lr)
    denom = target.pow(2).sum().clamp_min(1e-12)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = (modulation.mlp(emb) - target).pow(2).sum() / denom
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((modulation.mlp(emb) - target).pow(2).sum() / denom)
