"""Sparse autoencoders over (activation, timestep) rows: TopK / BatchTopK / ReLU-L1 / JumpReLU sparsity,
plain, TIDE-modulated or per-bucket timestep conditioning, exact folding, safetensors I/O, and export of the
folded per-timestep SAEs for SAELens and sparsify."""

from tide.sae.config import SAEConfig
from tide.sae.io import export_folded, load_folded, load_sae, save_sae
from tide.sae.model import SAE, ForwardOutput
from tide.sae.sparsity import Latents
from tide.sae.export import ExportConfig, export_saelens, export_sparsify

__all__ = ["SAEConfig", "SAE", "ForwardOutput", "Latents", "save_sae", "load_sae", "export_folded", "load_folded",
           "export_saelens", "export_sparsify", "ExportConfig"]
