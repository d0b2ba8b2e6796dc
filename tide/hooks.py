"""HookedBackbone: transformer_lens HookPoints on every block of a diffusers transformer.

Hook names follow TransformerLens:

* single-stream blocks (DiT, PixArt, SANA, Wan): ``blocks.{i}.hook_resid_pre`` (block input),
  ``blocks.{i}.hook_resid_post`` (block output), ``blocks.{i}.hook_attn_out`` (self-attention
  output) and ``blocks.{i}.hook_mlp_out`` (feed-forward output), where the block has the modules
  its :class:`~tide.models.base.BlockSpec` names (``attn_name``, ``mlp_name``: ``attn1``/``ff`` in
  diffusers' image blocks, ``attn1``/``ffn`` in Wan's; SANA's convolutional feed-forward has none). In adaLN blocks the attention and MLP
  outputs are taken *before* the adaLN gate multiplies them into the residual stream.
* two-stream blocks (SD3, FLUX, Qwen-Image): ``blocks.{i}.hook_img_resid_pre/post`` and
  ``blocks.{i}.hook_txt_resid_pre/post``. FLUX's single-stream blocks continue the numbering after
  the double-stream blocks and expose the same four names (diffusers splits their stream back into
  text and image parts). SD3's last block returns no text stream, so it has no ``hook_txt_resid_post``.

Activations are (batch, tokens, d_model); image tokens are patches in row-major order over the
backbone's ``patch_grid``: (row, col) for images, (frame, row, col) for video.

The diffusers model is left untouched: a HookPoint lives in a small container per block, and torch
forward hooks on the diffusers block route its input/output through them. The plain model's
``state_dict`` therefore loads unchanged.

The sampler publishes the current timestep, step index, CFG branch and sample id of every batch row
through :func:`current_step`; hook functions read it instead of counting calls.
"""

from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from tide.branches import BRANCHES, COND, UNCOND  # noqa: F401  (re-exported: the rows' labels)
from tide.errors import TideError
from tide.models.base import Backbone, BlockSpec

BRANCH_NAMES = BRANCHES
"""CFG branch name -> the label in ``StepContext.cfg_branch_B`` (see :mod:`tide.branches`)."""

SINGLE_STREAM_HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
JOINT_HOOKS = ("hook_img_resid_pre", "hook_img_resid_post", "hook_txt_resid_pre", "hook_txt_resid_post")


# ------------------------------------------------------------------------------------ step context
@dataclass(frozen=True)
class StepContext:
    """Where the sampler is: set for the duration of one denoiser call."""

    step_index: int
    """Index of the denoising step, 0 = first (noisiest)."""
    num_steps: int
    """Steps in the schedule."""
    timestep: float
    """The scheduler's timestep value at this step (DDPM-style 0..999, or flow-matching t*1000)."""
    cfg_branch_B: torch.Tensor
    """Per batch row: ``COND`` (0) or ``UNCOND`` (1)."""
    sample_ids_B: torch.Tensor
    """Per batch row: the id of the sample the row belongs to."""
    conds_B: torch.Tensor
    """Per batch row: the condition id fed to the model (-1 for the null condition)."""


_CURRENT_STEP: ContextVar[StepContext | None] = ContextVar("tide_current_step", default=None)


def current_step() -> StepContext | None:
    """The sampler's current step, or None outside a sampling loop."""
    return _CURRENT_STEP.get()


def require_step(what: str) -> StepContext:
    """The sampler's current step; outside a sampling loop, a TideError saying that ``what`` needs one."""
    ctx = _CURRENT_STEP.get()
    if ctx is None:
        raise TideError(f"{what} reads the timestep from the sampler's step context: run it inside "
                        "tide.sampling.sample (or within tide.hooks.step_context)")
    return ctx


@contextlib.contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    token = _CURRENT_STEP.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT_STEP.reset(token)


