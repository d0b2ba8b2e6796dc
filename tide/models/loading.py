"""Load a backbone offline: an embedded model by name, a diffusers pipeline directory, or a bare
transformer directory. Nothing here touches the network."""

from __future__ import annotations

import contextlib
import json
import warnings
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
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if cls is None:
        raise TideError(f"{path}/model_index.json names {what} class {name!r}, which is not a diffusers class this "
                        f"version knows (diffusers {diffusers.__version__}): fix model_index.json or use the "
                        "diffusers version the checkpoint was saved with")
    return cls


def _transformer_family(config_path: Path, class_name: str, where: Path) -> type[Backbone]:
    """The adapter for a transformer, with diffusers' own remapping of the legacy ``Transformer2DModel``
    (the Hub's DiT-XL/2 and PixArt-α checkpoints) by its config's ``norm_type``."""
    from diffusers.models.model_loading_utils import _CLASS_REMAPPING_DICT

    if class_name in _CLASS_REMAPPING_DICT:
        norm_type = _read_json(config_path).get("norm_type")
        remapped = _CLASS_REMAPPING_DICT[class_name].get(norm_type) if isinstance(norm_type, str) else None
        if remapped is None:
            raise TideError(f"{where}: a {class_name} with norm_type {norm_type!r} is neither a DiT (ada_norm_zero) "
                            f"nor a PixArt (ada_norm_single) transformer; tide supports {_supported()}")
        class_name = remapped
    return family_for_class(class_name, where)


def _read_json(path: Path) -> dict:
    """A JSON object (settings) from ``path``, or one line naming what is wrong with the file."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise TideError(f"{path} is missing: the checkpoint directory is incomplete") from None
    except IsADirectoryError:
        raise TideError(f"{path} is a directory, not a JSON file: the checkpoint directory is damaged") from None
    except (OSError, ValueError, RecursionError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise TideError(f"{path} is not valid JSON ({reason}): the checkpoint directory is damaged; "
                        "save it again with save_pretrained") from None
    if not isinstance(data, dict):
        raise TideError(f"{path} holds a JSON {type(data).__name__}, not an object of settings: the checkpoint "
                        "directory is damaged; save it again with save_pretrained")
    return data


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files tide refuses to read: loading them would unpickle (run) arbitrary code."""
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
"""The weights file diffusers saves for a model (sharded: ``WEIGHTS_NAME + .index.json`` and its shards)."""
MAX_SAFETENSORS_HEADER = 100 << 20
"""Largest safetensors header tide reads (the format's own limit)."""


def _component_entry(index: dict, name: str, path: Path) -> str | None:
    """The class a pipeline's ``model_index.json`` gives a component (``["diffusers", "Class"]``), None when it
    lists none (absent or ``[null, null]``)."""
    entry = index.get(name)
    if entry is None or (isinstance(entry, (list, tuple)) and all(e is None for e in entry)):
        return None
    if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], str)
            or not (entry[0] is None or isinstance(entry[0], str))):
        raise TideError(f"{path}/model_index.json gives {name} as {entry!r}, not [library, class] (e.g. "
                        "[\"diffusers\", \"DiTTransformer2DModel\"]): the pipeline index is damaged")
    return entry[1]


def _component_dir(path: Path, name: str, class_name: str) -> Path:
    """The folder of a component the pipeline index lists, refused in one line when it is not there."""
    directory = path / name
    if not directory.is_dir():
        raise TideError(f"{path}/model_index.json lists a {name} ({class_name}) but {directory} is "
                        f"{'a file' if directory.exists() else 'missing'}: the pipeline directory is incomplete "
                        f"(tide loads local files only and never downloads); copy the whole pipeline, {name}/ included")
    return directory


def check_safetensors(file: Path) -> None:
    """Refuse, in one line, a safetensors file that is empty, truncated or not safetensors at all; reads only its
    header (the tensors are checked by the loader)."""
    damaged = (": the weights are damaged or truncated; save them again with "
               "save_pretrained(..., safe_serialization=True)")
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, MAX_SAFETENSORS_HEADER):
                reason = "empty" if size == 0 else f"{size} bytes, no valid safetensors header"
                raise TideError(f"{file} is not a safetensors file ({reason}){damaged}")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise TideError(f"cannot read {file} ({exc.strerror or exc}): check its permissions") from None
    except (ValueError, RecursionError):
        raise TideError(f"{file} is not a safetensors file (its header is not JSON){damaged}") from None
    if not isinstance(header, dict):
        raise TideError(f"{file} is not a safetensors file (its header is not a JSON object){damaged}")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise TideError(f"{file} is not a safetensors file (its header lists no tensor offsets){damaged}") from None
    if 8 + n + end > size:
        raise TideError(f"{file} is truncated ({size} bytes; its header needs {8 + n + end}){damaged}")


