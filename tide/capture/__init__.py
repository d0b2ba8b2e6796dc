"""Capture: record a backbone's activations at every denoising step into HDF5 shards (docs/FORMAT.md)."""

from tide.capture.run import CaptureConfig, capture, parse_record_steps

__all__ = ["CaptureConfig", "capture", "parse_record_steps"]
