"""The training step the trainer runs: unit-norm decoder, gradient projection, AuxK for dead latents."""

from __future__ import annotations

import pytest
import torch

from tide.train.objective import auxk_loss, fired, make_optimizer, sae_loss, train_step

from sae_helpers import batch, make_sae


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu", "jumprelu"])
def test_decoder_stays_unit_norm_after_train_step(sparsity):
    sae = make_sae(sparsity, "tide", "global", f=40)
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    x, t_B = batch(sae, n=32)
    before = sae.W_dec.detach().clone()
    for _ in range(3):
        losses, _ = train_step(sae, opt, x, t_B, dead_NF=torch.ones(1, 40, dtype=torch.bool))
        assert torch.isfinite(losses.loss)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(1, 40))
    assert not torch.allclose(sae.W_dec, before)


def test_train_step_removes_the_gradient_parallel_to_decoder_rows():
    sae = make_sae("topk", f=40)
    opt = torch.optim.SGD(sae.parameters(), lr=0.0)
    x, t_B = batch(sae, n=32)
    seen = {}

    def keep_raw_grad(model):
        seen["raw"] = model.W_dec.grad.clone()

    train_step(sae, opt, x, t_B, dead_NF=None, grad_hook=keep_raw_grad)
    grad, raw = sae.W_dec.grad, seen["raw"]
    assert (raw * sae.W_dec).sum(-1).abs().max() > 1e-4  # there was a parallel part ...
    torch.testing.assert_close((grad * sae.W_dec).sum(-1), torch.zeros(1, 40), atol=1e-6, rtol=0)  # ... and it is gone
    parallel = (raw * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec
    torch.testing.assert_close(grad, raw - parallel)


def _dead_are_unfired(sae, x, t_B):
    with torch.no_grad():
        return ~fired(sae, sae(x, t_B), t_B)


@pytest.mark.parametrize("conditioning", ["none", "tide", "bucket"])
def test_auxk_gives_the_dead_latents_gradient(conditioning):
    sae = make_sae("topk", conditioning, "global", f=64, k=2)
    x, t_B = batch(sae, n=16)
    dead = _dead_are_unfired(sae, x, t_B)
    assert dead.any()
    grads = {}
    for coef in (0.0, 1.0):
        sae.zero_grad()
        losses, _ = sae_loss(sae, x, t_B, dead, k_aux=8, aux_coefficient=coef)
        losses.loss.backward()
        grads[coef] = (sae.W_dec.grad.clone(), sae.W_enc.grad.clone(), sae.b_enc.grad.clone())
    assert losses.aux > 0
    for without, with_aux in zip(grads[0.0], grads[1.0]):
        assert without[dead].abs().sum() == 0  # the main loss never reaches unfired latents
        assert with_aux[dead].abs().sum() > 0   # AuxK does, in the decoder and the encoder


def test_auxk_is_zero_when_no_latent_is_dead():
    sae = make_sae("topk", f=40)
    x, t_B = batch(sae, n=16)
    out = sae(x, t_B)
    none_dead = torch.zeros(1, 40, dtype=torch.bool)
    assert auxk_loss(sae, out, t_B, none_dead, k_aux=8) == 0
    losses, _ = sae_loss(sae, x, t_B, none_dead)
    assert losses.aux == 0 and losses.loss == losses.fvu


@pytest.mark.parametrize("conditioning", ["none", "tide", "bucket"])
def test_auxk_on_every_third_row_equals_auxk_on_those_rows_alone(conditioning):
    """The row stride is a subsample: the loss and every gradient equal AuxK run on the batch x[::3]."""
    sae = make_sae("topk", conditioning, "per_timestep", f=64, k=2)
    x, t_B = batch(sae, n=31)
    dead = _dead_are_unfired(sae, x, t_B)
    assert dead.any()
    results = []
    for rows, stride in ((slice(None), 3), (slice(None, None, 3), 1)):
        sae.zero_grad()
        aux = auxk_loss(sae, sae(x[rows], t_B[rows]), t_B[rows], dead, k_aux=8, row_stride=stride)
        aux.backward()
        results.append([aux.detach()] + [p.grad.clone() for p in sae.parameters() if p.grad is not None])
    assert results[0][0] > 0 and len(results[0]) == len(results[1])
    for strided, alone in zip(*results):
        torch.testing.assert_close(strided, alone)
    full = auxk_loss(sae, sae(x, t_B), t_B, dead, k_aux=8)
    assert not torch.allclose(full, results[0][0])  # the other rows did change the loss


def test_train_step_with_an_aux_row_stride_still_revives_dead_latents():
    sae = make_sae("topk", f=64, k=2)
    opt = make_optimizer(sae.parameters(), 0.01)
    x, t_B = batch(sae, n=64)
    dead = _dead_are_unfired(sae, x, t_B)
    before = sae.W_enc.detach().clone()
    train_step(sae, opt, x, t_B, dead, k_aux=8, aux_row_stride=4)
    assert (sae.W_enc - before)[dead].abs().sum() > 0


def test_make_optimizer_is_pytorchs_adam_fused_on_cpu():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 8)), torch.nn.Parameter(torch.randn(8))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = params[0].detach().clone()
    fused, plain = make_optimizer(params, 0.01), torch.optim.Adam(twins, lr=0.01, betas=(0.9, 0.999))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for step in range(5):
        for group in (params, twins):
            g = torch.Generator().manual_seed(step)
            for p in group:
                p.grad = torch.randn(p.shape, generator=g)
        fused.step()
        plain.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b)
    assert (params[0] - start).abs().min() > 0  # every entry moved


def test_auxk_uses_only_dead_latents():
    sae = make_sae("topk", f=40, k=2)
    x, t_B = batch(sae, n=16)
    dead = torch.zeros(1, 40, dtype=torch.bool)
    dead[0, :3] = True
    out = sae(x, t_B)
    aux = auxk_loss(sae, out, t_B, dead, k_aux=8)
    sae.zero_grad()
    aux.backward()
    assert sae.W_dec.grad[0, 3:].abs().sum() == 0 and sae.W_dec.grad[0, :3].abs().sum() > 0


def test_train_step_is_deterministic():
    params = []
    for _ in range(2):
        sae = make_sae("topk", "tide", "global", f=64, k=4)
        opt = torch.optim.Adam(sae.parameters(), lr=0.01)
        x, t_B = batch(sae, n=300)
        dead = torch.zeros(1, 64, dtype=torch.bool)
        dead[0, 1::3] = True
        for _ in range(3):
            train_step(sae, opt, x, t_B, dead, k_aux=8)
        params.append([p.detach().clone() for p in sae.parameters()])
    for a, b in zip(*params):
        assert torch.equal(a, b)


def test_training_forward_reuses_its_pre_activation_buffer_only_inside_reuse_buffers():
    sae = make_sae("topk", f=40)
    x, t_B = batch(sae, n=16)
    first, second = sae(x, t_B), sae(x, t_B)
    assert first.pre_BF.data_ptr() != second.pre_BF.data_ptr()
    with sae.reuse_buffers():
        a = sae(x, t_B).pre_BF.data_ptr()
        b = sae(x[:8], t_B[:8]).pre_BF.data_ptr()  # a smaller batch reuses the same memory
    assert a == b
    _, out = sae_loss(sae, x, t_B)  # the training loss runs its forward in the block
    assert out.pre_BF.data_ptr() == a
    torch.testing.assert_close(out.pre_BF, first.pre_BF)
    assert not sae._reusing
