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
from tide.analysis.dashboard import DashboardConfig, decode_heat, export_dashboard
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
                "max_act", "top_class_id", "top_class", "top_auroc", "peak_step", "peak_timestep", "profile", "auroc",
                "class_mean_act", "histogram", "neighbours", "images", "effects"}
IMAGE_KEYS = {"sample_id", "cond", "cond_name", "seed", "step", "timestep", "token", "value", "regenerated_value",
              "image", "frames", "heat"}
TOP_KEYS = {"schema", "schema_version", "tide_version", "hook", "sae_target", "stats_path", "sae_path", "dataset_path", "backbone",
            "num_steps", "guidance_scale", "cfg_branch", "num_features", "num_shown", "condition_names", "patch_grid",
            "steps", "timesteps", "histogram_edges", "effects", "image_px", "picture_size", "features"}


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
                                              images_per_feature=2, labels=str(labels), device="cpu", progress=False,
                                              effect_features=0, neighbours=5))
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
    for page in [index, *pages.values(), *(out / "assets").glob("*")]:
        text = page.read_text()
        assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', text, re.I)
        assert "http://" not in text and "https://" not in text
        assert XSS not in text
        assert "alert(1)" not in text.replace("&lt;script&gt;alert(1)&lt;/script&gt;", "").replace(
            "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index_text
    assert "&lt;script&gt;" in pages[features[0]].read_text()
    # every file a page references exists in the dashboard
    for page in [index, *pages.values()]:
        for target in re.findall(r'(?:src|href)="([^"#]+)"', page.read_text()):
            assert (page.parent / target).resolve().is_file(), (page.name, target)

    # dashboard.json: the documented keys
    doc = json.loads((out / "dashboard.json").read_text())
    assert set(doc) == TOP_KEYS and doc["schema"] == "tide.dashboard" and doc["schema_version"] == 2
    assert [r["id"] for r in doc["features"]] == features
    for r in doc["features"]:
        assert set(r) == FEATURE_KEYS
        assert len(r["images"]) == 2 and all(set(im) == IMAGE_KEYS for im in r["images"])
        assert len(r["auroc"]) == len(doc["condition_names"]) and len(r["profile"]["frequency"]) == len(doc["steps"])
        assert len(r["neighbours"]) == 5 and r["id"] not in [n["id"] for n in r["neighbours"]]
        for im in r["images"]:  # the regenerated trajectory reproduces the captured activation
            assert im["regenerated_value"] == pytest.approx(im["value"], rel=2e-2, abs=2e-2)
            heat = decode_heat(im["heat"])
            assert heat.shape == tuple(doc["patch_grid"]) and int(np.argmax(heat)) == im["token"]
            assert heat.max() == pytest.approx(im["regenerated_value"], rel=1e-6)
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


def test_every_firing_feature_gets_a_page_and_each_sample_is_written_once(analysed, tmp_path):
    stats = analysed.stats
    out = tmp_path / "atlas"
    result = export_dashboard(DashboardConfig(stats=str(analysed.stats_path), out=str(out), images_per_feature=12,
                                              effect_features=0, device="cpu", progress=False))
    firing = set(np.flatnonzero(stats.frequency > 0).tolist())
    assert set(result.features) == firing and len(firing) < stats.num_features
    freq = [stats.frequency[f] for f in result.features]
    assert freq == sorted(freq, reverse=True)  # most frequent first
    assert {p.name for p in (out / "features").iterdir()} == {f"f{f}.html" for f in firing}
    doc = json.loads((out / "dashboard.json").read_text())
    used = {im["sample_id"] for r in doc["features"] for im in r["images"]}
    assert {p.name for p in (out / "images").iterdir()} == {f"s{s}.png" for s in used}  # one picture per sample
    assert result.num_samples == len(used) <= 8 < result.num_images
    # top images: each feature's distinct samples of largest image-level activation, read independently
    for r in doc["features"]:
        best = stats.image_acts_step[:, :, r["id"]].max(1)
        want = [s for s in np.argsort(-best, kind="stable") if best[s] > 0][:12]
        assert [im["sample_id"] for im in r["images"]] == [int(s) for s in want]
        assert [im["value"] for im in r["images"]] == pytest.approx([float(best[s]) for s in want])


def test_heat_maps_travel_as_8_bit_arrays():
    from tide.analysis.dashboard import encode_heat

    heat = np.array([[0.0, 1.5], [3.0, 0.25]])
    entry = encode_heat(heat)
    assert entry["shape"] == [2, 2] and entry["max"] == 3.0
    np.testing.assert_allclose(decode_heat(entry), heat, atol=3.0 / 510)
    assert decode_heat(encode_heat(np.zeros((2, 3)))).max() == 0


def test_causal_strips_equal_the_steering_api_on_the_same_seeds(analysed, tmp_path):
    """Added = a norm-relative add edit (tide.analysis.steering) on the null condition; removed = an ablate edit
    on the feature's own top samples: the atlas's batched jobs against the steering API, one feature at a time."""
    from tide.analysis.dashboard import _strips, top_samples
    from tide.analysis.steering import FeatureEdit, HookScale, edit_generation
    from tide.models.base import NULL_CONDITION
    from tide.sae import load_sae

    stats = analysed.stats
    manifest = ActivationStore(analysed.data).manifest
    backbone = load_backbone(str(analysed.backbone), device="cpu")
    sae = load_sae(analysed.sae).eval()
    features = [int(f) for f in np.argsort(-stats.frequency)[:3]]
    occ = top_samples(stats, features, 4)
    config = DashboardConfig(stats=str(analysed.stats_path), effect_features=2, effect_samples=2,
                             effect_strength=0.7, effect_seed=123, device="cpu", progress=False, batch_size=5)
    meta, got = _strips(config, stats, sae, manifest, backbone, features, occ)
    assert meta["seeds"] == [123, 124] and set(got["strips"]) == set(features[:2])
    scale = HookScale.from_stats(stats)
    sconf = SamplerConfig(num_steps=4, guidance_scale=manifest["config"]["guidance_scale"])
    for f in features[:2]:
        before, added = edit_generation(backbone, sae, [NULL_CONDITION] * 2, [123, 124], sconf,
                                        [FeatureEdit(f, "add", alpha=0.7, scale="norm")], hook_scale=scale)
        torch.testing.assert_close(got["base"], before.images, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["strips"][f].added, added.images, atol=1e-4, rtol=1e-4)
        conds, seeds = zip(*(capture_sample(manifest, backbone, o.sample_id) for o in occ[f][:2]))
        _, removed = edit_generation(backbone, sae, conds, seeds, sconf, [FeatureEdit(f, "ablate")])
        torch.testing.assert_close(got["strips"][f].removed, removed.images, atol=1e-4, rtol=1e-4)
        assert (got["strips"][f].added - before.images).abs().max() > 1e-3  # the edit did something


def test_atlas_pages_show_the_strips_and_json_records_them(analysed, tmp_path):
    out = tmp_path / "atlas"
    result = export_dashboard(DashboardConfig(stats=str(analysed.stats_path), out=str(out), images_per_feature=3,
                                              effect_features=2, effect_samples=2, device="cpu", progress=False))
    doc = json.loads((out / "dashboard.json").read_text())
    with_strips = [r for r in doc["features"] if r["effects"]]
    assert result.num_effects == 2 and [r["id"] for r in with_strips] == list(result.features[:2])
    assert doc["effects"]["seeds"] and (out / doc["effects"]["base"]).is_file()
    for r in with_strips:
        assert (out / r["effects"]["strip"]).is_file() and r["effects"]["added"]["count"] == 2
        assert r["effects"]["removed"]["samples"] == [im["sample_id"] for im in r["images"][:2]]
        assert r["effects"]["added"]["change"] > 0
        page = (out / r["page"]).read_text()
        assert "feature added" in page and "feature removed" in page and f"../effects/f{r['id']}.png" in page
    other = [r for r in doc["features"] if not r["effects"]][0]
    assert "raise effect_features" in (out / other["page"]).read_text()


@pytest.mark.parametrize("kw, message", [
    (dict(images_per_feature=-1), "must be >= 0"), (dict(effect_features=-2), "effect_features >= -1"),
    (dict(effect_strength=-1.0), "effect_strength"), (dict(batch_size=0), "batch_size >= 1")])
def test_config_refuses_bad_sizes(kw, message):
    with pytest.raises(TideError, match=message):
        DashboardConfig(**kw)


def test_neuronpedia_export_holds_every_feature_and_its_heat_maps(analysed, tmp_path):
    import gzip

    from tide.analysis.neuronpedia import ACTIVATION_FIELDS, EXPLANATION_FIELDS, FEATURE_FIELDS, token_names

    out = tmp_path / "atlas"
    labels = tmp_path / "labels.json"
    firing = [int(f) for f in np.flatnonzero(analysed.stats.frequency > 0)]
    labels.write_text(json.dumps({str(firing[0]): "sole <b>"}))
    export_dashboard(DashboardConfig(stats=str(analysed.stats_path), out=str(out), images_per_feature=3,
                                     effect_features=0, neuronpedia=True, labels=str(labels), device="cpu",
                                     progress=False))
    doc = json.loads((out / "dashboard.json").read_text())
    folders = list((out / "neuronpedia").glob("*/*"))
    assert len(folders) == 1 and folders[0].name == "1-tide-res-post"

    def rows(sub):
        got = []
        for path in sorted((folders[0] / sub).glob("batch-*.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                got += [json.loads(line) for line in fh]
        return got

    feats, acts, expl = rows("features"), rows("activations"), rows("explanations")
    assert [int(r["index"]) for r in feats] == [r["id"] for r in doc["features"]]
    assert all(tuple(r) == FEATURE_FIELDS for r in feats) and all(tuple(a) == ACTIVATION_FIELDS for a in acts)
    assert all(tuple(e) == EXPLANATION_FIELDS for e in expl)
    by_id = {r["id"]: r for r in doc["features"]}
    assert len(acts) == sum(len(r["images"]) for r in doc["features"])
    for a in acts:
        r = by_id[int(a["index"])]
        im = r["images"][int(a["id"].rsplit("-", 1)[1])]
        assert a["dataIndex"] == str(im["sample_id"]) and a["tokens"] == token_names(doc["patch_grid"])
        np.testing.assert_allclose(a["values"], decode_heat(im["heat"]).reshape(-1), atol=1e-5)
        assert a["maxValueTokenIndex"] == im["token"] and a["maxValue"] == pytest.approx(max(a["values"]))
    for f in feats:
        r = by_id[int(f["index"])]
        assert f["frac_nonzero"] == r["frequency"] and f["maxActApprox"] == r["max_act"]
        assert f["topkCosSimIndices"] == [n["id"] for n in r["neighbours"]]
        if r["histogram"]:
            assert sum(f["freq_hist_data_bar_heights"]) == sum(r["histogram"]["counts"]) > 0
    assert {e["index"]: e["description"] for e in expl}[str(firing[0])] == "sole <b>"