# ------------------------------------------------------------------------------------ hook names
@dataclass(frozen=True)
class HookName:
    """A parsed hook name ``blocks.{block}.{point}``, e.g. ``blocks.4.hook_img_resid_post``."""

    block: int
    """Block index in tide's numbering."""
    point: str
    """The hook point within the block, e.g. ``hook_resid_post``."""

    @property
    def text_stream(self) -> bool:
        """True for the text stream of a two-stream block (its rows are prompt tokens, not image tokens)."""
        return self.point.startswith("hook_txt_")

    @classmethod
    def parse(cls, name: str) -> "HookName":
        """Parse ``blocks.{i}.hook_...``; a malformed name is a TideError naming the expected form."""
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or not parts[2].startswith("hook_"):
            raise TideError(f"hook name {name!r} is not of the form blocks.<index>.hook_<point> "
                            "(`tide hooks --backbone ...` lists the valid names)")
        return cls(int(parts[1]), parts[2])


def is_text_hook(name: str) -> bool:
    """Whether ``name`` hooks the text stream of a two-stream (MMDiT) block."""
    return HookName.parse(name).text_stream


# ------------------------------------------------------------------------------------ hooked model
def _submodule(block: nn.Module, name: str | None) -> nn.Module | None:
    """The block's child module ``name`` (its ``BlockSpec.attn_name`` / ``mlp_name``), or None."""
    if name is None:
        return None
    module = getattr(block, name, None)
    return module if isinstance(module, nn.Module) else None


