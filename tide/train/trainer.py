"""The training loop: one pass over a batch source trains one or several SAEs together.

The :class:`Trainer` reads any iterator of ``(x_BD, t_B)`` batches (:mod:`tide.train.batches`);
:func:`train` (what `tide train` runs) builds its source from a captured dataset: the shuffled,
endless :class:`~tide.data.ActivationLoader`. Every step gives each SAE its hook's column of the batch.

Checkpoints (:mod:`tide.train.checkpoint`) are complete and written atomically, so a run killed at
any moment and resumed ends with the same weights as an uninterrupted one: the source is a factory
``batches(start_step)``, called with the checkpoint's step (the dataset's loader is deterministic
given its seed and replays up to that step). Under ``torchrun`` (gloo) every rank reads the same
global batch, trains on its slice of the rows and averages gradients, which matches one process with
the same global batch. Metrics, the progress bar and wandb live in :mod:`tide.train.logging`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from tide.config import to_dict
from tide.data import ActivationStore
from tide.data.stats import compute_stats
from tide.device import resolve_device
from tide.errors import TideError
from tide.io import atomic_write_json
from tide.sae.config import SAEConfig
from tide.sae.io import save_sae
from tide.sae.model import SAE
from tide.train.batches import (Acts, BatchSource, complete_specs, dataset_batches, open_source, spec_rows, unpack,
                                verify_shards)
from tide.train.checkpoint import CHECKPOINTS, read_checkpoint, restore, save_checkpoint
from tide.train.config import RESUME_INSENSITIVE, SAESpec, TrainConfig, lr_factor
from tide.sae.timestep import fit_modulation

if TYPE_CHECKING:  # imported on use: they load diffusers and transformer_lens
    from tide.train.downstream import DownstreamObjective
from tide.train.logging import TrainLogger
from tide.train.objective import fired, make_optimizer, train_step

SUMMARY = "train_summary.json"


@dataclass(frozen=True)
class TrainResult:
    """What a finished run returns (``train_summary.json`` holds the same, plus the last log record)."""

    saes: tuple[str, ...]
    """Names of the trained SAEs; each is saved in ``out / name``."""
    steps: int
    """Optimizer steps done (the run's total, counting those before a resume)."""
    seconds: float
    """Wall time of this process's loop."""
    vectors_per_s: float
    """Rows per second of this process's steps (global batch rows; all SAEs together)."""
    out: Path
    """Run directory."""
    final: dict[str, dict[str, float]]
    """Last logged metrics of each SAE: {name: {loss, fvu, l0, aux, dead}}."""
    config: dict
    """The run's TrainConfig as a dict."""
    resumed: bool
    """Whether the run continued from a checkpoint."""
    world_size: int
    """Processes that trained together (torchrun)."""

    def sae_dir(self, name: str) -> Path:
        """Directory of the trained SAE ``name`` (cfg.json + sae.safetensors)."""
        return self.out / name


def stats_key(spec: SAESpec) -> str:
    """Which statistics normalise ``spec``'s input: its hook's, or those of its update target."""
    return spec.hook if spec.target == "activation" else f"{spec.hook} - {spec.base_hook}"


def init_modulation_from_adaln(sae: SAE, backbone, spec: SAESpec, stats) -> float:
    """Start a TIDE SAE's modulation at the (scale, shift) with which the backbone's adaLN reads ``spec.hook``, at the
    data's recorded timesteps (or 64 spread over [0, t_max] without statistics); returns the fit's relative error."""
    if backbone is None:
        raise TideError(f"SAE {spec.name!r}: modulation_init: adaln needs the backbone the data was captured from")
    t_T = torch.as_tensor(stats[stats_key(spec)].timesteps_T, dtype=torch.float32) if stats is not None else \
        torch.linspace(0, spec.t_max, 64)
    with torch.no_grad():
        scale_TD, shift_TD = backbone.reader_modulation(spec.hook, t_T)
    if scale_TD.shape[-1] != spec.d_in:
        raise TideError(f"SAE {spec.name!r}: the adaLN reading {spec.hook} has width {scale_TD.shape[-1]}, not {spec.d_in}")
    return fit_modulation(sae.modulation, t_T, scale_TD.float(), shift_TD.float())


def geometric_median(x_BD: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    y = x_BD.mean(0)
    for _ in range(iters):
        w = 1 / (x_BD - y).norm(dim=-1).clamp_min(1e-8)
        y = (w[:, None] * x_BD).sum(0) / w.sum()
    return y


# ------------------------------------------------------------------------------------ distributed
class _Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            self.rank = dist.get_rank()

    def average_grads(self, sae: SAE) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in sae.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return mask
        import torch.distributed as dist

        m = mask.to(torch.int32)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return m.bool()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# ------------------------------------------------------------------------------------ the run
class Trainer:
    """Trains ``specs`` (default: ``config.saes``, each with its ``d_in`` set) on ``batches``.

    ``batches`` is a factory ``batches(start_step) -> Iterable`` (exact resume) or a plain iterable
    read from the trainer's current step on (see :mod:`tide.train.batches`). ``stats`` maps a hook (for an update
    target, :func:`stats_key`) to its :class:`~tide.data.TimestepStats` for the SAEs' normalisation (without it:
    identity);
    ``trained_on`` names the data (recorded in each SAE's cfg.json and in error messages). ``downstream`` (a
    :class:`~tide.train.downstream.DownstreamObjective`) is required when a spec has ``downstream_coefficient > 0``,
    ``backbone`` (the data's) when one has ``modulation_init: adaln``.
    The config's ``data`` and ``shuffle_buffer`` are read by :func:`train`, not here.
    """

    def __init__(self, config: TrainConfig, batches: BatchSource, specs: list[SAESpec] | None = None,
                 stats: Mapping[str, object] | None = None, trained_on: str | None = None,
                 downstream: "DownstreamObjective | None" = None, backbone=None):
        config.validate()
        self.cfg = config
        self.source = batches
        self.trained_on = trained_on
        self.specs = list(config.saes if specs is None else specs)
        for spec in self.specs:
            if spec.d_in < 1:
                raise TideError(f"SAE {spec.name!r}: set d_in (the activations' width) to train it on a batch source")
        needs = [s.name for s in self.specs if s.downstream_coefficient > 0]
        if needs and downstream is None:
            raise TideError(f"SAE(s) {needs} have downstream_coefficient > 0: the trainer needs a DownstreamObjective "
                            "(tide train builds one from the dataset's backbone)")
        for spec in self.specs:
            if spec.downstream_coefficient > 0:
                downstream.hooked.check_hook_names([spec.hook])
        self.downstream = downstream if needs else None
        self.dist = _Dist()
        self.device = resolve_device(config.device)
        self.out = Path(config.out)
        torch.manual_seed(config.seed)
        self.saes: dict[str, SAE] = {}
        self.optims: dict[str, torch.optim.Optimizer] = {}
        self.rows_since_fired: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            sae = SAE(SAEConfig(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(SAEConfig)})).to(self.device)
            if stats is not None:
                sae.set_normalization(stats[stats_key(spec)])
            if spec.modulation_init == "adaln":
                init_modulation_from_adaln(sae, backbone, spec, stats)
            self.saes[spec.name] = sae
            self.optims[spec.name] = make_optimizer(sae.parameters(), config.lr)
            self.rows_since_fired[spec.name] = torch.zeros(sae.W_dec.shape[:2], dtype=torch.long, device=self.device)
        self.step = 0
        self.log = TrainLogger(config, self.out, [s.name for s in self.specs], enabled=self.dist.rank == 0)

    @classmethod
    def for_dataset(cls, config: TrainConfig) -> "Trainer":
        """A trainer on ``config.data``: SAE hooks and widths completed from the dataset, normalisation from its
        statistics, batches from its shuffled loader (seeded by ``config.seed``)."""
        config.validate()
        store = ActivationStore(config.data)
        specs = complete_specs(config.saes, store)
        if config.verify_checksums:  # before the statistics read the rows, and before the run directory is made
            verify_shards(store, progress=config.progress and os.environ.get("RANK", "0") == "0")
        hooks = sorted({h for s in specs for h in s.input_hooks})
        stats = {}
        for spec in specs:
            key = stats_key(spec)
            if key not in stats:
                stats[key] = store.stats(spec.hook) if spec.target == "activation" else \
                    compute_stats(store, spec.hook, minus=spec.base_hook)
        downstream = backbone = None
        from tide.models.loading import load_captured_backbone
        from tide.train.downstream import downstream_for_dataset

        if any(s.downstream_coefficient > 0 for s in specs):
            downstream = downstream_for_dataset(store, config)
            backbone = downstream.hooked.backbone
        elif any(s.modulation_init == "adaln" for s in specs):
            backbone = load_captured_backbone(store.manifest, store.path, device=resolve_device(config.device))
        return cls(config, dataset_batches(store, hooks, config), specs=specs, stats=stats,
                   trained_on=str(store.path), downstream=downstream, backbone=backbone)

    @property
    def history(self) -> list[dict]:
        """Logged metric records (restored from the checkpoint on resume)."""
        return self.log.history

    # ------------------------------------------------------------------ checkpoints
    def _prepare_out(self) -> None:
        if self.dist.rank != 0:
            return
        if self.cfg.resume:
            return
        if self.out.exists() and any(self.out.iterdir()):
            if not self.cfg.overwrite:
                raise TideError(f"run directory {self.out} is not empty: pass --resume to continue it or "
                                "--overwrite to replace it")
            if not (self.out / CHECKPOINTS).exists() and not (self.out / SUMMARY).exists():
                raise TideError(f"refusing to --overwrite {self.out}: it is not a tide training run")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.out / CHECKPOINTS, self.step, self.saes, self.optims, self.rows_since_fired,
                               {"config": to_dict(self.cfg), "history": self.history}, self.cfg.keep_checkpoints)

    def load_checkpoint(self) -> bool:
        ckpt = read_checkpoint(self.out / CHECKPOINTS)
        if ckpt is None:
            return False
        old = {k: v for k, v in ckpt.meta["config"].items() if k not in RESUME_INSENSITIVE}
        new = {k: v for k, v in to_dict(self.cfg).items() if k in old}
        diff = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new.get(k)]
        if diff:
            raise TideError(f"cannot resume {self.out} with a different config ({'; '.join(diff)}); use the "
                            "original settings or --overwrite")
        restore(ckpt, self.saes, self.optims, self.rows_since_fired, self.device)
        self.step = int(ckpt.meta["step"])
        self.log.history = list(ckpt.meta.get("history", []))
        return True

    # ------------------------------------------------------------------ loop
    def _rows(self, acts: Acts, t_B: torch.Tensor, rank: int = 0, world: int = 1) -> tuple[Acts, torch.Tensor]:
        """This rank's rows of the global batch (every rank reads the same batch and takes rows rank::world)."""
        def mine(a):
            return a[rank::world].to(self.device)
        return ({h: mine(a) for h, a in acts.items()} if isinstance(acts, dict) else mine(acts)), mine(t_B)

    def _init_b_dec(self, acts: Acts, t_B: torch.Tensor) -> None:
        if self.cfg.b_dec_init == "zero":
            return
        for spec in self.specs:
            sae = self.saes[spec.name]
            with torch.no_grad():
                x_n = sae(spec_rows(acts, spec), t_B).x_n_BD
                center = geometric_median(x_n) if self.cfg.b_dec_init == "median" else x_n.mean(0)
                sae.b_dec.copy_(center.expand_as(sae.b_dec))

    def _train_batch(self, batch) -> dict[str, dict[str, torch.Tensor]]:
        """One optimizer step of every SAE on ``batch``; their metrics as tensors."""
        acts, t_B = unpack(batch)
        if self.step == 0:
            self._init_b_dec(*self._rows(acts, t_B))  # from the global batch, identical on every rank
        acts, t_B = self._rows(acts, t_B, self.dist.rank, self.dist.world)
        rows_per_step = self.cfg.batch_size
        metrics = {}
        draw = self.downstream.draw(self.step) if self.downstream is not None else None
        for spec in self.specs:
            name, sae = spec.name, self.saes[spec.name]
            for group in self.optims[name].param_groups:
                group["lr"] = self.cfg.lr * lr_factor(self.step, self.cfg)
            dead = self.rows_since_fired[name] >= self.cfg.dead_after_rows
            down: dict[str, torch.Tensor] = {}  # the unweighted downstream term, for the log

            def downstream_term(sae=sae, spec=spec):
                down["value"] = self.downstream.loss(sae, spec.hook, draw)
                return spec.downstream_coefficient * down["value"]

            extra = downstream_term if spec.downstream_coefficient > 0 else None
            losses, out = train_step(sae, self.optims[name], spec_rows(acts, spec), t_B, dead,
                                     self.cfg.k_aux, self.cfg.aux_coefficient, self.dist.average_grads, extra,
                                     self.cfg.aux_row_stride)
            if not torch.isfinite(losses.loss):
                check = f", check the data with `tide data verify {self.trained_on}`" if self.trained_on else ""
                raise TideError(f"SAE {name!r}: the loss became {losses.loss.item()} at step {self.step}; stopped. "
                                f"The last good checkpoint is in {self.out / CHECKPOINTS} (lower --lr{check})")
            f = self.dist.any(fired(sae, out, t_B))
            self.rows_since_fired[name] = torch.where(f, 0, self.rows_since_fired[name] + rows_per_step)
            # tensors until a log step: converting every step would sync the device once per metric
            metrics[name] = {"loss": losses.loss.detach(), "fvu": losses.fvu, "l0": losses.l0,
                             "aux": losses.aux, "dead": dead.float().mean()}
            if down:
                metrics[name]["downstream"] = down["value"].detach()
        return metrics

    def run(self) -> TrainResult:
        self._prepare_out()
        self.dist.barrier()
        resumed = self.load_checkpoint() if self.cfg.resume else False
        if self.cfg.resume and not resumed and self.dist.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        batches = open_source(self.source, self.step)  # positioned at the (resumed) step
        start, steps_at_start = time.perf_counter(), self.step
        try:
            self.log.start(self.step)
            while self.step < self.cfg.steps:
                batch = next(batches, None)
                if batch is None:
                    raise TideError(f"the batch source ran out after step {self.step} of {self.cfg.steps}: give "
                                    "an endless source or fewer --steps")
                metrics = self._train_batch(batch)
                self.step += 1
                self.log.advance()
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    self.log.log(self.step, self.cfg.lr * lr_factor(self.step - 1, self.cfg), metrics)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.dist.rank == 0:
                    self.save_checkpoint()
        finally:
            self.log.close()
        seconds = time.perf_counter() - start
        result = TrainResult(saes=tuple(s.name for s in self.specs), steps=self.step, seconds=seconds,
                             vectors_per_s=(self.step - steps_at_start) * self.cfg.batch_size / max(seconds, 1e-9),
                             out=self.out, final=self.log.final, config=to_dict(self.cfg), resumed=resumed,
                             world_size=self.dist.world)
        if self.dist.rank == 0:
            self.save_checkpoint()
            extra = {"trained_on": self.trained_on} if self.trained_on is not None else {}
            for spec in self.specs:
                save_sae(self.saes[spec.name], self.out / spec.name, extra={**extra, "steps": self.step})
            atomic_write_json(self.out / SUMMARY, {
                "steps": result.steps, "seconds": seconds, "vectors_per_s": result.vectors_per_s,
                "saes": {name: str(result.sae_dir(name)) for name in result.saes},
                "final": self.history[-1] if self.history else {}, "config": result.config,
                "resumed": resumed, "world_size": result.world_size})
        self.dist.barrier()
        return result


def train(config: TrainConfig) -> TrainResult:
    """Train the configured SAEs on the captured dataset ``config.data`` (what `tide train` runs)."""
    return Trainer.for_dataset(config).run()
