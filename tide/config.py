"""Config dataclasses <-> YAML <-> command-line flags.

Every stage is driven by a dataclass whose fields carry a docstring (a string literal right after
the field). The same dataclass is the Python API's argument, the YAML schema under ``configs/``
and the CLI's flags: ``--num-steps 50`` sets ``num_steps``; ``--config file.yaml`` loads a YAML
file first and flags override it. Unknown YAML keys are refused with the valid ones listed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tide.errors import TideError

T = TypeVar("T")


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (and its dataclass bases), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


_EXAMPLES = {int: "a whole number (e.g. 4)", float: "a number (e.g. 0.5)", bool: "true or false"}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise TideError(f"config field {name!r} may not be empty")
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if inner in (int, float, str):
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return inner(value)
        if origin in (list, tuple):
            (elem, *_) = typing.get_args(inner) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            out = [_coerce(v, elem, name) for v in value]
            return tuple(out) if origin is tuple else out
        if dataclasses.is_dataclass(inner):
            return from_dict(inner, value)
        if origin is typing.Literal:
            choices = typing.get_args(inner)
            if value not in choices:
                raise TideError(f"config field {name!r} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            return value
    except (TypeError, ValueError):
        raise TideError(f"config field {name!r}: cannot read {value!r} as {getattr(inner, '__name__', inner)}: "
                        f"give {_EXAMPLES.get(inner, 'a value of that type')}") from None
    return value


def from_dict(cls: type[T], data: dict | None) -> T:
    """Build a config dataclass from a mapping, refusing unknown keys with the valid ones listed."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TideError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = _resolved_types(cls)
    return cls(**{k: _coerce(v, hints[k], k) for k, v in data.items()})


def to_dict(config: Any) -> dict:
    """A YAML/JSON-able dict of a config dataclass."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(config)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> TideError:
    """PyYAML's several-line report as one line: file:line:column, the problem, and where to fix it."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and context != problem:
        problem = f"{problem} ({context})"
    return TideError(f"{where}: not valid YAML: {' '.join(str(problem).split())}; fix the file there")


