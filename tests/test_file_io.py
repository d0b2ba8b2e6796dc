"""The ground floor: atomic writes leave the old file or the new one, never a partial one or a stray temp file."""

import hashlib
import json

import pytest
import torch

from tide.io import TMP_SUFFIX, atomic_dir, atomic_path, atomic_write_json, canonical_hash, sha256_file, tensors_hash


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and not (tmp_path / ("a.bin" + TMP_SUFFIX)).exists()
    with atomic_path(target) as tmp:
        assert tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_atomic_dir_swaps_a_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "x.json").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "x.json").write_text("2")
            raise ValueError
    assert (target / "x.json").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_json_and_hashes(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"b": 1, "a": [1, 2]}
    assert sha256_file(tmp_path / "m.json") == hashlib.sha256((tmp_path / "m.json").read_bytes()).hexdigest()
    assert canonical_hash({"a": 1, "b": 2}) == canonical_hash({"b": 2, "a": 1})
    w = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "s": torch.tensor(2.0)}
    expected = hashlib.sha256()
    for name in ("s", "w"):
        expected.update(name.encode())
        expected.update(w[name].numpy().tobytes())
    assert tensors_hash(w.items()) == expected.hexdigest()
    assert tensors_hash(w.items(), {"x": 1}) != tensors_hash(w.items())
    assert tensors_hash({**w, "w": w["w"].T.contiguous().T}.items()) == tensors_hash(w.items())  # layout-free
