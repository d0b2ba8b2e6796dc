"""Capture: record a backbone's activations at every denoising step into HDF5 shards (docs/FORMAT.md).

``tide.capture.schema`` (the format's names, constants and shard record) imports nothing heavy, so the
data layer reads it without loading models. The capture run (torch, diffusers, transformer_lens: about
7 s more on a 2-core CPU) is imported on first use of the names below.
"""

_LAZY = {"CaptureConfig": "run", "CaptureResult": "run", "capture": "run", "parse_record_steps": "run"}

__all__ = [*_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tide.capture.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tide.capture' has no attribute {name!r}")
