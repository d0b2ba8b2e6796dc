"""Per-feature statistics against a brute-force reference computed from every row in memory."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from tide.analysis import FeatureStats, compute_feature_stats, load_feature_stats, save_feature_stats
from tide.analysis.ranking import auroc_one_vs_rest, midranks
from tide.capture.run import CaptureConfig, capture
from tide.data import ActivationStore
from tide.errors import TideError
from tide.sae import SAE, SAEConfig, save_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def dataset(tmp_path, tiny_dit):
    out = tmp_path / "capture"
    capture(CaptureConfig(out=str(out), hooks=[HOOK], num_samples=12, samples_per_shard=4, num_steps=4), tiny_dit,
            progress=False)
    return out


def make_sae(sparsity="topk", seed=0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4, sparsity=sparsity, normalization="none", hook=HOOK))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc))
        if sparsity == "relu":
            sae.b_enc.fill_(-1.0)
            sae.b_enc[..., 0] = -1e6  # feature 0 never fires
    return sae


def all_rows(path, branch=0):
    store = ActivationStore(path)
    cols = ("timestep", "step_index", "sample_id", "token", "cond", "cfg_branch")
    acts, meta = [], {c: [] for c in cols}
    for shard in store.shards:
        with h5py.File(shard.path, "r") as f:
            acts.append(f["acts"][HOOK][()])
            for c in cols:
                meta[c].append(f[c][()])
    meta = {c: np.concatenate(v) for c, v in meta.items()}
    keep = meta["cfg_branch"] == branch
    x = np.concatenate(acts)[keep].astype(np.float32)
    return store, x, {c: v[keep] for c, v in meta.items()}


def pairwise_auroc(score, label, c):
    pos, neg = score[label == c], score[label != c]
    if len(pos) == 0 or len(neg) == 0:
        return np.nan
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def check_against_reference(stats: FeatureStats, sae: SAE, path):
    store, x, meta = all_rows(path)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x), torch.from_numpy(meta["timestep"])).numpy().astype(np.float64)
    F = z.shape[1]
    steps = np.array(store.recorded_steps)
    np.testing.assert_array_equal(stats.steps, steps)
    assert stats.rows == len(x) == stats.attrs["rows"]

    fire = z > 0
    np.testing.assert_allclose(stats.frequency, fire.mean(0))
    np.testing.assert_allclose(stats.mean_act, z.mean(0), rtol=1e-5, atol=1e-7)
    with np.errstate(invalid="ignore", divide="ignore"):
        firing_mean = z.sum(0) / fire.sum(0)
    np.testing.assert_allclose(stats.mean_act_firing, firing_mean, rtol=1e-5, atol=1e-7)
    for i, s in enumerate(steps):
        at = meta["step_index"] == s
        assert stats.rows_per_step[i] == at.sum()
        np.testing.assert_array_equal(stats.fire_count_step[i], fire[at].sum(0))
        np.testing.assert_allclose(stats.frequency_step[i], fire[at].mean(0))
        np.testing.assert_allclose(stats.mean_act_step[i], z[at].mean(0), rtol=1e-5, atol=1e-7)
        rms = np.sqrt((x[at].astype(np.float64) ** 2).sum(-1).mean())  # R(t) of the hook's activations
        assert stats.act_rms_step[i] == pytest.approx(rms, rel=1e-6)
        assert stats.timesteps[i] == pytest.approx(float(meta["timestep"][at][0]))

    # top-k: the values are the K largest positive activations; each occurrence's metadata points at a row
    # holding exactly that value (ties may pick either row)
    K = stats.topk_value.shape[1]
    lookup = {(int(a), int(b), int(c)): i for i, (a, b, c) in
              enumerate(zip(meta["sample_id"], meta["step_index"], meta["token"]))}
    for f in range(F):
        pos = np.sort(z[:, f][z[:, f] > 0])[::-1][:K]
        expect = np.zeros(K)
        expect[:len(pos)] = pos
        np.testing.assert_allclose(stats.topk_value[f], expect, rtol=1e-5)
        for j in range(K):
            if j >= len(pos):
                assert stats.topk_sample[f, j] == -1 and stats.topk_token[f, j] == -1 and np.isnan(stats.topk_timestep[f, j])
                continue
            row = lookup[(stats.topk_sample[f, j], stats.topk_step[f, j], stats.topk_token[f, j])]
            assert z[row, f] == pytest.approx(stats.topk_value[f, j], rel=1e-5)
            assert stats.topk_timestep[f, j] == pytest.approx(meta["timestep"][row])

    # image level (max over tokens and steps) and AUROC per class
    N = store.manifest["num_samples"]
    image = np.zeros((N, F))
    cond = np.full(N, -1)
    for i in range(len(x)):
        image[meta["sample_id"][i]] = np.maximum(image[meta["sample_id"][i]], z[i])
        cond[meta["sample_id"][i]] = meta["cond"][i]
    np.testing.assert_array_equal(stats.sample_cond, cond)
    np.testing.assert_allclose(stats.image_acts, image, rtol=1e-6)
    C = stats.auroc.shape[0]
    assert C == len(store.manifest["condition_names"])
    ref = np.array([[pairwise_auroc(image[:, f], cond, c) for f in range(F)] for c in range(C)])
    np.testing.assert_allclose(stats.auroc, ref, equal_nan=True)
    i = 1
    at = meta["step_index"] == steps[i]
    image_s = np.zeros((N, F))
    for r in np.nonzero(at)[0]:
        image_s[meta["sample_id"][r]] = np.maximum(image_s[meta["sample_id"][r]], z[r])
    ref_s = np.array([[pairwise_auroc(image_s[:, f], cond, c) for f in range(F)] for c in range(C)])
    np.testing.assert_allclose(stats.auroc_step[i], ref_s, equal_nan=True)

    # spatial maps
    grid = store.manifest["patch_grid"]
    T = int(np.prod(grid))
    ref_map = np.stack([z[meta["token"] == t].mean(0) for t in range(T)]).T.reshape(F, *grid)
    np.testing.assert_allclose(stats.spatial_mean, ref_map, rtol=1e-5, atol=1e-7)
    return z


def test_topk_sae_matches_brute_force(dataset, tmp_path):
    sae = make_sae()
    stats = compute_feature_stats(sae, dataset, top_k=8, batch_size=100, progress=False)
    check_against_reference(stats, sae, dataset)
    assert stats.attrs["hook"] == HOOK and stats.attrs["cfg_branch"] == 0
    assert stats.attrs["manifest_sha256"] == ActivationStore(dataset).manifest_sha256

    out = save_feature_stats(stats, tmp_path)
    assert out.name == "feature_stats.h5" and not list(tmp_path.glob("*.tmp"))
    back = load_feature_stats(out)
    for name in ("topk_value", "topk_sample", "topk_timestep", "auroc", "auroc_step", "image_acts_step",
                 "fire_count_step", "spatial_sum", "act_sq_step"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    assert back.attrs == stats.attrs
    assert back.patch_grid == stats.patch_grid and back.condition_names == stats.condition_names
    np.testing.assert_array_equal(back.spatial_mean, stats.spatial_mean)


def test_dense_sae_from_saved_dir_with_never_firing_feature(dataset, tmp_path):
    sae = make_sae("relu", seed=1)
    save_sae(sae, tmp_path / "sae")
    stats = compute_feature_stats(tmp_path / "sae", dataset, top_k=4, batch_size=333, progress=False)
    z = check_against_reference(stats, sae, dataset)
    assert (z[:, 0] == 0).all() and stats.fire_count[0] == 0 and np.isnan(stats.mean_act_firing[0])
    assert (stats.topk_sample[0] == -1).all()
    assert stats.attrs["sae_path"] == str(tmp_path / "sae")


def test_refusals(dataset):
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4, normalization="none", hook="blocks.0.hook_resid_post"))
    with pytest.raises(TideError, match="blocks.0.hook_resid_post.*blocks.1.hook_resid_post"):
        compute_feature_stats(sae, dataset, hook=HOOK, progress=False)
    with pytest.raises(TideError, match="not captured"):
        compute_feature_stats(sae, dataset, progress=False)
    with pytest.raises(TideError, match="image_budget_bytes"):
        compute_feature_stats(make_sae(), dataset, image_budget_bytes=1000, progress=False)


def test_midranks_and_auroc_ties():
    x = np.array([[1.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.5, 1.0]])
    np.testing.assert_array_equal(midranks(x), [[2, 2], [3.5, 2], [3.5, 2], [1, 4]])
    label = np.array([0, 1, 1, 0])
    got = auroc_one_vs_rest(x, label, 3)
    for c in range(2):
        for f in range(2):
            assert got[c, f] == pytest.approx(pairwise_auroc(x[:, f], label, c))
    assert np.isnan(got[2]).all()


def test_cfg_branch_filter(tmp_path, tiny_dit):
    out = tmp_path / "cfg"
    capture(CaptureConfig(out=str(out), hooks=[HOOK], num_samples=4, samples_per_shard=4, num_steps=2,
                          guidance_scale=2.0, cfg_branch="both"), tiny_dit, progress=False)
    sae = make_sae()
    cond = compute_feature_stats(sae, out, progress=False)
    both = compute_feature_stats(sae, out, cfg_branch=None, progress=False)
    uncond = compute_feature_stats(sae, out, cfg_branch=1, progress=False)
    assert cond.rows == uncond.rows == ActivationStore(out).rows // 2 == both.rows // 2
    check_against_reference(cond, sae, out)
    np.testing.assert_array_equal(both.fire_count_step, cond.fire_count_step + uncond.fire_count_step)
    assert not np.array_equal(cond.fire_count_step, uncond.fire_count_step)
