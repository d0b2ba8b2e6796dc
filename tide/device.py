"""Where and how modules run: device selection (the GPU when one is present, else the CPU) and a
temporary switch into eval mode."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

from tide.errors import TideError

DEVICE_FORMS = "cpu, cuda, cuda:N (N a GPU index) or auto (the GPU when one is present)"
"""The device names tide accepts, as the messages name them."""
_DEVICE = re.compile(r"(cpu|auto|cuda(?::(\d+))?)")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; ``cpu``, ``cuda`` or ``cuda:N`` checked against the GPUs
    visible; anything else refused in one line naming the accepted forms."""
    if isinstance(name, torch.device):
        if name.type == "cpu":
            return name
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    match = _DEVICE.fullmatch(text)
    if match is None:
        raise TideError(f"unknown device {str(name)!r}: use {DEVICE_FORMS}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TideError(f"device {str(name)!r} requested but no CUDA GPU is visible: use --device cpu (or auto)")
    if match.group(2) is not None:
        index, count = int(match.group(2)), torch.cuda.device_count()
        if index >= count:
            raise TideError(f"device {str(name)!r} requested but only {count} CUDA GPU(s) are visible "
                            f"(cuda:0..cuda:{count - 1}): choose one of those, or --device cpu")
    return torch.device(text)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode for the block, its previous mode restored afterwards (also on error)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
