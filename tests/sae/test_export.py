"""Exports for SAELens (5 and 6) and sparsify: every field each library's loader needs, the tensors it reads, its
forward re-implemented in torch from the exported files, and the `tide export` command's refusals.

The libraries themselves are not installed here; experiments/export_check.py loads the exports with them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tide.cli import main
from tide.config import field_docs
from tide.errors import TideError
from tide.sae import export_folded, load_folded, save_sae
from tide.sae.export import (INDEX, ExportConfig, check_timesteps, default_timesteps, export_saelens, export_sparsify,
                             timestep_dir)

from sae_helpers import TIMESTEPS, batch, make_sae

SPARSITIES = ("topk", "batchtopk", "relu", "jumprelu")
CONDITIONINGS = ("tide", "bucket", "none")
HOOK, BACKBONE = "blocks.3.hook_resid_post", "tiny-dit"

# SAELens 6.54 (SAE.load_from_disk -> handle_config_defaulting -> <Arch>SAEConfig.from_dict): read_sae_components_from_disk
# indexes cfg["dtype"]; the config class is chosen by "architecture"; d_in and d_sae have no default; TopKSAEConfig.k
# defaults to 100; a cfg without sae_lens_version >= 6 goes through handle_pre_6_0_config, which rebuilds "metadata"
# from its own key list (the timestep would be dropped).
SAELENS6_REQUIRED = {"architecture": str, "d_in": int, "d_sae": int, "dtype": str, "sae_lens_version": str, "metadata": dict}
SAELENS6_READ = {"apply_b_dec_to_input": bool, "normalize_activations": str, "reshape_activations": str}
# SAELens 5.11 (SAE.load_from_disk -> handle_config_defaulting -> SAEConfig.from_dict): dataclass fields without a
# default and not filled in by handle_config_defaulting ...
SAELENS5_REQUIRED = {"d_in": int, "d_sae": int, "context_size": int, "model_name": str, "hook_name": str,
                     "hook_layer": int, "hook_head_index": (type(None), int), "dataset_path": str, "dtype": str}
# ... and those it defaults (prepend_bos True, activation_fn "relu" even for architecture "topk", ...), written anyway
SAELENS5_DEFAULTED = {"architecture": str, "activation_fn": str, "apply_b_dec_to_input": bool,
                      "finetuning_scaling_factor": bool, "prepend_bos": bool, "dataset_trust_remote_code": bool,
                      "normalize_activations": str, "sae_lens_training_version": (type(None), str), "device": str,
                      "activation_fn_kwargs": dict, "neuronpedia_id": (type(None), str),
                      "model_from_pretrained_kwargs": dict, "seqpos_slice": list}
SAELENS5_FIELDS = set(SAELENS5_REQUIRED) | set(SAELENS5_DEFAULTED) - {"activation_fn"} | {"activation_fn_str"}
# sparsify 1.3.3 (SparseCoder.load_from_disk): pops "d_in", reads the rest with
# SparseCoderConfig.from_dict(drop_extra_fields=True); load_model(strict=True) wants exactly these tensors.
SPARSIFY_REQUIRED = {"d_in": int, "activation": str, "k": int, "num_latents": int, "expansion_factor": int,
                     "normalize_decoder": bool, "multi_topk": bool, "skip_connection": bool, "transcode": bool}
PROVENANCE = ("timestep", "hook_name", "model_name", "folded_from", "source_conditioning", "source_normalization")


def tide_sae(sparsity="topk", conditioning="tide", normalization="per_timestep", **kw):
    return make_sae(sparsity, conditioning, normalization, hook=HOOK, backbone=BACKBONE, **kw).eval()


def assert_types(cfg: dict, spec: dict, library: str) -> None:
    missing = sorted(set(spec) - set(cfg))
    assert not missing, f"{library} needs {missing}"
    for key, tp in spec.items():
        assert isinstance(cfg[key], tp) and not (tp is int and isinstance(cfg[key], bool)), (library, key, cfg[key])


def saelens_forward(tensors: dict, cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' inference forward (5 and 6 alike) from the exported files: encode (x - b_dec) W_enc + b_enc, then
    TopK (ReLU of the k largest) / ReLU / JumpReLU (ReLU where pre > threshold); decode z W_dec + b_dec."""
    pre = (x - tensors["b_dec"] * cfg["apply_b_dec_to_input"]) @ tensors["W_enc"] + tensors["b_enc"]
    if cfg["activation_fn"] == "topk":  # SAELens 5 reads activation_fn_kwargs.k, SAELens 6 reads k
        assert cfg["architecture"] == "topk" and cfg["activation_fn_kwargs"]["k"] == cfg["k"]
        vals, idx = pre.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    elif cfg["architecture"] == "jumprelu":
        z = torch.relu(pre) * (pre > tensors["threshold"])
    else:
        assert cfg["architecture"] == "standard" and cfg["activation_fn"] == "relu"
        z = torch.relu(pre)
    return z, z @ tensors["W_dec"] + tensors["b_dec"]


