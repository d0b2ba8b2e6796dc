"""Feature statistics and the dashboard on a video capture (tiny Wan, a (3 frames, 3 rows, 4 cols) token
grid): spatial maps per frame, and dashboard heat maps as one map per latent frame over a film strip."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tide.analysis import compute_feature_stats, save_feature_stats
from tide.analysis.dashboard import DashboardConfig, export_dashboard
from tide.analysis.feature_plots import video_frames
from tide.capture.run import CaptureConfig, capture
from tide.data import ActivationStore, token_coords
from tide.sae import SAE, SAEConfig, save_sae

_spec = importlib.util.spec_from_file_location("wan_checkpoint",
                                               Path(__file__).parents[1] / "models" / "wan_checkpoint.py")
wan_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wan_checkpoint)
GRID = wan_checkpoint.GRID
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny 3-D VAE is much faster on one thread of a busy 2-core machine
    root = tmp_path_factory.mktemp("video")
    path = wan_checkpoint.build(root / "wan")
    data = root / "capture"
    capture(CaptureConfig(backbone=str(path), out=str(data), hooks=[HOOK], num_samples=4, samples_per_shard=2,
                          num_steps=3, storage_dtype="float32", device="cpu"), progress=False)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=wan_checkpoint.D_MODEL, d_sae=16, k=4, sparsity="topk", normalization="none", hook=HOOK))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc))
    sae_dir = save_sae(sae, root / "sae")
    stats = compute_feature_stats(sae_dir, data, top_k=4, device="cpu", progress=False)
    yield {"root": root, "backbone": path, "data": data, "sae": sae, "sae_dir": sae_dir, "stats": stats,
           "stats_path": save_feature_stats(stats, root / "feature_stats.h5")}
    torch.set_num_threads(threads)


def test_spatial_maps_are_per_frame_and_equal_the_mean_at_each_space_time_patch(video):
    stats, sae = video["stats"], video["sae"]
    assert stats.patch_grid == GRID and stats.spatial_mean.shape == (16, *GRID)
    store = ActivationStore(video["data"])
    rows = [store.read(i, 0, s.rows, [HOOK], ["token", "cfg_branch"]) for i, s in enumerate(store.shards)]
    x = np.concatenate([a[HOOK] for a, _ in rows])
    meta = {c: np.concatenate([m[c] for _, m in rows]) for c in ("token", "cfg_branch")}
    keep = meta["cfg_branch"] == 0
    t = np.concatenate([store.read(i, 0, s.rows, [], ["timestep"])[1]["timestep"] for i, s in enumerate(store.shards)])
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x[keep]), torch.from_numpy(t[keep])).numpy()
    frame, row, col = token_coords(meta["token"][keep], GRID)
    for f, r, c in [(0, 0, 0), (2, 1, 3), (1, 2, 0)]:  # the map at (frame, row, col) is that patch's mean
        at = (frame == f) & (row == r) & (col == c)
        np.testing.assert_allclose(stats.spatial_mean[:, f, r, c], z[at].mean(0), rtol=1e-4, atol=1e-6)


def test_video_frames_pair_latent_frames_with_their_decoded_frames():
    assert video_frames(3, 9) == [(0, 0), (1, 4), (2, 8)]  # Wan: latent frame k <-> pixel frame 4k
    assert video_frames(21, 81, keep=5, max_frames=3) == [(0, 0), (5, 20), (10, 40), (20, 80)]


def test_dashboard_shows_a_heat_map_per_frame_of_a_video_sample(video):
    from tide.analysis.dashboard import decode_heat

    out = video["root"] / "dash"
    stats = video["stats"]
    feature = int(np.argmax(stats.frequency))
    export_dashboard(DashboardConfig(stats=str(video["stats_path"]), out=str(out), features=[feature],
                                     images_per_feature=1, device="cpu", progress=False, neighbours=0,
                                     effect_features=0))
    doc = json.loads((out / "dashboard.json").read_text())
    assert doc["patch_grid"] == list(GRID)
    im = doc["features"][0]["images"][0]
    assert im["frames"] == [0, 1, 2]  # every latent frame of this short video, in order
    heat = decode_heat(im["heat"])
    assert heat.shape == GRID  # one rows x cols map per latent frame shown
    assert heat.reshape(-1)[im["token"]] == pytest.approx(im["regenerated_value"], rel=1e-5)
    assert im["regenerated_value"] == pytest.approx(im["value"], rel=1e-3, abs=1e-4)
    f, r, c = token_coords(im["token"], GRID)
    page = (out / "features" / f"f{feature}.html").read_text()
    assert f"token {im['token']} (frame {f}, row {r}, col {c})" in page
    # the sample's picture is a film strip of the 3 decoded frames that line up with the latent frames
    from PIL import Image

    with Image.open(out / im["image"]) as pic:
        assert pic.size == (3 * 64, 48)  # three 64x48 frames side by side, at their own resolution


def test_steering_masks_cover_frames_rows_and_cols_of_a_video(video):
    from tide.analysis.steering import FeatureEdit, edit_generation, region_mask, steering_fn
    from tide.errors import TideError
    from tide.hooks import StepContext, step_context
    from tide.models import load_backbone
    from tide.sampling import SamplerConfig

    left = region_mask("left", GRID)
    assert left.shape == GRID and left[:, :, :2].all() and not left[:, :, 2:].any()
    fn = steering_fn(video["sae"], [FeatureEdit(3, mode="add", alpha=4.0)], mask=left)
    act = torch.randn(1, 36, wan_checkpoint.D_MODEL)
    ctx = StepContext(0, 3, 999.0, torch.zeros(1, dtype=torch.int8), torch.zeros(1, dtype=torch.long),
                      torch.zeros(1, dtype=torch.long))
    with step_context(ctx):
        changed = (fn(act) - act).abs().amax(-1)[0] > 0
    _, _, col = token_coords(np.arange(36), GRID)
    np.testing.assert_array_equal(changed.numpy(), col < 2)  # the left half of every frame, nothing else

    wan = load_backbone(video["backbone"], device="cpu")
    config = SamplerConfig(num_steps=2)
    before, after = edit_generation(wan, video["sae"], [0], [5], config, [FeatureEdit(3, alpha=4.0)], mask=left,
                                    decode=False)
    assert (after.latents - before.latents).abs().max() > 0
    with pytest.raises(TideError, match=r"expected shape \(3, 3, 4\) \(the patch grid\) or \(36,\)"):
        edit_generation(wan, video["sae"], [0], [5], config, [FeatureEdit(3)], mask=left[0], decode=False)
