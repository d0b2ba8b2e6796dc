"""Training checkpoints: complete (weights, Adam state, dead-latent counters, step, metric history)
and written atomically, so a run killed at any moment resumes from the newest complete one.

Layout under the run directory::

    checkpoints/latest                    name of the newest complete checkpoint
    checkpoints/step-0000500/{sae}/       each SAE (cfg.json + sae.safetensors)
    checkpoints/step-0000500/state.safetensors   Adam state and rows_since_fired of every SAE
    checkpoints/step-0000500/trainer.json        step, Adam param groups, config, history

A checkpoint directory is filled under a temporary name and renamed into place
(:func:`tide.io.atomic_dir`); ``latest`` is replaced after it (:func:`tide.io.atomic_write_bytes`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tide.errors import TideError
from tide.io import TMP_SUFFIX, atomic_dir, atomic_write_bytes, atomic_write_json
from tide.sae.io import load_sae, save_sae
from tide.sae.model import SAE

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAIN_STATE = "trainer.json"
STATE = "state.safetensors"


class Checkpoint(NamedTuple):
    """A checkpoint read back: where it is, its ``trainer.json`` and its state tensors."""

    path: Path
    meta: dict
    """step, param_groups (per SAE), config, history."""
    tensors: dict[str, torch.Tensor]


def save_checkpoint(root: Path, step: int, saes: dict[str, SAE], optims: dict[str, torch.optim.Optimizer],
                    rows_since_fired: dict[str, torch.Tensor], meta: dict, keep: int) -> Path:
    """Write checkpoint ``step-{step}`` under ``root`` atomically, point ``latest`` at it and keep the newest ``keep``.
    ``meta`` (config, history) goes into ``trainer.json`` beside the step and Adam's param groups."""
    name = f"step-{step:07d}"
    final = root / name
    with atomic_dir(final) as tmp:
        tensors, groups = {}, {}
        for sae_name, sae in saes.items():
            save_sae(sae, tmp / sae_name)
            opt = optims[sae_name].state_dict()
            for i, state in opt["state"].items():
                for key, value in state.items():
                    tensors[f"{sae_name}/optim/{i}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
            groups[sae_name] = opt["param_groups"]
            tensors[f"{sae_name}/rows_since_fired"] = rows_since_fired[sae_name].cpu()
        save_file(tensors, str(tmp / STATE))
        atomic_write_json(tmp / TRAIN_STATE, {"step": step, "param_groups": groups, **meta})
    atomic_write_bytes(root / LATEST, name.encode())
    for old in sorted(p for p in root.glob("step-*") if not p.name.endswith(TMP_SUFFIX))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


RESTART = "pass --overwrite to start the run again instead"
"""The fix every damaged-checkpoint message ends with."""


def read_checkpoint(root: Path) -> Checkpoint | None:
    """The checkpoint ``latest`` names under ``root``; None when there is none. A pointer, state or SAE that is
    missing, truncated or not what tide writes is refused in one line naming the file (:class:`TideError`)."""
    latest = root / LATEST
    if not latest.exists():
        return None
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TideError(f"cannot read the checkpoint pointer {latest} ({_why(exc)}): {RESTART}") from None
    path = root / name
    if not name or Path(name).name != name or name in (".", "..") or not name.startswith("step-"):
        raise TideError(f"the checkpoint pointer {latest} is damaged (it names {name[:40]!r}, not a step-N "
                        f"checkpoint): {RESTART}")
    if not path.is_dir():
        raise TideError(f"{latest} names the checkpoint {path}, which does not exist: {RESTART}")
    meta_path, state_path = path / TRAIN_STATE, path / STATE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TideError(f"the checkpoint {path} has no {TRAIN_STATE}: it is incomplete; {RESTART}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TideError(f"cannot read {meta_path} ({_why(exc)}): the checkpoint is damaged; {RESTART}") from None
    if (not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(meta.get("config"), dict)
            or not isinstance(meta.get("param_groups"), dict) or not isinstance(meta.get("history", []), list)):
        raise TideError(f"{meta_path} is not a tide training state (it needs step, config and param_groups): "
                        f"{RESTART}")
    if not state_path.is_file():
        raise TideError(f"the checkpoint {path} has no {STATE}: it is incomplete; {RESTART}")
    try:
        tensors = load_file(str(state_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TideError(f"cannot read {state_path} ({_why(exc)}): the checkpoint is damaged; {RESTART}") from None
    return Checkpoint(path, meta, tensors)


def _why(exc: BaseException) -> str:
    """The first line of an error, short."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 120 else text[:117] + "..."


def restore(ckpt: Checkpoint, saes: dict[str, SAE], optims: dict[str, torch.optim.Optimizer],
            rows_since_fired: dict[str, torch.Tensor], device: torch.device) -> None:
    """Load ``ckpt``'s weights, Adam state and dead-latent counters into the given objects (in place); a part that
    is missing or does not fit is refused in one line naming the checkpoint (:class:`TideError`)."""
    for sae_name, sae in saes.items():
        sae_dir = ckpt.path / sae_name
        try:
            sae.load_state_dict(load_sae(sae_dir, device=device).state_dict())
        except TideError as exc:
            raise TideError(f"the checkpoint's SAE {sae_dir} is damaged ({exc}); {RESTART}") from None
        except RuntimeError as exc:
            raise TideError(f"the checkpoint's SAE {sae_dir} does not fit this run ({_why(exc)}); {RESTART}") from None
        try:
            state = {}
            for key, value in ckpt.tensors.items():
                parts = key.split("/")
                if parts[0] == sae_name and len(parts) == 4 and parts[1] == "optim":
                    state.setdefault(int(parts[2]), {})[parts[3]] = value.to(device) if parts[3] != "step" else value
            optims[sae_name].load_state_dict({"state": state, "param_groups": ckpt.meta["param_groups"][sae_name]})
            rows_since_fired[sae_name] = ckpt.tensors[f"{sae_name}/rows_since_fired"].to(device)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise TideError(f"the optimizer state of SAE {sae_name!r} in {ckpt.path / STATE} is damaged or missing "
                            f"({_why(exc)}); {RESTART}") from None
