"""Load a backbone offline: an embedded model by name, a diffusers pipeline directory, or a bare
transformer directory. Nothing here touches the network."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

from tide.config import DEFAULT_BACKBONE, EMBEDDED, BackboneConfig, resolve_backbone_path  # noqa: F401  (BackboneConfig re-exported)
from tide.device import resolve_device
from tide.errors import TideError
from tide.models.base import Backbone, PromptBank
from tide.models.registry import FAMILIES, family_for_class

TIDE_META = "tide.json"
"""Optional file beside a checkpoint with tide metadata (class names, pixel scale, classifier)."""
PROMPTS_FILE = "prompt_embeds.safetensors"
"""Prompt-embedding file picked up from a text-family checkpoint directory when present."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Weight dtypes a backbone can be loaded in, by name."""


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (torch dtypes pass through), with a clear error for other names."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise TideError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _diffusers_class(name: str, what: str, path: Path):
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise TideError(f"{path}: {what} class {name!r} is not a diffusers class this version knows "
                        f"(diffusers {diffusers.__version__})")
    return cls


def _transformer_family(config_path: Path, class_name: str, where: Path) -> type[Backbone]:
    """The adapter for a transformer, with diffusers' own remapping of the legacy ``Transformer2DModel``
    (the Hub's DiT-XL/2 and PixArt-α checkpoints) by its config's ``norm_type``."""
    from diffusers.models.model_loading_utils import _CLASS_REMAPPING_DICT

    if class_name in _CLASS_REMAPPING_DICT:
        norm_type = _read_json(config_path).get("norm_type")
        remapped = _CLASS_REMAPPING_DICT[class_name].get(norm_type)
        if remapped is None:
            raise TideError(f"{where}: a {class_name} with norm_type {norm_type!r} is neither a DiT (ada_norm_zero) "
                            f"nor a PixArt (ada_norm_single) transformer; tide supports {_supported()}")
        class_name = remapped
    return family_for_class(class_name, where)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TideError(f"{path} is missing: the checkpoint directory is incomplete") from None
    except (OSError, ValueError) as exc:
        raise TideError(f"{path} is not valid JSON ({exc}): the checkpoint directory is damaged") from None


def _from_pretrained(cls, path: Path, what: str, **kwargs):
    """``cls.from_pretrained`` on a local directory only: no hub, safetensors weights only (nothing is unpickled)."""
    try:
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, EnvironmentError, ValueError) as exc:
        weights = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if "use_safetensors" in kwargs and weights:
            raise TideError(f"{path}: the {what} weights are pickled ({', '.join(weights)}) and tide never unpickles: "
                            "convert them to safetensors (save_pretrained(..., safe_serialization=True))") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TideError(f"{path}: cannot load the {what} from this local directory ({first}); it needs its config "
                        "and safetensors weights (nothing is downloaded)") from None


