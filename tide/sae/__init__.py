"""Sparse autoencoders over (activation, timestep) rows: TopK / BatchTopK / ReLU-L1 / JumpReLU sparsity,
plain, TIDE-modulated or per-bucket timestep conditioning, exact folding, safetensors I/O."""

from tide.sae.config import SAEConfig
from tide.sae.io import export_folded, load_folded, load_sae, save_sae
from tide.sae.model import SAE, ForwardOutput
from tide.sae.sparsity import Latents

__all__ = ["SAEConfig", "SAE", "ForwardOutput", "Latents", "save_sae", "load_sae", "export_folded", "load_folded"]
