"""TIDE: interpret diffusion transformers with timestep-aware sparse autoencoders.

Data flows one way through the package:
``models`` (backbones) -> ``hooks`` -> ``sampling`` -> ``capture`` -> ``data`` -> ``sae`` -> ``train``
-> ``eval`` -> ``analysis``; ``cli`` and ``config`` sit on top.
"""

from tide.errors import TideError

__version__ = "0.1.0"
__all__ = ["TideError", "__version__"]