def load_yaml(cls: type[T], path: str | Path) -> T:
    """A config dataclass from a YAML mapping of its field names; every problem is one line naming the file."""
    import difflib

    path = Path(path)
    if path.is_dir():
        raise TideError(f"config file {path} is a directory: pass a YAML file to --config")
    if not path.is_file():
        raise TideError(f"config file {path} does not exist: check the path given to --config")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TideError(f"cannot read config file {path} ({getattr(exc, 'strerror', None) or exc}): "
                        "pass a readable UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise TideError(f"config file {path} must hold a mapping of keys to values (`key: value` lines), "
                        f"not a {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        near = [difflib.get_close_matches(str(k).replace("-", "_"), names, n=1, cutoff=0.75) for k in unknown]
        hints = "; ".join(f"did you mean {m[0]!r} for {k!r}?" for k, m in zip(unknown, near) if m)
        raise TideError(f"config file {path}: unknown key{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(k) for k in unknown)}{f' ({hints})' if hints else ''}; "
                        f"valid keys: {', '.join(names)}")
    try:
        return from_dict(cls, data)
    except TideError as exc:
        raise TideError(f"config file {path}: {exc}") from None


def save_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field, help from the field docstring; defaults stay unset so YAML can fill them."""
    docs = field_docs(cls)
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        inner, _ = _base_type(hints[f.name])
        if typing.get_origin(inner) in (list, tuple) and any(dataclasses.is_dataclass(a) for a in typing.get_args(inner)):
            continue  # nested records (e.g. the SAEs of a training run) come from YAML only
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if inner is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            metavar = "A,B,..." if typing.get_origin(inner) in (list, tuple) else f.name.upper()
            parser.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=help_)


def from_args(cls: type[T], args: argparse.Namespace, yaml_path: str | Path | None = None) -> T:
    """YAML file (if any) first, then every flag the user gave."""
    data: dict = {}
    if yaml_path:
        data.update(dataclasses.asdict(load_yaml(cls, yaml_path)))
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    return from_dict(cls, data)


# ------------------------------------------------------------------------------------ shared parts of stage configs
DEFAULT_BACKBONE = "fmnist-pixart"
"""The backbone a stage runs when none is named: the embedded model."""
ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED = {"fmnist-dit": ASSETS / "fmnist-dit", "fmnist-pixart": ASSETS / "fmnist-pixart"}
"""Embedded models that ship inside the package, by name: ``fmnist-dit`` (class-conditional, DiT-XL/2-like:
the class enters every block through adaLN) and ``fmnist-pixart`` (PixArt-like: prompts over a small
vocabulary enter through cross-attention, adaLN-single carries the timestep)."""
TRAINING_SCRIPTS = {"fmnist-dit": "experiments/train_embedded.py", "fmnist-pixart": "experiments/train_fmnist_pixart.py"}


def resolve_backbone_path(spec: str | Path) -> Path:
    """The directory behind an embedded name or a path, with a clear error when there is none."""
    if str(spec) in EMBEDDED:
        path = EMBEDDED[str(spec)]
        if not (path / "model_index.json").exists():
            raise TideError(f"embedded model {spec!r} is missing its weights at {path}: "
                            f"reinstall tide or run {TRAINING_SCRIPTS.get(str(spec), 'its training script')}")
        return path
    if not str(spec).strip():
        raise TideError(f"no backbone named (an empty --backbone): give an embedded model ({', '.join(sorted(EMBEDDED))}) "
                        "or the path of a local diffusers pipeline or transformer directory")
    path = Path(spec).expanduser()
    if not path.exists():
        raise TideError(f"no embedded model or checkpoint directory named {str(spec)!r} was found locally, and tide "
                        f"never downloads models: give an embedded model ({', '.join(sorted(EMBEDDED))}) or the path "
                        "of a local diffusers pipeline directory (with model_index.json) or transformer directory "
                        "(with config.json)")
    if not path.is_dir():
        raise TideError(f"{path} is a file: pass the checkpoint *directory* (with model_index.json "
                        "or config.json)")
    return path


@dataclass
class BackboneConfig:
    """The backbone part every stage that loads a model shares: which model, and where it runs."""

    backbone: str = DEFAULT_BACKBONE
    """Embedded model name (fmnist-dit, fmnist-pixart) or path to a local diffusers pipeline/transformer directory."""
    prompts: str | None = None
    """Prompts of a text-conditioned family, condition i being the i-th: a prompt-embedding file (safetensors,
    `prompt_embeds` ...), or, for a backbone with a vocabulary text encoder (fmnist-pixart), the prompts as
    text separated by `;` (e.g. `dark trouser; light bag`). Default: the checkpoint's own prompt_embeds.safetensors."""
    device: str = "auto"
    """cpu, cuda[:N], or auto (the GPU when one is present)."""
    dtype: str = "float32"
    """Weight dtype of the backbone: float32, bfloat16 or float16 (bfloat16 halves the memory of large models)."""

    def load_backbone(self):
        """The backbone these fields name (:func:`tide.models.load_backbone`); a name that is neither an
        embedded model nor a directory is refused before torch and diffusers are imported."""
        resolve_backbone_path(self.backbone)
        from tide.models.loading import load_backbone

        return load_backbone(self.backbone, prompts=self.prompts, device=self.device, dtype=self.dtype)


@dataclass
class GenerationConfig:
    """The generation part every generating stage shares (sample, capture, steer, eval, demo): how many
    denoising steps, which guidance, and the seed of the first sample (sample ``i`` uses ``seed + i``)."""

    num_steps: int = 50
    """Denoising steps of the scheduler."""
    guidance_scale: float | None = None
    """Guidance scale; None = the model's default (tide.json's, else its diffusers pipeline's: DiT 4, PixArt 4.5,
    SD3 7, FLUX.1-dev 3.5 embedded, FLUX.1-schnell 1). 1.0 runs the conditional model alone (no null-condition
    half); guidance-distilled FLUX takes the scale as a model input instead."""
    seed: int = 0
    """Seed of the first sample; sample i uses seed + i."""
