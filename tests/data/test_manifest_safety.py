"""A manifest is checked the same way on every read path (`tide data info`, `tide data verify`, `tide train`,
the loader): JSON object, schema and version, the types of its entries, shard files confined to the dataset
directory. Each refusal is one stderr line and exit status 2, and leaves every file as it was. The training
loader can also check each shard's SHA-256 (once per process)."""

import copy
import json
import os
import shutil
from pathlib import Path

import h5py
import pytest

import tide.data.store as store_module
from fixture_dataset import HOOKS, refresh_shard_record, write_fixture_dataset, write_manifest
from tide.cli import main
from tide.data import ActivationLoader, ActivationStore, LoaderConfig
from tide.errors import TideError

H0, H1 = list(HOOKS)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_fixture_dataset(tmp_path_factory.mktemp("pristine") / "ds")


@pytest.fixture
def data(pristine, tmp_path):
    """A private copy of the fixture dataset, free to damage, beside an ``outside`` directory holding a valid copy
    of shard 0 (so a manifest that escapes the dataset directory would find a readable shard there)."""
    path = tmp_path / "ds"
    shutil.copytree(pristine.path, path)
    (tmp_path / "outside").mkdir()
    shutil.copy2(path / "shard-000000.h5", tmp_path / "outside" / "shard.h5")
    return pristine._replace(path=path, manifest=json.loads((path / "manifest.json").read_text()))


