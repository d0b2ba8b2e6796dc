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


EDGES = np.logspace(-4, 4, 65)  # the histogram's bins, written out independently of the module: 8 per decade


def reference_histogram(z_f: np.ndarray) -> np.ndarray:
    """np.histogram of one feature's firing latents, clipped into [first edge, last edge] so that values outside
    the range land in the first or the last bin (np.histogram's last bin is closed on the right)."""
    v = z_f[z_f > 0]
    return np.histogram(np.clip(v, EDGES[0], EDGES[-1]), bins=EDGES)[0]


def near_an_edge(z_f: np.ndarray, rel: float = 1e-5) -> bool:
    """Whether a firing latent lies so close to an inner edge that float rounding in the batched pass could move
    it across (the pass encodes in batches, maybe on the GPU; the reference encodes every row at once)."""
    v = z_f[z_f > 0]
    return bool((np.abs(v[:, None] / EDGES[None, 1:-1] - 1) < rel).any())


def check_histogram(stats: FeatureStats, z: np.ndarray, min_exact: int = 8) -> None:
    """Each feature's histogram sums to its fire count and equals numpy's on the reference latents (exactly, for
    the features with no latent within float rounding of an edge: at least ``min_exact`` of them)."""
    F = z.shape[1]
    assert stats.hist_count.shape == (F, 64) and stats.hist_count.dtype == np.int64
    assert stats.hist_edges.dtype == np.float64
    np.testing.assert_array_equal(stats.hist_edges, EDGES)
    np.testing.assert_array_equal(stats.hist_count.sum(1), stats.fire_count)
    np.testing.assert_array_equal(stats.hist_count.sum(1), (z > 0).sum(0))
    exact = [f for f in range(F) if not near_an_edge(z[:, f])]
    assert len(exact) >= min_exact
    for f in exact:
        np.testing.assert_array_equal(stats.hist_count[f], reference_histogram(z[:, f]), err_msg=f"feature {f}")
    assert (stats.hist_count > 0).sum(1).max() > 1  # the latents spread over several bins: the check has teeth


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

    check_histogram(stats, z)
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
                 "fire_count_step", "spatial_sum", "act_sq_step", "hist_edges", "hist_count"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
        assert getattr(back, name).dtype == getattr(stats, name).dtype
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


def test_histogram_clips_to_the_end_bins_and_survives_save_load(dataset, tmp_path):
    """Latents beyond the edges (a ReLU SAE with one feature scaled far above 1e4 and one far below 1e-4) count in
    the last and the first bin; a latent exactly on an edge counts in the bin above it (features 3 and 4 have a zero
    encoder row, so their latent is their bias on every row: 1.0 = edge 32 and 1e4 = the last edge, both exact in
    float32) and one just below an edge in the bin below (feature 5: the float32 nearest an edge that float32 rounds
    down, which a comparison against float32-rounded edges would put in the bin above); the histogram round-trips
    through the file exactly."""
    sae = make_sae("relu", seed=2)
    with torch.no_grad():
        sae.W_enc[..., 1, :] *= 1e6
        sae.W_enc[..., 2, :] *= 1e-7
        sae.b_enc[..., 2] = 0.0
        sae.W_enc[..., 3:6, :] = 0.0
        sae.b_enc[..., 3] = 1.0
        sae.b_enc[..., 4] = 1e4
        k = next(k for k in range(33, 64) if np.float32(EDGES[k]) < EDGES[k])
        sae.b_enc[..., 5] = float(np.float32(EDGES[k]))
    stats = compute_feature_stats(sae, dataset, top_k=4, batch_size=256, progress=False)
    _, x, meta = all_rows(dataset)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x), torch.from_numpy(meta["timestep"])).numpy().astype(np.float64)
    assert (z[:, 1] >= 1e4).any() and (z[:, 2] > 0).any() and (z[:, 2][z[:, 2] > 0] < 1e-4).all()
    check_histogram(stats, z)
    assert stats.hist_count[1, -1] == (z[:, 1] >= EDGES[-2]).sum()
    assert stats.hist_count[1, -1] > np.histogram(z[:, 1], bins=EDGES)[0][-1]  # clipping moved values into it
    assert stats.hist_count[2, 0] == stats.fire_count[2] > 0 and stats.hist_count[2, 1:].sum() == 0
    assert stats.hist_count[0].sum() == 0  # feature 0 never fires
    assert EDGES[32] == 1.0 and (z[:, 3] == 1.0).all() and (z[:, 4] == 1e4).all()
    assert (z[:, 5] < EDGES[k]).all() and (z[:, 5] == np.float32(EDGES[k])).all()
    assert stats.hist_count[3, 32] == stats.hist_count[4, 63] == stats.hist_count[5, k - 1] == stats.rows
    np.testing.assert_array_equal(stats.hist_count[3], reference_histogram(z[:, 3]))
    np.testing.assert_array_equal(stats.hist_count[4], reference_histogram(z[:, 4]))
    np.testing.assert_array_equal(stats.hist_count[5], reference_histogram(z[:, 5]))

    centers = stats.hist_centers
    assert centers.shape == (64,)
    np.testing.assert_allclose(centers, 10.0 ** (-4 + (np.arange(64) + 0.5) / 8), rtol=1e-12)
    assert (EDGES[:-1] < centers).all() and (centers < EDGES[1:]).all()

    back = load_feature_stats(save_feature_stats(stats, tmp_path / "stats.h5"))
    np.testing.assert_array_equal(back.hist_count, stats.hist_count)
    np.testing.assert_array_equal(back.hist_edges, stats.hist_edges)
    assert back.hist_count.dtype == np.int64 and back.hist_edges.dtype == np.float64
    np.testing.assert_array_equal(back.hist_centers, stats.hist_centers)


def test_a_schema_2_file_is_refused_in_one_line(dataset, tmp_path):
    """A file written before the histogram (schema_version 2: no hist_* datasets) is refused, naming the version and
    the fix, in one line."""
    path = save_feature_stats(compute_feature_stats(make_sae(), dataset, top_k=2, progress=False), tmp_path)
    assert load_feature_stats(path).hist_count.shape == (32, 64)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 2
        del f["hist_edges"], f["hist_count"]
    with pytest.raises(TideError) as err:
        load_feature_stats(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "schema_version 2 but this tide reads version 3: recompute it with `tide stats`" in message
