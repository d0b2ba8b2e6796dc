"""Training: the objective (FVU, sparsity penalty, AuxK), the shared train step, and the trainer
(one pass for several SAEs over any iterator of (x_BD, t_B) batches, checkpoints and exact resume,
metrics/progress/optional wandb, DDP under torchrun)."""

from tide.train.batches import dataset_batches
from tide.train.config import SAESpec, TrainConfig
from tide.train.objective import LossOutput, sae_loss, train_step
from tide.train.trainer import Trainer, TrainResult, train

__all__ = ["LossOutput", "sae_loss", "train_step", "SAESpec", "TrainConfig", "Trainer", "TrainResult", "train",
           "dataset_batches"]
