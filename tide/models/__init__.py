"""Backbones: one adapter per diffusers transformer family, and the embedded model zoo."""

from tide.models.base import NULL_CONDITION, Backbone, BlockSpec, PromptBank
from tide.models.loading import DEFAULT_BACKBONE, EMBEDDED, BackboneConfig, load_backbone
from tide.models.registry import FAMILIES, family_for_class, get_family

__all__ = ["NULL_CONDITION", "Backbone", "BlockSpec", "PromptBank", "DEFAULT_BACKBONE", "EMBEDDED", "BackboneConfig",
           "load_backbone", "FAMILIES", "family_for_class", "get_family"]
