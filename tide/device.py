"""Where and how modules run: device selection (the GPU when one is present, else the CPU) and a
temporary switch into eval mode."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from tide.errors import TideError


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; otherwise the named device, checked."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TideError(f"device {name!r} requested but no CUDA GPU is visible: use --device cpu")
    return device


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode for the block, its previous mode restored afterwards (also on error)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
