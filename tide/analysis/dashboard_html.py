"""The atlas's HTML: the index (every feature, paginated, searched and sorted by ``assets/index.js``) and the
feature pages (text, tables and inline SVG plots written here; heat maps drawn by ``assets/feature.js``).

Pages open from ``file://`` with no server and fetch nothing from elsewhere: pictures are PNG files of the
dashboard (``images/``, ``effects/``), the stylesheet and scripts are in ``assets/`` (copied from the package).
Every string written into HTML goes through :func:`E` (:func:`html.escape`, with bidirectional control
characters such as U+202E shown as visible ``\\u202e`` escapes, so a label cannot reorder the text shown around
it); JSON embedded in a page has ``<``, ``>`` and ``&`` written as ``\\u003c`` etc. (:func:`json_for_html`), so a
label or class name cannot close a tag or a script; the scripts put data into the page only as text
(``textContent``) or attributes, never as HTML.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

INDEX_FILE = "index.html"
FEATURES_DIR = "features"
ASSETS_DIR = "assets"
ASSET_FILES = ("atlas.css", "index.js", "feature.js")
PAGE_ROWS = 100
"""Rows of the index written into the HTML (its first page); the script shows the rest page by page."""
INDEX_COLUMNS = ("id", "label", "frequency", "max_act", "top_class_id", "top_auroc", "peak_step", "peak_timestep",
                 "images", "effects")
"""The fields of each row of the index's data (``rows`` in its #tide-data JSON), in order."""

BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
"""Bidirectional formatting characters: one in a label (e.g. U+202E, right-to-left override) would reorder the
text shown after it, so the pages show each as a visible escape (``\\u202e``) instead."""
_BIDI_VISIBLE = {ord(c): f"\\u{ord(c):04x}" for c in BIDI_CONTROLS}


def visible(text) -> str:
    """``text`` with every bidirectional control character written as a visible ``\\uXXXX`` escape."""
    return str(text).translate(_BIDI_VISIBLE)


def E(text) -> str:
    """A string as HTML text or attribute value: escaped (``<``, ``>``, ``&``, quotes), and bidirectional controls
    shown as visible escapes so that no label can reorder the text around it."""
    return html.escape(visible(text))


def json_for_html(obj) -> str:
    """JSON safe inside a <script> element: <, > and & are written as \\u escapes."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def write_assets(directory: Path) -> None:
    """Copy the stylesheet and the scripts into ``directory``."""
    src = resources.files("tide") / "assets" / "atlas"
    for name in ASSET_FILES:
        with resources.as_file(src / name) as path:
            shutil.copyfile(path, Path(directory) / name)


def _page(title: str, body: str, data: dict, prefix: str, script: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{E(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<link rel="stylesheet" href="{prefix}{ASSETS_DIR}/atlas.css"></head><body>\n{body}\n'
            f'<script type="application/json" id="tide-data">{json_for_html(data)}</script>\n'
            f'<script src="{prefix}{ASSETS_DIR}/{script}"></script>\n</body></html>\n')


def _fmt(x, spec=".4g") -> str:
    return "–" if x is None else format(x, spec)


def index_row(r: dict) -> list:
    """The index's data row of a feature record (fields :data:`INDEX_COLUMNS`)."""
    return [r["id"], visible(r["label"]), r["frequency"], r["max_act"], r["top_class_id"], r["top_auroc"],
            r["peak_step"], r["peak_timestep"], len(r["images"]), r["effects"] is not None]


