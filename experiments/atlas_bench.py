"""Atlas benchmark: how long the feature atlas takes to export, how big it is, and how fast its pages load.

    tide capture --config configs/faithful_capture.yaml --out runs/faithful_capture
    tide train --config configs/atlas.yaml --data runs/faithful_capture --out runs/atlas_saes
    python experiments/atlas_bench.py --sae runs/atlas_saes/tide

Measured, on this machine's CPU threads (``--threads``, default 2 and 1):

* **statistics** of the 4096-feature SAE over the capture (``tide stats``; once);
* **export** of every firing feature with ``--images`` top images each and no causal strips (``--repeats`` runs at
  each thread count; the median and the spread are reported, with the time of each part: load, regenerate,
  write);
* **causal strips** for ``--effect-features`` features (a second export with them): the cost per feature;
* **the demo's atlas** (``--demo``, default runs/demo: every firing feature of its SAE), when it exists;
* ``--stage every-feature-fires``: the same SAE with each feature's weights set to one row of the capture, so
  that all 4096 features fire in many samples and get their 12 images (the trained one leaves most of them dead,
  and random weights fire no more);
* **in the browser** (Debian's headless Chromium through chromedriver): the time until the index has rendered its
  first page (``window.tideReadyMs``, from navigation start), for the 4096-feature atlas and for a 16384-feature
  index made from it (its rows repeated under new ids; the index is the only page whose cost grows with the
  number of features); a search's time to re-render; a feature page's time until every heat map is drawn.

Writes experiments/results/atlas_bench{.json,.md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tide.analysis import compute_feature_stats, save_feature_stats  # noqa: E402
from tide.analysis.dashboard import DashboardConfig, export_dashboard  # noqa: E402
from tide.analysis.dashboard_html import index_html  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default="runs/atlas_saes/tide")
    p.add_argument("--data", default="runs/faithful_capture")
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2, help="exports per thread count")
    p.add_argument("--threads", default="2,1")
    p.add_argument("--effect-features", type=int, default=32)
    p.add_argument("--demo", default="runs/demo")
    p.add_argument("--work", default=None, help="where the atlases are written (default: a temporary directory)")
    p.add_argument("--out", default=str(RESULTS / "atlas_bench"))
    p.add_argument("--stage", choices=("all", "every-feature-fires"), default="all",
                   help="every-feature-fires: add, to the results at --out, the export of the same SAE with its "
                        "encoder and decoder rows set to rows of the capture, so that every one of its features fires "
                        "in many samples and gets its 12 images: the atlas at full width")
    return p.parse_args(argv)


def data_directions(sae, data: str, seed: int = 0) -> torch.Tensor:
    """(F, D) unit directions, one per feature, each the SAE's own input of one row of the capture drawn at random
    (minus its decoder bias): a feature with that encoder row fires on its row and on rows like it."""
    import numpy as np

    from tide.data import ActivationStore

    store = ActivationStore(data)
    hook, F = sae.cfg.hook, sae.cfg.d_sae
    rng = np.random.default_rng(seed)
    sizes = np.array([s.rows for s in store.shards])
    picks = rng.choice(int(sizes.sum()), size=F, replace=False)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    xs, ts = [], []
    for g in np.sort(picks):
        i = int(np.searchsorted(starts, g, side="right") - 1)
        acts, meta = store.read(i, int(g - starts[i]), int(g - starts[i]) + 1, [hook], ["timestep"])
        xs.append(torch.from_numpy(acts[hook].astype("float32")))
        ts.append(torch.from_numpy(meta["timestep"].astype("float32")))
    x, t = torch.cat(xs), torch.cat(ts)
    with torch.no_grad():
        x_in = sae(x, t).x_in_BD
        return torch.nn.functional.normalize(x_in - sae.b_dec[0], dim=-1)


def every_feature_fires(args):
    """The export at full width: the trained SAE's config with each feature's encoder and decoder row set to one
    row of the capture (:func:`data_directions`), so that every feature fires in many samples; timed like the
    trained one."""
    from tide.sae import load_sae, save_sae

    out = Path(args.out)
    res = json.loads(out.with_suffix(".json").read_text())
    work = Path(args.work or tempfile.mkdtemp(prefix="atlas-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sae = load_sae(args.sae).eval()
    w = data_directions(sae, args.data)
    with torch.no_grad():
        sae.W_dec.copy_(w[None].expand_as(sae.W_dec))
        sae.W_enc.copy_(w[None].expand_as(sae.W_enc))
    sae_dir = save_sae(sae, work / "random_sae")
    t = time.perf_counter()
    stats = compute_feature_stats(sae_dir, args.data, progress=True)
    stats_seconds = round(time.perf_counter() - t, 2)
    stats_path = save_feature_stats(stats, work / "random_stats.h5")
    torch.set_num_threads(int(args.threads.split(",")[0]))
    runs = []
    for r in range(args.repeats):
        got = _export(stats_path, work / "random_atlas", images_per_feature=args.images, effect_features=0)
        runs.append(_summary(got))
        print(f"data-direction weights, run {r}: {got.seconds['total']:.1f} s, {got.bytes / 1e6:.1f} MB, "
              f"{got.num_features} features", flush=True)
    driver = _browser()
    try:
        base = (work / "random_atlas").resolve().as_uri()
        doc = json.loads((work / "random_atlas" / "dashboard.json").read_text())
        browser = {"index_ready_ms": _stat(_ready_ms(driver, f"{base}/index.html")),
                   "feature_page_ready_ms": _stat(_ready_ms(driver, f"{base}/features/f{doc['features'][0]['id']}.html"))}
    finally:
        driver.quit()
    res["every_feature_fires"] = {
        "firing_features": int((stats.frequency > 0).sum()), "stats_seconds": stats_seconds,
        "threads": int(args.threads.split(",")[0]), "total": _stat([x["seconds"]["total"] for x in runs]),
        "parts": {k: _stat([x["seconds"][k] for x in runs]) for k in runs[0]["seconds"]}, "last": runs[-1],
        "files": _files(work / "random_atlas"), "browser": browser,
        "index_megabytes": round((work / "random_atlas" / "index.html").stat().st_size / 1e6, 2)}
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


def _export(stats_path, out, **kw):
    return export_dashboard(DashboardConfig(stats=str(stats_path), out=str(out), overwrite=True, progress=False, **kw))


def _summary(result) -> dict:
    return {"features": result.num_features, "images": result.num_images, "samples": result.num_samples,
            "causal_strips": result.num_effects, "megabytes": round(result.bytes / 1e6, 2),
            "files": None, "seconds": {k: round(v, 2) for k, v in result.seconds.items()}}


def _files(path: Path) -> int:
    return sum(1 for p in Path(path).rglob("*") if p.is_file())


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 "--window-size=1300,1000", f"--user-data-dir={tempfile.mkdtemp(prefix='atlas-bench-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def _ready_ms(driver, url: str, runs: int = 3) -> list[float]:
    from selenium.webdriver.support.ui import WebDriverWait

    out = []
    for _ in range(runs):
        driver.get("about:blank")
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return window.tideReadyMs !== undefined"))
        out.append(float(driver.execute_script("return window.tideReadyMs")))
    return out


def _search_ms(driver, url: str, text: str) -> float:
    driver.get(url)
    return float(driver.execute_script(
        "var q=document.getElementById('q');var t=performance.now();q.value=arguments[0];"
        "q.dispatchEvent(new Event('input'));return performance.now()-t;", text))


def _stat(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "runs": [round(v, 2) for v in values]}


def main(argv=None):
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.stage == "every-feature-fires":
        return every_feature_fires(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="atlas-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    res = {"what": __doc__.split("\n\n")[0], "args": vars(args), "machine": {"torch": torch.__version__}}

    t = time.perf_counter()
    stats = compute_feature_stats(args.sae, args.data, progress=True)
    res["stats_seconds"] = round(time.perf_counter() - t, 2)
    stats_path = save_feature_stats(stats, work / "feature_stats.h5")
    res["sae_features"] = stats.num_features
    res["firing_features"] = int((stats.frequency > 0).sum())
    print(f"statistics in {res['stats_seconds']} s: {res['firing_features']} of {stats.num_features} fire", flush=True)

    exports = {}
    for threads in (int(v) for v in args.threads.split(",")):
        torch.set_num_threads(threads)
        runs = []
        for r in range(args.repeats):
            got = _export(stats_path, work / "atlas", images_per_feature=args.images, effect_features=0)
            runs.append(_summary(got))
            print(f"{threads} thread(s), run {r}: {got.seconds['total']:.1f} s, {got.bytes / 1e6:.1f} MB", flush=True)
        exports[str(threads)] = {"total": _stat([x["seconds"]["total"] for x in runs]),
                                 "parts": {k: _stat([x["seconds"][k] for x in runs]) for k in runs[0]["seconds"]},
                                 "last": runs[-1]}
    torch.set_num_threads(int(args.threads.split(",")[0]))
    res["export"] = exports
    res["export_files"] = _files(work / "atlas")

    if args.effect_features:
        got = _export(stats_path, work / "atlas_effects", images_per_feature=args.images,
                      effect_features=args.effect_features)
        res["effects"] = {**_summary(got), "seconds_per_feature": round(got.seconds["effects"] / max(got.num_effects, 1), 3)}
        print(f"causal strips: {res['effects']['seconds_per_feature']} s per feature", flush=True)

    demo_stats = Path(args.demo) / "feature_stats.h5"
    if demo_stats.is_file():
        got = _export(demo_stats, work / "demo_atlas", images_per_feature=args.images, effect_features=24)
        res["demo"] = {**_summary(got), "files": _files(work / "demo_atlas")}
        print(f"demo atlas: {got.seconds['total']:.1f} s", flush=True)

    # a 16384-feature index from the 4096-feature atlas's rows
    doc = json.loads((work / "atlas" / "dashboard.json").read_text())
    rows = doc["features"]
    big = []
    for rep in range(4):
        for r in rows:
            big.append({**r, "id": r["id"] + rep * doc["num_features"], "page": f"features/f{r['id']}.html"})
    while len(big) < 16384:
        big += big[: 16384 - len(big)]
    meta = {k: v for k, v in doc.items() if k != "features"}
    (work / "atlas" / "index16k.html").write_text(index_html({**meta, "num_features": 16384}, big[:16384]))
    res["index16k_megabytes"] = round((work / "atlas" / "index16k.html").stat().st_size / 1e6, 2)
    res["index_megabytes"] = round((work / "atlas" / "index.html").stat().st_size / 1e6, 2)

    driver = _browser()
    try:
        base = (work / "atlas").resolve().as_uri()
        first = doc["features"][0]["id"]
        res["browser"] = {
            "index_ready_ms": _stat(_ready_ms(driver, f"{base}/index.html")),
            "index_16384_ready_ms": _stat(_ready_ms(driver, f"{base}/index16k.html")),
            "search_16384_ms": round(_search_ms(driver, f"{base}/index16k.html", "trouser"), 2),
            "feature_page_ready_ms": _stat(_ready_ms(driver, f"{base}/features/f{first}.html")),
            "chromium": driver.capabilities.get("browserVersion")}
    finally:
        driver.quit()
    print(json.dumps(res["browser"], indent=1), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


def write_markdown(res: dict, path: Path) -> None:
    e2 = res["export"][min(res["export"], key=lambda k: -int(k))]
    lines = ["# Atlas benchmark (`experiments/atlas_bench.py`)", "",
             f"SAE `{res['args']['sae']}` ({res['sae_features']} features, {res['firing_features']} fire) on "
             f"`{res['args']['data']}`; {res['args']['images']} top images per feature. Times in seconds on this "
             "machine's CPU; median (min–max) of the runs.", "",
             f"Feature statistics (one streaming pass, `tide stats`): {res['stats_seconds']} s.", "",
             "| threads | export, total | load | regenerate | write | features | images | samples regenerated | "
             "size |", "|---|---|---|---|---|---|---|---|---|"]
    for th, ex in sorted(res["export"].items(), key=lambda kv: -int(kv[0])):
        p, la = ex["parts"], ex["last"]
        lines.append(f"| {th} | {ex['total']['median']} ({ex['total']['min']}–{ex['total']['max']}) | "
                     f"{p['load']['median']} | {p['regenerate']['median']} | {p['write']['median']} | "
                     f"{la['features']} | {la['images']} | {la['samples']} | {la['megabytes']} MB |")
    lines += ["", f"Files written: {res['export_files']} (every sample's picture once under images/, one page per "
              f"feature, dashboard.json, the index and the assets). Only {res['firing_features']} of the "
              f"{res['sae_features']} features fire, and they fire in few of the {e2['last']['samples']} samples "
              f"({e2['last']['images'] / max(e2['last']['features'], 1):.1f} images per feature on average), so this "
              "is not the full-width case: see *every feature firing* below for the aim.", ""]
    if "effects" in res:
        ef = res["effects"]
        lines += [f"Causal strips (added / removed, {res['args']['effect_features']} features, 3 + 3 generations "
                  f"each): {ef['seconds']['effects']} s, **{ef['seconds_per_feature']} s per feature**; for every "
                  f"firing feature that would be about {ef['seconds_per_feature'] * res['firing_features'] / 60:.0f} "
                  "min on this CPU, which is why the atlas makes them for the most frequent features by default "
                  "(`effect_features`).", ""]
    if "demo" in res:
        d = res["demo"]
        lines += [f"The demo's atlas (`{res['args']['demo']}`): {d['features']} features (every firing one), "
                  f"{d['images']} images from {d['samples']} regenerated samples, causal strips for "
                  f"{d['causal_strips']}: {d['seconds']['total']} s, {d['megabytes']} MB in {d['files']} files.", ""]
    if "every_feature_fires" in res:
        r = res["every_feature_fires"]
        la, p = r["last"], r["parts"]
        lines += ["**Every feature firing** (`--stage every-feature-fires`): the trained SAE leaves "
                  f"{res['sae_features'] - res['firing_features']} of its {res['sae_features']} features dead (random "
                  "unit-norm weights fire no more: 931), so the same SAE with each feature's encoder and decoder row "
                  "set to the SAE's input at one row of the capture drawn at random (it fires on that row and rows "
                  f"like it; {r['firing_features']} fire) shows the atlas at full width: statistics {r['stats_seconds']} s; "
                  f"export on {r['threads']} threads **{r['total']['median']} s** ({r['total']['min']}–"
                  f"{r['total']['max']}; load {p['load']['median']}, regenerate {p['regenerate']['median']}, write "
                  f"{p['write']['median']}) for {la['features']} features, {la['images']} images from "
                  f"{la['samples']} regenerated samples, {la['megabytes']} MB in {r['files']} files; its index "
                  f"({r['index_megabytes']} MB) is ready in {r['browser']['index_ready_ms']['median']} ms and a "
                  f"feature page in {r['browser']['feature_page_ready_ms']['median']} ms. Aim (≤ 600 s): "
                  f"**{'met' if r['total']['median'] <= 600 else 'not met'}**.", ""]
    b = res["browser"]
    lines += [f"In headless Chromium {b['chromium']} (file://, median of 3 loads, ms from navigation start until the "
              "page has rendered):", "",
              "| page | ready (ms) | size |", "|---|---|---|",
              f"| index, {res['firing_features']} features (the trained SAE's) | {b['index_ready_ms']['median']} ({b['index_ready_ms']['min']}–"
              f"{b['index_ready_ms']['max']}) | {res['index_megabytes']} MB |",
              f"| index, 16384 features (those rows repeated) | {b['index_16384_ready_ms']['median']} ({b['index_16384_ready_ms']['min']}–"
              f"{b['index_16384_ready_ms']['max']}) | {res['index16k_megabytes']} MB |",
              f"| a feature page, {res['args']['images']} heat maps drawn | {b['feature_page_ready_ms']['median']} "
              f"({b['feature_page_ready_ms']['min']}–{b['feature_page_ready_ms']['max']}) | |", "",
              f"A search over the 16384-feature index re-renders in {b['search_16384_ms']} ms."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
