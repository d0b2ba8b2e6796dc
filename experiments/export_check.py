"""Do SAELens 6, SAELens 5 and EleutherAI sparsify load tide's folded-SAE exports, and compute what tide computes?

    python experiments/export_check.py     # about two minutes on 2 CPU cores (plus creating the environments once)

Exports an SAE (``--sae``; default runs/steering_saes/tide when it exists, else a random TIDE-conditioned TopK SAE
with every parameter randomised) with ``tide.sae.export.export_saelens`` and ``export_sparsify`` at a few
timesteps, then loads every exported directory in a subprocess of each library's own environment
(``.bench-venv``: SAELens 6 + sparsify; ``.bench-venv-saelens5`` or ``--saelens5-python``: SAELens 5; both created
on first use) and checks that it loads, that the
library's own encode / decode of random activations (mu_t + sigma_t * noise, the SAE's normalisation statistics)
match tide's folded SAE and the original SAE at t (max abs difference), that the activation is TopK with the
SAE's k, and where the timestep and provenance are reachable from the loaded object. Then the same SAELens checks
for random TIDE SAEs of the other sparsities (relu, jumprelu, batchtopk; sparsify refuses them). Negative
controls: the cfg.json tide wrote before this export (the legacy ``export_folded`` fields) in SAELens 6 and 5,
and tide's cfg without ``activation_fn`` in SAELens 5. Writes experiments/results/export_check.json.

The same file is the worker (``--worker saelens|sparsify``): it imports only the library and torch, never tide.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAE = ROOT / "runs" / "steering_saes" / "tide"
BENCH_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
"""SAELens 6 + sparsify: the SAE benchmark's environment (experiments/bench/sae_bench.py), created on first use."""
SAELENS5_VENV = ROOT / ".bench-venv-saelens5"
SAELENS5_PYTHON = Path(os.environ.get("TIDE_SAELENS5_PYTHON", SAELENS5_VENV / "bin" / "python"))
SAELENS5_REQUIREMENTS = ["sae-lens==5.11.0", "pyarrow<20"]
"""SAELens 5's last release; pyarrow 20+ needs numpy 2, which sae-lens 5 does not allow."""


def ensure_environments(saelens5_python: Path) -> None:
    """Create the library environments that are missing (torch pinned to this environment's version, so pip takes
    the same local CPU wheel)."""
    import torch

    version = torch.__version__.split("+")[0]
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    from sae_bench import ensure_bench_venv

    ensure_bench_venv(version)
    probe = [str(saelens5_python), "-c", "import sae_lens, torch"]
    if saelens5_python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return
    venv = saelens5_python.parent.parent
    print(f"creating {venv} (torch=={version} {' '.join(SAELENS5_REQUIREMENTS)})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(saelens5_python), "-m", "pip", "install", "-q", f"torch=={version}", *SAELENS5_REQUIREMENTS],
                   check=True)
    subprocess.run(probe, check=True, capture_output=True)
LEGACY_KEYS = ("architecture", "d_in", "d_sae", "k", "hook_name", "model_name", "timestep", "apply_b_dec_to_input",
               "normalize_activations", "dtype", "folded_from", "source_conditioning", "source_normalization")
"""The cfg.json fields tide's export_folded wrote before tide.sae.export (the negative control)."""


# ------------------------------------------------------------------------------------------------ worker side
def _dense(acts, idx, d_sae):
    import torch

    return torch.zeros(acts.shape[0], d_sae, dtype=acts.dtype).scatter_(1, idx, acts)


