"""The static dashboard: pages, links, escaping, self-containment, the JSON schema, regeneration
from seeds, automatic labels and the labels file."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tide.analysis import compute_feature_stats, save_feature_stats
from tide.analysis.dashboard import DashboardConfig, export_dashboard
from tide.analysis.dashboard_html import json_for_html
from tide.analysis.regenerate import capture_sample, regenerate, top_occurrences
from tide.analysis.labels import auto_label, load_labels
from tide.capture.run import CaptureConfig, capture
from tide.data import ActivationStore
from tide.errors import TideError
from tide.models import load_backbone
from tide.sae import SAE, SAEConfig, save_sae
from tide.sampling import SamplerConfig, sample

HOOK = "blocks.1.hook_resid_post"
XSS = "<script>alert(1)</script>"
FEATURE_KEYS = {"id", "label", "auto_label", "user_label", "page", "frequency", "mean_act", "mean_act_firing",
                "top_class_id", "top_class", "top_auroc", "peak_step", "peak_timestep", "profile", "auroc",
                "class_mean_act", "neighbours", "images"}
IMAGE_KEYS = {"sample_id", "cond", "cond_name", "seed", "step", "timestep", "token", "value", "regenerated_value",
              "heatmap"}
TOP_KEYS = {"schema", "schema_version", "tide_version", "hook", "stats_path", "sae_path", "dataset_path", "backbone",
            "num_steps", "guidance_scale", "cfg_branch", "num_features", "condition_names", "patch_grid", "steps",
            "timesteps", "features"}


@pytest.fixture
def analysed(tmp_path, tiny_dit_dir):
    data = tmp_path / "capture"
    capture(CaptureConfig(backbone=str(tiny_dit_dir), out=str(data), hooks=[HOOK], num_samples=8,
                          samples_per_shard=4, num_steps=4, device="cpu"), progress=False)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4, sparsity="topk", normalization="none", hook=HOOK))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc))
    sae_dir = save_sae(sae, tmp_path / "sae")
    stats = compute_feature_stats(sae_dir, data, top_k=8, device="cpu", progress=False)
    stats_path = save_feature_stats(stats, tmp_path / "feature_stats.h5")
    return SimpleNamespace(data=data, sae=sae_dir, stats=stats, stats_path=stats_path, backbone=tiny_dit_dir)


def test_dashboard_pages_json_escaping_and_regeneration(analysed, tmp_path):
    stats = analysed.stats
    features = [int(f) for f in np.argsort(-stats.frequency)[:3]]
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(features[0]): XSS}))
    out = tmp_path / "dash"
    result = export_dashboard(DashboardConfig(stats=str(analysed.stats_path), out=str(out), features=features,
                                              images_per_feature=2, labels=str(labels), device="cpu", progress=False))
    index = result.index_path
    assert index == out / "index.html"
    pages = {f: out / "features" / f"f{f}.html" for f in features}
    assert result.pages == tuple(pages.values()) and result.json_path == out / "dashboard.json"
    assert result.features == tuple(features) and result.num_features == 3 and result.num_images == 6
    assert result.sae_features == stats.num_features
    assert all(p.is_file() for p in pages.values())

    # links both ways; nothing external; the hostile label escaped everywhere
    index_text = index.read_text()
    for f, page in pages.items():
        assert f'href="features/f{f}.html"' in index_text
        assert 'href="../index.html"' in page.read_text()
    for page in [index, *pages.values()]:
        text = page.read_text()
        assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', text, re.I)
        assert "http://" not in text and "https://" not in text
        assert XSS not in text
        assert "alert(1)" not in text.replace("&lt;script&gt;alert(1)&lt;/script&gt;", "").replace(
            "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index_text
    assert "&lt;script&gt;" in pages[features[0]].read_text()
    # each neighbour link points at a page of this dashboard
    for f, page in pages.items():
        for target in re.findall(r'href="(f\d+\.html)"', page.read_text()):
            assert (out / "features" / target).is_file()

    # dashboard.json: the documented keys
    doc = json.loads((out / "dashboard.json").read_text())
    assert set(doc) == TOP_KEYS and doc["schema"] == "tide.dashboard"
    assert [r["id"] for r in doc["features"]] == features
    for r in doc["features"]:
        assert set(r) == FEATURE_KEYS
        assert len(r["images"]) == 2 and all(set(im) == IMAGE_KEYS for im in r["images"])
        assert len(r["auroc"]) == len(doc["condition_names"]) and len(r["profile"]["frequency"]) == len(doc["steps"])
        assert len(r["neighbours"]) == 5 and r["id"] not in [n["id"] for n in r["neighbours"]]
        for im in r["images"]:  # the regenerated trajectory reproduces the captured activation
            assert im["regenerated_value"] == pytest.approx(im["value"], rel=2e-2, abs=2e-2)
    assert doc["features"][0]["label"] == XSS and doc["features"][0]["user_label"] == XSS
    assert doc["features"][1]["label"] == auto_label(stats, features[1])

    # the regenerated images are sample()'s outputs for those conditions and seeds
    manifest = ActivationStore(analysed.data).manifest
    backbone = load_backbone(str(analysed.backbone), device="cpu")
    occ = top_occurrences(stats, features[0], 2)
    needs = {o.sample_id: {o.step} for o in occ}
    regen = regenerate(backbone, HOOK, manifest, needs)
    ids = sorted(needs)
    conds, seeds = zip(*(capture_sample(manifest, backbone, i) for i in ids))
    assert list(seeds) == [manifest["config"]["seed"] + i for i in ids]
    ref = sample(backbone, conds, seeds, SamplerConfig(num_steps=4))
    for i, img in zip(ids, ref.images):
        torch.testing.assert_close(regen.images[i], img, atol=1e-5, rtol=1e-5)
    assert set(regen.acts) == {(o.sample_id, o.step) for o in occ}


BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_bidi_controls_are_shown_as_visible_escapes():
    from tide.analysis.dashboard_html import BIDI_CONTROLS, E

    assert set(BIDI_CONTROLS) == set(BIDI)
    for c in BIDI:
        shown = E(f"ab{c}cd<")
        assert c not in shown and shown == f"ab\\u{ord(c):04x}cd&lt;"
    assert E("Sneaker · ünïcode 日本") == "Sneaker · ünïcode 日本"  # other text untouched


def test_a_right_to_left_override_in_a_label_cannot_reorder_the_pages(analysed, tmp_path):
    stats = analysed.stats
    features = [int(f) for f in np.argsort(-stats.frequency)[:2]]
    labels = tmp_path / "labels.json"
    rlo = "sole \u202eelbuod\u202c \u2067x\u2069 end"
    labels.write_text(json.dumps({str(features[0]): rlo}))
    out = tmp_path / "dash"
    export_dashboard(DashboardConfig(stats=str(analysed.stats_path), out=str(out), features=features,
                                     images_per_feature=0, labels=str(labels), device="cpu", progress=False))
    for page in [out / "index.html", *(out / "features").glob("f*.html")]:
        text = page.read_text(encoding="utf-8")
        assert not set(BIDI) & set(text), f"{page.name} holds a raw bidi control"
    shown = "sole \\u202eelbuod\\u202c \\u2067x\\u2069 end"
    assert shown in (out / "index.html").read_text() and shown in (out / "features" / f"f{features[0]}.html").read_text()
    assert json.loads((out / "dashboard.json").read_text())["features"][0]["label"] == rlo  # the data keeps it


def test_json_in_html_cannot_close_a_script():
    text = json_for_html({"label": "</script><script>alert(1)</script>&"})
    assert "</" not in text and "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text)["label"] == "</script><script>alert(1)</script>&"


def fake_stats(auroc_C, profile_S, spatial_HW, names=("T-shirt", "Sneaker")):
    """Duck-typed statistics of one feature, enough for auto_label."""
    spatial = np.asarray(spatial_HW, dtype=float)
    return SimpleNamespace(
        num_features=1, auroc=np.asarray(auroc_C, dtype=float)[:, None], condition_names=list(names),
        frequency_step=np.asarray(profile_S, dtype=float)[:, None], steps=np.arange(len(profile_S)),
        patch_grid=spatial.shape, spatial_mean=spatial[None])


def test_auto_label_reads_class_phase_and_place():
    lower = np.zeros((4, 4))
    lower[2:] = 1
    assert auto_label(fake_stats([0.2, 0.9], [0, 0.1, 0.2, 0.9], lower), 0) == "Sneaker · late steps · lower half"
    centre = np.zeros((4, 4))
    centre[1:3, 1:3] = 1
    assert auto_label(fake_stats([0.6, 0.7], [0.9, 0.1, 0, 0], centre), 0) == "mixed · early steps · centre"
    left = np.zeros((5, 5))
    left[:, :2] = 1
    assert auto_label(fake_stats([np.nan, np.nan], [0.1, 0.8, 0.1], left), 0) == "mixed · middle steps · left half"
    assert auto_label(fake_stats([0.8, 0.1], [0.5, 0.5, 0.5], np.ones((4, 4))), 0) == "T-shirt · all steps · everywhere"
    assert auto_label(fake_stats([0.5, 0.5], [0, 0, 0], np.zeros((4, 4))), 0) == "mixed · never fires"
    with pytest.raises(TideError, match="out of range"):
        auto_label(fake_stats([0.5, 0.5], [0, 0], np.ones((2, 2))), 3)


def test_auto_label_on_real_stats_is_a_short_string(analysed):
    for f in range(analysed.stats.num_features):
        label = auto_label(analysed.stats, f)
        assert isinstance(label, str) and 0 < len(label) < 80


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"abc": "x"}', "not a feature id"),
    ('{"-1": "x"}', "not a feature id"),
    ('{"3": 5}', "non-empty string"),
    ('{"3": "  "}', "non-empty string"),
    ('{"99": "x"}', "out of range"),
])
def test_load_labels_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_text(content)
    with pytest.raises(TideError, match=message):
        load_labels(path, num_features=32)


def test_load_labels_reads_ids_and_reports_a_missing_file(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text('{"3": " sole ", "12": "background"}')
    assert load_labels(path) == {3: "sole", 12: "background"}
    with pytest.raises(TideError, match="does not exist"):
        load_labels(tmp_path / "missing.json")
