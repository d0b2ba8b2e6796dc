"""What a training run reports: the metric history (kept in checkpoints), the progress bar and its
postfix, and the optional Weights & Biases run (``--wandb offline|online``; disabled by default and
never required). Only rank 0 shows or sends anything; every rank keeps the history."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from tide.config import to_dict
from tide.errors import TideError


def postfix(metrics: dict[str, float]) -> str:
    """The progress bar's summary of one SAE's metrics."""
    return (f"loss {metrics['loss']:.3f} fvu {metrics['fvu']:.3f} L0 {metrics['l0']:.1f} "
            f"dead {metrics['dead']:.1%}")


class TrainLogger:
    """Metric history + progress bar + optional wandb run of one training run.

    ``history`` holds one record per logged step: ``{"step", "lr", sae_name: {metric: value}}``.
    :meth:`start` opens the bar and the wandb run, :meth:`close` closes them (also after an error).
    """

    def __init__(self, config, out: Path, names: list[str], enabled: bool = True, history: list[dict] | None = None):
        self.cfg, self.out, self.names, self.enabled = config, Path(out), list(names), enabled
        self.history: list[dict] = list(history or [])
        self.bar = None
        self.run = None

    def start(self, step: int) -> None:
        """Open the progress bar at ``step`` of ``config.steps`` and, when asked for, the wandb run."""
        self.bar = tqdm(total=self.cfg.steps, initial=step, disable=not self.cfg.progress or not self.enabled,
                        desc="train " + ",".join(self.names))
        if self.enabled and self.cfg.wandb != "disabled":
            try:
                import wandb
            except ImportError:
                raise TideError("wandb logging was requested but wandb is not installed: pip install wandb, "
                                "or use --wandb disabled") from None
            self.run = wandb.init(project="tide", dir=str(self.out), mode=self.cfg.wandb, config=to_dict(self.cfg),
                                  settings=wandb.Settings(silent=True, x_disable_stats=True))

    def advance(self) -> None:
        """One step done."""
        self.bar.update(1)

    def log(self, step: int, lr: float, metrics: dict[str, dict[str, torch.Tensor]]) -> dict:
        """Record the metrics of ``step`` (tensors, converted here: once per logged step, not per step)."""
        values = {name: {k: v.item() for k, v in m.items()} for name, m in metrics.items()}
        record = {"step": step, "lr": lr, **values}
        self.history.append(record)
        if self.run is not None:
            flat = {f"{name}/{k}": v for name, m in values.items() for k, v in m.items()}
            self.run.log({"lr": lr, **flat}, step=step)
        self.bar.set_postfix_str(postfix(values[self.names[0]]), refresh=False)
        return record

    @property
    def final(self) -> dict[str, dict[str, float]]:
        """The last logged metrics of each SAE ({} before the first log step)."""
        last = self.history[-1] if self.history else {}
        return {name: last[name] for name in self.names if name in last}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run is not None:
            self.run.finish()
            self.run = None
