"""The atlas's features in Neuronpedia's export format, for a Neuronpedia-style viewer to import.

Neuronpedia publishes its data as one folder per model and source (``v1/[MODEL_ID]/[SOURCE_ID]/``) holding
gzipped JSON-lines batches: ``features/batch-N.jsonl.gz`` (one object per feature), ``activations/batch-N.jsonl.gz``
(its top activations, each a token sequence with one value per token) and ``explanations/batch-N.jsonl.gz``
(labels), beside ``model.jsonl`` and ``source.jsonl`` (docs.neuronpedia.org, "Exports"; the field names below are
those of its importer's models). An image's tokens are its patches: the activation of a top image is the
feature's heat map flattened row-major, with tokens named ``r{row}c{col}`` (``f{frame}r{row}c{col}`` for video),
``dataIndex`` the capture's sample id and ``dataSource`` its condition, seed and step.

:func:`write_neuronpedia` converts a ``dashboard.json`` document (written by :mod:`tide.analysis.dashboard`, which
calls it with ``neuronpedia=True``); fields that
have no meaning for an image model (logit tables, neuron alignment) are written empty. The format is the public
one of Neuronpedia's exports; it has not been loaded into a running Neuronpedia here.
"""

from __future__ import annotations

import gzip
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tide.analysis.regenerate import decode_heat

