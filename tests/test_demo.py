"""`tide demo` (what the README's first command runs), end to end on each embedded model at a small size."""

import json

import pytest

from tide.cli import main


@pytest.mark.parametrize("backbone", [None, "fmnist-dit"])  # None: the default, fmnist-pixart
def test_demo_runs_every_stage_and_reports_its_artefacts(backbone, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *(["--backbone", backbone] if backbone else []), "--out", str(out), "--n-per-class", "1",
                 "--num-steps", "8", "--capture-samples", "10",
                 "--train-steps", "20", "--d-sae", "256", "--k", "8", "--splice-samples", "1", "--dashboard-features", "3",
                 "--steer-samples", "2", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"]["name"] == (backbone or "fmnist-pixart")
    assert summary["backbone"]["family"] == ("dit" if backbone else "pixart")
    for key in ("hooks", "samples", "activations", "sae", "eval_tide", "eval_plain", "feature_stats", "dashboard", "steering"):
        assert key in summary["artefacts"]
    assert (out / "samples.png").stat().st_size > 1000
    assert summary["capture"]["rows"] == 10 * 8 * 49 * (1 if backbone else 2)  # pixart: both CFG branches
    assert summary["eval"]["tide"]["config"]["sae"].endswith("tide")
    assert summary["eval"]["tide"]["sae"]["config"]["target"] == "update"
    assert "agreement_spliced" in summary["eval"]["tide"]["spliced_samples"]["classifier"]
    assert 0 < summary["eval"]["tide"]["reconstruction"]["overall"]["fvu"] < 1.5
    assert (out / "eval" / "tide" / "eval.png").exists()
    assert (out / "dashboard" / "index.html").exists() and list((out / "dashboard" / "features").glob("f*.html"))
    steering = summary["steering"]
    assert 0 <= steering["success"] <= 1 and len(steering["success_per_class"]) == 10 and (out / "steering.png").exists()
    assert steering["success"] == pytest.approx(sum(steering["success_per_class"]) / 10)
    assert steering["recipe"].startswith("feature patch") and not (out / "steering_profile.h5").exists()
    assert json.loads((out / "sae" / "steer" / "cfg.json").read_text())["config"]["target"] == "activation"
    printed = capsys.readouterr().out
    assert str(out / "summary.json") in printed
    assert "spliced at every step, the classifier agrees" in printed
    assert "steering null-condition generations toward each class" in printed