def snapshot(*roots: Path) -> dict:
    """Every file (and symlink target) under ``roots``, with its bytes."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
    return out


def run(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def reader_argv(reader: str, path: Path, tmp_path: Path) -> list:
    if reader == "train":
        return ["train", "--data", path, "--out", tmp_path / "run", "--steps", "2", "--batch-size", "64",
                "--shuffle-buffer", "128", "--device", "cpu", "--no-progress"]
    return ["data", reader, path]


def _entry(m, **changes):
    m["shards"][1].update(changes)
    return m


def _drop(key):
    def edit(m):
        del m[key]
        return m
    return edit


def _drop_entry_key(key):
    def edit(m):
        del m["shards"][1][key]
        return m
    return edit


# (id, edit of the manifest dict -> new JSON value, text the one-line message must hold)
GARBAGE = [
    ("list", lambda m: [m], "holds a list, not a JSON object"),
    ("string", lambda m: "tide", "holds a string, not a JSON object"),
    ("null", lambda m: None, "holds null, not a JSON object"),
    ("number", lambda m: 7, "holds an integer, not a JSON object"),
    ("empty-object", lambda m: {}, "has no 'schema' entry"),
    ("other-schema", lambda m: dict(m, schema="other.format"), "has schema 'other.format', expected 'tide.activations'"),
    ("newer-version", lambda m: dict(m, schema_version=99), "written by a newer tide (version 99); upgrade tide"),
    ("older-version", lambda m: dict(m, schema_version=0), "older than this tide reads"),
    ("version-string", lambda m: dict(m, schema_version="1"), "has schema_version '1', not an integer"),
    ("version-float", lambda m: dict(m, schema_version=1.0), "has schema_version 1.0, not an integer"),
    ("version-bool", lambda m: dict(m, schema_version=True), "has schema_version True, not an integer"),
    ("no-shards", _drop("shards"), "has no 'shards' entry"),
    ("no-hooks", _drop("hooks"), "has no 'hooks' entry"),
    ("no-complete", _drop("complete"), "has no 'complete' entry"),
    ("complete-string", lambda m: dict(m, complete="yes"), "has complete 'yes', expected true or false"),
    ("shards-string", lambda m: dict(m, shards="shard-000000.h5"), "has shards 'shard-000000.h5', expected a list"),
    ("shards-object", lambda m: dict(m, shards={"0": m["shards"][0]}), "expected a list of shard entries"),
    ("entry-number", lambda m: dict(m, shards=[5]), "shard entry 0 is an integer, not an object"),
    ("entry-no-rows", _drop_entry_key("rows"), "shard entry 1 ('shard-000001.h5') has rows missing"),
    ("rows-string", lambda m: _entry(m, rows="many"), "has rows 'many', expected an integer >= 0"),
    ("rows-negative", lambda m: _entry(m, rows=-5), "has rows -5, expected an integer >= 0"),
    ("rows-float", lambda m: _entry(m, rows=1.5), "has rows 1.5"),
    ("rows-null", lambda m: _entry(m, rows=None), "has rows None"),
    ("rows-bool", lambda m: _entry(m, rows=True), "has rows True"),
    ("bytes-list", lambda m: _entry(m, bytes=[1]), "has bytes [1]"),
    ("index-string", lambda m: _entry(m, index="1"), "has index '1'"),
    ("file-number", lambda m: _entry(m, file=3), "has file 3, expected a file name"),
    ("sha256-short", lambda m: _entry(m, sha256="abc"), "has sha256 'abc', expected 64 hexadecimal digits"),
    ("dtypes-list", lambda m: _entry(m, dtypes=["float16"]), "has dtypes ['float16']"),
    ("hooks-list", lambda m: dict(m, hooks=[H0]), "has hooks ['blocks.0.hook_resid_post'], expected an object"),
    ("hooks-empty", lambda m: dict(m, hooks={}), "has hooks {}"),
    ("d_model-string", lambda m: dict(m, hooks={H0: {"d_model": "8"}}), f"hook '{H0}' has {{'d_model': '8'}}"),
    ("hook-spec-int", lambda m: dict(m, hooks={H0: 8}), f"hook '{H0}' has 8"),
    ("schedule-list", lambda m: dict(m, schedule=[]), "has schedule [], expected an object"),
    ("timesteps-strings", lambda m: dict(m, schedule=dict(m["schedule"], timesteps=["a"])),
     "has schedule.timesteps ['a'], expected a list of numbers"),
    ("recorded-steps-string", lambda m: dict(m, schedule=dict(m["schedule"], recorded_steps="all")),
     "has schedule.recorded_steps 'all'"),
    ("backbone-string", lambda m: dict(m, backbone="dit"), "has backbone 'dit', expected an object"),
    ("config-null", lambda m: dict(m, config=None), "has config None, expected an object"),
    ("conditions-number", lambda m: dict(m, condition_names=4), "has condition_names 4"),
    ("patch-grid-string", lambda m: dict(m, patch_grid="4x4"), "has patch_grid '4x4'"),
    ("num-tokens-string", lambda m: dict(m, num_tokens="16"), "has num_tokens '16'"),
    ("total-rows-list", lambda m: dict(m, total_rows=[640]), "has total_rows [640]"),
    ("num-shards-negative", lambda m: dict(m, num_shards=-1), "has num_shards -1"),
    ("absolute-path", lambda m: _entry(m, file="/etc/passwd"),
     "shard entry 1 ('/etc/passwd') names file '/etc/passwd', which is an absolute path"),
    ("dotdot-path", lambda m: _entry(m, file="../outside/shard.h5"),
     "shard entry 1 ('../outside/shard.h5') names file '../outside/shard.h5', which contains '..'"),
    ("dotdot-inside", lambda m: _entry(m, file="sub/../shard-000001.h5"), "which contains '..'"),
]


@pytest.mark.parametrize("reader", ["info", "verify", "train"])
@pytest.mark.parametrize("edit, needle", [g[1:] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_a_garbage_manifest_is_one_line_exit_2_and_changes_nothing(data, tmp_path, capsys, reader, edit, needle):
    manifest = edit(copy.deepcopy(data.manifest))
    write_manifest(data.path, manifest)
    before = snapshot(tmp_path)
    rc, err = run(reader_argv(reader, data.path, tmp_path), capsys)
    assert rc == 2 and len(err) == 1, err
    assert needle in err[0], err[0]
    assert "manifest.json" in err[0] and "Traceback" not in err[0]
    if "version" not in needle and "schema" not in needle:
        assert "recapture" in err[0], err[0]
    assert snapshot(tmp_path) == before  # dataset, outside dir, and no run directory made
    with pytest.raises(TideError, match="manifest.json"):
        ActivationLoader(data.path)


def test_a_symlinked_shard_must_resolve_inside_the_dataset(data, tmp_path, capsys):
    """A shard entry that names a symlink out of the directory is refused everywhere; one to a file inside is fine."""
    (data.path / "escape.h5").symlink_to(tmp_path / "outside" / "shard.h5")
    m = copy.deepcopy(data.manifest)
    m["shards"][0]["file"] = "escape.h5"  # same bytes and hash as the listed shard: only the path is wrong
    write_manifest(data.path, m)
    before = snapshot(tmp_path)
    for reader in ("info", "verify", "train"):
        rc, err = run(reader_argv(reader, data.path, tmp_path), capsys)
        assert rc == 2 and len(err) == 1, err
        assert "shard entry 0 ('escape.h5') names file 'escape.h5', which resolves to" in err[0]
        assert "outside the dataset directory" in err[0] and "recapture" in err[0]
    assert snapshot(tmp_path) == before

    (data.path / "alias.h5").symlink_to("shard-000000.h5")
    m["shards"][0]["file"] = "alias.h5"
    write_manifest(data.path, m)
    store = ActivationStore(data.path)
    assert store.verify().ok
    assert sum(len(b.t_B) for b in ActivationLoader(store, LoaderConfig(batch_size=64, shuffle_buffer=128))) == 640


def test_a_shard_whose_row_count_disagrees_with_the_manifest_is_refused_before_reading(data):
    m = copy.deepcopy(data.manifest)
    m["shards"][1]["rows"] = 10 ** 12  # a valid type, a wrong value: the loader must not plan 10^12 rows
    write_manifest(data.path, m)
    with pytest.raises(TideError, match=r"shard shard-000001.h5 holds 256 rows of .*, the manifest says 1000000000000"):
        ActivationLoader(data.path, LoaderConfig(batch_size=64, shuffle_buffer=128))


@pytest.mark.parametrize("value", [99, 0])
def test_a_shard_file_of_another_schema_version_is_refused(data, value):
    with h5py.File(data.path / "shard-000002.h5", "r+") as f:
        f.attrs["schema_version"] = value
    refresh_shard_record(data.path, data.manifest, 2)  # size and hash agree: only the attribute is wrong
    message = "was written by a newer tide \\(version 99\\); upgrade tide" if value > 1 else "has schema_version 0, older"
    with pytest.raises(TideError, match=f"shard-000002.h5 {message}"):
        ActivationLoader(data.path)


ODD_VALUES = [None, True, -1, 0, 1.5, "x", [], {}, [1, "a"], {"a": None}, "DELETE"]


def test_no_manifest_value_makes_info_or_verify_crash(data, capsys):
    """Every top-level and shard-entry key set to each odd JSON value (or deleted): `data info` and `data verify`
    succeed, report damage (verify: 1) or refuse in one line (2); never a traceback."""
    cases = [(None, key) for key in data.manifest] + [(1, key) for key in data.manifest["shards"][1]]
    outcomes = set()
    for where, key in cases:
        for value in ODD_VALUES:
            m = copy.deepcopy(data.manifest)
            target = m if where is None else m["shards"][where]
            if value == "DELETE":
                del target[key]
            else:
                target[key] = value
            write_manifest(data.path, m)
            for action in ("info", "verify"):
                rc, err = run(["data", action, data.path], capsys)
                assert rc in ((0, 2) if action == "info" else (0, 1, 2)), (key, value, action, rc, err)
                assert (rc == 2) == (len(err) == 1) and len(err) <= 1, (key, value, action, err)
                outcomes.add(rc)
    assert outcomes == {0, 1, 2}


# ------------------------------------------------------------------------------------ checksums in the loader
def flip_byte(path: Path, hook: str, row: int = 3) -> None:
    """Flip the low mantissa bit of one stored activation: same size, still finite, different SHA-256."""
    with h5py.File(path, "r") as f:
        offset = f[f"acts/{hook}"].id.get_offset() + row * 2 * f[f"acts/{hook}"].shape[1]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x01]))


def loader_cfg(verify: bool, **kw) -> LoaderConfig:
    return LoaderConfig(batch_size=64, shuffle_buffer=128, block_rows=64, verify_checksums=verify, **kw)


def test_the_loader_refuses_a_changed_shard_only_when_verifying(data):
    flip_byte(data.path / "shard-000001.h5", H1)
    store = ActivationStore(data.path)
    assert store.shards[1].path.stat().st_size == store.shards[1].bytes  # the size check cannot see it
    with pytest.raises(TideError, match=r"shard shard-000001.h5 does not match its SHA-256 in the manifest .*"
                                        r"run `tide data verify .*ds` for details"):
        list(ActivationLoader(store, loader_cfg(True)))
    rows = sum(len(b.t_B) for b in ActivationLoader(store, loader_cfg(False)))
    assert rows == store.rows == 640


def test_each_shard_is_hashed_once_per_process_and_again_after_it_changes(data, monkeypatch):
    hashed = []
    real = store_module.sha256_file

    def counting(path, *args):
        hashed.append(Path(path).name)
        return real(path, *args)
    monkeypatch.setattr(store_module, "sha256_file", counting)
    store = ActivationStore(data.path)
    batches = list(ActivationLoader(store, loader_cfg(True, epochs=3)))
    assert sum(len(b.t_B) for b in batches) == 3 * 640
    assert sorted(hashed) == [s.file for s in store.shards]  # three epochs, one hash per shard
    list(ActivationLoader(ActivationStore(data.path), loader_cfg(True)))  # a new loader and store: remembered
    assert len(hashed) == 3

    flip_byte(data.path / "shard-000002.h5", H0)  # changed on disk after it was verified: hashed again, refused
    with pytest.raises(TideError, match="shard-000002.h5 does not match its SHA-256"):
        list(ActivationLoader(ActivationStore(data.path), loader_cfg(True)))
    assert hashed[3:] == ["shard-000002.h5"] or sorted(hashed[3:]) == ["shard-000002.h5"]
    with pytest.raises(TideError, match="shard-000002.h5 does not match its SHA-256"):  # a mismatch is not remembered
        ActivationStore(data.path).verify_checksum(2)


def test_verify_names_the_flipped_shard_and_exits_1(data, capsys):
    flip_byte(data.path / "shard-000000.h5", H0)
    rc, _ = run(["data", "verify", data.path], capsys)
    assert rc == 1
    rc, _ = run(["data", "verify", data.path, "--no-hashes"], capsys)
    assert rc == 0
