"""The downstream-aware objective and the adaLN-initialised modulation, on the embedded fmnist-pixart (a real
PixArtTransformer2DModel with classifier-free guidance)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tide.capture import CaptureConfig, capture
from tide.errors import TideError
from tide.eval.splice import denoiser_error
from tide.models import load_backbone
from tide.sae import SAE, SAEConfig, load_sae
from tide.sampling import SamplerConfig, Trajectory
from tide.train import SAESpec, TrainConfig, Trainer, train
from tide.train.downstream import DownstreamObjective, collect_contexts, downstream_loss

HOOK = "blocks.4.hook_resid_post"
STEPS = 4


@pytest.fixture(scope="module")
def pixart():
    return load_backbone("fmnist-pixart", device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, pixart):
    out = tmp_path_factory.mktemp("down") / "ds"
    capture(CaptureConfig(backbone="fmnist-pixart", out=str(out), hooks=[HOOK], num_samples=6, samples_per_shard=3,
                          num_steps=STEPS, guidance_scale=3.0, cfg_branch="both", seed=5), pixart, progress=False)
    return out


def _sae(seed=0):
    torch.manual_seed(seed)
    return SAE(SAEConfig(d_in=128, d_sae=256, k=16, normalization="none", hook=HOOK))


def test_guided_contexts_replay_the_sampler(pixart):
    sampler = SamplerConfig(num_steps=STEPS, guidance_scale=3.0)
    ctx = collect_contexts(pixart, [1, 7], [11, 12], sampler, "both")
    assert ctx.guided and len(ctx) == 2 * STEPS and ctx.step_N.tolist() == [s for s in range(STEPS) for _ in range(2)]
    traj = Trajectory(pixart, [1, 7], [11, 12], [0, 1], sampler)
    for step in traj:  # the stored guided output is what the sampler's own loop predicts
        out = traj.predict(step)
        rows = ctx.step_N == step.index
        torch.testing.assert_close(ctx.out_NCHW[rows], out.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ctx.x_in_NCHW[rows], traj.model_input(step)[:2].float())
        traj.advance(step, out)
    cond_only = collect_contexts(pixart, [1, 7], [11, 12], sampler, "cond")
    assert not cond_only.guided and len(cond_only) == 2 * STEPS


def test_downstream_loss_is_the_spliced_denoiser_error_and_trains_only_the_sae(pixart):
    """At a step, the loss over every sample equals the squared relative error tide.eval.splice.denoiser_error
    measures (through Trajectory.predict and the splice hook); its gradient reaches the SAE and not the backbone."""
    sampler = SamplerConfig(num_steps=STEPS, guidance_scale=3.0)
    conds, seeds = [2, 5, 9], [3, 4, 5]
    sae = _sae()
    ctx = collect_contexts(pixart, conds, seeds, sampler, "both")
    reference = denoiser_error(pixart, sae, HOOK, conds, seeds, sampler).relative_error_T
    objective = DownstreamObjective(pixart, ctx, rows_per_step=3)
    for step in range(STEPS):
        rows = torch.nonzero(ctx.step_N == step).flatten()
        loss = downstream_loss(objective.hooked, sae, HOOK, ctx, step, rows)
        np.testing.assert_allclose(float(loss.detach()), reference[step] ** 2, rtol=1e-4)
    sae.zero_grad()
    loss.backward()
    assert sae.W_dec.grad is not None and float(sae.W_dec.grad.abs().sum()) > 0
    assert sae.W_enc.grad is not None and float(sae.W_enc.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in pixart.parameters())


def test_draws_are_one_timestep_and_reproducible(pixart):
    ctx = collect_contexts(pixart, [0, 1, 2], [0, 1, 2], SamplerConfig(num_steps=STEPS, guidance_scale=3.0), "both")
    objective = DownstreamObjective(pixart, ctx, rows_per_step=2, seed=3)
    for step in range(20):
        s, rows = objective.draw(step)
        assert len(rows) == 2 and set(ctx.step_N[rows].tolist()) == {s}
        s2, rows2 = objective.draw(step)
        assert s2 == s and rows2.tolist() == rows.tolist()
    assert len({objective.draw(i)[0] for i in range(40)}) == STEPS  # every step gets drawn


def test_training_with_the_downstream_term_lowers_the_spliced_error(dataset, tmp_path):
    """Same data, seeds and steps: the SAE trained with the downstream term ends with a lower spliced denoiser error
    than the one trained on activation FVU alone; the term is logged."""
    specs = [SAESpec(name="mse", hook=HOOK, d_sae=256, k=8),
             SAESpec(name="down", hook=HOOK, d_sae=256, k=8, downstream_coefficient=4.0)]
    cfg = TrainConfig(data=str(dataset), out=str(tmp_path / "run"), saes=specs, steps=60, batch_size=256, lr=2e-3,
                      warmup_steps=5, checkpoint_every=0, log_every=10, progress=False, device="cpu",
                      downstream_samples=4, downstream_batch=4)
    result = train(cfg)
    assert "downstream" in result.final["down"] and "downstream" not in result.final["mse"]
    pixart = load_backbone("fmnist-pixart", device="cpu")
    sampler = SamplerConfig(num_steps=STEPS, guidance_scale=3.0)
    err = {n: denoiser_error(pixart, load_sae(tmp_path / "run" / n), HOOK, [0, 3, 6, 8], [50, 51, 52, 53],
                             sampler).relative_error_T.mean() for n in ("mse", "down")}
    assert err["down"] < 0.95 * err["mse"], err
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["config"]["saes"][1]["downstream_coefficient"] == 4.0


def test_adaln_modulation_init_reproduces_the_reading_norm(dataset, tmp_path):
    cfg = TrainConfig(data=str(dataset), out=str(tmp_path / "run"), steps=1, batch_size=64, progress=False,
                      device="cpu", saes=[SAESpec(name="t", hook=HOOK, d_sae=64, k=4, conditioning="tide",
                                                  modulation_init="adaln", normalization="none")])
    trainer = Trainer.for_dataset(cfg)
    sae = trainer.saes["t"]
    pixart = load_backbone("fmnist-pixart", device="cpu")
    t_T = torch.as_tensor(pixart.make_scheduler(STEPS).timesteps, dtype=torch.float32)  # the data's timesteps
    want_s, want_h = pixart.reader_modulation(HOOK, t_T)
    with torch.no_grad():
        got_s, got_h = sae.modulation(t_T)
    rel = ((got_s - want_s).pow(2).sum() + (got_h - want_h).pow(2).sum()) / (want_s.pow(2).sum() + want_h.pow(2).sum())
    assert float(rel) < 0.02 and float(want_s.abs().mean()) > 0.05


def test_adaln_init_needs_tide_conditioning():
    with pytest.raises(TideError, match="conditioning: tide"):
        TrainConfig(saes=[SAESpec(name="p", modulation_init="adaln")]).validate()
    with pytest.raises(TideError, match="downstream_coefficient must be >= 0"):
        TrainConfig(saes=[SAESpec(name="p", downstream_coefficient=-1.0)]).validate()
