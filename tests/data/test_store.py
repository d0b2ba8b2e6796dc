import json
import shutil
from unittest import mock

import h5py
import numpy as np
import pytest

from fixture_dataset import HOOKS, refresh_shard_record, write_fixture_dataset, write_manifest
from tide.data import ActivationStore
from tide.errors import TideError

H0, H1 = list(HOOKS)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_fixture_dataset(tmp_path_factory.mktemp("pristine") / "ds")


@pytest.fixture
def data(pristine, tmp_path):
    """A private copy of the fixture dataset, free to damage."""
    path = tmp_path / "ds"
    shutil.copytree(pristine.path, path)
    return pristine._replace(path=path, manifest=json.loads((path / "manifest.json").read_text()))


def test_verify_passes_on_a_good_dataset(pristine):
    store = ActivationStore(pristine.path)
    report = store.verify()
    assert report.ok, report.format()
    assert report.shards_checked == 3 and report.rows_checked == store.rows == len(pristine.meta["sample_id"])
    report.raise_if_bad()
    assert "OK" in report.format()


def test_truncated_shard_is_named(data):
    shard = data.path / "shard-000001.h5"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    report = ActivationStore(data.path).verify()
    assert report.bad_shards == ["shard-000001.h5"]
    assert any("truncated" in p for p in report.problems["shard-000001.h5"])
    with pytest.raises(TideError, match="shard-000001.h5: size"):
        report.raise_if_bad()


def test_flipped_byte_fails_the_checksum(data):
    shard = data.path / "shard-000002.h5"
    with h5py.File(shard, "r") as f:
        offset = f[f"acts/{H1}"].id.get_offset() + 7
    raw = bytearray(shard.read_bytes())
    raw[offset] ^= 0x01  # the low mantissa bit of one float16: still finite, same size
    shard.write_bytes(bytes(raw))
    report = ActivationStore(data.path).verify()
    assert report.bad_shards == ["shard-000002.h5"]
    assert len(report.problems["shard-000002.h5"]) == 1 and "SHA-256" in report.problems["shard-000002.h5"][0]
    assert ActivationStore(data.path).verify(check_hashes=False).ok  # only the hash can see this one


def test_missing_shard_is_refused_on_open_and_reported_by_verify(data):
    (data.path / "shard-000001.h5").unlink()
    with pytest.raises(TideError, match="shard-000001.h5 is listed in the manifest but missing"):
        ActivationStore(data.path)
    report = ActivationStore(data.path, strict=False).verify()
    assert report.bad_shards == ["shard-000001.h5"]
    assert "missing" in report.problems["shard-000001.h5"][0]


def test_nan_and_inf_in_activations_are_found_and_located(data):
    with h5py.File(data.path / "shard-000000.h5", "r+") as f:
        f[f"acts/{H0}"][17, 3] = np.nan
    with h5py.File(data.path / "shard-000002.h5", "r+") as f:
        f[f"acts/{H1}"][5, 0] = np.inf
        f[f"acts/{H1}"][9, 1] = -np.inf
    for i in (0, 2):
        refresh_shard_record(data.path, data.manifest, i)  # size and hash agree: only the scan can tell
    store = ActivationStore(data.path)
    report = store.verify()
    assert report.bad_shards == ["shard-000000.h5", "shard-000002.h5"]
    assert report.problems["shard-000000.h5"] == [f"/acts/{H0} holds 1 NaN/inf value(s), first in row 17"]
    assert report.problems["shard-000002.h5"] == [f"/acts/{H1} holds 2 NaN/inf value(s), first in row 5"]
    assert store.verify(scan=False).ok
    with pytest.raises(TideError, match="shard-000000.h5.*NaN/inf"):
        report.raise_if_bad()


def test_shape_and_metadata_mismatches_are_reported(data):
    with h5py.File(data.path / "shard-000001.h5", "r+") as f:
        del f["token"]
        f["token"] = np.zeros(5, np.int16)
        f["cfg_branch"][0] = 3
    refresh_shard_record(data.path, data.manifest, 1)
    report = ActivationStore(data.path).verify()
    assert report.problems == {"shard-000001.h5": ["/token has shape (5,), expected (256,)"]}
    with h5py.File(data.path / "shard-000001.h5", "r+") as f:
        del f["token"]
        f["token"] = np.zeros(256, np.int16)
    refresh_shard_record(data.path, data.manifest, 1)
    report = ActivationStore(data.path).verify()
    assert report.problems == {"shard-000001.h5": ["/cfg_branch holds values other than 0 and 1"]}


def test_total_rows_must_equal_the_sum_of_the_shards(data):
    data.manifest["total_rows"] += 1
    write_manifest(data.path, data.manifest)
    report = ActivationStore(data.path).verify()
    assert list(report.problems) == ["manifest"] and "total_rows" in report.problems["manifest"][0]
    with pytest.raises(TideError, match="manifest: total_rows"):
        report.raise_if_bad()