class BlockHooks(nn.Module):
    """The HookPoints of one block."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        for name in names:
            setattr(self, name, HookPoint())




class HookedBackbone(HookedRootModule):
    """A backbone with TransformerLens hook points; ``forward`` runs one denoiser call.

    ``forward(latents_BCHW, t, cond)`` takes the latents, the scheduler timestep and the
    conditioning dict from ``backbone.encode_conditions``; ``run_with_cache`` / ``run_with_hooks``
    work as in TransformerLens, with hook names checked first.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.block_specs: list[BlockSpec] = backbone.blocks()
        self.blocks = nn.ModuleList()
        self._handles = []
        for spec in self.block_specs:
            if spec.joint:
                names = list(JOINT_HOOKS)
                if getattr(spec.module, "context_pre_only", False):
                    # SD3's last joint block reads the text stream but returns none: no text output to hook
                    names.remove("hook_txt_resid_post")
            else:
                names = ["hook_resid_pre", "hook_resid_post"]
                if _submodule(spec.module, spec.attn_name) is not None:
                    names.append("hook_attn_out")
                if _submodule(spec.module, spec.mlp_name) is not None:
                    names.append("hook_mlp_out")
            hooks = BlockHooks(names)
            self.blocks.append(hooks)
            self._attach(spec, hooks)
        self.setup()

    # The hook points are the only modules TransformerLens needs to know; leaving the diffusers
    # modules out of setup() keeps their attributes untouched.
    def setup(self):
        self.mod_dict, self.hook_dict = {}, {}
        for name, module in self.blocks.named_modules(prefix="blocks"):
            if isinstance(module, HookPoint):
                module.name = name
                self.mod_dict[name] = module
                self.hook_dict[name] = module

    @classmethod
    def of(cls, backbone: Backbone) -> "HookedBackbone":
        """The backbone's hooked view, created once (hooks are attached to the blocks only once)."""
        if isinstance(backbone, HookedBackbone):
            return backbone
        hooked = backbone.__dict__.get("_tide_hooked")
        if hooked is None:
            hooked = cls(backbone)
            backbone.__dict__["_tide_hooked"] = hooked  # plain attribute: not a registered submodule
        return hooked

    def _attach(self, spec: BlockSpec, hooks: BlockHooks) -> None:
        block = spec.module
        # bind the call's arguments by name, whether diffusers passes them by position or keyword
        signature = inspect.signature(block.forward)
        if spec.joint:
            def pre(module, args, kwargs):
                bound = signature.bind(*args, **kwargs)
                bound.arguments["hidden_states"] = hooks.hook_img_resid_pre(bound.arguments["hidden_states"])
                txt = bound.arguments.get("encoder_hidden_states")
                if txt is not None:
                    bound.arguments["encoder_hidden_states"] = hooks.hook_txt_resid_pre(txt)
                return bound.args, bound.kwargs

            def post(module, args, kwargs, output):
                txt, img = output
                if txt is not None:
                    txt = hooks.hook_txt_resid_post(txt)
                return txt, hooks.hook_img_resid_post(img)
        else:
            def pre(module, args, kwargs):
                bound = signature.bind(*args, **kwargs)
                bound.arguments["hidden_states"] = hooks.hook_resid_pre(bound.arguments["hidden_states"])
                return bound.args, bound.kwargs

            def post(module, args, kwargs, output):
                return hooks.hook_resid_post(output)

            if hasattr(hooks, "hook_attn_out"):
                self._handles.append(_submodule(block, spec.attn_name).register_forward_hook(
                    lambda m, a, out: hooks.hook_attn_out(out)))
            if hasattr(hooks, "hook_mlp_out"):
                self._handles.append(_submodule(block, spec.mlp_name).register_forward_hook(
                    lambda m, a, out: hooks.hook_mlp_out(out)))
        self._handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(block.register_forward_hook(post, with_kwargs=True))

    def detach(self) -> None:
        """Remove the routing hooks from the diffusers blocks (the backbone runs plain again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.backbone.__dict__.pop("_tide_hooked", None)

    # ------------------------------------------------------------------------------ forward
    def forward(self, latents_BCHW: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone.denoise(latents_BCHW, t, cond)

    # ------------------------------------------------------------------------------ names
    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def describe_hook_names(self) -> str:
        """A compact listing of the valid names, e.g. ``blocks.{0..7}.hook_resid_post``."""
        n = len(self.block_specs)
        suffixes: dict[str, list[int]] = {}
        for name in self.hook_dict:
            parsed = HookName.parse(name)
            suffixes.setdefault(parsed.point, []).append(parsed.block)
        parts = []
        for suffix, idx in suffixes.items():
            span = f"{{0..{n - 1}}}" if idx == list(range(n)) else "{" + ",".join(map(str, idx)) + "}"
            parts.append(f"blocks.{span}.{suffix}")
        return ", ".join(parts)

    def check_hook_names(self, names: Iterable[str]) -> None:
        """Raise a TideError naming the unknown hooks and listing the valid ones."""
        unknown = [n for n in names if isinstance(n, str) and n not in self.hook_dict]
        if unknown:
            raise TideError(f"unknown hook name(s) {unknown} for the {self.backbone.family} backbone "
                            f"'{self.backbone.name}'; valid hooks: {self.describe_hook_names()} "
                            "(`tide hooks --backbone ...` lists them with shapes)")

    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False):
        self.check_hook_names([name for name, _ in list(fwd_hooks) + list(bwd_hooks)])
        return super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts)

    def run_with_cache(self, *model_args, names_filter=None, **kwargs):
        if isinstance(names_filter, str):
            self.check_hook_names([names_filter])
        elif isinstance(names_filter, (list, tuple)):
            self.check_hook_names(names_filter)
        return super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)

    def hook_shapes(self) -> dict[str, tuple]:
        """Per-row activation shape (tokens, d_model) at every hook, from one real forward pass."""
        b = self.backbone
        latents = torch.zeros(1, *b.latent_shape(), device=b.device, dtype=b.dtype)
        t = b.make_scheduler(2).timesteps[0]
        conds = torch.tensor([0 if b.num_conditions else -1], device=b.device)
        cond = {**b.encode_conditions(conds), **b.guidance_inputs(b.default_guidance_scale)}
        with torch.no_grad():
            _, cache = self.run_with_cache(latents, t, cond)
        return {name: tuple(act.shape[1:]) for name, act in cache.items()}

    def default_hook(self) -> str:
        """The residual stream after the middle block, the usual place to train an SAE."""
        mid = len(self.block_specs) // 2
        return f"blocks.{mid}.hook_img_resid_post" if self.block_specs[mid].joint else f"blocks.{mid}.hook_resid_post"
