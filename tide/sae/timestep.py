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
