"""`tide train`: train one or several SAEs from one pass over a captured dataset.

Every step reads one shuffled batch (all hooks' aligned rows) and gives each SAE its hook's column.
Checkpoints are complete (weights, Adam state, dead-latent counters, step) and written atomically,
so a run killed at any moment and resumed ends with the same weights as an uninterrupted one:
the loader is deterministic given its seed and is fast-forwarded to the checkpoint's step.
Under ``torchrun`` (gloo) every rank reads the same global batch, trains on its slice of the rows
and averages gradients, which matches one process with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tide.io import atomic_write_bytes, atomic_write_json
from tide.config import to_dict
from tide.data import ActivationLoader, ActivationStore, LoaderConfig
from tide.device import resolve_device
from tide.errors import TideError
from tide.sae.config import SAEConfig
from tide.sae.io import load_sae, save_sae
from tide.sae.model import SAE
from tide.train.objective import fired, train_step

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAIN_STATE = "trainer.json"
SUMMARY = "train_summary.json"


@dataclass
class SAESpec(SAEConfig):
    """One SAE to train: its architecture plus a name (its directory under ``out``)."""

    name: str = "sae"
    """Directory name of this SAE under the run directory."""
    d_in: int = 0
    """Width of the activations; 0 = the dataset's width for this hook."""