def _saelens_worker(dirs: list[Path], inputs: dict) -> tuple[dict, dict]:
    import torch
    from sae_lens import SAE

    version = importlib.metadata.version("sae-lens")
    major = int(version.split(".")[0])
    results, tensors = {}, {}
    for d in dirs:
        try:
            sae = SAE.load_from_disk(str(d), device="cpu")
        except Exception as exc:  # noqa: BLE001 - the check reports what failed
            results[d.name] = {"loaded": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            continue
        cfg = sae.cfg
        act = sae.activation_fn
        arch = cfg.architecture() if callable(cfg.architecture) else cfg.architecture
        info = {"loaded": True, "class": type(sae).__name__, "architecture": arch, "activation": type(act).__name__,
                "activation_k": getattr(act, "k", None), "cfg_k": getattr(cfg, "k", None),
                "activation_fn_kwargs": getattr(cfg, "activation_fn_kwargs", None)}
        if major >= 6:
            meta = cfg.metadata
            info["provenance"] = {"where": "sae.cfg.metadata.<key>", **{k: meta.get(k) for k in (
                "timestep", "hook_name", "model_name", "folded_from", "source_conditioning", "source_normalization",
                "source_sparsity", "source_k", "target")}}
        else:
            m = re.search(r"timestep=([0-9.eE+-]+)", cfg.dataset_path or "")
            info["provenance"] = {"where": "sae.cfg.dataset_path ('tide-fold:timestep=T'), sae.cfg.hook_name, "
                                  "sae.cfg.model_name; SAELens 5's SAEConfig has no metadata field",
                                  "dataset_path": cfg.dataset_path, "timestep": float(m.group(1)) if m else None,
                                  "hook_name": cfg.hook_name, "model_name": cfg.model_name,
                                  "has_metadata": hasattr(cfg, "metadata")}
        if d.name in inputs:
            with torch.no_grad():
                z = sae.encode(inputs[d.name])
                tensors[f"{d.name}/z"] = z.contiguous()
                tensors[f"{d.name}/x_hat"] = sae.decode(z).contiguous()
                tensors[f"{d.name}/x_hat_forward"] = sae(inputs[d.name]).contiguous()
        results[d.name] = info
    return {"library": "sae-lens", "version": version, "torch": torch.__version__, "results": results}, tensors


def _sparsify_worker(dirs: list[Path], inputs: dict) -> tuple[dict, dict]:
    import torch
    from sparsify import SparseCoder

    results, tensors = {}, {}
    for d in dirs:
        try:
            sc = SparseCoder.load_from_disk(d, device="cpu")
        except Exception as exc:  # noqa: BLE001
            results[d.name] = {"loaded": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            continue
        cfg_file = json.loads((d / "cfg.json").read_text())
        tide = cfg_file.get("tide", {})
        results[d.name] = {
            "loaded": True, "class": type(sc).__name__, "activation": sc.cfg.activation, "cfg_k": sc.cfg.k,
            "num_latents": sc.num_latents, "d_in": sc.d_in,
            "provenance": {"where": "cfg.json['tide'][<key>] beside the weights (sparsify drops unknown cfg keys: "
                                    "not on SparseCoder.cfg); load_many keys by directory name",
                           "on_loaded_cfg": hasattr(sc.cfg, "tide") or hasattr(sc.cfg, "timestep"),
                           **{k: tide.get(k) for k in ("timestep", "hook_name", "model_name", "folded_from",
                                                       "source_conditioning", "source_normalization")}}}
        if d.name in inputs:
            x = inputs[d.name]
            with torch.no_grad():
                top_acts, top_idx, _ = sc.encode(x)
                tensors[f"{d.name}/z"] = _dense(top_acts, top_idx, sc.num_latents)
                tensors[f"{d.name}/x_hat"] = sc.decode(top_acts, top_idx).contiguous()
                tensors[f"{d.name}/x_hat_forward"] = sc(x).sae_out.contiguous()
    if dirs:  # the whole export at once, as a user of several timesteps would load it
        many = SparseCoder.load_many(str(dirs[0].parent), local=True)
        results["load_many_keys"] = sorted(many)
    return {"library": "eai-sparsify", "version": importlib.metadata.version("eai-sparsify"), "torch": torch.__version__,
            "results": results}, tensors


def worker(args) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    dirs = [Path(d) for d in args.dirs]
    flat = load_file(args.inputs) if args.inputs else {}
    inputs = {k.split("/")[0]: v for k, v in flat.items()}
    report, tensors = (_saelens_worker if args.worker == "saelens" else _sparsify_worker)(dirs, inputs)
    if tensors:
        save_file(tensors, args.outputs)
    Path(args.report).write_text(json.dumps(report, indent=1))


# ------------------------------------------------------------------------------------------------ tide side
def random_sae(sparsity: str = "topk"):
    """A TIDE-conditioned SAE with global normalisation and every parameter randomised (no trained SAE, or the
    sparsities other than the trained SAE's)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from tide.sae import SAE, SAEConfig

    torch.manual_seed(0)
    d, f = 64, 512
    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=16, sparsity=sparsity, conditioning="tide", normalization="global", hook="blocks.4.hook_resid_post",
                        backbone="random-check"))
    rng = np.random.default_rng(0)
    sae.set_normalization(SimpleNamespace(mean_D=rng.normal(size=d), var=float(d * 4.0)))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        for p in sae.modulation.parameters():  # small: 1 + scale(t) stays near 1, as in a trained TIDE SAE
            p.normal_(0, 0.02)
        if sparsity == "jumprelu":
            sae.log_threshold.uniform_(-3, 0)
        if sparsity == "batchtopk":
            sae.threshold.fill_(0.2)
        if sparsity != "topk":  # no k: shift each latent's bias so that it fires on about 3% of rows, as if trained
            x = sae.norm_mean_TD[0] + 2.0 * torch.randn(4096, d)
            pre = sae.eval()(x, torch.rand(4096) * sae.cfg.t_max).pre_BF
            sae.b_enc -= pre.quantile(0.97, dim=0)
    return sae.eval()


def run_worker(python: Path, kind: str, dirs: list[Path], inputs: Path | None, work: Path, tag: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    report, outputs = work / f"{tag}.json", work / f"{tag}.safetensors"
    cmd = [str(python), __file__, "--worker", kind, "--report", str(report), "--outputs", str(outputs),
           *(["--inputs", str(inputs)] if inputs else []), "--dirs", *map(str, dirs)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not report.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"loaded": False, "error": " | ".join(tail), "seconds": round(seconds, 1)}, {}
    out = json.loads(report.read_text())
    out["seconds"] = round(seconds, 1)
    warnings = sorted({ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()})
    out["log_lines"] = warnings[:12]
    return out, (load_file(str(outputs)) if outputs.exists() else {})


def compare(report: dict, outputs: dict, refs: dict, sae_cfg) -> dict:
    """Per timestep: max abs differences of latents and reconstructions against tide's folded SAE and the original
    SAE at t, the largest L0, whether the library built the expected architecture and, for TopK, whether the
    activation is TopK with the SAE's k (and no row has more than k latents)."""
    from tide.sae.io import _architecture

    table = {}
    for name, info in report.get("results", {}).items():
        if not isinstance(info, dict) or not info.get("loaded"):
            if isinstance(info, dict):
                table[name] = info
            continue
        row = dict(info)
        if f"{name}/z" in outputs:
            z, x_hat = outputs[f"{name}/z"], outputs[f"{name}/x_hat"]
            row.update({
                "max_abs_diff_latents_vs_folded": float((z - refs[name]["z_folded"]).abs().max()),
                "max_abs_diff_recon_vs_folded": float((x_hat - refs[name]["x_hat_folded"]).abs().max()),
                "max_abs_diff_latents_vs_original_at_t": float((z - refs[name]["z_original"]).abs().max()),
                "max_abs_diff_recon_vs_original_at_t": float((x_hat - refs[name]["x_hat_original"]).abs().max()),
                "max_abs_diff_forward_vs_decode": float((outputs[f"{name}/x_hat_forward"] - x_hat).abs().max()),
                "max_abs_recon": float(refs[name]["x_hat_original"].abs().max()),
                "max_l0": int((z != 0).sum(-1).max()),
                "same_active_set_as_folded": bool(((z != 0) == (refs[name]["z_folded"] != 0)).all()),
            })
        expected = "topk" if report.get("library") == "eai-sparsify" else _architecture(sae_cfg)
        row["architecture_ok"] = info.get("architecture", info.get("activation")) == expected
        if sae_cfg.sparsity == "topk":
            k_seen = info.get("activation_k") if "activation_k" in info else info.get("cfg_k")
            is_topk = info.get("activation") in ("TopK", "topk")
            row["topk_with_k"] = bool(is_topk and k_seen == sae_cfg.k and row.get("max_l0", 0) <= sae_cfg.k)
        table[name] = row
    return table


def copy_with_cfg(d: Path, work: Path, group: str, edit) -> Path:
    """A copy of one exported SAELens directory with its cfg.json changed by ``edit(cfg) -> cfg``."""
    copy = work / group / d.name
    shutil.copytree(d, copy)
    (copy / "cfg.json").write_text(json.dumps(edit(json.loads((d / "cfg.json").read_text()))))
    return copy


def reference_inputs(sae, ts: list[float], names: list[str], rows: int, path: Path) -> dict:
    """Random activations around the SAE's own statistics at each timestep (saved for the workers), and tide's
    folded and original latents and reconstructions on them."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    flat, refs = {}, {}
    for t, name in zip(ts, names):
        t_B = torch.full((rows,), t)
        mu, sigma = sae._norm(t_B)
        x = (mu + sigma * torch.randn(rows, sae.cfg.d_in, generator=g)).contiguous()
        folded = sae.fold(t).eval()
        with torch.no_grad():
            refs[name] = {"x": x, "z_folded": folded.encode(x, t_B), "x_hat_folded": folded.reconstruct(x, t_B),
                          "z_original": sae.encode(x, t_B), "x_hat_original": sae.reconstruct(x, t_B)}
        flat[f"{name}/x"] = x
    save_file(flat, str(path))
    return refs


def check(sae, ts: list[float], work: Path, args, source: str, libraries=("sae_lens_6", "sae_lens_5", "sparsify")) -> dict:
    """Export ``sae`` at ``ts`` in both formats and run every library's worker on it; per-library results and a summary."""
    from tide.sae.export import export_saelens, export_sparsify

    cfg = sae.cfg
    work.mkdir(parents=True)
    start = time.perf_counter()
    dirs = {"saelens": export_saelens(sae, work / "saelens", ts, source=source)}
    dirs["sparsify"] = export_sparsify(sae, work / "sparsify", ts, source=source) if cfg.sparsity == "topk" else []
    export_seconds = time.perf_counter() - start
    inputs = work / "inputs.safetensors"
    refs = reference_inputs(sae, ts, [d.name for d in dirs["saelens"]], args.rows, inputs)
    pythons = {"sae_lens_6": BENCH_PYTHON, "sae_lens_5": Path(args.saelens5_python), "sparsify": BENCH_PYTHON}
    libs = {}
    for tag in libraries:
        kind = "sparsify" if tag == "sparsify" else "saelens"
        if not dirs[kind]:
            libs[tag] = {"skipped": f"sparsify exports TopK SAEs only; this SAE is {cfg.sparsity}"}
        elif not pythons[tag].exists():
            libs[tag] = {"loaded": False, "error": f"no interpreter at {pythons[tag]}"}
        else:
            report, outputs = run_worker(pythons[tag], kind, dirs[kind], inputs, work, tag)
            report["per_timestep"] = compare(report, outputs, refs, cfg)
            report.pop("results", None)
            libs[tag] = report

    summary = {}
    for tag, lib in libs.items():
        rows = [r for r in lib.get("per_timestep", {}).values() if isinstance(r, dict) and "loaded" in r]
        if not rows:
            summary[tag] = {"ok": None, "skipped": lib["skipped"]} if "skipped" in lib else {"ok": False, "why": lib.get("error")}
            continue
        loaded = all(r.get("loaded") for r in rows)
        worst = {key: max(r.get(key, float("nan")) for r in rows) for key in (
            "max_abs_diff_latents_vs_folded", "max_abs_diff_recon_vs_folded", "max_abs_diff_latents_vs_original_at_t",
            "max_abs_diff_recon_vs_original_at_t")} if loaded else {}
        arch_ok = loaded and all(r["architecture_ok"] for r in rows)
        topk_ok = loaded and all(r.get("topk_with_k", True) for r in rows)
        prov_ok = loaded and all(r.get("provenance", {}).get("timestep") == t for r, t in zip(rows, ts))
        close = loaded and max(worst.values()) < args.tolerance * max(1.0, max(r["max_abs_recon"] for r in rows))
        summary[tag] = {"ok": bool(loaded and arch_ok and topk_ok and prov_ok and close), "all_loaded": loaded,
                        "architecture_ok": arch_ok, **({"topk_with_k": topk_ok} if cfg.sparsity == "topk" else {}),
                        "timestep_reachable": prov_ok, "where": rows[0].get("provenance", {}).get("where") if loaded else None,
                        **{f"worst_{k}": v for k, v in worst.items()},
                        "max_abs_recon": max(r["max_abs_recon"] for r in rows) if loaded else None,
                        "max_l0": max(r["max_l0"] for r in rows) if loaded else None}
    return {"sae": source, "sae_config": {k: getattr(cfg, k) for k in (
                "d_in", "d_sae", "sparsity", "k", "conditioning", "normalization", "hook", "backbone", "t_max")},
            "timesteps": ts, "export_seconds": round(export_seconds, 2), "summary": summary, "libraries": libs,
            "dirs": dirs, "refs": refs}


def controls(dirs: list[Path], refs: dict, work: Path, args) -> dict:
    """Negative controls on one exported directory: the cfg.json the old export_folded wrote (SAELens 6 and 5),
    and tide's cfg without ``activation_fn`` / ``activation_fn_kwargs`` (SAELens 5)."""
    from safetensors.torch import save_file

    d = dirs[len(dirs) // 2]
    legacy = copy_with_cfg(d, work, "legacy", lambda c: {k: c.get(k) for k in LEGACY_KEYS})
    no_act = copy_with_cfg(d, work, "no_activation_fn", lambda c: {k: v for k, v in c.items()
                                                                   if k not in ("activation_fn", "activation_fn_kwargs")})
    inputs = work / "control_inputs.safetensors"
    save_file({f"{d.name}/x": refs[d.name]["x"]}, str(inputs))
    keys = ("loaded", "error", "class", "architecture", "activation", "activation_k", "provenance")
    out = {}
    for tag, python, copy, inp in (("legacy_cfg_sae_lens_6", BENCH_PYTHON, legacy, None),
                                   ("legacy_cfg_sae_lens_5", Path(args.saelens5_python), legacy, None),
                                   ("no_activation_fn_sae_lens_5", Path(args.saelens5_python), no_act, inputs)):
        if not python.exists():
            continue
        report, outputs = run_worker(python, "saelens", [copy], inp, work, tag)
        res = report.get("results", {}).get(copy.name, report)
        out[tag] = {k: res.get(k) for k in keys if k in res}
        if f"{copy.name}/z" in outputs:
            z = outputs[f"{copy.name}/z"]
            out[tag].update(max_l0=int((z != 0).sum(-1).max()), mean_l0=float((z != 0).sum(-1).float().mean()),
                            max_abs_diff_recon_vs_folded=float((outputs[f"{copy.name}/x_hat"] - refs[d.name]["x_hat_folded"]).abs().max()))
    return out


def main(args) -> dict:
    import torch

    from tide.sae import load_sae
    from tide.sae.export import default_timesteps

    torch.set_num_threads(1)
    if args.sae and Path(args.sae).exists():
        path = Path(args.sae).resolve()
        sae, source = load_sae(path).eval(), str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    else:
        sae, source = random_sae(), "random TIDE TopK SAE (no --sae found)"
    default = default_timesteps(sae)
    ts = [float(t) for t in args.timesteps.split(",")] if args.timesteps else sorted({default[0], default[len(default) // 2], default[-1]})
    work = Path(tempfile.mkdtemp(prefix="tide-export-check-"))
    try:
        main_check = check(sae, ts, work / "main", args, source)
        control = controls(main_check["dirs"]["saelens"], main_check.pop("refs"), work, args)
        main_check.pop("dirs")

        others = {}
        if not args.skip_other_sparsities:  # SAELens exports of the other sparsities (random TIDE SAEs), one timestep each
            for sparsity in ("relu", "jumprelu", "batchtopk"):
                other = check(random_sae(sparsity), [500.0], work / sparsity, args, f"random TIDE {sparsity} SAE",
                              libraries=("sae_lens_6", "sae_lens_5"))
                other.pop("refs"), other.pop("dirs")
                others[sparsity] = other
    finally:
        if args.keep:
            print(f"exports kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    libs = main_check["libraries"]
    return {
        "what": "tide's SAELens and sparsify exports, loaded by each library in its own environment; latents and "
                "reconstructions of the library's own encode/decode on random activations (mu_t + sigma_t * noise) "
                "vs tide's folded SAE and the original SAE at t",
        "rows_per_timestep": args.rows, "tolerance_relative": args.tolerance,
        "versions": {"python": platform.python_version(), "torch_tide_env": torch.__version__,
                     **{tag: {"library": lib.get("library"), "version": lib.get("version"), "torch": lib.get("torch")}
                        for tag, lib in libs.items() if "version" in lib}},
        **main_check, "controls": control, "other_sparsities": others,
    }


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", default=str(DEFAULT_SAE) if DEFAULT_SAE.exists() else "", help="tide SAE directory to export")
    p.add_argument("--timesteps", default="", help="comma-separated; default: the first, middle and last of the SAE's default export timesteps")
    p.add_argument("--rows", type=int, default=256, help="random activation rows per timestep")
    p.add_argument("--saelens5-python", default=str(SAELENS5_PYTHON), help="python of a venv with sae-lens<6")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed, relative to max |x_hat|")
    p.add_argument("--keep", action="store_true", help="keep the temporary export directories (their path is printed)")
    p.add_argument("--skip-other-sparsities", action="store_true", help="skip the relu / jumprelu / batchtopk SAELens checks")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "export_check.json"))
    p.add_argument("--worker", choices=("saelens", "sparsify"), help=argparse.SUPPRESS)
    p.add_argument("--dirs", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--inputs", default="", help=argparse.SUPPRESS)
    p.add_argument("--outputs", default="", help=argparse.SUPPRESS)
    p.add_argument("--report", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    if args.worker:
        worker(args)
        sys.exit(0)
    ensure_environments(Path(args.saelens5_python))
    result = main(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"summary": result["summary"], "controls": result["controls"],
                      "other_sparsities": {k: v["summary"] for k, v in result["other_sparsities"].items()}}, indent=1))
    print(f"-> {args.out}")
