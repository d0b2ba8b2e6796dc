"""``Backbone.reader_modulation``: the (scale, shift) it returns are those the real diffusers block applies."""

from __future__ import annotations

import pytest
import torch

from tide.errors import TideError
from tide.hooks import HookedBackbone
from tide.models import load_backbone
from tide.models.base import NULL_CONDITION


def _reader_input(backbone, reader: int):
    """The module whose input is the modulated norm that reads the residual stream before block ``reader``."""
    tr = backbone.transformer
    if reader < len(tr.transformer_blocks):
        return tr.transformer_blocks[reader].attn1
    return tr.proj_out if backbone.family == "pixart" else tr.proj_out_2


@pytest.mark.parametrize("name", ["fmnist-pixart", "fmnist-dit"])
@pytest.mark.parametrize("hook,reader", [("blocks.0.hook_resid_pre", 0), ("blocks.4.hook_resid_post", 5),
                                         ("blocks.7.hook_resid_post", 8)])
def test_reader_modulation_matches_the_block_that_reads_the_hook(name, hook, reader):
    backbone = load_backbone(name, device="cpu")
    hooked = HookedBackbone.of(backbone)
    seen = {}
    module = _reader_input(backbone, reader)
    def grab(module, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    t = backbone.make_scheduler(10).timesteps[3]
    latents = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = backbone.encode_conditions(torch.tensor([NULL_CONDITION, NULL_CONDITION]))  # the null condition (DiT: null class)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(latents, t, cond, names_filter=[hook])
    handle.remove()
    x = cache[hook]
    scale, shift = backbone.reader_modulation(hook, torch.full((2,), float(t)))
    want = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(seen["x"], want, rtol=1e-4, atol=1e-4)


def test_hooks_without_a_reading_norm_are_refused():
    backbone = load_backbone("fmnist-pixart", device="cpu")
    with pytest.raises(TideError, match="not read by an adaLN norm"):
        backbone.reader_modulation("blocks.3.hook_attn_out", torch.zeros(1))