@dataclass
class TrainConfig:
    """`tide train`: which SAEs to train on which dataset, and how."""

    data: str = "runs/capture"
    """Captured dataset directory."""
    out: str = "runs/sae"
    """Run directory: one sub-directory per SAE, checkpoints/, train_summary.json."""
    saes: list[SAESpec] = field(default_factory=lambda: [SAESpec()])
    """SAEs trained together from one pass (YAML list; `hook` defaults to the dataset's first hook, `d_in` to its width)."""
    steps: int = 2000
    """Optimizer steps (one batch each)."""
    batch_size: int = 4096
    """Rows per step (the global batch under torchrun)."""
    lr: float = 4e-4
    """Adam learning rate after warm-up."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    decay_start: float = 0.8
    """Fraction of the run after which the learning rate decays linearly to 0."""
    k_aux: int = 256
    """AuxK: dead latents used to reconstruct the residual."""
    aux_coefficient: float = 0.03125
    """AuxK loss weight (0 turns AuxK off)."""
    dead_after_rows: int = 1_000_000
    """A latent that has not fired for this many rows counts as dead."""
    b_dec_init: str = "median"
    """Decoder bias from the first batch: median (geometric median), mean, or zero."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    shuffle_buffer: int = 262_144
    """Loader shuffle-buffer rows."""
    seed: int = 0
    """Seed of weight initialisation and data order."""
    resume: bool = False
    """Continue from the newest checkpoint in `out`."""
    overwrite: bool = False
    """Replace an existing run in `out`."""
    wandb: str = "disabled"
    """Weights & Biases logging: disabled, offline (local files only) or online."""
    log_every: int = 10
    """Steps between logged metrics."""
    device: str = "auto"
    """cpu, cuda[:N] or auto."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise TideError("steps and batch_size must be >= 1")
        if self.b_dec_init not in ("median", "mean", "zero"):
            raise TideError(f"b_dec_init must be median, mean or zero, got {self.b_dec_init!r}")
        if self.wandb not in ("disabled", "offline", "online"):
            raise TideError(f"wandb must be disabled, offline or online, got {self.wandb!r}")
        names = [s.name for s in self.saes]
        if not names or len(set(names)) != len(names):
            raise TideError(f"give each SAE a distinct name (got {names})")
        if self.resume and self.overwrite:
            raise TideError("choose one of --resume and --overwrite")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last (1 - decay_start) of the run."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    start = int(cfg.decay_start * cfg.steps)
    decay = 1.0 if step < start else max(0.0, (cfg.steps - step) / max(1, cfg.steps - start))
    return warm * decay


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
    def __init__(self, config: TrainConfig):
        config.validate()
        self.cfg = config
        self.dist = _Dist()
        self.device = resolve_device(config.device)
        self.out = Path(config.out)
        self.store = ActivationStore(config.data)
        self.specs = [self._complete_spec(s) for s in config.saes]
        self.hooks = sorted({s.hook for s in self.specs})
        torch.manual_seed(config.seed)
        self.saes: dict[str, SAE] = {}
        self.optims: dict[str, torch.optim.Optimizer] = {}
        self.rows_since_fired: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            sae = SAE(SAEConfig(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(SAEConfig)})).to(self.device)
            sae.set_normalization(self.store.stats(spec.hook))
            self.saes[spec.name] = sae
            self.optims[spec.name] = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=(0.9, 0.999))
            self.rows_since_fired[spec.name] = torch.zeros(sae.W_dec.shape[:2], dtype=torch.long, device=self.device)
        self.step = 0
        self.history: list[dict] = []

    def _complete_spec(self, spec: SAESpec) -> SAESpec:
        hooks = self.store.hooks
        hook = spec.hook or next(iter(hooks))
        if hook not in hooks:
            raise TideError(f"SAE {spec.name!r}: hook {hook!r} is not in dataset {self.store.path}; "
                            f"it holds {sorted(hooks)}")
        width = hooks[hook]
        if spec.d_in and spec.d_in != width:
            raise TideError(f"SAE {spec.name!r}: d_in={spec.d_in} but the dataset's {hook} activations have width {width}; "
                            f"set d_in: {width} (or leave it out)")
        backbone = self.store.manifest.get("backbone", {}).get("name", "")
        return dataclasses.replace(spec, hook=hook, d_in=width, backbone=backbone)

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
        root = self.out / CHECKPOINTS
        name = f"step-{self.step:07d}"
        tmp = root / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {}
        groups = {}
        for sae_name, sae in self.saes.items():
            save_sae(sae, tmp / sae_name)
            opt = self.optims[sae_name].state_dict()
            for i, state in opt["state"].items():
                for key, value in state.items():
                    tensors[f"{sae_name}/optim/{i}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
            groups[sae_name] = opt["param_groups"]
            tensors[f"{sae_name}/rows_since_fired"] = self.rows_since_fired[sae_name].cpu()
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / TRAIN_STATE, {"step": self.step, "param_groups": groups, "config": to_dict(self.cfg),
                                               "history": self.history})
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_bytes(root / LATEST, name.encode())
        for old in sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> bool:
        root = self.out / CHECKPOINTS
        if not (root / LATEST).exists():
            return False
        path = root / (root / LATEST).read_text().strip()
        meta = json.loads((path / TRAIN_STATE).read_text())
        old = {k: v for k, v in meta["config"].items() if k not in ("resume", "overwrite", "progress", "device", "wandb")}
        new = {k: v for k, v in to_dict(self.cfg).items() if k in old}
        diff = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new.get(k)]
        if diff:
            raise TideError(f"cannot resume {self.out} with a different config ({'; '.join(diff)}); use the "
                            "original settings or --overwrite")
        tensors = load_file(str(path / "state.safetensors"))
        for sae_name, sae in self.saes.items():
            sae.load_state_dict(load_sae(path / sae_name, device=self.device).state_dict())
            opt = self.optims[sae_name]
            state = {}
            for key, value in tensors.items():
                parts = key.split("/")
                if parts[0] == sae_name and parts[1] == "optim":
                    state.setdefault(int(parts[2]), {})[parts[3]] = value.to(self.device) if parts[3] != "step" else value
            opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][sae_name]})
            self.rows_since_fired[sae_name] = tensors[f"{sae_name}/rows_since_fired"].to(self.device)
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        return True

    # ------------------------------------------------------------------ loop
    def _loader(self) -> ActivationLoader:
        return ActivationLoader(self.store, LoaderConfig(hooks=self.hooks, batch_size=self.cfg.batch_size,
                                                         shuffle_buffer=self.cfg.shuffle_buffer, seed=self.cfg.seed,
                                                         epochs=None, drop_last=True))

    def _rows(self, batch, rank: int = 0, world: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's rows of the global batch (every rank reads the same batch and takes rows rank::world)."""
        acts = batch.acts if isinstance(batch.acts, dict) else {self.hooks[0]: batch.acts}
        return ({h: a[rank::world].to(self.device) for h, a in acts.items()}, batch.t_B[rank::world].to(self.device))

    def _init_b_dec(self, acts: dict[str, torch.Tensor], t_B: torch.Tensor) -> None:
        if self.cfg.b_dec_init == "zero":
            return
        for spec in self.specs:
            sae = self.saes[spec.name]
            with torch.no_grad():
                x_n = sae(acts[spec.hook], t_B).x_n_BD
                center = geometric_median(x_n) if self.cfg.b_dec_init == "median" else x_n.mean(0)
                sae.b_dec.copy_(center.expand_as(sae.b_dec))

    def run(self) -> dict:
        self._prepare_out()
        self.dist.barrier()
        resumed = self.load_checkpoint() if self.cfg.resume else False
        if self.cfg.resume and not resumed and self.dist.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        logger = _Logger(self.cfg, self.out, enabled=self.dist.rank == 0)
        loader_it = iter(self._loader())
        for _ in range(self.step):  # fast-forward the deterministic loader to the checkpoint
            next(loader_it)
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not self.cfg.progress or self.dist.rank != 0,
                   desc="train " + ",".join(self.saes))
        start, rows_per_step = time.perf_counter(), self.cfg.batch_size
        steps_at_start = self.step
        try:
            while self.step < self.cfg.steps:
                batch = next(loader_it)
                if self.step == 0:
                    self._init_b_dec(*self._rows(batch))  # from the global batch, identical on every rank
                acts, t_B = self._rows(batch, self.dist.rank, self.dist.world)
                metrics = {}
                for spec in self.specs:
                    name, sae = spec.name, self.saes[spec.name]
                    for group in self.optims[name].param_groups:
                        group["lr"] = self.cfg.lr * lr_factor(self.step, self.cfg)
                    dead = self.rows_since_fired[name] >= self.cfg.dead_after_rows
                    losses, out = train_step(sae, self.optims[name], acts[spec.hook], t_B, dead,
                                             self.cfg.k_aux, self.cfg.aux_coefficient, self.dist.average_grads)
                    if not torch.isfinite(losses.loss):
                        raise TideError(
                            f"SAE {name!r}: the loss became {losses.loss.item()} at step {self.step}; stopped. The last "
                            f"good checkpoint is in {self.out / CHECKPOINTS} (lower --lr, check the data with "
                            f"`tide data verify {self.store.path}`)")
                    f = self.dist.any(fired(sae, out, t_B))
                    self.rows_since_fired[name] = torch.where(f, 0, self.rows_since_fired[name] + rows_per_step)
                    # tensors until a log step: converting every step would sync the device once per metric
                    metrics[name] = {"loss": losses.loss.detach(), "fvu": losses.fvu, "l0": losses.l0,
                                     "aux": losses.aux, "dead": dead.float().mean()}
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    metrics = {name: {k: v.item() for k, v in m.items()} for name, m in metrics.items()}
                    record = {"step": self.step, "lr": self.cfg.lr * lr_factor(self.step - 1, self.cfg), **metrics}
                    self.history.append(record)
                    logger.log(record)
                    first = metrics[self.specs[0].name]
                    bar.set_postfix_str(f"loss {first['loss']:.3f} fvu {first['fvu']:.3f} L0 {first['l0']:.1f} "
                                        f"dead {first['dead']:.1%}", refresh=False)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.dist.rank == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            logger.close()
        seconds = time.perf_counter() - start
        summary = {"steps": self.step, "seconds": seconds,
                   "vectors_per_s": (self.step - steps_at_start) * self.cfg.batch_size / max(seconds, 1e-9),
                   "saes": {s.name: str(self.out / s.name) for s in self.specs}, "final": self.history[-1] if self.history else {},
                   "config": to_dict(self.cfg), "resumed": resumed, "world_size": self.dist.world}
        if self.dist.rank == 0:
            self.save_checkpoint()
            for spec in self.specs:
                save_sae(self.saes[spec.name], self.out / spec.name,
                         extra={"trained_on": str(self.store.path), "steps": self.step})
            atomic_write_json(self.out / SUMMARY, summary)
        self.dist.barrier()
        return summary


class _Logger:
    """Optional Weights & Biases logging (never required; offline or disabled by default)."""

    def __init__(self, cfg: TrainConfig, out: Path, enabled: bool):
        self.run = None
        if not enabled or cfg.wandb == "disabled":
            return
        try:
            import wandb
        except ImportError:
            raise TideError("wandb logging was requested but wandb is not installed: pip install wandb, "
                            "or use --wandb disabled") from None
        self.run = wandb.init(project="tide", dir=str(out), mode=cfg.wandb, config=to_dict(cfg),
                              settings=wandb.Settings(silent=True, x_disable_stats=True))

    def log(self, record: dict) -> None:
        if self.run is not None:
            flat = {f"{k}/{m}": v for k, d in record.items() if isinstance(d, dict) for m, v in d.items()}
            self.run.log({"lr": record["lr"], **flat}, step=record["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def train(config: TrainConfig) -> dict:
    """Train the configured SAEs; returns the run summary."""
    return Trainer(config).run()
