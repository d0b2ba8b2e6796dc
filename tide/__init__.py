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

# tide never reaches the network: models load from local directories only. The Hugging Face libraries read these
# switches once, at import (huggingface_hub.constants.HF_HUB_OFFLINE, which diffusers and transformers consult, reads
# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE; datasets reads HF_DATASETS_OFFLINE), so they are forced here, before tide
# imports any of them, and whatever a user set is overridden. diffusers has no offline switch of its own; it
# follows huggingface_hub's, and tide also passes local_files_only=True to every from_pretrained (tide.models).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "DIFFUSERS_DISABLE_REMOTE_CODE": "1"}
"""Environment variables tide forces on import so that no Hugging Face library opens a connection."""
os.environ.update(OFFLINE_ENV)


def _force_offline() -> None:
    """Offline mode for a huggingface_hub imported before tide (e.g. by a notebook): its HTTP layer checks
    ``constants.HF_HUB_OFFLINE`` on every request."""
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
        constants.HF_HUB_DISABLE_TELEMETRY = True


_force_offline()

from tide.errors import TideError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["TideError", "__version__"]