def index_html(meta: dict, records: list[dict]) -> str:
    """``index.html``: every feature record in a table, its first page written here and the whole list (sorted
    by frequency) as data for the script's search, filters, sorting and pages."""
    names = meta["condition_names"]
    records = sorted(records, key=lambda r: (-r["frequency"], r["id"]))
    rows = []
    for i, r in enumerate(records[:PAGE_ROWS]):
        top = "–" if r["top_class_id"] is None else f"{E(names[r['top_class_id']])} ({_fmt(r['top_auroc'], '.2f')})"
        peak = "–" if r["peak_timestep"] is None else f"{_fmt(r['peak_timestep'], '.4g')} (step {r['peak_step']})"
        rows.append(
            f'<tr data-id="{r["id"]}"{" class=active" if i == 0 else ""}><td class="n"><a href="{E(r["page"])}">'
            f'{r["id"]}</a></td><td>{E(r["label"])}</td><td class="n">{r["frequency"]:.3g}</td>'
            f'<td class="n">{r["max_act"]:.3g}</td><td>{top}</td><td class="n">{peak}</td>'
            f'<td class="n">{len(r["images"])}</td><td>{"yes" if r["effects"] else "–"}</td></tr>')
    eff = meta.get("effects") or {}
    body = (f"<h1>SAE feature atlas</h1><p class=muted>hook {E(meta['hook'])} · SAE {E(meta['sae_path'])} · "
            f"dataset {E(meta['dataset_path'])} · {len(records)} of {meta['num_features']} features"
            + (f" · causal strips for {eff['features']}" if eff.get("features") else "") + "</p>"
            '<div class="controls"><label>search <input id="q" type="search" size="28" '
            'placeholder="id, label or class  (press /)" autocomplete="off"></label>'
            '<label>top class <select id="cls"><option value="">any</option></select></label>'
            '<label>peak timestep <input id="tmin" type="number" step="any" placeholder="min"> – '
            '<input id="tmax" type="number" step="any" placeholder="max"></label>'
            '<label>frequency <input id="fmin" type="number" step="any" min="0" placeholder="min"> – '
            '<input id="fmax" type="number" step="any" min="0" placeholder="max"></label>'
            '<label>rows <select id="size"><option>50</option><option selected>100</option><option>250</option>'
            '</select></label></div>'
            '<div class="pager"><button id="prev" type="button">‹ previous</button><span id="page"></span>'
            '<button id="next" type="button">next ›</button><span id="count" class="muted"></span>'
            '<span class="muted">keys: <kbd>/</kbd> search · <kbd>↑</kbd><kbd>↓</kbd> move · <kbd>Enter</kbd> open · '
            '<kbd>n</kbd><kbd>p</kbd> page</span></div>'
            '<table id="features"><thead><tr><th data-key="id">feature</th><th data-key="label">label</th>'
            '<th data-key="frequency">frequency</th><th data-key="max_act">max activation</th>'
            '<th data-key="top_auroc">top class (AUROC)</th><th data-key="peak_timestep">peak timestep</th>'
            '<th data-key="images">images</th><th>causal strip</th></tr></thead><tbody id="rows">\n'
            + "\n".join(rows) + "\n</tbody></table>")
    data = {"meta": {"condition_names": names, "num_features": meta["num_features"]},
            "columns": list(INDEX_COLUMNS), "rows": [index_row(r) for r in records]}
    return _page("SAE feature atlas", body, data, "", "index.js")


def _where(token: int, grid: list[int]) -> str:
    """`` (frame f, row r, col c)`` for a video token; empty for images (their grid is small and square)."""
    if len(grid) != 3:
        return ""
    f, r, c = (int(x) for x in np.unravel_index(int(token), tuple(grid)))
    return f" (frame {f}, row {r}, col {c})"


def _display(meta: dict, panels: int = 1) -> tuple[float, int, int]:
    """(scale, tile width, tile height) of a sample picture on the page (its longer side near image_px)."""
    h, w = meta.get("picture_size") or (28, 28)
    w_tile = w / max(panels, 1)
    k = meta.get("image_px", 112) / max(h, w_tile)
    if k >= 1:
        k = float(max(1, math.floor(k)))
    return k, int(round(w_tile)), int(h)


def _sprite(href: str, col: int, row: int, cols: int, rows: int, meta: dict, title: str) -> str:
    k, w, h = _display(meta)
    return (f'<span class="sprite" role="img" aria-label="{E(title)}" title="{E(title)}" style="width:{w * k:.0f}px;'
            f'height:{h * k:.0f}px;background-image:url(\'{E(href)}\');background-size:{cols * w * k:.0f}px '
            f'{rows * h * k:.0f}px;background-position:-{col * w * k:.0f}px -{row * h * k:.0f}px"></span>')


def _effects_html(meta: dict, r: dict) -> str:
    eff, em = r["effects"], meta.get("effects") or {}
    if eff is None:
        why = em.get("skipped") or ("not made for this feature: the atlas makes them for the "
                                    f"{em.get('features', 0)} most frequent features (raise effect_features)")
        return f"<p class=muted>Causal strips {E(why)}.</p>"
    cols, rows_n = eff["columns"], 2 if eff["removed"]["count"] else 1
    strip = f"../{eff['strip']}"
    base = "".join(_sprite(f"../{em['base']}", i, 0, len(em["seeds"]), 1, meta, f"seed {s}, unedited")
                   for i, s in enumerate(em["seeds"]))
    added = "".join(_sprite(strip, i, 0, cols, rows_n, meta, f"seed {em['seeds'][i]}, feature added")
                    for i in range(eff["added"]["count"]))
    parts = [f"<p class=muted>The feature's decoder direction added with norm {em['strength']} × R(t) at every step "
             "and token (null condition, the same seeds for every feature); and the feature's latent set to 0 in its "
             "own top samples (the SAE's error term kept). Mean |Δpixel|: added "
             f"{_fmt(eff['added']['change'], '.3f')}, removed {_fmt(eff['removed']['change'], '.3f')}.</p>",
             f'<div class="strip"><span class="name">unedited</span>{base}</div>',
             f'<div class="strip"><span class="name">feature added</span>{added}</div>']
    if eff["removed"]["count"]:
        k, w, h = _display(meta)
        orig = "".join(f'<img src="../images/s{s}.png" alt="sample {s}" width="{w * k:.0f}" height="{h * k:.0f}" '
                       f'style="image-rendering:pixelated">' for s in eff["removed"]["samples"])
        removed = "".join(_sprite(strip, i, 1, cols, rows_n, meta, f"sample {s}, feature removed")
                          for i, s in enumerate(eff["removed"]["samples"]))
        parts += [f'<div class="strip"><span class="name">top samples</span>{orig}</div>',
                  f'<div class="strip"><span class="name">feature removed</span>{removed}</div>']
    return "".join(parts)