def check_weights(directory: Path, what: str) -> None:
    """Refuse, in one line, a model folder without readable safetensors weights: pickled weights (never loaded),
    none at all, a damaged index of shards, or a damaged file."""
    single, index = directory / WEIGHTS_NAME, directory / (WEIGHTS_NAME + ".index.json")
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
            raise TideError(f"{index} has no weight_map of tensor names to shard files: the {what} weights are "
                            "damaged; save them again with save_pretrained")
        names = sorted(set(weight_map.values()))
        if any(Path(name).name != name or name in ("", ".", "..") for name in names):
            raise TideError(f"{index} names shard files outside {directory}: the {what} weights index is damaged; "
                            "save them again with save_pretrained")
        files = [directory / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise TideError(f"{directory}: the {what} weight shard(s) {missing[:3]} listed in {index.name} are missing; "
                            "copy the complete checkpoint")
    else:
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        pickled = [name for name in present if name.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise TideError(f"{directory}: the {what} weights are pickled ({', '.join(pickled[:3])}) and tide never "
                            "unpickles: convert them to safetensors (save_pretrained(..., safe_serialization=True))")
        found = ", ".join(present[:5]) or "nothing"
        raise TideError(f"{directory} holds no {what} weights ({WEIGHTS_NAME}; found: {found}): the checkpoint is "
                        "incomplete (tide reads local files only; nothing is downloaded): copy the complete checkpoint "
                        "or save it with save_pretrained(..., safe_serialization=True)")
    for file in files:
        check_safetensors(file)


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' warnings and log lines silenced while it loads (tide reports a failure in one line itself)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlogging.set_verbosity(level)


def _from_pretrained(cls, path: Path, what: str, **kwargs):
    """``cls.from_pretrained`` on a local directory only: no hub, safetensors weights only (nothing is unpickled).
    Its config and weights are checked first, so a damaged folder is named in one line."""
    if not path.is_dir():
        raise TideError(f"{path} is missing: the {what} folder of the checkpoint is needed (tide loads local files "
                        "only and never downloads)")
    _read_json(path / getattr(cls, "config_name", None) or "config.json")
    if kwargs.get("use_safetensors"):
        check_weights(path, what)
    try:
        with _quiet_diffusers():
            return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as exc:  # diffusers raises many types for a checkpoint it cannot read; none is a tide bug
        text = " ".join(str(exc).split())
        if not text or "huggingface.co" in text:
            text = type(exc).__name__
        raise TideError(f"{path}: cannot load the {what} from this local directory ({text[:300]}); it needs its "
                        "config and safetensors weights, as save_pretrained writes them (nothing is downloaded)") from None


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
    device = resolve_device(device)  # a bad --device is refused before anything is read
    path = resolve_backbone_path(spec)
    meta: dict = {"name": str(spec) if str(spec) in EMBEDDED else path.name, "path": str(path)}
    if (path / TIDE_META).exists():
        meta.update(_read_json(path / TIDE_META))
        _check_meta(meta, path / TIDE_META)

    scheduler = vae = None
    if (path / "model_index.json").exists():
        index = _read_json(path / "model_index.json")
        if not isinstance(index.get("_class_name"), str) or not index["_class_name"]:
            raise TideError(f"{path}/model_index.json has no _class_name: it is not a diffusers pipeline index; "
                            "save the pipeline with save_pretrained, or pass its transformer/ folder instead")
        meta["pipeline_index"] = index  # pipeline-level settings (e.g. Wan's expand_timesteps) for the adapter
        transformer_class = _component_entry(index, "transformer", path)
        if transformer_class is None:
            raise TideError(f"{path}/model_index.json lists no transformer: tide needs a transformer-based "
                            f"pipeline (supported transformer classes: {_supported()})")
        scheduler_class = _component_entry(index, "scheduler", path)
        vae_class = _component_entry(index, "vae", path)
        cls = _transformer_family(path / "transformer" / "config.json", transformer_class, path)  # supported at all?
        _component_dir(path, "transformer", transformer_class)
        # every component is checked before the first is loaded: a damaged one costs no model load
        scheduler_cls = vae_cls = None
        if scheduler_class is not None:
            scheduler_cls = _diffusers_class(scheduler_class, "scheduler", path)
            _read_json(_component_dir(path, "scheduler", scheduler_class) / scheduler_cls.config_name)
        if vae_class is not None:
            vae_cls = _diffusers_class(vae_class, "VAE", path)
            check_weights(_component_dir(path, "vae", vae_class), "VAE")
        check_weights(path / "transformer", "transformer")
        transformer = _from_pretrained(cls.transformer_class, path / "transformer", "transformer",
                                       torch_dtype=dtype, use_safetensors=True)
        if scheduler_cls is not None:
            scheduler = _from_pretrained(scheduler_cls, path / "scheduler", "scheduler")
        if vae_cls is not None:
            vae = _from_pretrained(vae_cls, path / "vae", "VAE", torch_dtype=dtype, use_safetensors=True)
        if "id2label" in index and "class_names" not in meta:
            meta["class_names"] = _labels(index["id2label"], path)
    elif (path / "config.json").exists():
        config = _read_json(path / "config.json")
        class_name = config.get("_class_name")
        if not isinstance(class_name, str) or not class_name:
            raise TideError(f"{path}/config.json has no _class_name: it is not a diffusers model config; save the "
                            "transformer with save_pretrained")
        cls = _transformer_family(path / "config.json", class_name, path)
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
    return backbone.to(device)


def _check_meta(meta: dict, where: Path) -> None:
    """Refuse tide.json settings of the wrong type in one line (they are read long after loading)."""
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise TideError(f"{where}: class_names must be a list of names, got {type(names).__name__}: fix tide.json")
    for key in ("guidance_scale", "pixel_scale"):
        if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], (int, float))):
            raise TideError(f"{where}: {key} must be a number, got {meta[key]!r}: fix tide.json")


def _labels(labels, path: Path) -> list[str]:
    """Class names from a pipeline index's ``id2label`` (a mapping "0" -> name, or a list)."""
    try:
        names = [labels[str(i)] if isinstance(labels, dict) else labels[i] for i in range(len(labels))]
    except (KeyError, IndexError, TypeError):
        names = None
    if not isinstance(labels, (dict, list)) or names is None or not all(isinstance(n, str) for n in names):
        raise TideError(f"{path}/model_index.json: id2label must map every class id 0..N-1 to a name: "
                        "the pipeline index is damaged")
    return names


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
