"""TIDE: interpret diffusion transformers with timestep-aware sparse autoencoders.

Data flows one way through the package:
``models`` (backbones) -> ``hooks`` -> ``sampling`` -> ``capture`` -> ``data`` -> ``sae`` -> ``train``
-> ``eval`` -> ``analysis``; ``cli`` and ``config`` sit on top.
"""

import os

# OpenMP threads that wait at the end of a parallel region sleep instead of spinning. Alike on an idle machine;
# on a busy one a spinning thread takes the core its peer needs, and a 2-thread SAE training step ran 1.2x
# (1.4x with AuxK) slower (experiments/bench/README.md). Read once, when torch loads its OpenMP runtime: it
# applies when tide is imported first (the `tide` command always is); an explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tide.errors import TideError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["TideError", "__version__"]
