"""SAE configuration: one dataclass, saved beside the weights as cfg.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SPARSITIES = ("topk", "batchtopk", "relu", "jumprelu")
CONDITIONINGS = ("none", "tide", "bucket")
TARGETS = ("activation", "update")
NORMALIZATIONS = ("none", "global", "per_timestep", "per_dimension", "per_timestep_dimension")


@dataclass
class SAEConfig:
    """Architecture of a (timestep-conditioned) sparse autoencoder."""

    d_in: int = 128
    """Width of the activations (the hook's d_model)."""
    d_sae: int = 4096
    """Dictionary size (number of latents)."""
    sparsity: str = "topk"
    """topk | batchtopk (top k*batch over the batch; a learned threshold at inference) | relu (ReLU + L1) | jumprelu."""
    k: int = 32
    """Active latents per row for topk / batchtopk."""
    l1_coefficient: float = 5.0
    """relu: weight of the L1 penalty sum_i |z_i| * ||W_dec_i|| (on normalised inputs)."""
    l0_coefficient: float = 1e-3
    """jumprelu: weight of the L0 penalty (straight-through estimator)."""
    jumprelu_init_threshold: float = 0.001
    """jumprelu: initial threshold of every latent."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: width of the rectangle kernel of the straight-through gradient."""
    conditioning: str = "none"
    """none (plain SAE) | tide (timestep modulates input and output, adaLN-Zero style) | bucket (one SAE per timestep range)."""
    num_buckets: int = 4
    """bucket: number of equal timestep ranges over [0, t_max]."""
    t_max: float = 1000.0
    """Largest timestep value (DDPM: 1000; flow matching: 1000)."""
    t_embed_dim: int = 64
    """tide: sinusoidal timestep-embedding width."""
    t_hidden: int = 128
    """tide: hidden width of the modulation MLP."""
    normalization: str = "global"
    """none | global (dataset mean and one scale) | per_timestep (mean and scale at each recorded timestep) |
    per_dimension (dataset mean, each dimension scaled to unit variance) | per_timestep_dimension (both)."""
    hook: str = ""
    """Hook the SAE reads (provenance; checked against the data and at splice time)."""
    target: str = "activation"
    """activation (the hook's activation) | update (at a resid_post hook: the block's update, resid_post - resid_pre of
    the same block; spliced in, resid_pre + the reconstruction replaces resid_post). Training data needs both hooks."""
    backbone: str = ""
    """Backbone name the activations came from (provenance)."""
    prompts: str = ""
    """Prompts the activations were captured with, as the capture was given them (a prompt-embedding file, or
    text for a backbone with a vocabulary); empty = the checkpoint's own. Provenance; `tide steer` reuses it so
    condition ids keep their meaning."""

    @property
    def base_hook(self) -> str | None:
        """For an update target, the hook whose activation the update is taken from (the block's resid_pre)."""
        return update_base_hook(self.hook) if self.target == "update" else None

    @property
    def input_hooks(self) -> list[str]:
        """The hooks the SAE's input is computed from (one, or the block's input and output for an update target)."""
        return [self.hook] if self.target != "update" else [self.base_hook, self.hook]

    def rows(self, acts: dict) -> "torch.Tensor":
        """The SAE's input rows from aligned activations of its ``input_hooks``: ``acts[hook]``, or for an update
        target ``acts[hook] - acts[base_hook]``."""
        from tide.errors import TideError

        missing = [h for h in self.input_hooks if h not in acts]
        if missing:
            raise TideError(f"the activations hold {sorted(acts)}, not {missing} that the SAE on {self.hook!r} "
                            f"(target {self.target}) reads")
        x = acts[self.hook]
        return x - acts[self.base_hook] if self.target == "update" else x

    def validate(self) -> "SAEConfig":
        from tide.errors import TideError

        if self.target not in TARGETS:
            raise TideError(f"SAE target {self.target!r} is not one of {list(TARGETS)}")
        if self.target == "update" and self.hook:
            update_base_hook(self.hook)
        for name, value, allowed in (("sparsity", self.sparsity, SPARSITIES), ("conditioning", self.conditioning, CONDITIONINGS),
                                     ("normalization", self.normalization, NORMALIZATIONS)):
            if value not in allowed:
                raise TideError(f"SAE {name} {value!r} is not one of {list(allowed)}")
        if self.d_in < 1 or self.d_sae < 1:
            raise TideError(f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")
        if self.sparsity in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise TideError(f"k must lie in 1..d_sae={self.d_sae}, got {self.k}")
        if self.conditioning == "bucket" and self.num_buckets < 1:
            raise TideError("num_buckets must be >= 1")
        return self


def update_base_hook(hook: str) -> str:
    """``blocks.N.hook_resid_post`` -> ``blocks.N.hook_resid_pre`` (and the joint blocks' ``hook_img_*``)."""
    from tide.errors import TideError

    for post, pre in (("hook_img_resid_post", "hook_img_resid_pre"), ("hook_resid_post", "hook_resid_pre")):
        if hook.endswith("." + post):
            return hook[: -len(post)] + pre
    raise TideError(f"an update target needs a block's resid_post hook (the update is resid_post - resid_pre), "
                    f"not {hook!r}")
