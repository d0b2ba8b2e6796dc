"""Captured activation datasets: open and verify them (``ActivationStore``), summarise them
(``info``, per-timestep ``stats``), stream shuffled, filtered batches (``ActivationLoader``) and
map a row's ``token`` to its (frame,) row and column (``token_coords``)."""

from tide.data.coords import coords_token, token_coords
from tide.data.loader import ActivationLoader, Batch, LoaderConfig
from tide.data.stats import TimestepStats
from tide.data.store import ActivationStore, ShardInfo
from tide.data.verify import VerifyReport

__all__ = ["ActivationLoader", "ActivationStore", "Batch", "LoaderConfig", "ShardInfo", "TimestepStats",
           "VerifyReport", "coords_token", "token_coords"]
