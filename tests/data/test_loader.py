from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from fixture_dataset import HOOKS, write_fixture_dataset
from tide.config import field_docs, from_dict
from tide.data import ActivationLoader, ActivationStore, LoaderConfig
from tide.errors import TideError

H0, H1 = list(HOOKS)
SMALL = dict(batch_size=16, shuffle_buffer=96, block_rows=32, with_metadata=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """640 rows: 3 shards (256, 256, 128 rows), 4 recorded steps, 2 CFG branches, 8 tokens per image."""
    return write_fixture_dataset(tmp_path_factory.mktemp("loader") / "ds")


@pytest.fixture(scope="module")
def store(data):
    return ActivationStore(data.path)


def rows_of(batches) -> list[tuple]:
    """(sample, step, branch, token) of every row, in the order the loader gave them."""
    keys = []
    for b in batches:
        m = b.meta
        keys += list(zip(m["sample_id"].tolist(), m["step_index"].tolist(), m["cfg_branch"].tolist(),
                         m["token"].tolist()))
    return keys


def reference_rows(data, keep=None) -> list[tuple]:
    m = data.meta
    keep = np.ones(len(m["sample_id"]), bool) if keep is None else keep
    return list(zip(m["sample_id"][keep].tolist(), m["step_index"][keep].tolist(), m["cfg_branch"][keep].tolist(),
                    m["token"][keep].tolist()))


def test_every_row_comes_exactly_once_per_epoch(data, store):
    loader = ActivationLoader(store, LoaderConfig(**SMALL, epochs=2))
    batches = list(loader)
    keys = rows_of(batches)
    n = len(data.meta["sample_id"])
    assert len(keys) == 2 * n and loader.num_rows == n
    assert sorted(keys[:n]) == sorted(reference_rows(data)) == sorted(keys[n:])
    assert keys[:n] != keys[n:]  # a new order in the second epoch
    assert all(len(b.t_B) == 16 for b in batches)  # 640 = 40 x 16
    assert loader.epoch == 2


def test_batches_mix_shards_images_and_timesteps(store):
    loader = ActivationLoader(store, LoaderConfig(**SMALL))
    first = next(iter(loader))
    assert len(set(first.meta["shard"].tolist())) >= 2
    assert len(set(first.meta["step_index"].tolist())) >= 2
    assert len(set(first.meta["sample_id"].tolist())) >= 4
    # unshuffled, rows come in stored order
    ordered = ActivationLoader(store, LoaderConfig(**dict(SMALL, shuffle=False)))
    shard_row = [(s, r) for b in ordered for s, r in zip(b.meta["shard"].tolist(), b.meta["row"].tolist())]
    assert shard_row == sorted(shard_row) and len(shard_row) == store.rows


@pytest.mark.parametrize("filters", [
    dict(t_min=400.0, t_max=800.0), dict(steps=[0, 9]), dict(conds=[1, 3]), dict(cfg_branch="uncond"),
    dict(t_max=500.0, conds=[2], cfg_branch="cond"),
])
def test_filters_keep_exactly_the_matching_rows(data, store, filters):
    loader = ActivationLoader(store, LoaderConfig(**SMALL, **filters))
    m = data.meta
    keep = np.ones(len(m["sample_id"]), bool)
    if "t_min" in filters:
        keep &= m["timestep"] >= filters["t_min"]
    if "t_max" in filters:
        keep &= m["timestep"] <= filters["t_max"]
    if "steps" in filters:
        keep &= np.isin(m["step_index"], filters["steps"])
    if "conds" in filters:
        keep &= np.isin(m["cond"], filters["conds"])
    if "cfg_branch" in filters:
        keep &= m["cfg_branch"] == {"cond": 0, "uncond": 1}[filters["cfg_branch"]]
    keys = rows_of(loader)
    assert 0 < len(keys) < len(keep) and loader.num_rows == keep.sum()
    assert sorted(keys) == sorted(reference_rows(data, keep))


def test_a_filter_that_keeps_nothing_is_refused(store):
    with pytest.raises(TideError, match="keep no rows.*recorded steps \\[0, 2, 5, 9\\]"):
        ActivationLoader(store, LoaderConfig(**SMALL, steps=[3]))


def test_hooks_come_aligned_and_as_stored(data, store):
    both = next(iter(ActivationLoader(store, LoaderConfig(**SMALL))))
    assert set(both.acts) == set(HOOKS)
    shard, row = both.meta["shard"].numpy(), both.meta["row"].numpy()
    offsets = np.cumsum([0] + [s.rows for s in store.shards])
    for hook, width in HOOKS.items():
        acts = both.acts[hook]
        assert acts.shape == (16, width) and acts.dtype == torch.float32
        expected = data.acts[hook][offsets[shard] + row].astype(np.float32)
        np.testing.assert_array_equal(acts.numpy(), expected)
    np.testing.assert_array_equal(both.t_B.numpy(), data.meta["timestep"][offsets[shard] + row])
    assert both.t_B.dtype == torch.float32
    moved = both.to("cpu")
    assert set(moved.acts) == set(HOOKS) and torch.equal(moved.meta["row"], both.meta["row"])

    one = next(iter(ActivationLoader(store, LoaderConfig(**dict(SMALL, with_metadata=False), hooks=[H1],
                                                         dtype="bfloat16"))))
    assert isinstance(one.acts, torch.Tensor) and one.acts.shape == (16, 12) and one.acts.dtype == torch.bfloat16
    assert one.meta is None
    with pytest.raises(TideError, match="not captured"):
        ActivationLoader(store, LoaderConfig(hooks=["blocks.7.hook_resid_post"]))


def test_same_seed_same_order_other_seed_other_order(store):
    def order(seed):
        return rows_of(ActivationLoader(store, LoaderConfig(**SMALL, seed=seed)))
    assert order(3) == order(3)
    assert order(3) != order(4) and sorted(order(3)) == sorted(order(4))
    loader = ActivationLoader(store, LoaderConfig(**SMALL, seed=3))
    first, second = rows_of(loader), rows_of(loader)  # iterating again continues with the next epoch
    loader.set_epoch(0)
    assert first != second and rows_of(loader) == first


def test_buffer_memory_stays_bounded(store):
    cfg = LoaderConfig(**SMALL)
    loader = ActivationLoader(store, cfg)
    assert loader.max_buffer_rows == cfg.shuffle_buffer + cfg.block_rows < store.rows
    n = sum(len(b.t_B) for b in loader)
    assert n == store.rows
    assert cfg.shuffle_buffer <= loader.peak_buffer_rows <= loader.max_buffer_rows


def test_endless_iteration_and_drop_last(store):
    endless = ActivationLoader(store, LoaderConfig(**dict(SMALL, batch_size=48), epochs=None))
    sizes = [len(b.t_B) for b in islice(endless, 40)]  # 640 rows = 13 x 48 + 16 per epoch
    assert sizes[:14] == [48] * 13 + [16] and len(sizes) == 40
    dropped = ActivationLoader(store, LoaderConfig(**dict(SMALL, batch_size=48), drop_last=True))
    assert [len(b.t_B) for b in dropped] == [48] * 13


def test_ranks_read_disjoint_blocks_that_cover_the_data(data, store):
    per_rank = [rows_of(ActivationLoader(store, LoaderConfig(**SMALL, rank=r, world_size=3))) for r in range(3)]
    everything = Counter(k for keys in per_rank for k in keys)
    assert sorted(everything) == sorted(reference_rows(data)) and set(everything.values()) == {1}
    assert all(len(keys) > 0 for keys in per_rank)


def test_config_is_checked_and_documented():
    assert set(field_docs(LoaderConfig)) == {f for f in LoaderConfig.__dataclass_fields__}
    cfg = from_dict(LoaderConfig, {"hooks": "a,b", "steps": "0,3", "t_max": "500", "epochs": "none"})
    assert cfg.hooks == ["a", "b"] and cfg.steps == [0, 3] and cfg.t_max == 500.0 and cfg.epochs is None
    for bad, message in [(dict(shuffle_buffer=10, batch_size=20), "shuffle_buffer"),
                         (dict(cfg_branch="neither"), "cfg_branch"), (dict(dtype="int8"), "dtype"),
                         (dict(rank=2, world_size=2), "rank"), (dict(t_min=5.0, t_max=1.0), "swap")]:
        with pytest.raises(TideError, match=message):
            LoaderConfig(**bad)
