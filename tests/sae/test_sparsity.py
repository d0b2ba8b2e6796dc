"""Sparsity functions: how many latents are active, and what each one trains with."""

from __future__ import annotations

import torch

from tide.sae import SAE

from sae_helpers import batch, make_sae


def test_topk_keeps_exactly_k_distinct_latents_per_row():
    sae = make_sae("topk", k=5, f=40)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: relu removes none of the k
    x, t_B = batch(sae, n=64)
    out = sae(x, t_B)
    assert out.latents.idx.shape == (64, 5)
    assert all(len(set(row.tolist())) == 5 for row in out.latents.idx)
    assert (sae.encode(x, t_B) != 0).sum(-1).tolist() == [5] * 64
    torch.testing.assert_close(out.latents.acts.sort(-1).values, out.pre_BF.topk(5, dim=-1).values.sort(-1).values)


def test_batchtopk_keeps_k_times_batch_latents_over_the_batch_in_training():
    sae = make_sae("batchtopk", k=3, f=40).train()
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
        sae.threshold.zero_()
    x, t_B = batch(sae, n=32)
    z = sae(x, t_B).latents.dense(40)
    assert int((z != 0).sum()) == 3 * 32
    assert len(set((z != 0).sum(-1).tolist())) > 1  # rows differ: the budget is shared over the batch
    assert int(sae.threshold_steps[0]) == 1 and float(sae.threshold[0]) > 0  # running inference threshold updated


def test_batchtopk_uses_the_inference_threshold_in_eval_mode():
    sae = make_sae("batchtopk", k=3, f=40).eval()
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    x, t_B = batch(sae, n=32)
    out = sae(x, t_B)
    z = out.latents.dense(40)
    torch.testing.assert_close(z, out.pre_BF * (out.pre_BF > 0.5))
    steps = int(sae.threshold_steps[0])
    sae(x, t_B)
    assert int(sae.threshold_steps[0]) == steps  # eval leaves the threshold alone


def test_jumprelu_threshold_receives_gradient():
    sae = make_sae("jumprelu", f=40, jumprelu_bandwidth=0.5)
    x, t_B = batch(sae, n=64)
    out = sae(x, t_B)
    assert out.penalty > 0
    (out.x_hat_n_BD.pow(2).sum() + out.penalty).backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0
    # and the activations are the pre-activations above the threshold
    theta = sae.log_threshold[0].exp()
    torch.testing.assert_close(out.latents.acts, out.pre_BF * (out.pre_BF > theta))


def test_relu_penalty_is_the_decoder_norm_weighted_l1():
    sae = make_sae("relu", f=40, l1_coefficient=2.0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(1, 40, 1) + 0.5)  # rows of different norms
    x, t_B = batch(sae, n=16)
    out = sae(x, t_B)
    want = 2.0 * (torch.relu(out.pre_BF) * sae.W_dec[0].norm(dim=-1)).sum(-1).mean()
    torch.testing.assert_close(out.penalty, want)
    out.penalty.backward()
    assert sae.W_enc.grad.abs().sum() > 0


def test_bucket_sae_codes_each_row_with_its_bucket():
    sae = make_sae("topk", "bucket", f=40)
    x, _ = batch(sae, n=8)
    t_B = torch.tensor([10.0, 990.0] * 4)
    out = sae(x, t_B)
    for b, rows in ((0, slice(0, None, 2)), (3, slice(1, None, 2))):
        single = SAE(make_sae("topk", "none", f=40).cfg)
        state = {k: (v[b:b + 1] if k in ("W_enc", "W_dec", "b_enc", "b_dec") else v) for k, v in sae.state_dict().items()}
        single.load_state_dict(state)
        torch.testing.assert_close(single(x[rows], t_B[rows]).x_hat_BD, out.x_hat_BD[rows])
