"""Token coordinates: flat ``token`` <-> (frame, row, col) / (row, col) over the manifest's patch grid, and
the ``token`` column's width (int16, int32 for large video grids) through writer, verify and loader."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tide.capture.run import CaptureConfig, Recorder
from tide.capture.schema import token_dtype
from tide.data import ActivationLoader, ActivationStore, LoaderConfig, coords_token, token_coords
from tide.errors import TideError

from fixture_dataset import refresh_shard_record, write_fixture_dataset


def test_token_coords_are_row_major_over_frames_rows_and_cols():
    grid = (3, 5, 7)
    token = np.arange(3 * 5 * 7)
    frame, row, col = token_coords(token, grid)
    np.testing.assert_array_equal(token, (frame * 5 + row) * 7 + col)
    assert token_coords(52, grid) == (1, 2, 3)  # 52 = (1 * 5 + 2) * 7 + 3
    assert token_coords(np.int16(6), [2, 7]) == (0, 6)  # images: (row, col)
    np.testing.assert_array_equal(coords_token((frame, row, col), grid), token)
    assert coords_token((1, 2, 3), grid) == 52
    with pytest.raises(TideError, match=r"token index\(es\) \[105\] lie outside the 3x5x7 patch grid"):
        token_coords([0, 105], grid)
    with pytest.raises(TideError, match="got 2 coordinate axes for the 3-D patch grid"):
        coords_token((1, 2), grid)
    with pytest.raises(TideError, match="on axis 2 lie outside 0..6"):
        coords_token((0, 0, 7), grid)


def test_token_column_widens_to_int32_only_past_the_int16_range():
    assert token_dtype(49) == np.int16 and token_dtype(32768) == np.int16  # indices 0..32767
    assert token_dtype(32769) == np.int32 and token_dtype(21 * 45 * 80) == np.int32  # Wan 720p
    big = Recorder(CaptureConfig(token_fraction=1 / 4096), ["h"], 75600, [0], writer=None, shard=0, sample_conds={0: 0})
    small = Recorder(CaptureConfig(), ["h"], 36, [0], writer=None, shard=0, sample_conds={0: 0})
    import torch

    from tide.hooks import StepContext

    ctx = StepContext(0, 1, 999.0, torch.zeros(1, dtype=torch.int8), torch.zeros(1, dtype=torch.long),
                      torch.zeros(1, dtype=torch.long))
    for recorder, dtype in ((big, np.int32), (small, np.int16)):
        recorder._select = recorder._selection(ctx)
        meta = recorder._metadata(ctx)
        assert meta["token"].dtype == dtype
    assert big._metadata(ctx)["token"].max() > np.iinfo(np.int16).max  # would have wrapped in int16


def test_an_int32_token_column_verifies_and_loads_and_other_widths_are_refused(tmp_path):
    data = write_fixture_dataset(tmp_path / "ds", num_samples=4, samples_per_shard=2)
    with h5py.File(data.path / "shard-000000.h5", "r+") as f:
        tokens = f["token"][:]
        del f["token"]
        f["token"] = tokens.astype(np.int32)
    refresh_shard_record(data.path, data.manifest, 0)
    store = ActivationStore(data.path)
    assert store.verify().ok
    loader = ActivationLoader(store, LoaderConfig(batch_size=10_000, shuffle=False, with_metadata=True))
    batch = next(iter(loader))
    np.testing.assert_array_equal(batch.meta["token"].numpy(), data.meta["token"])
    assert store.patch_grid == (4, 4)
    assert store.token_coords(data.meta["token"][:3])[0].tolist() == (data.meta["token"][:3] // 4).tolist()
    store.close()
    with h5py.File(data.path / "shard-000000.h5", "r+") as f:
        del f["token"]
        f["token"] = tokens.astype(np.int64)
    refresh_shard_record(data.path, data.manifest, 0)
    problems = ActivationStore(data.path).verify().problems
    assert problems == {"shard-000000.h5": ["/token has dtype int64, expected int16 or int32"]}
