"""Load a backbone offline: an embedded model by name, a diffusers pipeline directory, or a bare
transformer directory. Nothing here touches the network."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from tide.device import resolve_device
from tide.errors import TideError
from tide.models.base import Backbone, PromptBank
from tide.models.registry import FAMILIES, family_for_class

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = {"fmnist-dit": ASSETS / "fmnist-dit"}
"""Embedded models that ship inside the package, by name."""
DEFAULT_BACKBONE = "fmnist-dit"
TIDE_META = "tide.json"
"""Optional file beside a checkpoint with tide metadata (class names, pixel scale, classifier)."""
PROMPTS_FILE = "prompt_embeds.safetensors"
"""Prompt-embedding file picked up from a text-family checkpoint directory when present."""


def resolve_backbone_path(spec: str | Path) -> Path:
    """The directory behind an embedded name or a path, with a clear error when there is none."""
    if str(spec) in EMBEDDED:
        path = EMBEDDED[str(spec)]
        if not (path / "model_index.json").exists():
            raise TideError(f"embedded model {spec!r} is missing its weights at {path}: "
                            "reinstall tide or run experiments/train_embedded.py")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise TideError(f"no embedded model or checkpoint directory named {str(spec)!r}: embedded "
                        f"models are {sorted(EMBEDDED)}; otherwise pass the path of a local diffusers "
                        "pipeline directory (with model_index.json) or transformer directory (with config.json)")
    if not path.is_dir():
        raise TideError(f"{path} is a file: pass the checkpoint *directory* (with model_index.json "
                        "or config.json)")
    return path


def _diffusers_class(name: str, what: str, path: Path):
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise TideError(f"{path}: {what} class {name!r} is not a diffusers class this version knows "
                        f"(diffusers {diffusers.__version__})")
    return cls


def load_backbone(spec: str | Path = DEFAULT_BACKBONE, *, prompts: str | Path | PromptBank | None = None,
                  device: str | torch.device | None = "auto", dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a backbone by embedded name or local directory.

    A pipeline directory (``model_index.json`` with ``transformer/``, ``scheduler/`` and optionally
    ``vae/``) is read as a whole; a bare transformer directory gets its family's default scheduler.
    Text families take precomputed prompt embeddings (``prompts``, or ``prompt_embeds.safetensors``
    inside the directory).
    """
    path = resolve_backbone_path(spec)
    meta: dict = {"name": str(spec) if str(spec) in EMBEDDED else path.name, "path": str(path)}
    if (path / TIDE_META).exists():
        meta.update(json.loads((path / TIDE_META).read_text()))

    scheduler = vae = None
    if (path / "model_index.json").exists():
        index = json.loads((path / "model_index.json").read_text())
        entry = index.get("transformer")
        if not entry or entry[1] is None:
            raise TideError(f"{path}/model_index.json lists no transformer: tide needs a transformer-based "
                            f"pipeline (supported transformer classes: {_supported()})")
        cls = family_for_class(entry[1], path)
        transformer = cls.transformer_class.from_pretrained(path / "transformer", torch_dtype=dtype)
        if index.get("scheduler") and index["scheduler"][1]:
            scheduler = _diffusers_class(index["scheduler"][1], "scheduler", path).from_pretrained(
                path / "scheduler")
        if index.get("vae") and index["vae"][1] and (path / "vae").exists():
            vae = _diffusers_class(index["vae"][1], "VAE", path).from_pretrained(path / "vae", torch_dtype=dtype)
        if "id2label" in index and "class_names" not in meta:
            labels = index["id2label"]
            meta["class_names"] = [labels[str(i)] if isinstance(labels, dict) else labels[i]
                                   for i in range(len(labels))]
    elif (path / "config.json").exists():
        config = json.loads((path / "config.json").read_text())
        cls = family_for_class(config.get("_class_name", "<missing _class_name>"), path)
        transformer = cls.transformer_class.from_pretrained(path, torch_dtype=dtype)
    else:
        raise TideError(f"{path} is not a diffusers checkpoint: expected model_index.json (a pipeline) "
                        "or config.json (a transformer) inside it")
    if scheduler is None:
        scheduler = cls.default_scheduler()

    bank = None
    if cls.text_conditioned:
        if isinstance(prompts, PromptBank):
            bank = prompts
        elif prompts is not None:
            bank = PromptBank.load(prompts)
        elif (path / PROMPTS_FILE).exists():
            bank = PromptBank.load(path / PROMPTS_FILE)
    backbone = cls(transformer, scheduler, vae, meta, bank)
    return backbone.to(resolve_device(device))


def _supported() -> str:
    return ", ".join(c.transformer_class.__name__ for c in FAMILIES.values())


@dataclass
class BackboneConfig:
    """Which model to run, and where."""

    backbone: str = DEFAULT_BACKBONE
    """Embedded model name (fmnist-dit) or path to a local diffusers pipeline/transformer directory."""
    prompts: str | None = None
    """Prompt-embedding file (safetensors, `prompt_embeds` ...) for text-conditioned families."""
    device: str = "auto"
    """cpu, cuda[:N], or auto (the GPU when one is present)."""

    def load_backbone(self) -> Backbone:
        return load_backbone(self.backbone, prompts=self.prompts, device=self.device)
