"""Sparse kernels for k-sparse codes: the encoder's and the decoder's backward, and the decoder itself,
touch only the k selected latents of each row.

A k-sparse code is ``idx_BK`` (which latents) with values ``vals_BK``: the rows of a (B, F) matrix Z
with k non-zeros each. Three products cover every pass of a TopK SAE:

* ``Z @ W`` (B, D): the decoder, and the input gradient of the encoder (:func:`sparse_matmul`);
* ``Z^T @ X`` (F, D): the weight gradients of encoder and decoder (:func:`sparse_t_matmul`: the code
  sorted by latent, one bag of rows of X per latent; :class:`SparseCode` sorts once for both);
* ``X @ W^T`` at the code's positions (B, K): the gradient of the decoder with respect to the code
  (:func:`gather_dot`, a sampled dense-dense product).

Each costs B*K*D multiply-adds instead of the dense B*F*D. The dense encoder product that chooses the
latents remains (it must look at every latent); its backward does not. Choosing the top k of each
row (:func:`row_topk`) runs on CPU as a partial sort per block of rows on the intra-op threads.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta" (once per process)
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class SparseCode:
    """The positions ``idx_BK`` of a k-sparse code over ``num_latents`` latents, with its transpose
    (entries sorted by latent: the CSR structure of Z^T) computed once, on first use, and shared by
    every product that needs it (the encoder's and the decoder's weight gradients)."""

    def __init__(self, idx_BK: torch.Tensor, num_latents: int):
        self.idx_BK = idx_BK
        self.num_latents = num_latents
        self._t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, crow, rows): entry ``order[j]`` of the flat code is the j-th in latent order (stable, so
        deterministic), latent f owns entries ``crow[f]:crow[f+1]``, and ``rows[j]`` is that entry's row."""
        if self._t is None:
            K = self.idx_BK.shape[1]
            flat = self.idx_BK.reshape(-1)
            keys = flat.to(torch.int32) if self.num_latents < 2**31 else flat  # int32 sorts twice as fast
            order = torch.argsort(keys, stable=True)
            crow = torch.zeros(self.num_latents + 1, dtype=torch.long, device=flat.device)
            torch.cumsum(torch.bincount(flat, minlength=self.num_latents), 0, out=crow[1:])
            self._t = order, crow, torch.div(order, K, rounding_mode="floor")
        return self._t


def sparse_matmul(idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_FD: torch.Tensor) -> torch.Tensor:
    """``Z @ W``: sum_k vals[b, k] * W[idx[b, k]] -> (B, D) (no autograd of its own)."""
    return F.embedding_bag(idx_BK, W_FD, per_sample_weights=vals_BK.to(W_FD.dtype), mode="sum")


def sparse_t_matmul(idx_BK: torch.Tensor, vals_BK: torch.Tensor, X_BD: torch.Tensor, num_latents: int,
                    code: SparseCode | None = None) -> torch.Tensor:
    """``Z^T @ X``: out[f] = sum over (b, k) with idx[b, k] == f of vals[b, k] * X[b] -> (F, D).

    Rows of latents that are never selected come out zero. Pass the code's :class:`SparseCode` to reuse
    its sort.
    """
    code = code if code is not None else SparseCode(idx_BK, num_latents)
    order, crow, rows = code.transposed()
    # one bag per latent: its entries' rows of X, weighted (2-3x faster than a CSR product on CPU)
    return F.embedding_bag(rows, X_BD, crow, per_sample_weights=vals_BK.reshape(-1)[order].to(X_BD.dtype),
                           mode="sum", include_last_offset=True)


def gather_dot(idx_BK: torch.Tensor, X_BD: torch.Tensor, W_FD: torch.Tensor) -> torch.Tensor:
    """``(X @ W^T)[b, idx[b, k]]``: the dot product of each row with its selected latents' rows -> (B, K)."""
    B, K = idx_BK.shape
    crow = torch.arange(0, B * K + 1, K, device=idx_BK.device)
    pattern = _csr(crow, idx_BK.reshape(-1), X_BD.new_zeros(B * K), (B, W_FD.shape[0]))
    return torch.sparse.sampled_addmm(pattern, X_BD, W_FD.T, beta=0.0).values().view(B, K)


# ---------------------------------------------------------------------------------------------- top k per row
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0
_pool_lock = threading.Lock()
_ROW_BLOCK = 64  # rows per task: a block's copy and index array stay in cache


def _threads() -> ThreadPoolExecutor:
    """A pool of ``torch.get_num_threads()`` threads, made anew when that number changes or in a forked child
    (which inherits the pool but not its threads)."""
    global _pool, _pool_size, _pool_pid
    n = max(1, torch.get_num_threads())
    with _pool_lock:
        if _pool is None or _pool_size != n or _pool_pid != os.getpid():
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)
            _pool, _pool_size, _pool_pid = ThreadPoolExecutor(n, thread_name_prefix="tide-topk"), n, os.getpid()
        return _pool