def feature_html(meta: dict, r: dict, plots: dict, nav: dict) -> str:
    """A feature's page. ``plots``: inline SVG strings ``profile``, ``classes`` and ``histogram`` (None when the
    statistics hold no histogram); ``nav``: ids of the ``prev`` and ``next`` features (or None)."""
    names = meta["condition_names"]
    figs = []
    for i, im in enumerate(r["images"]):
        panels = len(im["frames"]) if im.get("frames") else 1
        k, w, h = _display(meta, panels)
        cap = (f"sample {im['sample_id']} · {E(im['cond_name'])} · seed {im['seed']} · step {im['step']} "
               f"(t={_fmt(im['timestep'], 'g')}) · token {im['token']}{_where(im['token'], meta['patch_grid'])} "
               f"· activation {_fmt(im['value'])} (regenerated {_fmt(im['regenerated_value'])})")
        figs.append(f'<figure data-i="{i}"><span class="pic"><img src="../{E(im["image"])}" '
                    f'alt="sample {im["sample_id"]}" width="{w * k * panels:.0f}" height="{h * k:.0f}"><canvas>'
                    f"</canvas></span><figcaption>{cap}</figcaption></figure>")
    neigh = "".join(
        f'<li><a href="f{n["id"]}.html">feature {n["id"]}</a> (cos {n["cosine"]:.3f})</li>' if n["shown"] else
        f'<li>feature {n["id"]} <span class=muted>(no page here)</span> (cos {n["cosine"]:.3f})</li>'
        for n in r["neighbours"])
    class_rows = "".join(
        f'<tr><td><a href="../{INDEX_FILE}#class={c}">{E(n)}</a></td><td class=n>{_fmt(a, ".3f")}</td>'
        f"<td class=n>{_fmt(m)}</td></tr>" for c, (n, a, m) in enumerate(zip(names, r["auroc"], r["class_mean_act"])))
    user = f'<span class=muted>(automatic: {E(r["auto_label"])})</span> ' if r["user_label"] is not None else ""
    links = [f'<a href="../{INDEX_FILE}">← all features</a>']
    if nav.get("prev") is not None:
        links.append(f'<a href="f{nav["prev"]}.html" rel="prev">‹ feature {nav["prev"]}</a>')
    if nav.get("next") is not None:
        links.append(f'<a href="f{nav["next"]}.html" rel="next">feature {nav["next"]} ›</a>')
    links.append('<span class=muted>keys: <kbd>←</kbd><kbd>→</kbd> previous / next · <kbd>i</kbd> index · '
                 '<kbd>h</kbd> heat maps</span>')
    hist = plots.get("histogram") or ('<p class=muted>no activation histogram in these statistics: recompute them '
                                      'with `tide stats`</p>')
    top_class = "" if r["top_class_id"] is None else (
        f' · top class <a href="../{INDEX_FILE}#class={r["top_class_id"]}">{E(r["top_class"])}</a> '
        f'(AUROC {_fmt(r["top_auroc"], ".3f")})')
    body = (f'<div class="nav">{" ".join(links)}</div><h1>Feature {r["id"]}: {E(r["label"])}</h1>'
            f"<p>{user}frequency {r['frequency']:.4g} · mean activation {_fmt(r['mean_act'])} · when firing "
            f"{_fmt(r['mean_act_firing'])} · max {_fmt(r['max_act'])} · peak at step {_fmt(r['peak_step'], 'd')} "
            f"(t={_fmt(r['peak_timestep'], 'g')}){top_class}</p>"
            f'<h2>Top-activating images</h2><p><label><input id="heat" type="checkbox" checked> heat maps (the '
            f"feature's activation per token at the step where it peaked)</label></p>"
            f"<div class=imgs>{''.join(figs) or '<p class=muted>none</p>'}</div>"
            f"<h2>What it does</h2>{_effects_html(meta, r)}"
            f'<h2>Activations, timesteps and classes</h2><div class="plots">{hist}{plots["profile"]}'
            f'{plots["classes"]}</div>'
            f"<table><thead><tr><th>class</th><th>AUROC</th><th>mean image activation</th></tr></thead>"
            f"<tbody>{class_rows}</tbody></table>"
            f"<h2>Nearest decoder directions</h2><ul>{neigh or '<li class=muted>none</li>'}</ul>")
    data = {"feature": {"id": r["id"], "images": [{"heat": im["heat"], "frames": im.get("frames")}
                                                  for im in r["images"]]}, "nav": nav}
    return _page(f"Feature {r['id']}", body, data, "../", "feature.js")
