"""The data layer on a real capture: verify, stream every row once, and name a damaged shard."""

import numpy as np
import pytest

from tide.capture import CaptureConfig, capture
from tide.cli import main
from tide.data import ActivationLoader, ActivationStore, LoaderConfig
from tide.errors import TideError

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


@pytest.fixture
def captured(tiny_dit, tmp_path):
    out = tmp_path / "ds"
    capture(CaptureConfig(out=str(out), hooks=HOOKS, num_samples=6, samples_per_shard=2, num_steps=5,
                          guidance_scale=2.0, cfg_branch="both", token_fraction=0.5), tiny_dit, progress=False)
    return out


def test_loader_streams_every_captured_row_once_with_aligned_hooks(captured):
    store = ActivationStore(captured)
    assert store.verify().ok
    loader = ActivationLoader(store, LoaderConfig(batch_size=32, shuffle_buffer=64, block_rows=16, with_metadata=True))
    keys, first = [], None
    for batch in loader:
        m = batch.meta
        keys += list(zip(m["sample_id"].tolist(), m["step_index"].tolist(), m["cfg_branch"].tolist(), m["token"].tolist()))
        first = first or batch
    assert len(keys) == len(set(keys)) == store.rows == 6 * 5 * 2 * 8
    assert set(first.acts) == set(HOOKS)
    # aligned: each row's two hooks come from the same (shard, row) on disk
    shard, row = first.meta["shard"][0].item(), first.meta["row"][0].item()
    acts, _ = store.read(shard, row, row + 1, hooks=HOOKS)
    for hook in HOOKS:
        np.testing.assert_allclose(first.acts[hook][0].numpy(), acts[hook][0].astype(np.float32))


def test_data_cli_reports_and_names_a_damaged_shard(captured, capsys):
    assert main(["data", "info", str(captured)]) == 0
    assert "blocks.2.hook_resid_post" in capsys.readouterr().out
    assert main(["data", "verify", str(captured)]) == 0
    path = captured / "shard-000001.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["data", "verify", str(captured)]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.h5" in out and "corrupted" in out
    assert "shard-000000.h5" not in out
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(TideError, match="shard-000001.h5"):
        ActivationStore(captured).verify().raise_if_bad()
    with pytest.raises(TideError, match="shard-000001.h5 is .* bytes.*truncated"):  # never read silently
        list(ActivationLoader(ActivationStore(captured), LoaderConfig(batch_size=8)))