def load_backbone(spec: str | Path = DEFAULT_BACKBONE, *,
                  prompts: str | Path | PromptBank | list[str] | None = None,
                  device: str | torch.device | None = "auto", dtype: str | torch.dtype = torch.float32) -> Backbone:
    """Load a backbone by embedded name or local directory, offline.

    A pipeline directory (``model_index.json`` with ``transformer/``, ``scheduler/`` and optionally
    ``vae/``) is read as a whole; a bare transformer directory gets its family's default scheduler.
    The Hub's legacy ``Transformer2DModel`` layouts (DiT-XL/2, PixArt-α) are mapped to their family
    by ``norm_type`` as diffusers does. Weights load in ``dtype`` (float32, bfloat16 or float16),
    from safetensors files only. Text families take precomputed prompt embeddings (``prompts``, or
    ``prompt_embeds.safetensors`` inside the directory); a checkpoint with a vocabulary text encoder
    (``text_encoder/vocab.json``, as ``fmnist-pixart`` ships) also takes ``prompts`` as text: a list of
    prompts, or one string with ``;`` between them. Its encoder is ``backbone.vocabulary``.
    """
    dtype = torch_dtype(dtype)
    path = resolve_backbone_path(spec)
    meta: dict = {"name": str(spec) if str(spec) in EMBEDDED else path.name, "path": str(path)}
    if (path / TIDE_META).exists():
        meta.update(_read_json(path / TIDE_META))

    scheduler = vae = None
    if (path / "model_index.json").exists():
        index = _read_json(path / "model_index.json")
        meta["pipeline_index"] = index  # pipeline-level settings (e.g. Wan's expand_timesteps) for the adapter
        entry = index.get("transformer")
        if not entry or entry[1] is None:
            raise TideError(f"{path}/model_index.json lists no transformer: tide needs a transformer-based "
                            f"pipeline (supported transformer classes: {_supported()})")
        cls = _transformer_family(path / "transformer" / "config.json", entry[1], path)
        transformer = _from_pretrained(cls.transformer_class, path / "transformer", "transformer",
                                       torch_dtype=dtype, use_safetensors=True)
        if index.get("scheduler") and index["scheduler"][1]:
            scheduler = _from_pretrained(_diffusers_class(index["scheduler"][1], "scheduler", path),
                                         path / "scheduler", "scheduler")
        if index.get("vae") and index["vae"][1] and (path / "vae").exists():
            vae = _from_pretrained(_diffusers_class(index["vae"][1], "VAE", path), path / "vae", "VAE",
                                   torch_dtype=dtype, use_safetensors=True)
        if "id2label" in index and "class_names" not in meta:
            labels = index["id2label"]
            meta["class_names"] = [labels[str(i)] if isinstance(labels, dict) else labels[i]
                                   for i in range(len(labels))]
    elif (path / "config.json").exists():
        config = _read_json(path / "config.json")
        cls = _transformer_family(path / "config.json", config.get("_class_name", "<missing _class_name>"), path)
        transformer = _from_pretrained(cls.transformer_class, path, "transformer", torch_dtype=dtype,
                                       use_safetensors=True)
    else:
        raise TideError(f"{path} is not a diffusers checkpoint: expected model_index.json (a pipeline) "
                        "or config.json (a transformer) inside it")
    if scheduler is None:
        scheduler = cls.default_scheduler()

    vocabulary = _vocabulary(path, meta) if cls.text_conditioned else None
    bank = None
    if cls.text_conditioned:
        if isinstance(prompts, PromptBank):
            bank = prompts
        elif prompts is not None:
            bank = _prompt_bank(prompts, vocabulary, path)
        elif (path / PROMPTS_FILE).exists():
            bank = PromptBank.load(path / PROMPTS_FILE)
        if prompts is not None:
            # condition i is now the i-th given prompt, not the checkpoint's own i-th prompt (its class)
            meta.pop("class_names", None)
    backbone = cls(transformer, scheduler, vae, meta, bank)
    backbone.vocabulary = vocabulary
    return backbone.to(resolve_device(device))


def _vocabulary(path: Path, meta: dict):
    """The checkpoint's vocabulary text encoder (``text_encoder/vocab.json``), or None when it has another
    (or no) text encoder."""
    from tide.models.vocabulary import Vocabulary

    directory = path / meta.get("text_encoder", "text_encoder")
    return Vocabulary.load(directory) if Vocabulary.is_vocabulary(directory) else None


def _prompt_bank(prompts, vocabulary, path: Path) -> PromptBank:
    """A prompt bank from a prompt-embedding file, or from prompts as text (a list, or one string with
    ``;`` between prompts) encoded by the checkpoint's vocabulary."""
    if isinstance(prompts, (str, Path)) and (Path(prompts).is_file() or str(prompts).endswith(".safetensors")):
        return PromptBank.load(prompts)
    if vocabulary is None:
        raise TideError(f"prompt-embedding file {prompts} does not exist (the checkpoint {path} has no vocabulary "
                        "text encoder, so prompts cannot be given as text)")
    texts = [p.strip() for p in prompts.split(";")] if isinstance(prompts, str) else [str(p) for p in prompts]
    return vocabulary.prompt_bank(texts)


def _supported() -> str:
    return ", ".join(c.transformer_class.__name__ for c in FAMILIES.values())


def load_captured_backbone(manifest: dict, where: str | Path, spec: str | Path | None = None,
                           prompts: str | None = None, dtype: str | None = None,
                           device: str | torch.device | None = "auto") -> Backbone:
    """The backbone a capture (its ``manifest``, read from dataset ``where``) was made with: the manifest's
    backbone, prompts and dtype unless given; refused when its weights are not the captured ones."""
    captured = manifest.get("config", {}) or {}
    spec = spec or captured.get("backbone")
    if not spec:
        raise TideError(f"the manifest of {where} names no backbone: give --backbone")
    try:
        backbone = load_backbone(spec, prompts=prompts or captured.get("prompts"), device=device,
                                 dtype=dtype or captured.get("dtype", "float32"))
    except TideError as exc:
        raise TideError(f"cannot load backbone {spec!r} named in the manifest of {where}: {exc} "
                        "(pass the capture's backbone with --backbone)") from None
    expected = manifest.get("backbone_hash")
    if expected and backbone.identity_hash() != expected:
        raise TideError(f"backbone {backbone.name!r} is not the model {where} was captured from (its weights "
                        "differ): pass the capture's backbone with --backbone")
    return backbone