def row_topk(values_BN: torch.Tensor, k: int, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row (among ``columns`` if given), unsorted: ``(vals_BK, idx_BK)``
    with ``idx_BK`` indexing the full rows. Equal to ``torch.topk`` up to the order of the k entries (and,
    on exact ties, which of the tied entries is kept); never differentiable.

    On CPU this is numpy's introselect over blocks of rows on ``torch.get_num_threads()`` threads, which
    is faster than ``torch.topk`` there (and, with ``columns``, never copies the whole column subset). The
    order of a row's k entries depends on that row alone, never on the batch it came in, so that a row's
    reconstruction (a sum over its k latents) is bit-identical in any batch.
    """
    values_BN = values_BN.detach()
    B = values_BN.shape[0]
    n = values_BN.shape[1] if columns is None else len(columns)
    if not 0 < k <= n:
        raise ValueError(f"k={k} must lie in 1..{n}")
    if values_BN.device.type != "cpu" or values_BN.dtype not in (torch.float32, torch.float64):
        sub = values_BN if columns is None else values_BN.index_select(1, columns)
        vals, j = sub.topk(k, dim=-1, sorted=False)
        return vals, (j if columns is None else columns[j])
    src = (values_BN if values_BN.stride(-1) == 1 else values_BN.contiguous()).numpy()  # strided rows need no copy
    cols = None if columns is None else columns.cpu().numpy()
    vals = np.empty((B, k), dtype=src.dtype)
    idx = np.empty((B, k), dtype=np.int64)

    def block(start: int) -> None:
        sub = src[start:start + _ROW_BLOCK]
        if cols is not None:
            sub = np.take(sub, cols, axis=1)  # several times faster than sub[:, cols]
        part = np.argpartition(sub, n - k, axis=1)[:, n - k:]
        vals[start:start + _ROW_BLOCK] = np.take_along_axis(sub, part, axis=1)
        idx[start:start + _ROW_BLOCK] = part if cols is None else cols[part]

    starts = range(0, B, _ROW_BLOCK)
    taken = itertools.count()  # the next block to take: each thread takes blocks until none is left

    def blocks() -> None:
        while (i := next(taken)) < len(starts):
            block(starts[i])

    pool = _threads() if len(starts) > 1 else None
    if pool is None or _pool_size == 1:
        blocks()
    else:  # blocks are taken, not dealt: a thread that another process holds up takes fewer of them
        futures = [pool.submit(blocks) for _ in range(_pool_size - 1)]
        blocks()
        for f in futures:
            f.result()
    return torch.from_numpy(vals), torch.from_numpy(idx)


# ---------------------------------------------------------------------------------------------- autograd
class _SparseDecode(torch.autograd.Function):
    """y = Z @ W with a backward that touches only the selected rows of W."""

    @staticmethod
    def forward(ctx, idx_BK, acts_BK, W_FD, code):
        ctx.save_for_backward(idx_BK, acts_BK, W_FD)
        ctx.code = code
        return sparse_matmul(idx_BK, acts_BK, W_FD)

    @staticmethod
    def backward(ctx, grad_BD):
        idx_BK, acts_BK, W_FD = ctx.saved_tensors
        grad_BD = grad_BD.contiguous()
        grad_acts = gather_dot(idx_BK, grad_BD, W_FD) if ctx.needs_input_grad[1] else None
        grad_W = None
        if ctx.needs_input_grad[2]:
            grad_W = sparse_t_matmul(idx_BK, acts_BK, grad_BD, W_FD.shape[0], ctx.code)
        return None, grad_acts, grad_W, None


def sparse_decode(idx_BK: torch.Tensor, acts_BK: torch.Tensor, W_FD: torch.Tensor, code: SparseCode | None = None) -> torch.Tensor:
    """sum_k acts[b, k] * W[idx[b, k]] -> (B, D); forward and backward cost B*K*D, not B*F*D."""
    return _SparseDecode.apply(idx_BK, acts_BK, W_FD, code if code is not None else SparseCode(idx_BK, W_FD.shape[0]))


def dense_decode_reference(idx_BK: torch.Tensor, acts_BK: torch.Tensor, W_FD: torch.Tensor) -> torch.Tensor:
    """The same product through a dense (B, F) code: the naive reference the sparse kernel is tested against."""
    z_BF = acts_BK.new_zeros(acts_BK.shape[0], W_FD.shape[0]).scatter(1, idx_BK, acts_BK)
    return z_BF @ W_FD


class _SelectedEncode(torch.autograd.Function):
    """The pre-activations W[idx] . (x - b_dec) + b[idx] of already selected latents.

    The forward only passes the values on (the dense product that chose the latents computed them); the
    backward builds the gradients of x, b_dec, W and b from the K selected entries of each row.
    """

    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_FD, b_F, vals_BK, xc_BD, code):
        ctx.save_for_backward(W_FD, xc_BD)
        ctx.code = code
        return vals_BK.clone()

    @staticmethod
    def backward(ctx, grad_BK):
        W_FD, xc_BD = ctx.saved_tensors
        code = ctx.code
        idx_BK = code.idx_BK
        need_x, need_bdec, need_W, need_b = ctx.needs_input_grad[:4]
        grad_BK = grad_BK.contiguous()
        grad_x = grad_bdec = grad_W = grad_b = None
        if need_x:
            grad_x = sparse_matmul(idx_BK, grad_BK, W_FD)
        if need_W:
            grad_W = sparse_t_matmul(idx_BK, grad_BK, xc_BD, code.num_latents, code)
        if need_b or (need_bdec and grad_x is None):
            grad_b = grad_BK.new_zeros(code.num_latents).index_add_(0, idx_BK.reshape(-1), grad_BK.reshape(-1))
        if need_bdec:  # x - b_dec: minus the row-sum of the input gradient, = -(grad_b @ W)
            grad_bdec = -grad_x.sum(0) if grad_x is not None else -(grad_b @ W_FD)
        return grad_x, grad_bdec, grad_W, grad_b if need_b else None, None, None, None


def selected_encode(x_BD: torch.Tensor, b_dec_D: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor,
                    idx_BK: torch.Tensor, vals_BK: torch.Tensor, xc_BD: torch.Tensor | None = None,
                    code: SparseCode | None = None) -> torch.Tensor:
    """Differentiable pre-activations ``W[idx] . (x - b_dec) + b[idx]`` of the selected latents ``idx_BK``,
    whose values ``vals_BK`` are already known.

    ``xc_BD`` is ``x - b_dec`` if already computed. Gradients reach x, b_dec, W and b through the selected
    entries only (B*K*D work).
    """
    if xc_BD is None:
        with torch.no_grad():
            xc_BD = x_BD - b_dec_D
    code = code if code is not None else SparseCode(idx_BK, W_FD.shape[0])
    return _SelectedEncode.apply(x_BD, b_dec_D, W_FD, b_F, vals_BK.detach(), xc_BD.detach(), code)


def encoder_product(xc_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``xc @ W^T + b`` -> (B, F), into ``out`` if given. On CPU one product with the bias as an extra input
    column: ``addmm`` first copies the broadcast bias into its whole (B, F) output, which costs a fifth of the
    product there."""
    if xc_BD.device.type != "cpu":
        return torch.addmm(b_F, xc_BD, W_FD.T, out=out) if out is not None else torch.addmm(b_F, xc_BD, W_FD.T)
    B, D = xc_BD.shape
    xa_BD1 = xc_BD.new_empty(B, D + 1)
    xa_BD1[:, :D] = xc_BD
    xa_BD1[:, D] = 1
    Wa_FD1 = torch.cat([W_FD, b_F[:, None]], 1)
    return torch.mm(xa_BD1, Wa_FD1.T, out=out) if out is not None else torch.mm(xa_BD1, Wa_FD1.T)


def topk_encode(x_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, k: int, b_dec_D: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TopK encoder: ``(acts_BK, idx_BK, pre_BF)`` for ``relu(topk(W (x - b_dec) + b))``.

    The dense product chooses the latents without autograd; ``acts_BK`` carries the gradient of the
    selected entries only, and ``pre_BF`` (every pre-activation, from which AuxK chooses dead latents) is
    detached: re-encode chosen latents with :func:`selected_encode` to differentiate them. ``out`` is an
    optional (B, F) buffer for ``pre_BF`` (saves re-faulting fresh memory on every CPU training step).
    """
    acts_BK, idx_BK, pre_BF, _ = topk_encode_code(x_BD, W_FD, b_F, k, b_dec_D, out)
    return acts_BK, idx_BK, pre_BF


def topk_encode_code(x_BD, W_FD, b_F, k, b_dec_D=None, out=None):
    """:func:`topk_encode`, also returning the :class:`SparseCode` (to share its sort with the decoder)."""
    if b_dec_D is None:
        b_dec_D = x_BD.new_zeros(x_BD.shape[-1])
    with torch.no_grad():
        xc_BD = x_BD - b_dec_D
        pre_BF = encoder_product(xc_BD, W_FD, b_F, out)
        vals_BK, idx_BK = row_topk(pre_BF, k)
        vals_BK, idx_BK = vals_BK.to(pre_BF.device), idx_BK.to(pre_BF.device)
    code = SparseCode(idx_BK, W_FD.shape[0])
    acts_BK = torch.relu(selected_encode(x_BD, b_dec_D, W_FD, b_F, idx_BK, vals_BK, xc_BD, code))
    return acts_BK, idx_BK, pre_BF, code


def dense_topk_encode_reference(x_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, k: int,
                                b_dec_D: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`topk_encode` by plain autograd through the dense product (the reference it is tested against)."""
    xc_BD = x_BD if b_dec_D is None else x_BD - b_dec_D
    pre_BF = torch.addmm(b_F, xc_BD, W_FD.T)
    vals_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
    return torch.relu(vals_BK), idx_BK, pre_BF