FEATURE_FIELDS = (
    "modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector", "vectorLabel",
    "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues", "neuron_alignment_indices",
    "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_pearson",
    "correlated_neurons_l1", "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "decoder_weights_dist")
"""Fields of a feature object in Neuronpedia's exports."""
ACTIVATION_FIELDS = (
    "id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values", "creatorId",
    "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue", "createdAt", "lossValues",
    "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex")
"""Fields of an activation object in Neuronpedia's exports."""
EXPLANATION_FIELDS = ("id", "modelId", "layer", "index", "description", "authorId", "embedding", "triggeredById",
                      "typeName", "explanationModelName", "notes", "createdAt")
"""Fields of an explanation object in Neuronpedia's exports."""
CREATOR = "tide"
BATCH_FEATURES = 1024
"""Features per batch file."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "model"


def source_id(hook: str, set_name: str = "tide", target: str = "activation") -> str:
    """Neuronpedia's source id of an SAE at ``hook``: ``{layer}-{set}-{kind}``, e.g. ``4-tide-res-post`` for
    ``blocks.4.hook_resid_post``, ``4-tide-update`` for an SAE of block 4's update (``target="update"``)."""
    m = re.match(r"blocks\.(\d+)\.hook_(\w+)", hook)
    if not m:
        return f"0-{set_name}-{_slug(hook)}"
    kind = {"resid_post": "res-post", "resid_pre": "res-pre", "resid_mid": "res-mid"}.get(m.group(2), _slug(m.group(2)))
    return f"{m.group(1)}-{set_name}-{'update' if target == 'update' else kind}"


def token_names(grid: list[int]) -> list[str]:
    """Names of the patch tokens, row-major: ``r{row}c{col}`` (``f{frame}r{row}c{col}`` for a video grid)."""
    idx = np.indices(tuple(int(g) for g in grid)).reshape(len(grid), -1).T
    if len(grid) == 3:
        return [f"f{f}r{r}c{c}" for f, r, c in idx]
    return [f"r{r}c{c}" for r, c in idx]


def neuronpedia_rows(doc: dict, model_id: str | None = None, set_name: str = "tide") -> tuple[list, list, list]:
    """(features, activations, explanations): the objects of Neuronpedia's export for a dashboard document."""
    model = _slug(model_id or doc.get("backbone") or "model")
    layer = source_id(doc["hook"], set_name, doc.get("sae_target", "activation"))
    created = datetime.now(timezone.utc).isoformat()
    edges = doc.get("histogram_edges")
    features, activations, explanations = [], [], []
    for r in doc["features"]:
        f = str(r["id"])
        heights, values = [], []
        if r.get("histogram") and edges:
            lo = r["histogram"]["first_bin"]
            heights = [float(c) for c in r["histogram"]["counts"]]
            values = [float(np.sqrt(edges[lo + i] * edges[lo + i + 1])) for i in range(len(heights))]
        row = dict.fromkeys(FEATURE_FIELDS)
        row.update(modelId=model, layer=layer, index=f, creatorId=CREATOR, createdAt=created,
                   maxActApprox=float(r["max_act"]), hasVector=False, vector=[], vectorLabel=None,
                   vectorDefaultSteerStrength=None, hookName=doc["hook"],
                   topkCosSimIndices=[n["id"] for n in r["neighbours"]],
                   topkCosSimValues=[n["cosine"] for n in r["neighbours"]],
                   frac_nonzero=float(r["frequency"]), freq_hist_data_bar_heights=heights,
                   freq_hist_data_bar_values=values, decoder_weights_dist=[])
        for k in FEATURE_FIELDS:
            if row[k] is None and k not in ("vectorLabel", "vectorDefaultSteerStrength"):
                row[k] = []
        features.append(row)
        for k, im in enumerate(r["images"]):
            heat = decode_heat(im["heat"])
            grid = list(heat.shape)
            vals = [round(float(v), 6) for v in heat.reshape(-1)]
            a = dict.fromkeys(ACTIVATION_FIELDS)
            a.update(id=f"{layer}-{f}-{k}", tokens=token_names(grid), index=f, layer=layer, modelId=model,
                     maxValue=max(vals), maxValueTokenIndex=int(np.argmax(vals)), minValue=min(vals), values=vals,
                     creatorId=CREATOR, dataSource=f"{im['cond_name']} seed {im['seed']} step {im['step']}",
                     dataIndex=str(im["sample_id"]), dfaValues=[], lossValues=[], createdAt=created,
                     qualifyingTokenIndex=int(np.argmax(vals)))
            activations.append(a)
        e = dict.fromkeys(EXPLANATION_FIELDS)
        e.update(id=f"{layer}-{f}-label", modelId=model, layer=layer, index=f, description=r["label"],
                 authorId=CREATOR, typeName="user" if r.get("user_label") is not None else "tide-auto-label",
                 createdAt=created)
        explanations.append(e)
    return features, activations, explanations


def _write_gz_jsonl(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=5) as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")


def write_neuronpedia(doc: dict, out, model_id: str | None = None, set_name: str = "tide") -> Path:
    """Write ``doc`` (a dashboard.json document) as ``out/[model]/[source]/`` in Neuronpedia's export layout;
    returns that source folder."""
    feats, acts, expl = neuronpedia_rows(doc, model_id, set_name)
    model = _slug(model_id or doc.get("backbone") or "model")
    layer = source_id(doc["hook"], set_name, doc.get("sae_target", "activation"))
    folder = Path(out) / model / layer
    for sub in ("features", "activations", "explanations"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    by_feature: dict[str, list] = {}
    for a in acts:
        by_feature.setdefault(a["index"], []).append(a)
    for b, start in enumerate(range(0, max(len(feats), 1), BATCH_FEATURES)):
        chunk = feats[start:start + BATCH_FEATURES]
        _write_gz_jsonl(folder / "features" / f"batch-{b}.jsonl.gz", chunk)
        _write_gz_jsonl(folder / "activations" / f"batch-{b}.jsonl.gz",
                        [a for row in chunk for a in by_feature.get(row["index"], [])])
        _write_gz_jsonl(folder / "explanations" / f"batch-{b}.jsonl.gz", expl[start:start + BATCH_FEATURES])
    created = datetime.now(timezone.utc).isoformat()
    (folder / "model.jsonl").write_text(json.dumps({"id": model, "displayName": doc.get("backbone") or model,
                                                    "displayNameShort": model, "creatorId": CREATOR,
                                                    "createdAt": created}) + "\n")
    (folder / "source.jsonl").write_text(json.dumps({
        "id": layer, "modelId": model, "setName": set_name, "hookName": doc["hook"], "visibility": "PUBLIC",
        "creatorId": CREATOR, "createdAt": created, "num_prompts": None, "num_tokens_in_prompt":
            int(np.prod(doc["patch_grid"]))}) + "\n")
    return folder
