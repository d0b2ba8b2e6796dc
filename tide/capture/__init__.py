"""Capture: record a backbone's activations at every denoising step into HDF5 shards (docs/FORMAT.md).

``tide.capture.schema`` (the format's names and atomic-write helpers) imports nothing heavy, so the
data layer can use it without loading models; the capture run is imported on first use.
"""

__all__ = ["CaptureConfig", "CaptureResult", "capture", "parse_record_steps"]


def __getattr__(name):
    if name in __all__:
        from tide.capture import run

        return getattr(run, name)
    raise AttributeError(f"module 'tide.capture' has no attribute {name!r}")