def test_unusable_datasets_are_refused_with_the_fix(tmp_path):
    data = write_fixture_dataset(tmp_path / "partial", num_samples=6, samples_per_shard=2, complete=False)
    with pytest.raises(TideError, match=r"incomplete \(2 of 3 shards.*tide capture --resume"):
        ActivationStore(data.path)
    partial = ActivationStore(data.path, strict=False)
    assert partial.verify().ok and "INCOMPLETE (2 of 3 shards)" in partial.format_info()

    with pytest.raises(TideError, match="no manifest.json"):
        ActivationStore(tmp_path)
    with pytest.raises(TideError, match="not a directory"):
        ActivationStore(tmp_path / "nowhere")
    for key, value, message in [("schema", "other.format", "has schema 'other.format'"),
                                ("schema_version", 2, "upgrade tide"),
                                ("schema_version", 0, "recapture")]:
        manifest = dict(data.manifest, complete=True, **{key: value})
        write_manifest(data.path, manifest)
        with pytest.raises(TideError, match=message):
            ActivationStore(data.path)
    (data.path / "manifest.json").write_text("{not json")
    with pytest.raises(TideError, match="not valid JSON"):
        ActivationStore(data.path)


def test_info_summarises_the_dataset(pristine):
    store = ActivationStore(pristine.path)
    info = store.info()
    assert info["hooks"] == HOOKS and info["dtypes"] == {H0: ["float16"], H1: ["float16"]}
    assert info["rows"] == 640 and info["shards"] == 3 and info["samples"] == 10
    assert info["bytes"] == sum(p.stat().st_size for p in pristine.path.glob("shard-*.h5"))
    assert info["recorded_steps"] == [0, 2, 5, 9]
    assert info["timesteps"] == [901.0, 701.0, 401.0, 1.0] and info["timestep_range"] == [1.0, 901.0]
    assert info["tokens_kept"] == 8 and info["cfg_branches"] == 2 and len(info["conditions"]) == 4
    assert info["backbone"] == {"name": "fixture-dit", "family": "dit"}
    text = store.format_info()
    for needle in ("fixture-dit (dit)", "640 in 3 shards", "4 recorded of 10", H0, "d_model 12",
                   "class 0", "8 kept of 16", "2 CFG branch"):
        assert needle in text, (needle, text)
    json.dumps(info)


def test_stats_equal_a_numpy_reference_and_are_cached(data):
    store = ActivationStore(data.path)
    st = store.stats(H1)
    x = data.acts[H1].astype(np.float64)
    step = data.meta["step_index"]
    assert st.steps_T.tolist() == [0, 2, 5, 9]
    assert st.timesteps_T.tolist() == [901.0, 701.0, 401.0, 1.0]
    for k, s in enumerate(st.steps_T):
        xs = x[step == s]
        assert st.count_T[k] == len(xs)
        np.testing.assert_allclose(st.mean_TD[k], xs.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(st.rms_T[k], np.sqrt((xs ** 2).sum(1).mean()), rtol=1e-10)
        np.testing.assert_allclose(st.var_T[k], ((xs - xs.mean(0)) ** 2).sum(1).mean(), rtol=1e-9)
        np.testing.assert_allclose(st.var_TD[k], xs.var(0), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(st.mean_D, x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st.rms, np.sqrt((x ** 2).sum(1).mean()), rtol=1e-10)
    np.testing.assert_allclose(st.var, ((x - x.mean(0)) ** 2).sum(1).mean(), rtol=1e-9)
    np.testing.assert_allclose(st.var_D, x.var(0), rtol=1e-8, atol=1e-12)
    assert st.rms_T[-1] > st.rms_T[0]  # the fixture grows with the step
    assert st.index_of([901.0, 400.0, 0.0]).tolist() == [0, 2, 3]

    assert (data.path / "stats.h5").is_file() and not list(data.path.glob("*.tmp"))
    with mock.patch.object(ActivationStore, "_compute_stats", side_effect=AssertionError("recomputed")):
        cached = ActivationStore(data.path).stats(H1)
    np.testing.assert_allclose(cached.mean_TD, st.mean_TD, rtol=1e-12)
    np.testing.assert_allclose(cached.var_T, st.var_T, rtol=1e-12)
    np.testing.assert_allclose(cached.var_TD, st.var_TD, rtol=1e-9, atol=1e-12)
    assert cached.count_T.tolist() == st.count_T.tolist()

    other = ActivationStore(data.path).stats(H0)  # a second hook joins the cache
    with h5py.File(data.path / "stats.h5", "r") as f:
        assert sorted(f) == sorted(HOOKS)
    # a changed manifest (e.g. a recapture) invalidates the cache
    data.manifest["created"] = "2027-01-01T00:00:00+00:00"
    write_manifest(data.path, data.manifest)
    with mock.patch.object(ActivationStore, "_compute_stats", side_effect=RuntimeError("recomputed")):
        with pytest.raises(RuntimeError, match="recomputed"):
            ActivationStore(data.path).stats(H0)
    np.testing.assert_allclose(ActivationStore(data.path).stats(H0).mean_D, other.mean_D, rtol=1e-12)


def test_stats_need_a_hook_name_when_several_were_captured(pristine):
    with pytest.raises(TideError, match="name one of"):
        ActivationStore(pristine.path).stats()
    with pytest.raises(TideError, match="not captured"):
        ActivationStore(pristine.path).stats("blocks.9.hook_resid_post")
