"""The dashboard's HTML: the page template with its inline CSS, the index table with its inline
sort/filter script, and the per-feature page.

Pages open from ``file://`` with no server: images and plots come in as base64 PNGs, the script is
inline, nothing is fetched from elsewhere. Every string written into HTML goes through :func:`E`
(:func:`html.escape`, with bidirectional control characters such as U+202E shown as visible ``\\u202e``
escapes, so a label cannot reorder the text shown around it), and JSON embedded in a page has ``<``,
``>`` and ``&`` written as ``\\u003c`` etc. (:func:`json_for_html`), so a label or class name cannot close
a tag or a script.
"""

from __future__ import annotations

import html
import json

import numpy as np

INDEX_FILE = "index.html"
FEATURES_DIR = "features"

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
    return (json.dumps(obj, sort_keys=True).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left}th{cursor:pointer;background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}.imgs{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}figcaption{font-size:.8em;color:#555;max-width:22em}img{image-rendering:pixelated}
.plots img{image-rendering:auto}.muted{color:#777}"""

SORT_JS = """(function(){var t=document.getElementById('features'),b=t.tBodies[0],f=document.getElementById('filter');
var dir={};Array.prototype.forEach.call(t.tHead.rows[0].cells,function(th,i){th.addEventListener('click',function(){
var num=th.getAttribute('data-type')==='num';dir[i]=-(dir[i]||-1);var rows=Array.prototype.slice.call(b.rows);
rows.sort(function(x,y){var a=x.cells[i].getAttribute('data-v'),c=y.cells[i].getAttribute('data-v');
if(num){a=a===''?-Infinity:parseFloat(a);c=c===''?-Infinity:parseFloat(c);return dir[i]*(a-c);}
return dir[i]*a.localeCompare(c);});rows.forEach(function(r){b.appendChild(r);});});});
f.addEventListener('input',function(){var q=f.value.toLowerCase();Array.prototype.forEach.call(b.rows,function(r){
r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});})();"""


def _page(title: str, body: str, data: dict) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{E(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n"
            f'<script type="application/json" id="tide-data">{json_for_html(data)}</script>\n</body></html>\n')


def _fmt(x, spec=".4g") -> str:
    return "–" if x is None else format(x, spec)


def index_html(meta: dict, records: list[dict]) -> str:
    """``index.html``: one sortable, filterable row per feature record, linking to its page."""
    rows = []
    for r in records:
        top = "–" if r["top_class"] is None else f"{E(r['top_class'])} ({_fmt(r['top_auroc'], '.2f')})"
        rows.append(
            f'<tr><td class="n" data-v="{r["id"]}"><a href="{E(r["page"])}">{r["id"]}</a></td>'
            f'<td data-v="{E(r["label"])}">{E(r["label"])}</td>'
            f'<td class="n" data-v="{r["frequency"]:.6g}">{r["frequency"]:.4f}</td>'
            f'<td data-v="{E(r["top_class"] or "")}">{top}</td>'
            f'<td class="n" data-v="{"" if r["top_auroc"] is None else format(r["top_auroc"], ".6g")}">{_fmt(r["top_auroc"], ".3f")}</td>'
            f'<td class="n" data-v="{"" if r["peak_timestep"] is None else format(r["peak_timestep"], "g")}">'
            f'{_fmt(r["peak_timestep"], "g")} (step {_fmt(r["peak_step"], "d")})</td></tr>')
    body = (f"<h1>SAE features</h1><p class=muted>hook {E(meta['hook'])} · SAE {E(meta['sae_path'])} · "
            f"dataset {E(meta['dataset_path'])} · {len(records)} of {meta['num_features']} features</p>"
            '<p><input id="filter" type="search" placeholder="filter (id, label, class)" size="40"></p>'
            '<table id="features"><thead><tr><th data-type="num">feature</th><th>label</th>'
            '<th data-type="num">frequency</th><th>top class (AUROC)</th><th data-type="num">AUROC</th>'
            '<th data-type="num">peak timestep</th></tr></thead><tbody>\n' + "\n".join(rows) +
            f"\n</tbody></table><script>{SORT_JS}</script>")
    return _page("SAE features", body, {"meta": meta, "features": [
        {k: r[k] for k in ("id", "label", "frequency", "top_class", "top_auroc", "peak_timestep")} for r in records]})


def _where(token: int, grid: list[int]) -> str:
    """`` (frame f, row r, col c)`` for a video token; empty for images (their grid is small and square)."""
    if len(grid) != 3:
        return ""
    f, r, c = (int(x) for x in np.unravel_index(int(token), tuple(grid)))
    return f" (frame {f}, row {r}, col {c})"


def feature_html(meta: dict, r: dict, pictures: dict) -> str:
    """A feature's page; ``pictures``: base64 PNGs ``profile``, ``classes`` and, per entry of
    ``r["images"]``, a (plain, overlaid) pair under ``images``."""
    names = meta["condition_names"]
    figs = []
    for im, pics in zip(r["images"], pictures["images"]):
        cap = (f"sample {im['sample_id']} · {E(im['cond_name'])} · seed {im['seed']} · step {im['step']} "
               f"(t={_fmt(im['timestep'], 'g')}) · token {im['token']}{_where(im['token'], meta['patch_grid'])} "
               f"· activation {_fmt(im['value'])} "
               f"(regenerated {_fmt(im['regenerated_value'])})")
        figs.append(f'<figure><img alt="sample {im["sample_id"]}" src="data:image/png;base64,{pics[0]}"> '
                    f'<img alt="activation overlay" src="data:image/png;base64,{pics[1]}">'
                    f"<figcaption>{cap}</figcaption></figure>")
    neigh = "".join(
        f'<li><a href="f{n["id"]}.html">feature {n["id"]}</a> (cos {n["cosine"]:.3f})</li>' if n["shown"] else
        f'<li>feature {n["id"]} <span class=muted>(not in this dashboard)</span> (cos {n["cosine"]:.3f})</li>'
        for n in r["neighbours"])
    auroc_rows = "".join(f"<tr><td>{E(n)}</td><td class=n>{_fmt(a, '.3f')}</td><td class=n>{_fmt(m)}</td></tr>"
                         for n, a, m in zip(names, r["auroc"], r["class_mean_act"]))
    user = f' <span class=muted>(automatic: {E(r["auto_label"])})</span>' if r["user_label"] is not None else ""
    body = (f'<p><a href="../{INDEX_FILE}">← all features</a></p><h1>Feature {r["id"]}: {E(r["label"])}</h1>'
            f"<p>{user}frequency {r['frequency']:.4f} · mean activation {_fmt(r['mean_act'])} · when firing "
            f"{_fmt(r['mean_act_firing'])} · peak at step {_fmt(r['peak_step'], 'd')} (t={_fmt(r['peak_timestep'], 'g')})</p>"
            f"<h2>Top-activating images</h2><div class=imgs>{''.join(figs) or '<p class=muted>none</p>'}</div>"
            f'<h2>Timestep profile and classes</h2><div class="imgs plots"><img alt="timestep profile" '
            f'src="data:image/png;base64,{pictures["profile"]}"><img alt="per class" '
            f'src="data:image/png;base64,{pictures["classes"]}"></div>'
            f"<table><thead><tr><th>class</th><th>AUROC</th><th>mean image activation</th></tr></thead>"
            f"<tbody>{auroc_rows}</tbody></table>"
            f"<h2>Nearest decoder directions</h2><ul>{neigh or '<li class=muted>none</li>'}</ul>")
    return _page(f"Feature {r['id']}", body, r)
