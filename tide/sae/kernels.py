"""Sparse kernels for k-sparse codes: touch only the k active decoder rows per input row."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_decode(idx_BK: torch.Tensor, acts_BK: torch.Tensor, W_FD: torch.Tensor) -> torch.Tensor:
    """sum_k acts[b, k] * W[idx[b, k]] -> (B, D); forward and backward cost B*K*D, not B*F*D."""
    return F.embedding_bag(idx_BK, W_FD, per_sample_weights=acts_BK, mode="sum")


def dense_decode_reference(idx_BK: torch.Tensor, acts_BK: torch.Tensor, W_FD: torch.Tensor) -> torch.Tensor:
    """The same product through a dense (B, F) code: the naive reference the sparse kernel is tested against."""
    z_BF = acts_BK.new_zeros(acts_BK.shape[0], W_FD.shape[0]).scatter(1, idx_BK, acts_BK)
    return z_BF @ W_FD
