"""Backbone families by name and by diffusers transformer class."""

from __future__ import annotations

from pathlib import Path

from tide.errors import TideError
from tide.models.base import Backbone
from tide.models.dit import DiTBackbone
from tide.models.flux import FluxBackbone
from tide.models.pixart import PixArtBackbone
from tide.models.qwenimage import QwenImageBackbone
from tide.models.sana import SanaBackbone
from tide.models.sd3 import SD3Backbone
from tide.models.wan import WanBackbone

FAMILIES: dict[str, type[Backbone]] = {
    cls.family: cls for cls in (DiTBackbone, PixArtBackbone, SanaBackbone, SD3Backbone, FluxBackbone, WanBackbone,
                                QwenImageBackbone)}
"""Backbone adapters by family name."""


def family_for_class(class_name: str, where: Path | str = "") -> type[Backbone]:
    """The adapter for a diffusers transformer class name, or a clear error naming the supported ones."""
    for cls in FAMILIES.values():
        if cls.transformer_class.__name__ == class_name:
            return cls
    supported = ", ".join(f"{c.transformer_class.__name__} ({f})" for f, c in FAMILIES.items())
    raise TideError(f"{where}: unsupported model class {class_name!r}; tide supports {supported}")


def get_family(name: str) -> type[Backbone]:
    if name not in FAMILIES:
        raise TideError(f"unknown backbone family {name!r}: choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]
