"""Export an SAE folded at chosen timesteps (:meth:`tide.sae.SAE.fold`) for other SAE tools.

Each timestep becomes one plain SAE on raw activations, in its own directory ``out/t{t:07.2f}/``:

* ``saelens`` (:func:`export_saelens`): ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc`` (d_in, d_sae),
  ``W_dec`` (d_sae, d_in), ``b_enc``, ``b_dec`` (+ ``threshold`` for jumprelu / batchtopk). The cfg holds the
  union of what SAELens 6 (``SAE.load_from_disk``) and SAELens 5 (``SAEConfig.from_dict``) need, and
  ``sae_lens_version`` >= 6 so that SAELens 6 keeps the ``metadata`` block (timestep, hook, model, source
  conditioning and normalisation) as ``sae.cfg.metadata``; SAELens 5 has no such field, so the timestep also
  goes into ``dataset_path`` (``tide-fold:timestep=...``), a field SAELens uses only to train.
* ``sparsify`` (:func:`export_sparsify`, TopK only): ``cfg.json`` + ``sae.safetensors`` as EleutherAI
  sparsify's ``SparseCoder.load_from_disk`` reads them: ``encoder.weight`` (d_sae, d_in), ``encoder.bias``,
  ``W_dec`` (d_sae, d_in), ``b_dec``. Sparsify drops unknown cfg keys, so the provenance sits in the cfg's
  ``tide`` block (in the file, not on the loaded object).

Both libraries compute what tide computes: ``z = TopK((x - b_dec) W_enc + b_enc)`` (ReLU on the kept values),
``x^ = z W_dec + b_dec``. The whole export is written in a temporary directory beside ``out`` and renamed
into place; ``out/tide_export.json`` indexes it. An existing, non-empty ``out`` is replaced only with
``overwrite`` and only when it is itself a tide export.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from safetensors.torch import save_file

from tide.errors import TideError
from tide.io import atomic_dir, atomic_path, atomic_write_json, check_writable_dir
from tide.sae.io import CONFIG, FOLDED_WEIGHTS, _architecture, load_sae
from tide.sae.model import SAE

FORMATS = ("saelens", "sparsify")
"""Export formats: SAELens (5 and 6) and EleutherAI sparsify."""
SPARSIFY_WEIGHTS = "sae.safetensors"
"""File name sparsify reads the weights from."""
INDEX = "tide_export.json"
"""The index of an export directory (format, timesteps, source SAE); its presence marks a tide export."""
INDEX_FORMAT = "tide.export"
SAELENS_CFG_VERSION = "6.0.0"
"""``sae_lens_version`` written into the cfg: SAELens 6 takes a config at or above 6.0 as-is, metadata block
included; below it (or without it) SAELens 6 rebuilds the metadata from its own list of keys and the
timestep is lost."""
DEFAULT_TIMESTEP_COUNT = 10
"""TIDE SAEs without per-timestep normalisation are exported at the midpoints of this many equal ranges of
[0, t_max] (50, 150, ..., 950 for t_max 1000) by default."""


def default_timesteps(sae: SAE) -> list[float]:
    """The timesteps to export when none are given: the SAE's recorded normalisation timesteps (per-timestep
    normalisation), else each bucket's midpoint (bucket conditioning), else one timestep, t_max / 2, for an
    SAE that does not depend on t (plain, with global, per-dimension or no normalisation), else the midpoints of
    :data:`DEFAULT_TIMESTEP_COUNT` equal ranges of [0, t_max]."""
    cfg = sae.cfg
    if sae.norm_t_T.numel() > 1:
        return sorted({round(float(t), 4) for t in sae.norm_t_T.tolist()})
    n = {"bucket": cfg.num_buckets, "none": 1}.get(cfg.conditioning, DEFAULT_TIMESTEP_COUNT)
    return [cfg.t_max * (i + 0.5) / n for i in range(n)]


def timestep_dir(t: float) -> str:
    """Directory name of the SAE folded at ``t``: ``t0500.00``."""
    return f"t{float(t):07.2f}"


def check_timesteps(sae: SAE, timesteps: Sequence[float]) -> list[float]:
    """The timesteps as floats; refuses none, non-finite ones, ones outside [0, t_max] and ones that share a
    directory name (equal to 2 decimals)."""
    ts = [float(t) for t in timesteps]
    if not ts:
        raise TideError("no timesteps to export: pass --timesteps, e.g. --timesteps 100,500,900")
    t_max = sae.cfg.t_max
    bad = [t for t in ts if not math.isfinite(t) or not 0.0 <= t <= t_max]
    if bad:
        raise TideError(f"timestep(s) {bad} lie outside the SAE's range [0, {t_max:g}]: pass timesteps within it")
    seen: dict[str, float] = {}
    for t in ts:
        name = timestep_dir(t)
        if name in seen:
            raise TideError(f"timesteps {seen[name]:g} and {t:g} would share the directory {name}: "
                            "pass timesteps that differ in the first two decimals")
        seen[name] = t
    return ts


def provenance(sae: SAE, t: float) -> dict:
    """Where the folded SAE at ``t`` comes from: the timestep, hook, backbone and the source SAE's
    conditioning, normalisation and sparsity."""
    cfg = sae.cfg
    return {"timestep": float(t), "hook_name": cfg.hook, "model_name": cfg.backbone, "folded_from": "tide.sae",
            "source_conditioning": cfg.conditioning, "source_normalization": cfg.normalization,
            "source_sparsity": cfg.sparsity, "source_k": cfg.k, "t_max": cfg.t_max, "target": cfg.target,
            "input_hooks": cfg.input_hooks}


def _hook_layer(hook: str) -> int:
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else 0


def saelens_config(sae: SAE, t: float) -> dict:
    """The cfg.json of the SAE folded at ``t``, for SAELens 6 and SAELens 5.

    SAELens 6 (``SAE.load_from_disk``) reads ``architecture``, ``d_in``, ``d_sae``, ``dtype`` (the weights'
    dtype), ``k`` for topk (default 100 otherwise), ``apply_b_dec_to_input``, ``normalize_activations``,
    ``reshape_activations``, ``sae_lens_version`` (>= 6: the cfg is taken as-is) and ``metadata``.
    SAELens 5 (``SAEConfig.from_dict``, after ``handle_config_defaulting``) needs ``d_in``, ``d_sae``,
    ``dtype``, ``model_name``, ``hook_name``, ``hook_layer``, ``hook_head_index``, ``context_size``,
    ``dataset_path`` (no defaults) and reads ``architecture``, ``activation_fn`` + ``activation_fn_kwargs``
    (without ``activation_fn: topk`` it runs ReLU whatever the architecture), ``apply_b_dec_to_input``,
    ``finetuning_scaling_factor``, ``prepend_bos``, ``dataset_trust_remote_code``, ``normalize_activations``,
    ``sae_lens_training_version``. A DiT has no token context or text dataset: ``context_size`` is 0,
    ``prepend_bos`` false, and ``dataset_path`` names the fold (``tide-fold:timestep=...``) so that the
    timestep survives SAELens 5 too."""
    cfg = sae.cfg
    arch = _architecture(cfg)
    topk = cfg.sparsity == "topk"
    meta = provenance(sae, t)
    dataset_path = f"tide-fold:timestep={float(t)!r}"
    llm = {"model_name": cfg.backbone, "hook_name": cfg.hook, "hook_head_index": None, "context_size": 0,
           "prepend_bos": False, "dataset_path": dataset_path, "sae_lens_training_version": None}
    out = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "activation_fn": "topk" if topk else "relu", "activation_fn_kwargs": {"k": cfg.k} if topk else {},
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "normalize_activations": "none",
        "reshape_activations": "none", "dtype": "float32", "device": "cpu",
        **llm, "hook_layer": _hook_layer(cfg.hook), "dataset_trust_remote_code": False, "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {}, "seqpos_slice": [None], "sae_lens_version": SAELENS_CFG_VERSION,
    }
    if topk:
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    # top-level provenance (what export_folded always wrote), then the block SAELens 6 keeps as cfg.metadata
    out.update({k: meta[k] for k in ("timestep", "folded_from", "source_conditioning", "source_normalization")})
    out["metadata"] = {"sae_lens_version": SAELENS_CFG_VERSION, **llm, **meta}
    return out


def sparsify_config(sae: SAE, t: float) -> dict:
    """The cfg.json of the SAE folded at ``t`` for sparsify's ``SparseCoder.load_from_disk``: ``d_in`` (popped
    before the rest is read) and the ``SparseCoderConfig`` fields ``activation`` (topk), ``k``, ``num_latents``
    (= d_sae; wins over ``expansion_factor``, written as d_sae // d_in when exact, else 0),
    ``normalize_decoder`` (false: folded decoder rows are not unit-norm), ``multi_topk``, ``skip_connection``
    and ``transcode`` (all false); provenance in a ``tide`` block, which sparsify drops on loading."""
    cfg = sae.cfg
    return {"d_in": cfg.d_in, "activation": "topk", "k": cfg.k, "num_latents": cfg.d_sae,
            "expansion_factor": cfg.d_sae // cfg.d_in if cfg.d_sae % cfg.d_in == 0 else 0,
            "normalize_decoder": False, "multi_topk": False, "skip_connection": False, "transcode": False,
            "tide": provenance(sae, t)}


def folded_tensors(sae: SAE, t: float) -> dict[str, torch.Tensor]:
    """The SAE folded at ``t`` in the common layout: ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``,
    ``b_dec`` and, for jumprelu / batchtopk, ``threshold`` (d_sae,); float32 on the CPU."""
    folded = sae.fold(float(t))
    cfg = folded.cfg
    tensors = {"W_enc": folded.W_enc[0].T, "W_dec": folded.W_dec[0], "b_enc": folded.b_enc[0], "b_dec": folded.b_dec[0]}
    if cfg.sparsity == "jumprelu":
        tensors["threshold"] = folded.log_threshold[0].exp()
    if cfg.sparsity == "batchtopk":
        tensors["threshold"] = folded.threshold[0].expand(cfg.d_sae)
    return {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}


def _write_saelens(sae: SAE, t: float, d: Path) -> None:
    with atomic_path(d / FOLDED_WEIGHTS) as tmp:
        save_file(folded_tensors(sae, t), str(tmp))
    atomic_write_json(d / CONFIG, saelens_config(sae, t))


def _write_sparsify(sae: SAE, t: float, d: Path) -> None:
    f = folded_tensors(sae, t)
    tensors = {"encoder.weight": f["W_enc"].T.contiguous(), "encoder.bias": f["b_enc"], "W_dec": f["W_dec"], "b_dec": f["b_dec"]}
    with atomic_path(d / SPARSIFY_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(d / CONFIG, sparsify_config(sae, t))


def check_sparsity(sae: SAE, format: str) -> None:
    """Refuse an SAE the format cannot express (sparsify runs TopK only)."""
    if format == "sparsify" and sae.cfg.sparsity != "topk":
        raise TideError(f"sparsify runs TopK SAEs only and this SAE's sparsity is {sae.cfg.sparsity}: "
                        "export it with --format saelens")


def check_out(path: str | Path, overwrite: bool) -> Path:
    """Refuse an output path that is a file, a non-empty directory without ``overwrite``, or a non-empty
    directory that is not a tide export (which ``overwrite`` would delete)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TideError(f"{path} is a file: pass --out a directory to create")
    check_writable_dir(path)  # a folder under a file, or a read-only one: refused before the SAE is read
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise TideError(f"{path} already exists: pass --overwrite to replace it, or choose another --out")
        if not (path / INDEX).is_file():
            raise TideError(f"{path} is not a tide export (it has no {INDEX}) and --overwrite would delete it: "
                            "choose another --out")
    return path


def _export(sae: SAE, path: str | Path, timesteps: Sequence[float], format: str, overwrite: bool,
            source: str | None, write: Callable[[SAE, float, Path], None]) -> list[Path]:
    check_sparsity(sae, format)
    path = check_out(path, overwrite)
    ts = check_timesteps(sae, timesteps)
    names = [timestep_dir(t) for t in ts]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        for t, name in zip(ts, names):
            (tmp / name).mkdir()
            write(sae, t, tmp / name)
        atomic_write_json(tmp / INDEX, {"format": INDEX_FORMAT, "version": 1, "target": format,
                                        "source": source, "timesteps": ts, "dirs": names,
                                        "source_config": dataclasses.asdict(sae.cfg)})
    return [path / name for name in names]


def export_saelens(sae: SAE, path: str | Path, timesteps: Sequence[float], overwrite: bool = False,
                   source: str | None = None) -> list[Path]:
    """One SAELens SAE per timestep in ``path/t{t:07.2f}/`` (cfg.json + sae_weights.safetensors), loadable with
    SAELens 6 and 5 (``SAE.load_from_disk(dir)``); returns the directories. ``source`` (the SAE's directory)
    is recorded in the index."""
    return _export(sae, path, timesteps, "saelens", overwrite, source, _write_saelens)


def export_sparsify(sae: SAE, path: str | Path, timesteps: Sequence[float], overwrite: bool = False,
                    source: str | None = None) -> list[Path]:
    """One sparsify SAE per timestep in ``path/t{t:07.2f}/`` (cfg.json + sae.safetensors), loadable with
    ``SparseCoder.load_from_disk(dir)`` (or all of them with ``SparseCoder.load_many(path, local=True)``);
    TopK SAEs only. Returns the directories."""
    return _export(sae, path, timesteps, "sparsify", overwrite, source, _write_sparsify)


EXPORTERS = {"saelens": export_saelens, "sparsify": export_sparsify}


class ExportResult(NamedTuple):
    path: Path
    """The export directory."""
    dirs: list[Path]
    """One directory per timestep."""
    timesteps: list[float]
    """The timesteps, in the order of ``dirs``."""


@dataclass
class ExportConfig:
    """`tide export`: write an SAE folded at chosen timesteps as plain SAEs that SAELens or sparsify load."""

    sae: str = ""
    """SAE directory (cfg.json + sae.safetensors, as `tide train` writes it)."""
    out: str = ""
    """Output directory; one subdirectory t0500.00 per timestep, and tide_export.json."""
    format: str = "saelens"
    """saelens (loads in SAELens 6 and 5; any sparsity) | sparsify (EleutherAI sparsify; TopK SAEs only)."""
    timesteps: list[float] = field(default_factory=list)
    """Timesteps to fold at, within [0, t_max]; empty = the SAE's recorded normalisation timesteps
    (per-timestep normalisation), else one per bucket (bucket midpoints), else t_max/2 for a plain SAE with
    global normalisation (it does not depend on t), else the midpoints of 10 equal ranges of [0, t_max] (50, 150, ..., 950)."""
    overwrite: bool = False
    """Replace an existing export at --out (only a directory a tide export wrote is replaced)."""

    def run(self) -> ExportResult:
        if not self.sae:
            raise TideError("give the SAE directory: tide export --sae DIR --out DIR")
        if not self.out:
            raise TideError("give the output directory: tide export --sae DIR --out DIR")
        if self.format not in FORMATS:
            raise TideError(f"unknown export format {self.format!r}: use --format {' or --format '.join(FORMATS)}")
        sae_dir = Path(self.sae)
        if not sae_dir.exists():
            raise TideError(f"SAE directory {sae_dir} does not exist: pass --sae the directory `tide train` wrote "
                            "(with cfg.json and sae.safetensors)")
        out = check_out(self.out, self.overwrite)
        if out.resolve() == sae_dir.resolve() or out.resolve() in sae_dir.resolve().parents:
            raise TideError(f"--out {out} holds the SAE itself: choose another --out")
        sae = load_sae(sae_dir).eval()
        check_sparsity(sae, self.format)
        ts = check_timesteps(sae, self.timesteps or default_timesteps(sae))
        dirs = EXPORTERS[self.format](sae, out, ts, overwrite=self.overwrite, source=str(sae_dir))
        return ExportResult(out, dirs, ts)
