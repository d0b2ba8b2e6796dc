"""Sparsity functions: pre-activations (B, F) -> latents, plus the penalty each one trains with."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Latents(NamedTuple):
    """Active latents: ``acts`` (B, K) with ``idx`` (B, K) for k-sparse codes, or dense ``acts`` (B, F) with idx None."""

    acts: torch.Tensor
    idx: torch.Tensor | None

    def dense(self, d_sae: int) -> torch.Tensor:
        if self.idx is None:
            return self.acts
        out = self.acts.new_zeros(self.acts.shape[0], d_sae)
        return out.scatter_(1, self.idx, self.acts)

    def l0(self) -> torch.Tensor:
        """(B,) number of non-zero latents per row."""
        return (self.acts > 0).sum(-1)


def topk(pre_BF: torch.Tensor, k: int) -> Latents:
    vals_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
    return Latents(torch.relu(vals_BK), idx_BK)


def batch_topk(pre_BF: torch.Tensor, k: int) -> tuple[Latents, torch.Tensor]:
    """Top k*B activations over the whole batch; also returns the smallest selected positive value."""
    relu_BF = torch.relu(pre_BF)
    flat = relu_BF.flatten()
    vals, idx = flat.topk(min(k * pre_BF.shape[0], flat.numel()), sorted=False)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True).view_as(pre_BF)
    positive = vals[vals > 0]
    smallest = positive.min() if positive.numel() else pre_BF.new_zeros(())
    return Latents(relu_BF * mask, None), smallest.detach()


def threshold(pre_BF: torch.Tensor, theta: torch.Tensor) -> Latents:
    """Inference form of BatchTopK: keep pre-activations above a fixed threshold."""
    return Latents(pre_BF * (pre_BF > theta), None)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z = x * H(x - theta); straight-through gradient for theta (Rajamanoharan et al., 2024)."""

    @staticmethod
    def forward(ctx, x, theta, bandwidth):
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return x * (x > theta)

    @staticmethod
    def backward(ctx, grad):
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_x = (x > theta) * grad
        grad_theta = (-(theta / eps) * rectangle((x - theta) / eps) * grad).sum(0)
        return grad_x, grad_theta, None


class _Step(torch.autograd.Function):
    """H(x - theta) with the straight-through gradient for theta (used for the L0 penalty)."""

    @staticmethod
    def forward(ctx, x, theta, bandwidth):
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * rectangle((x - theta) / eps) * grad).sum(0)
        return torch.zeros_like(x), grad_theta, None


def jumprelu(pre_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> tuple[Latents, torch.Tensor]:
    """JumpReLU latents and the per-row L0 (differentiable in theta)."""
    z = _JumpReLU.apply(pre_BF, theta_F, bandwidth)
    l0_B = _Step.apply(pre_BF, theta_F, bandwidth).sum(-1)
    return Latents(z, None), l0_B
