"""Training: the objective (FVU, sparsity penalty, AuxK), the shared train step, and the trainer
(one pass for several SAEs, checkpoints and exact resume, optional wandb, DDP under torchrun)."""

from tide.train.objective import LossOutput, sae_loss, train_step
from tide.train.trainer import SAESpec, TrainConfig, Trainer, train

__all__ = ["LossOutput", "sae_loss", "train_step", "SAESpec", "TrainConfig", "Trainer", "train"]
