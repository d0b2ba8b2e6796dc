"""Captured activation datasets: open and verify them (``ActivationStore``), summarise them
(``info``, per-timestep ``stats``) and stream shuffled, filtered batches (``ActivationLoader``)."""

from tide.data.loader import ActivationLoader, Batch, LoaderConfig
from tide.data.store import ActivationStore, ShardInfo, TimestepStats, VerifyReport

__all__ = ["ActivationLoader", "ActivationStore", "Batch", "LoaderConfig", "ShardInfo", "TimestepStats",
           "VerifyReport"]
