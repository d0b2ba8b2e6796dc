"""Save and load SAEs (safetensors + cfg.json; never pickle), and export folded per-timestep SAEs
in the common format other SAE tools read (``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in),
``b_enc``, ``b_dec``; SAELens-style ``cfg.json``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tide.io import atomic_path, atomic_write_json
from tide.config import from_dict
from tide.errors import TideError
from tide.sae.config import SAEConfig
from tide.sae.model import SAE

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
FORMAT = "tide.sae"
FOLDED_WEIGHTS = "sae_weights.safetensors"
"""File name of an exported folded SAE's weights (SAELens convention)."""


def save_sae(sae: SAE, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``cfg.json`` + ``sae.safetensors`` into directory ``path`` (atomically, file by file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(path / CONFIG, {"format": FORMAT, "version": 1, "config": dataclasses.asdict(sae.cfg), **(extra or {})})
    return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by :func:`save_sae`; refuses pickles and anything that is not safetensors."""
    path = Path(path)
    if path.is_file():
        raise TideError(f"{path} is a file: pass the SAE directory (with {CONFIG} and {WEIGHTS})")
    cfg_path, weights = path / CONFIG, path / WEIGHTS
    if not cfg_path.exists() or not weights.exists():
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt")) if path.is_dir() else []
        hint = f" (found {pickles}: tide never unpickles files; convert them to safetensors)" if pickles else ""
        raise TideError(f"{path} is not a tide SAE directory: it needs {CONFIG} and {WEIGHTS}{hint}")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise TideError(f"{cfg_path} is not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise TideError(f"{cfg_path} is not a tide SAE config (format {meta.get('format')!r}); for a folded "
                        "export use tide.sae.io.load_folded")
    sae = SAE(from_dict(SAEConfig, meta["config"]))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TideError(f"cannot read {weights}: {exc} (expected a safetensors file)") from None
    _fit_buffers(sae, state)
    try:
        sae.load_state_dict(state)
    except RuntimeError as exc:
        raise TideError(f"{weights} does not match its {CONFIG}: {str(exc).splitlines()[0]}") from None
    return sae.to(device)


def _fit_buffers(sae: SAE, state: dict) -> None:
    """The normalisation table's length depends on the data: resize it before loading."""
    if "norm_scale_T" in state:  # SAEs saved before per-dimension scales kept one scale per timestep
        scale_T = state.pop("norm_scale_T")
        state["norm_scale_TD"] = scale_T[:, None].expand(-1, sae.cfg.d_in).contiguous()
    for name in ("norm_t_T", "norm_mean_TD", "norm_scale_TD"):
        if name in state:
            setattr(sae, name, torch.empty_like(state[name]))


def _architecture(cfg: SAEConfig) -> str:
    return {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu"}[cfg.sparsity]


def export_folded(sae: SAE, path: str | Path, timesteps: Sequence[float], overwrite: bool = False) -> list[Path]:
    """One plain SAE per timestep, on raw activations, in ``path/t{t:07.2f}/`` (cfg.json + sae_weights.safetensors):
    the SAELens export, :func:`tide.sae.export.export_saelens` (SAELens 6 and 5 load it). Returns the directories."""
    from tide.sae.export import export_saelens  # that module imports this one

    return export_saelens(sae, path, timesteps, overwrite=overwrite)


def load_folded(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one exported folded SAE (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``[, ``threshold``])."""
    try:
        return load_file(str(Path(path) / FOLDED_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TideError(f"cannot read {Path(path) / FOLDED_WEIGHTS}: {exc}") from None
