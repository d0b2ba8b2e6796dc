"""The training objective: normalised reconstruction error (FVU), sparsity penalty, and AuxK for dead latents."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tide.sae.kernels import SparseCode, row_topk
from tide.sae.model import SAE, ForwardOutput
from tide.sae.sparsity import Latents
from tide.sae.timestep import bucket_index


class LossOutput(NamedTuple):
    loss: torch.Tensor
    """What the optimizer minimises: fvu + penalty + aux_coefficient * aux."""
    fvu: torch.Tensor
    """Fraction of variance unexplained in normalised space (batch estimate)."""
    aux: torch.Tensor
    """AuxK loss (0 when no latent is dead or AuxK is off)."""
    penalty: torch.Tensor
    """Sparsity penalty (relu: L1, jumprelu: L0)."""
    l0: torch.Tensor
    """Mean active latents per row."""


def fvu(x_hat_BD: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
    """sum ||x^ - x||^2 / sum ||x - mean(x)||^2 over the batch."""
    return (x_hat_BD - x_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)


def fired(sae: SAE, out: ForwardOutput, t_B: torch.Tensor) -> torch.Tensor:
    """(N, F) bool: which latents fired in this batch (per timestep bucket for per-bucket SAEs)."""
    n, f = sae.W_dec.shape[:2]
    lat = out.latents
    if lat.idx is not None:
        mask = torch.zeros(n, f, dtype=torch.bool, device=lat.acts.device)
        mask[0, lat.idx[lat.acts > 0]] = True
        return mask
    active_BF = lat.acts > 0
    if n == 1:
        return active_BF.any(0)[None]
    bucket_B = bucket_index(t_B, n, sae.cfg.t_max)
    return torch.stack([active_BF[bucket_B == b].any(0) for b in range(n)])


def auxk_loss(sae: SAE, out: ForwardOutput, t_B: torch.Tensor, dead_NF: torch.Tensor, k_aux: int,
              row_stride: int = 1) -> torch.Tensor:
    """Reconstruct the residual from the top ``k_aux`` dead latents' pre-activations (Gao et al., 2024).

    Chooses among the dead latents' already computed pre-activations, then re-encodes and decodes only the
    chosen ones, so forward and backward cost B*k_aux*D beyond the choice. With ``row_stride`` s, only rows
    0, s, 2s, ... of the batch take part (the loss is their FVU): every part of the cost divides by s.
    """
    zero = out.pre_BF.new_zeros(())
    if not dead_NF.any():
        return zero
    if row_stride < 1:
        raise ValueError(f"row_stride={row_stride} must be at least 1")
    rows = slice(None, None, row_stride)
    n = dead_NF.shape[0]
    residual_BD = (out.x_n_BD - out.x_hat_n_BD).detach()[rows]
    x_in_BD, t_B = out.x_in_BD[rows], t_B[rows]
    out_scale_BD = None if out.out_scale_BD is None else out.out_scale_BD[rows]
    bucket_B = bucket_index(t_B, n, sae.cfg.t_max) if n > 1 else None
    k = min(k_aux, int(dead_NF.sum(-1).max()))
    with torch.no_grad():
        pre_BF = out.pre_BF.detach()[rows]
        if n == 1:  # only the dead columns take part in the choice
            vals_BK, idx_BK = row_topk(pre_BF, k, torch.nonzero(dead_NF[0]).flatten())
            vals_BK, idx_BK = vals_BK.to(pre_BF.device), idx_BK.to(pre_BF.device)
        else:  # a bucket with fewer than k dead latents pads with -inf (relu: 0, no gradient)
            vals_BK, idx_BK = pre_BF.masked_fill(~dead_NF[bucket_B], float("-inf")).topk(k, dim=-1, sorted=False)
    if n == 1:
        code = SparseCode(idx_BK, sae.cfg.d_sae)  # one sort for the encoder's and the decoder's backward
        acts_BK = torch.relu(sae.encode_selected(x_in_BD, idx_BK, vals_BK, 0, code))
        e_hat = sae.decode_latents(Latents(acts_BK, idx_BK), 0, code)
    else:
        e_hat = torch.zeros_like(residual_BD)
        for b in bucket_B.unique().tolist():
            in_b = torch.nonzero(bucket_B == b).flatten()
            code = SparseCode(idx_BK[in_b], sae.cfg.d_sae)
            acts = torch.relu(sae.encode_selected(x_in_BD[in_b], idx_BK[in_b], vals_BK[in_b], b, code))
            e_hat = e_hat.index_copy(0, in_b, sae.decode_latents(Latents(acts, idx_BK[in_b]), b, code))
    if out_scale_BD is not None:
        e_hat = e_hat / out_scale_BD
    loss = fvu(e_hat, residual_BD)
    return loss.nan_to_num(0.0)


def sae_loss(sae: SAE, x_BD: torch.Tensor, t_B: torch.Tensor, dead_NF: torch.Tensor | None = None,
             k_aux: int = 256, aux_coefficient: float = 1 / 32, aux_row_stride: int = 1) -> tuple[LossOutput, ForwardOutput]:
    """The training loss of one batch. The forward runs in :meth:`SAE.reuse_buffers`, so the returned output's
    ``pre_BF`` stays valid only until the next call of this function (or train_step) on the same SAE."""
    with sae.reuse_buffers():
        out = sae(x_BD, t_B)
    rec = fvu(out.x_hat_n_BD, out.x_n_BD)
    aux = auxk_loss(sae, out, t_B, dead_NF, k_aux, aux_row_stride) if dead_NF is not None and aux_coefficient > 0 \
        else rec.new_zeros(())
    loss = rec + out.penalty + aux_coefficient * aux
    l0 = out.latents.l0().float().mean()
    return LossOutput(loss, rec.detach(), aux.detach(), out.penalty.detach(), l0.detach()), out


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """The trainer's Adam (betas 0.9, 0.999): PyTorch's fused implementation where every parameter's device has
    one (about 5x faster than the default on CPU), the default otherwise."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def train_step(sae: SAE, optimizer: torch.optim.Optimizer, x_BD: torch.Tensor, t_B: torch.Tensor,
               dead_NF: torch.Tensor | None, k_aux: int = 256, aux_coefficient: float = 1 / 32,
               grad_hook=None, extra_loss=None, aux_row_stride: int = 1) -> tuple[LossOutput, ForwardOutput]:
    """One optimisation step exactly as the trainer runs it: loss, backward, (grad_hook, e.g. DDP all-reduce),
    parallel-gradient removal, optimizer step, decoder re-normalisation. ``extra_loss`` (a callable returning a
    weighted scalar, e.g. the downstream-aware term) is back-propagated into the same gradients; the returned
    loss includes it."""
    optimizer.zero_grad(set_to_none=True)
    losses, out = sae_loss(sae, x_BD, t_B, dead_NF, k_aux, aux_coefficient, aux_row_stride)
    losses.loss.backward()
    if extra_loss is not None:  # after the first backward: sae_loss's buffers are free to be reused
        extra = extra_loss()
        extra.backward()
        losses = losses._replace(loss=losses.loss.detach() + extra.detach())
    if grad_hook is not None:
        grad_hook(sae)
    sae.remove_parallel_grad()
    optimizer.step()
    sae.normalize_decoder()
    return losses, out
