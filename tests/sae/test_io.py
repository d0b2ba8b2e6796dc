"""Saving and loading: exact round trips, and clear errors for everything else."""

from __future__ import annotations

import json

import pytest
import torch

from tide.errors import TideError
from tide.sae import load_folded, load_sae, save_sae

from sae_helpers import batch, make_sae


@pytest.mark.parametrize("sparsity,conditioning", [("topk", "tide"), ("batchtopk", "bucket"), ("jumprelu", "none")])
def test_save_load_round_trip_is_exact(tmp_path, sparsity, conditioning):
    sae = make_sae(sparsity, conditioning, "per_timestep")
    save_sae(sae, tmp_path / "sae", extra={"step": 7})
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    want, got = sae.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    x, t_B = batch(sae)
    sae.eval(), loaded.eval()
    assert torch.equal(sae.reconstruct(x, t_B), loaded.reconstruct(x, t_B))
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["step"] == 7


def test_forward_rejects_activations_of_the_wrong_width():
    sae = make_sae(d=8)
    with pytest.raises(TideError, match=r"width 6 .* d_in=8"):
        sae(torch.randn(4, 6), torch.zeros(4))


def test_loading_a_directory_with_only_a_pickle_says_tide_never_unpickles(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(TideError, match="never unpickles"):
        load_sae(tmp_path)


def test_loading_a_file_instead_of_a_directory_is_a_tide_error(tmp_path):
    path = tmp_path / "sae.safetensors"
    path.write_bytes(b"")
    with pytest.raises(TideError, match="pass the SAE directory"):
        load_sae(path)


def test_loading_corrupt_safetensors_is_a_tide_error(tmp_path):
    save_sae(make_sae(), tmp_path)
    (tmp_path / "sae.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(TideError, match="cannot read .*safetensors"):
        load_sae(tmp_path)


def test_loading_a_folded_export_that_is_corrupt_is_a_tide_error(tmp_path):
    (tmp_path / "sae_weights.safetensors").write_bytes(b"nonsense")
    with pytest.raises(TideError, match="cannot read"):
        load_folded(tmp_path)


def test_cfg_json_with_unknown_keys_is_a_tide_error(tmp_path):
    save_sae(make_sae(), tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    meta["config"]["expansion"] = 4
    (tmp_path / "cfg.json").write_text(json.dumps(meta))
    with pytest.raises(TideError, match=r"unknown SAEConfig key\(s\) \['expansion'\]"):
        load_sae(tmp_path)


def test_weights_that_do_not_match_the_config_are_a_tide_error(tmp_path):
    save_sae(make_sae(f=32), tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    meta["config"]["d_sae"] = 16
    (tmp_path / "cfg.json").write_text(json.dumps(meta))
    with pytest.raises(TideError, match="does not match"):
        load_sae(tmp_path)
