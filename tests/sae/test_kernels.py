"""The sparse TopK kernels against dense references: values and every gradient."""

from __future__ import annotations

import pytest
import torch

from tide.sae import kernels as kn
from tide.train.objective import sae_loss

from sae_helpers import batch, dense_reference_loss, make_sae


def code(b=24, f=40, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(f, generator=g)[:k] for _ in range(b)])
    return idx, torch.randn(b, k, generator=g)


def test_sparse_decode_matches_dense_reference_in_values_and_gradients():
    idx, acts = code()
    W = torch.randn(40, 8)
    g = torch.randn(24, 8)
    grads = []
    for decode in (kn.sparse_decode, kn.dense_decode_reference):
        a, w = acts.clone().requires_grad_(), W.clone().requires_grad_()
        y = decode(idx, a, w)
        (y * g).sum().backward()
        grads.append((y.detach(), a.grad, w.grad))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref)


def test_sparse_decode_accumulates_repeated_latents_like_embedding_bag():
    idx = torch.tensor([[3, 3, 1], [0, 3, 3]])
    acts = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    W = torch.randn(5, 4, requires_grad=True)
    y = kn.sparse_decode(idx, acts, W)
    y.sum().backward()
    torch.testing.assert_close(y[0], 3 * W[3] + 3 * W[1])
    torch.testing.assert_close(W.grad[3], torch.full((4,), 1 + 2 + 5 + 6.0))
    torch.testing.assert_close(W.grad[2], torch.zeros(4))


def test_sparse_products_match_dense_products():
    idx, vals = code()
    X, W = torch.randn(24, 8), torch.randn(40, 8)
    Z = torch.zeros(24, 40).scatter(1, idx, vals)
    torch.testing.assert_close(kn.sparse_matmul(idx, vals, W), Z @ W)
    torch.testing.assert_close(kn.sparse_t_matmul(idx, vals, X, 40), Z.T @ X)
    torch.testing.assert_close(kn.gather_dot(idx, X, W), (X @ W.T).gather(1, idx))
    b = torch.randn(40)
    torch.testing.assert_close(kn.encoder_product(X, W, b), X @ W.T + b)
    out = torch.full((24, 40), float("nan"))
    assert kn.encoder_product(X, W, b, out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, X @ W.T + b)


def as_dense(idx, vals, f):
    return torch.zeros(idx.shape[0], f, dtype=vals.dtype).scatter(1, idx, vals)


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("rows", [24, 300])  # one block of rows, or several on the thread pool
def test_row_topk_matches_torch_topk(rows, columns):
    values = torch.randn(rows, 50, generator=torch.Generator().manual_seed(0))
    cols = torch.tensor([1, 4, 5, 9, 20, 21, 33, 40, 41, 49]) if columns else None
    vals, idx = kn.row_topk(values, 4, cols)
    ref = values if cols is None else torch.full_like(values, float("-inf")).index_copy(1, cols, values[:, cols])
    want_vals, want_idx = ref.topk(4, dim=-1)
    torch.testing.assert_close(as_dense(idx, vals, 50), as_dense(want_idx, want_vals, 50))
    torch.testing.assert_close(values.gather(1, idx), vals)


def test_row_topk_reads_a_strided_row_subset_without_copying_it_first():
    values = torch.randn(300, 50, generator=torch.Generator().manual_seed(0))
    for cols in (None, torch.tensor([1, 4, 5, 9, 20, 21, 33, 40, 41, 49])):
        got = kn.row_topk(values[::3], 4, cols)
        want = kn.row_topk(values[::3].contiguous(), 4, cols)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        torch.testing.assert_close(values[::3].gather(1, got[1]), got[0])


@pytest.mark.parametrize("rows", [24, 300])
@pytest.mark.parametrize("input_grad", [False, True])
def test_topk_encode_matches_dense_reference_in_values_and_gradients(input_grad, rows):
    torch.manual_seed(0)
    x, W, b, b_dec, W_dec = torch.randn(rows, 8), torch.randn(40, 8), torch.randn(40), torch.randn(8), torch.randn(40, 8)
    g = torch.randn(rows, 8)
    results = []
    for encode, decode in ((kn.topk_encode, kn.sparse_decode), (kn.dense_topk_encode_reference, kn.dense_decode_reference)):
        leaves = [t.clone().requires_grad_(True) for t in (x, W, b, b_dec, W_dec)]
        leaves[0].requires_grad_(input_grad)
        acts, idx, pre = encode(leaves[0], leaves[1], leaves[2], 5, leaves[3])
        y = decode(idx, acts, leaves[4])
        (y * g).sum().backward()
        results.append((as_dense(idx, acts.detach(), 40), pre.detach(), y.detach(),
                        *[t.grad if t.grad is not None else torch.zeros(()) for t in leaves]))
    for fast, ref in zip(*results):  # the same sums in another order
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)


def test_topk_encode_detaches_pre_activations_and_can_write_them_into_a_buffer():
    x, W, b = torch.randn(200, 8), torch.randn(40, 8, requires_grad=True), torch.zeros(40, requires_grad=True)
    buf = torch.empty(200, 40)
    acts, idx, pre = kn.topk_encode(x, W, b, 3, out=buf)
    assert pre.data_ptr() == buf.data_ptr() and not pre.requires_grad and acts.requires_grad
    torch.testing.assert_close(pre, x @ W.detach().T)


def check_loss_and_gradients_against_dense_reference(sae, x, t_B, dead, k_aux=6):
    sae.zero_grad()
    losses, _ = sae_loss(sae, x, t_B, dead, k_aux=k_aux, aux_coefficient=0.5)
    losses.loss.backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    if dead is not None:
        assert losses.aux > 0
    sae.zero_grad()
    ref_loss = dense_reference_loss(sae, x, t_B, dead, k_aux=k_aux, aux_coefficient=0.5)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses.loss, ref_loss)
    assert fast.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    assert ref["W_enc"].abs().sum() > 0 and ref["b_dec"].abs().sum() > 0
    return ref


@pytest.mark.parametrize("rows", [40, 300])
@pytest.mark.parametrize("conditioning,normalization", [("none", "none"), ("none", "global"), ("tide", "per_timestep")])
@pytest.mark.parametrize("auxk", [False, True])
def test_topk_training_loss_matches_dense_autograd_reference(conditioning, normalization, auxk, rows):
    sae = make_sae("topk", conditioning, normalization, d=8, f=48, k=4)
    x, t_B = batch(sae, n=rows)
    dead = None
    if auxk:  # half the latents dead, some of them fired in this batch (AuxK must ignore that)
        dead = torch.zeros(1, 48, dtype=torch.bool)
        dead[0, ::2] = True
    ref = check_loss_and_gradients_against_dense_reference(sae, x, t_B, dead)
    if conditioning == "tide":
        assert ref["modulation.mlp.2.weight"].abs().sum() > 0


def test_topk_training_loss_matches_dense_autograd_reference_on_the_test_device(device):
    sae = make_sae("topk", "tide", "global", d=8, f=48, k=4).to(device)
    x, t_B = batch(sae, n=300)
    dead = torch.zeros(1, 48, dtype=torch.bool, device=device)
    dead[0, 1::2] = True
    check_loss_and_gradients_against_dense_reference(sae, x, t_B, dead)


def test_row_topk_works_in_a_forked_child():
    import multiprocessing as mp

    values = torch.randn(300, 50)
    kn.row_topk(values, 4)  # the parent's pool exists before the fork
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        vals, idx = pool.apply_async(kn.row_topk, (values, 4)).get(timeout=60)
    torch.testing.assert_close(values.gather(1, idx), vals)
