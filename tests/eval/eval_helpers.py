"""Helpers shared by the evaluation tests: a tiny captured dataset and SAEs with known behaviour."""

from __future__ import annotations

import torch

from tide.capture import CaptureConfig, capture
from tide.sae import SAE, SAEConfig

HOOK = "blocks.1.hook_resid_post"
OTHER_HOOK = "blocks.0.hook_resid_post"
D = 16  # the tiny DiT's d_model


def capture_tiny(model, out, **overrides) -> str:
    """4 samples x 5 DDIM steps x 16 tokens of HOOK, float32 (timesteps 800, 600, 400, 200, 0).

    ``model`` is a loaded backbone, or None to load ``overrides["backbone"]`` (recorded in the manifest).
    """
    cfg = dict(out=str(out), hooks=[HOOK], num_samples=4, samples_per_shard=2, num_steps=5, storage_dtype="float32")
    cfg.update(overrides)
    capture(CaptureConfig(**cfg), model, progress=False)
    return str(out)


def identity_sae(hook: str = HOOK, d: int = D) -> SAE:
    """A TopK SAE that reconstructs exactly: W_enc = W_dec = [I; -I], k = d, no biases, no normalisation.

    pre = [x; -x]; the top d values are |x_i| (one per dimension), and decoding them gives back x.
    """
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, k=d, normalization="none", hook=hook))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye])[None])
        sae.W_dec.copy_(torch.cat([eye, -eye])[None])
    return sae


def random_sae(hook: str = HOOK, d: int = D, seed: int = 0, **cfg) -> SAE:
    torch.manual_seed(seed)
    return SAE(SAEConfig(**{"d_in": d, "d_sae": 64, "k": 4, "normalization": "none", "hook": hook, **cfg}))
