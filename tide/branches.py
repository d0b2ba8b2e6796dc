"""Classifier-free guidance branches: which half of a CFG batch a row belongs to, and the one way a
config names the rows it wants (``cond``, ``uncond`` or ``both``)."""

from __future__ import annotations

from typing import Literal

from tide.errors import TideError

COND, UNCOND = 0, 1
"""Branch label of a batch row (and of a captured row's ``cfg_branch`` column): conditional or
unconditional (null-condition) half."""
BRANCHES: dict[str, int] = {"cond": COND, "uncond": UNCOND}
"""Branch name -> label."""
CfgBranch = Literal["cond", "uncond", "both"]
"""The rows a stage works on: one branch, or both."""


def check_branch(value: str, field: str = "cfg_branch") -> str:
    """``value`` if it names a branch or ``both``; else a TideError naming the choices."""
    if value not in ("both", *BRANCHES):
        raise TideError(f"{field} must be 'cond', 'uncond' or 'both', got {value!r}")
    return value
