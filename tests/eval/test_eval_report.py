"""`evaluate`: eval.json, eval.png and the samples grid from a saved SAE and a captured dataset."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_DIT
from tide.config import field_docs, from_dict, load_yaml
from tide.errors import TideError
from tide.eval.report import EvalConfig, evaluate
from tide.models.dit import DiTBackbone
from tide.sae import save_sae

from eval_helpers import HOOK, OTHER_HOOK, capture_tiny, random_sae


@pytest.fixture
def run(tiny_dit_dir, tmp_path, device):
    data = capture_tiny(None, tmp_path / "ds", backbone=str(tiny_dit_dir), device=str(device), guidance_scale=2.0,
                        num_steps=4)
    sae_dir = save_sae(random_sae(), tmp_path / "sae")
    return EvalConfig(sae=str(sae_dir), data=data, out=str(tmp_path / "eval"), splice_samples=1, device=str(device))


def _no_nan(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"eval.json holds {c}"))


def test_evaluate_writes_eval_json_and_plots(run, tmp_path):
    typed = evaluate(run, progress=False)
    result = typed.report
    assert typed.out == tmp_path / "eval" and typed.fvu == result["reconstruction"]["overall"]["fvu"]
    assert typed.denoiser_error.samples == 4 and typed.spliced_samples.pixel_mse == result["spliced_samples"]["pixel_mse"]
    out = tmp_path / "eval"
    saved = _no_nan((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for name in ("eval.png", "eval_samples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = saved["reconstruction"]
    assert rec["hook"] == HOOK and rec["rows"] == 4 * 4 * 16 and len(rec["buckets"]) == 5
    assert len(rec["per_timestep"]["fvu"]) == 4 and 0 < rec["overall"]["fvu"]
    den = saved["denoiser_error"]
    assert den["samples"] == 4 and den["guidance_scale"] == 2.0 and den["ablation"] == "data"
    assert len(den["per_step"]["relative_error"]) == 4 and den["mean_relative_error"] > 0
    spl = saved["spliced_samples"]
    assert spl["samples"] == 4 and spl["pixel_mse"] > 0
    assert spl["classifier"] is None and "ships no evaluation classifier" in spl["classifier_note"]
    assert saved["sampler"]["num_steps"] == 4 and saved["sae"]["config"]["hook"] == HOOK
    assert set(saved["wall_time_s"]) >= {"reconstruction", "denoiser_error", "spliced_samples", "total"}


def test_evaluate_without_splice_samples_measures_reconstruction_only(run):
    result = evaluate(dataclasses.replace(run, splice_samples=0, buckets=[0.0, 500.0, 1000.0], max_rows=100),
                      progress=False).report
    assert "denoiser_error" not in result and result["reconstruction"]["rows"] == 100
    assert len(result["reconstruction"]["buckets"]) == 2


def test_evaluate_refuses_another_hook_several_saes_or_other_backbone_weights(run, device, tmp_path):
    with pytest.raises(TideError, match=f"{HOOK}.*{OTHER_HOOK}"):
        evaluate(dataclasses.replace(run, hook=OTHER_HOOK), progress=False)
    for name in ("plain", "tide"):
        save_sae(random_sae(), tmp_path / "trained" / name)
    with pytest.raises(TideError, match="several SAEs \\(plain, tide\\)"):
        evaluate(dataclasses.replace(run, sae=str(tmp_path / "trained")), progress=False)
    torch.manual_seed(1)
    other = DiTBackbone.from_config(TINY_DIT).to(device)
    with pytest.raises(TideError, match="not the model"):
        evaluate(run, backbone=other, progress=False)


def test_eval_config_reads_flags_and_yaml_and_documents_every_field():
    assert load_yaml(EvalConfig, Path(__file__).parents[2] / "configs" / "eval.yaml").splice_samples == 4
    cfg = from_dict(EvalConfig, {"buckets": "0,250,1000", "max_rows": "500", "guidance_scale": "3"})
    assert cfg.buckets == [0.0, 250.0, 1000.0] and cfg.max_rows == 500 and cfg.guidance_scale == 3.0
    assert set(field_docs(EvalConfig)) == {f.name for f in dataclasses.fields(EvalConfig)}
    with pytest.raises(TideError, match="splice_samples"):
        EvalConfig(splice_samples=-1).validate()
