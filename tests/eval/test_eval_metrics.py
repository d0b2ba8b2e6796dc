"""Reconstruction metrics on a real tiny capture, against a numpy reference over all rows in memory."""

import json

import numpy as np
import pytest
import torch

from tide.data import ActivationLoader, ActivationStore, LoaderConfig
from tide.errors import TideError
from tide.eval.metrics import default_buckets, reconstruction_metrics

from eval_helpers import HOOK, OTHER_HOOK, capture_tiny, identity_sae, random_sae


@pytest.fixture
def store(tiny_dit, tmp_path):
    return ActivationStore(capture_tiny(tiny_dit, tmp_path / "ds"))


def _all_rows(store):
    xs, ts = [], []
    for _, _, acts, meta in store.iter_blocks([HOOK], ("timestep",)):
        xs.append(acts[HOOK].astype(np.float64))
        ts.append(meta["timestep"].astype(np.float64))
    return np.concatenate(xs), np.concatenate(ts)


def _reference(x, x_hat, z, select, threshold):
    x, x_hat, z = x[select], x_hat[select], z[select]
    fvu = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    cos = ((x * x_hat).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1))).mean()
    active = z != 0
    return {"rows": len(x), "fvu": fvu, "mse": ((x_hat - x) ** 2).mean(), "cosine": cos,
            "l0": active.sum(1).mean(), "dead_fraction": (~active.any(0)).mean(),
            "dense_fraction": (active.mean(0) > threshold).mean()}


@pytest.mark.parametrize("sparsity", ["topk", "relu"])  # k-sparse and dense codes
def test_metrics_match_a_numpy_reference_per_bucket_per_timestep_and_overall(store, sparsity):
    # a TIDE SAE with a non-zero modulation, on global normalisation: every row's own t must be used
    sae = random_sae(conditioning="tide", normalization="global", t_hidden=16, t_embed_dim=16, sparsity=sparsity)
    sae.set_normalization(store.stats(HOOK))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in sae.modulation.parameters():
            p.normal_(0, 0.2)
    edges = [0.0, 300.0, 700.0, 1000.0]
    got = reconstruction_metrics(sae, store, buckets=edges, batch_size=7, dense_threshold=0.2)

    x, t = _all_rows(store)
    with torch.no_grad():
        out = sae(torch.from_numpy(x).float(), torch.from_numpy(t).float())
    x_hat = out.x_hat_BD.double().numpy()
    z = out.latents.dense(sae.cfg.d_sae).numpy()
    for name, select, metrics in [
        ("overall", np.ones(len(t), bool), got.overall),
        ("[0, 300)", (t >= 0) & (t < 300), got.buckets[0]),
        ("[300, 700)", (t >= 300) & (t < 700), got.buckets[1]),
        ("[700, 1000]", (t >= 700) & (t <= 1000), got.buckets[2]),
    ]:
        want = _reference(x, x_hat, z, select, 0.2)
        for key, value in want.items():
            assert getattr(metrics, key) == pytest.approx(value, rel=1e-5, abs=1e-9), (name, key)
    assert [b.rows for b in got.buckets] == [128, 128, 64]
    assert got.bucket_edges == edges and got.rows == len(x) == 320

    np.testing.assert_array_equal(got.timesteps_T, [0, 200, 400, 600, 800])
    for j, step_t in enumerate(got.timesteps_T):
        want = _reference(x, x_hat, z, t == step_t, 0.2)
        assert got.rows_T[j] == want["rows"]
        for key in ("fvu", "mse", "cosine", "l0"):
            assert getattr(got, f"{key}_T")[j] == pytest.approx(want[key], rel=1e-5), (step_t, key)

    d = json.loads(json.dumps(got.to_dict(), allow_nan=False))
    assert d["overall"]["fvu"] == pytest.approx(got.overall.fvu)
    assert len(d["buckets"]) == 3 and len(d["per_timestep"]["fvu"]) == 5


def test_default_buckets_are_five_equal_ranges_and_an_empty_bucket_is_reported_as_empty(store):
    assert default_buckets() == [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]
    got = reconstruction_metrics(random_sae(), store, buckets=[0.0, 100.0, 900.0, 2000.0])
    assert [b.rows for b in got.buckets] == [64, 256, 0]
    assert np.isnan(got.buckets[2].fvu)
    assert json.loads(json.dumps(got.to_dict(), allow_nan=False))["buckets"][2]["fvu"] is None
    with pytest.raises(TideError, match="increasing"):
        reconstruction_metrics(random_sae(), store, buckets=[0.0, 0.0])


def test_an_exact_sae_has_zero_fvu_and_cosine_one(store):
    got = reconstruction_metrics(identity_sae(), store, batch_size=50)
    assert got.overall.fvu == 0.0 and got.overall.mse == 0.0
    assert got.overall.cosine == pytest.approx(1.0, abs=1e-9)
    assert np.all(got.fvu_T == 0.0)


def test_dense_and_dead_fractions_follow_the_threshold(store):
    sae = random_sae()
    everything = reconstruction_metrics(sae, store, dense_threshold=0.0).overall
    nothing = reconstruction_metrics(sae, store, dense_threshold=1.0).overall
    assert everything.dense_fraction == pytest.approx(1 - everything.dead_fraction)
    assert nothing.dense_fraction == 0.0
    assert everything.l0 <= sae.cfg.k


def test_max_rows_and_loaders(store):
    sae = random_sae()
    full = reconstruction_metrics(sae, store)
    part = reconstruction_metrics(sae, store, max_rows=50, batch_size=16)
    assert part.rows == 50
    loader = ActivationLoader(store, LoaderConfig(batch_size=32, shuffle_buffer=64, block_rows=16))
    via_loader = reconstruction_metrics(sae, loader)
    assert via_loader.rows == full.rows
    assert via_loader.overall.fvu == pytest.approx(full.overall.fvu, rel=1e-9)
    endless = ActivationLoader(store, LoaderConfig(batch_size=32, shuffle_buffer=64, epochs=None))
    with pytest.raises(TideError, match="endless"):
        reconstruction_metrics(sae, endless)
    assert reconstruction_metrics(sae, endless, max_rows=100).rows == 100
    assert reconstruction_metrics(sae, str(store.path)).rows == full.rows


def test_metrics_refuse_an_sae_of_another_hook_or_width(store):
    with pytest.raises(TideError, match=f"{OTHER_HOOK}.*{HOOK}"):
        reconstruction_metrics(random_sae(hook=OTHER_HOOK), store, hook=HOOK)
    with pytest.raises(TideError, match="width 16.*d_in=8"):
        reconstruction_metrics(random_sae(d=8), store)
    with pytest.raises(TideError, match="were not captured"):
        reconstruction_metrics(random_sae(hook=""), store, hook=OTHER_HOOK)
