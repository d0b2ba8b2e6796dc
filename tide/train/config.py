"""`tide train`'s configuration: the SAEs to train (``SAESpec``), the run (``TrainConfig``), and the
learning-rate schedule it defines."""

from __future__ import annotations

from dataclasses import dataclass, field

from tide.errors import TideError
from tide.sae.config import SAEConfig


@dataclass
class SAESpec(SAEConfig):
    """One SAE to train: its architecture plus a name (its directory under ``out``)."""

    name: str = "sae"
    """Directory name of this SAE under the run directory."""
    d_in: int = 0
    """Width of the activations; 0 = the dataset's width for this hook."""
    modulation_init: str = "zero"
    """tide conditioning: zero (adaLN-Zero, training starts as a plain SAE) or adaln (fitted to the (scale, shift)
    of the backbone's adaLN norm that reads the hook, at the data's timesteps; needs the capture's backbone)."""
    downstream_coefficient: float = 0.0
    """Weight of the downstream-aware term: the denoiser output's squared relative error with the reconstruction
    spliced in at the hook (tide.train.downstream), added to the FVU; 0 = activation FVU only."""


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
    aux_row_stride: int = 4
    """AuxK reconstructs every n-th row of each batch (1: every row, as Gao et al.). Its cost divides by n; dead
    latents revive in more steps (at 4, about 1.4x as many) but in about the same time
    (experiments/results/auxk_revival.json)."""
    dead_after_rows: int = 1_000_000
    """A latent that has not fired for this many rows counts as dead."""
    downstream_samples: int = 32
    """Captured samples whose trajectories are regenerated (at every step) as the denoiser inputs of the
    downstream-aware term (only when an SAE has downstream_coefficient > 0; needs the capture's backbone)."""
    downstream_batch: int = 8
    """Denoiser inputs (of one timestep) per step of the downstream-aware term."""
    b_dec_init: str = "median"
    """Decoder bias from the first batch: median (geometric median), mean, or zero."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    shuffle_buffer: int = 262_144
    """Loader shuffle-buffer rows."""
    verify_checksums: bool = True
    """Check every shard's SHA-256 against the manifest before training and refuse a changed shard (run
    `tide data verify DIR` for details). Each file is read once more per process: measured 0.49 s for 415 MB
    (850 MB/s), 2.2% of one epoch of training on a 2-core CPU (default SAE, batch 4096; -0.6 to 5.2% over repeats),
    less over several epochs. Where the SAE step is nearly free (a fast GPU) it approaches the loader's own epoch
    time (+170% of a loader-only epoch); --no-verify-checksums skips it (experiments/bench/shard_checksum_bench.py)."""
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
        if self.aux_row_stride < 1:
            raise TideError(f"aux_row_stride must be >= 1 (1: AuxK on every row), got {self.aux_row_stride}")
        if self.downstream_samples < 1 or self.downstream_batch < 1:
            raise TideError("downstream_samples and downstream_batch must be >= 1")
        for s in self.saes:
            if s.downstream_coefficient < 0:
                raise TideError(f"SAE {s.name!r}: downstream_coefficient must be >= 0, got {s.downstream_coefficient}")
            if s.modulation_init not in ("zero", "adaln"):
                raise TideError(f"SAE {s.name!r}: modulation_init must be zero or adaln, got {s.modulation_init!r}")
            if s.modulation_init == "adaln" and s.conditioning != "tide":
                raise TideError(f"SAE {s.name!r}: modulation_init: adaln needs conditioning: tide")
        if self.resume and self.overwrite:
            raise TideError("choose one of --resume and --overwrite")


RESUME_INSENSITIVE = ("resume", "overwrite", "progress", "device", "wandb", "verify_checksums")
"""Config fields a resumed run may change; every other field must match the checkpoint's."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last (1 - decay_start) of the run."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    start = int(cfg.decay_start * cfg.steps)
    decay = 1.0 if step < start else max(0.0, (cfg.steps - step) / max(1, cfg.steps - start))
    return warm * decay
