"""Device selection: the GPU when one is present, else the CPU."""

from __future__ import annotations

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
