"""What the trainer reads: any iterator of ``(x_BD, t_B)`` batches. A captured dataset is one source.

A batch is any of

- a pair ``(x, t_B)`` (or any sequence whose first two items are those),
- an object with fields ``x_BD`` and ``t_B``,
- an object with fields ``acts`` and ``t_B`` (the data loader's :class:`tide.data.loader.Batch`),

where ``x`` is an ``(B, D)`` tensor that every SAE reads, or ``{hook: acts_BD}`` (rows aligned across
hooks) from which each SAE reads its own hook's column, and ``t_B`` holds each row's timestep.

Positioning on resume. The trainer is given a *source*, either

- a factory ``batches(start_step) -> Iterable``: its first batch is the one of step ``start_step``.
  The trainer calls it once per run with its current step (0, or the checkpoint's step when
  resuming), so a deterministic factory gives exact resume. :func:`dataset_batches` is one: the
  shuffled loader is deterministic given its seed and replays (reads and discards) the first
  ``start_step`` batches; or
- a plain iterable, read as given: it must start at the trainer's current step (a fresh run: step 0).

Under ``torchrun`` every rank must see the same global batches (each trains on rows ``rank::world``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Union

import torch
from tqdm.auto import tqdm

from tide.data import ActivationLoader, ActivationStore, LoaderConfig
from tide.errors import TideError
from tide.train.config import SAESpec, TrainConfig

Acts = Union[torch.Tensor, dict[str, torch.Tensor]]
BatchFactory = Callable[[int], Iterable[Any]]
"""``batches(start_step)``: the batches from step ``start_step`` on."""
BatchSource = Union[BatchFactory, Iterable[Any]]


def unpack(batch: Any) -> tuple[Acts, torch.Tensor]:
    """``(x, t_B)`` of a batch given as a pair, an object with ``x_BD``/``t_B`` or one with ``acts``/``t_B``."""
    for field in ("x_BD", "acts"):
        if hasattr(batch, field) and hasattr(batch, "t_B"):
            return getattr(batch, field), batch.t_B
    try:
        return batch[0], batch[1]
    except (TypeError, IndexError, KeyError):
        raise TideError(f"a training batch must be a pair (x_BD, t_B) or have fields x_BD and t_B; got "
                        f"{type(batch).__name__}") from None


def open_source(source: BatchSource, start_step: int) -> Iterator[Any]:
    """An iterator over ``source``'s batches from ``start_step`` on (see the module docstring)."""
    if callable(source):
        return iter(source(start_step))
    return iter(source)


def hook_rows(acts: Acts, hook: str) -> torch.Tensor:
    """The rows an SAE reading ``hook`` trains on: ``acts`` itself, or its ``hook`` column."""
    if not isinstance(acts, dict):
        return acts
    if hook not in acts:
        raise TideError(f"the batch holds activations of {sorted(acts)}, not of the SAE's hook {hook!r}")
    return acts[hook]


def spec_rows(acts: Acts, spec: SAESpec) -> torch.Tensor:
    """The rows SAE ``spec`` trains on: ``acts`` itself, or what its target computes from the batch's hook columns
    (its hook's column, or for an update target the block's output minus its input)."""
    if not isinstance(acts, dict) or spec.target == "activation":
        return hook_rows(acts, spec.hook)
    return spec.rows(acts)


# ------------------------------------------------------------------------------------ captured datasets
def dataset_batches(store: ActivationStore, hooks: list[str], cfg: TrainConfig) -> BatchFactory:
    """The shuffled, endless loader over ``store`` as a factory ``batches(start_step)``."""
    loader_cfg = LoaderConfig(hooks=hooks, batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                              seed=cfg.seed, epochs=None, drop_last=True,
                              verify_checksums=cfg.verify_checksums)

    def batches(start_step: int = 0) -> Iterator[Any]:
        it = iter(ActivationLoader(store, loader_cfg))
        for _ in range(start_step):  # deterministic given the seed: replaying start_step batches positions it exactly
            next(it)
        return it
    return batches


def verify_shards(store: ActivationStore, progress: bool = False) -> None:
    """Check every shard's SHA-256 against the manifest (each file streamed once per process; the loader's own
    checks then find them verified), refusing a changed shard with a TideError that names it."""
    total = sum(s.bytes for s in store.shards)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify shard checksums", disable=not progress,
              leave=False) as bar:
        for i, shard in enumerate(store.shards):
            store.verify_checksum(i)
            bar.update(shard.bytes)


def complete_specs(specs: list[SAESpec], store: ActivationStore) -> list[SAESpec]:
    """The specs with ``hook`` (default: the dataset's first), ``d_in``, ``backbone`` and ``prompts`` from ``store``."""
    hooks = store.hooks
    backbone = store.manifest.get("backbone", {}).get("name", "")
    prompts = store.manifest.get("config", {}).get("prompts") or ""
    out = []
    for spec in specs:
        hook = spec.hook or next(iter(hooks))
        if hook not in hooks:
            raise TideError(f"SAE {spec.name!r}: hook {hook!r} is not in dataset {store.path}; "
                            f"it holds {sorted(hooks)}")
        base = dataclasses.replace(spec, hook=hook).base_hook
        if base is not None and base not in hooks:
            raise TideError(f"SAE {spec.name!r}: an update target at {hook!r} needs {base!r} captured too; dataset "
                            f"{store.path} holds {sorted(hooks)} (capture both hooks)")
        width = hooks[hook]
        if spec.d_in and spec.d_in != width:
            raise TideError(f"SAE {spec.name!r}: d_in={spec.d_in} but the dataset's {hook} activations have width "
                            f"{width}; set d_in: {width} (or leave it out)")
        out.append(dataclasses.replace(spec, hook=hook, d_in=width, backbone=backbone, prompts=prompts))
    return out