def sparsify_forward(tensors: dict, cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's SparseCoder: encode = top-k of relu(linear(x - b_dec, encoder.weight, encoder.bias)); decode = the
    k rows of W_dec weighted by their activations, + b_dec."""
    assert cfg["activation"] == "topk" and not cfg["transcode"] and not cfg["skip_connection"]
    pre = torch.relu(torch.nn.functional.linear(x - tensors["b_dec"], tensors["encoder.weight"], tensors["encoder.bias"]))
    vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    return z, z @ tensors["W_dec"] + tensors["b_dec"]


def references(sae, t: float):
    x, t_B = batch(sae, n=64, t=t)
    with torch.no_grad():
        folded = sae.fold(t)
        return x, (folded.encode(x, t_B), folded.reconstruct(x, t_B)), (sae.encode(x, t_B), sae.reconstruct(x, t_B))


# ------------------------------------------------------------------------------------------------ SAELens
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_saelens_cfg_has_every_field_saelens_6_and_5_need(tmp_path, sparsity):
    sae = tide_sae(sparsity)
    (d,) = export_saelens(sae, tmp_path / "out", [250.0])
    cfg = json.loads((d / "cfg.json").read_text())
    assert_types(cfg, SAELENS6_REQUIRED | SAELENS6_READ, "SAELens 6")
    assert_types(cfg, SAELENS5_REQUIRED | SAELENS5_DEFAULTED, "SAELens 5")
    # SAELens 5: the dataclass can be built from the file alone (after its renames: activation_fn -> activation_fn_str)
    renamed = {("activation_fn_str" if k == "activation_fn" else k): v for k, v in cfg.items()}
    assert SAELENS5_FIELDS <= set(renamed)
    # SAELens 6 takes a cfg at or above 6.0 as-is, metadata block included
    assert tuple(int(p) for p in cfg["sae_lens_version"].split(".")[:1]) >= (6,)
    meta = cfg["metadata"]
    assert {k: meta[k] for k in PROVENANCE} == {"timestep": 250.0, "hook_name": HOOK, "model_name": BACKBONE,
                                                "folded_from": "tide.sae", "source_conditioning": "tide",
                                                "source_normalization": "per_timestep"}
    assert cfg["hook_name"] == HOOK and cfg["model_name"] == BACKBONE and cfg["hook_layer"] == 3
    assert cfg["timestep"] == 250.0 and cfg["dataset_path"] == "tide-fold:timestep=250.0"  # SAELens 5 keeps these
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True and cfg["dtype"] == "float32"
    arch = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[sparsity]
    assert cfg["architecture"] == arch
    if sparsity == "topk":  # without activation_fn topk + its k, SAELens 5 runs ReLU; SAELens 6 reads k
        assert (cfg["activation_fn"], cfg["activation_fn_kwargs"], cfg["k"]) == ("topk", {"k": sae.cfg.k}, sae.cfg.k)
        assert cfg["rescale_acts_by_decoder_norm"] is False
    else:
        assert cfg["activation_fn"] == "relu" and "k" not in cfg


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_saelens_export_reproduces_the_folded_and_the_original_sae(tmp_path, sparsity, conditioning):
    sae = tide_sae(sparsity, conditioning)
    ts = [100.0, 900.0]
    dirs = export_saelens(sae, tmp_path / "out", ts)
    assert [d.name for d in dirs] == ["t0100.00", "t0900.00"]
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    for d, t in zip(dirs, ts):
        tensors = load_file(str(d / "sae_weights.safetensors"))
        shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        if sparsity in ("jumprelu", "batchtopk"):
            shapes["threshold"] = (d_sae,)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
        assert all(v.dtype == torch.float32 for v in tensors.values())
        x, (z_fold, x_fold), (z_orig, x_orig) = references(sae, t)
        z, x_hat = saelens_forward(tensors, json.loads((d / "cfg.json").read_text()), x)
        torch.testing.assert_close(z, z_fold, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x_hat, x_fold, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(z, z_orig, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x_hat, x_orig, rtol=1e-4, atol=1e-4)


def test_export_folded_is_the_saelens_export(tmp_path):
    sae = tide_sae()
    dirs = export_folded(sae, tmp_path / "out", [500.0])
    again = export_saelens(sae, tmp_path / "again", [500.0])[0]
    assert json.loads((dirs[0] / "cfg.json").read_text()) == json.loads((again / "cfg.json").read_text())
    assert set(load_folded(dirs[0])) == {"W_enc", "W_dec", "b_enc", "b_dec"}


# ------------------------------------------------------------------------------------------------ sparsify
def test_sparsify_cfg_and_tensors_are_what_sparse_coder_load_from_disk_reads(tmp_path):
    sae = tide_sae(f=32, d=8)
    (d,) = export_sparsify(sae, tmp_path / "out", [750.0])
    assert sorted(p.name for p in d.iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((d / "cfg.json").read_text())
    assert_types(cfg, SPARSIFY_REQUIRED, "sparsify")
    assert (cfg["d_in"], cfg["activation"], cfg["k"], cfg["num_latents"], cfg["expansion_factor"]) == (8, "topk", sae.cfg.k, 32, 4)
    assert not (cfg["multi_topk"] or cfg["skip_connection"] or cfg["transcode"] or cfg["normalize_decoder"])
    assert {k: cfg["tide"][k] for k in PROVENANCE} == {"timestep": 750.0, "hook_name": HOOK, "model_name": BACKBONE,
                                                       "folded_from": "tide.sae", "source_conditioning": "tide",
                                                       "source_normalization": "per_timestep"}
    tensors = load_file(str(d / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {  # strict load: exactly these
        "encoder.weight": (32, 8), "encoder.bias": (32,), "W_dec": (32, 8), "b_dec": (8,)}
    # a d_sae that is no multiple of d_in: num_latents decides, expansion_factor says 0
    (d,) = export_sparsify(tide_sae(f=20, d=8), tmp_path / "odd", [750.0])
    assert json.loads((d / "cfg.json").read_text())["expansion_factor"] == 0


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_sparsify_export_reproduces_the_folded_and_the_original_sae(tmp_path, conditioning):
    sae = tide_sae("topk", conditioning)
    ts = [0.0, 500.0, 999.0]
    for d, t in zip(export_sparsify(sae, tmp_path / "out", ts), ts):
        x, (z_fold, x_fold), (z_orig, x_orig) = references(sae, t)
        z, x_hat = sparsify_forward(load_file(str(d / "sae.safetensors")), json.loads((d / "cfg.json").read_text()), x)
        torch.testing.assert_close(z, z_fold, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x_hat, x_fold, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(z, z_orig, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x_hat, x_orig, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sparsity", ["batchtopk", "relu", "jumprelu"])
def test_sparsify_refuses_an_sae_that_is_not_topk(tmp_path, sparsity):
    with pytest.raises(TideError, match=f"TopK SAEs only .* {sparsity}: export it with --format saelens"):
        export_sparsify(tide_sae(sparsity), tmp_path / "out", [500.0])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ timesteps
def test_default_timesteps():
    assert default_timesteps(tide_sae(normalization="per_timestep")) == TIMESTEPS
    assert default_timesteps(tide_sae(normalization="global")) == [50.0 + 100.0 * i for i in range(10)]
    assert default_timesteps(tide_sae(conditioning="bucket", normalization="global")) == [125.0, 375.0, 625.0, 875.0]
    assert default_timesteps(tide_sae(conditioning="none", normalization="global")) == [500.0]


def test_timesteps_out_of_range_or_sharing_a_directory_are_refused():
    sae = tide_sae()
    assert check_timesteps(sae, [0, 1000]) == [0.0, 1000.0]
    for bad, match in (([-1.0], r"outside the SAE's range \[0, 1000\]"), ([1000.5], "outside"), ([float("nan")], "outside"),
                       ([], "no timesteps"), ([500.001, 500.004], "share the directory t0500.00")):
        with pytest.raises(TideError, match=match):
            check_timesteps(sae, bad)
    assert timestep_dir(5) == "t0005.00"


# ------------------------------------------------------------------------------------------------ atomicity
def test_an_error_midway_leaves_nothing_written_and_an_old_export_intact(tmp_path, monkeypatch):
    import tide.sae.export as export

    sae, out = tide_sae(), tmp_path / "out"
    export_saelens(sae, out, [100.0])
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls = []

    def failing(sae, t, d):
        calls.append(t)
        if len(calls) == 2:
            raise OSError("disk full")
        real(sae, t, d)

    real = export._write_saelens
    monkeypatch.setattr(export, "_write_saelens", failing)
    with pytest.raises(OSError, match="disk full"):
        export_saelens(sae, out, [200.0, 300.0], overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        export_saelens(sae, tmp_path / "new", [200.0, 300.0])
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no new/, no *.tmp


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def sae_dir(tmp_path) -> Path:
    return save_sae(tide_sae(), tmp_path / "sae")


def test_export_command_writes_one_directory_per_timestep(sae_dir, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", "--sae", str(sae_dir), "--out", str(out), "--timesteps", "100,900"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["t0100.00", "t0900.00", INDEX]
    index = json.loads((out / INDEX).read_text())
    assert (index["target"], index["timesteps"], index["source"]) == ("saelens", [100.0, 900.0], str(sae_dir))
    assert "exported 2 saelens SAEs (t = 100, 900)" in capsys.readouterr().out
    # default timesteps: the per-timestep normalisation's
    assert main(["export", "--sae", str(sae_dir), "--out", str(tmp_path / "sp"), "--format", "sparsify"]) == 0
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == sorted([timestep_dir(t) for t in TIMESTEPS] + [INDEX])
    assert (tmp_path / "sp" / "t0250.00" / "sae.safetensors").is_file()


def test_export_config_fields_have_docstrings():
    docs = field_docs(ExportConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(ExportConfig))


def _refusals(tmp_path, sae_dir):
    relu_dir = save_sae(tide_sae("relu"), tmp_path / "relu_sae")
    existing = tmp_path / "existing"
    export_saelens(tide_sae(), existing, [10.0])
    (tmp_path / "afile").write_text("x")
    return [
        (["--out", str(tmp_path / "o")], "give the SAE directory"),
        (["--sae", str(sae_dir)], "give the output directory"),
        (["--sae", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist: pass --sae"),
        (["--sae", str(sae_dir), "--out", str(tmp_path / "o"), "--format", "onnx"], "unknown export format 'onnx': use --format saelens or --format sparsify"),
        (["--sae", str(relu_dir), "--out", str(tmp_path / "o"), "--format", "sparsify"], "sparsity is relu: export it with --format saelens"),
        (["--sae", str(sae_dir), "--out", str(existing)], "already exists: pass --overwrite"),
        (["--sae", str(sae_dir), "--out", str(sae_dir), "--overwrite"], "is not a tide export"),
        (["--sae", str(sae_dir), "--out", str(tmp_path), "--overwrite"], "is not a tide export"),
        (["--sae", str(sae_dir), "--out", str(tmp_path / "afile")], "is a file"),
        (["--sae", str(sae_dir), "--out", str(tmp_path / "o"), "--timesteps", "100,1500"], r"\[1500.0\] lie outside the SAE's range \[0, 1000\]"),
        (["--sae", str(sae_dir), "--out", str(tmp_path / "o"), "--timesteps", "-5"], "outside"),
        (["--sae", str(sae_dir), "--out", str(tmp_path / "o"), "--timesteps", "late"], "cannot read 'late' as float"),
        (["--sae", str(tmp_path / "afile"), "--out", str(tmp_path / "o")], "is a file: pass the SAE directory"),
    ]


def test_export_refusals_are_one_line_exit_2_and_write_nothing(sae_dir, tmp_path, capsys):
    import re

    for argv, message in _refusals(tmp_path, sae_dir):
        before = sorted(p for p in tmp_path.rglob("*"))
        capsys.readouterr()
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tide export: error: "), (argv, err)
        assert re.search(message, err[0]), (argv, err[0])
        assert sorted(p for p in tmp_path.rglob("*")) == before, argv


def test_overwrite_replaces_a_previous_export_only(sae_dir, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", "--sae", str(sae_dir), "--out", str(out), "--timesteps", "100"]) == 0
    assert main(["export", "--sae", str(sae_dir), "--out", str(out), "--timesteps", "200", "--format", "sparsify",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["t0200.00", INDEX]
    assert json.loads((out / INDEX).read_text())["target"] == "sparsify"
    # an empty directory is no export to lose: filled without --overwrite
    (tmp_path / "empty").mkdir()
    assert main(["export", "--sae", str(sae_dir), "--out", str(tmp_path / "empty"), "--timesteps", "5"]) == 0
    assert (tmp_path / "empty" / "t0005.00" / "cfg.json").is_file()
