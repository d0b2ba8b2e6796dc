"""The evaluation classifier: a small CNN for 1×28×28 images that judges generated samples.

It answers two questions about images in [0, 1]: which class does this look like
(:meth:`EvalClassifier.predict`, used for class agreement), and where does it sit in a learned
feature space (:meth:`EvalClassifier.features`, the penultimate layer, used for a Fréchet distance).
Checkpoints are a directory with ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tide.device import eval_mode
from tide.errors import TideError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class EvalClassifier(nn.Module):
    """conv(c0)×2 → pool → conv(c1)×2 → pool → conv(c2) → global mean → fc(feature_dim) → fc(K).

    Inputs are (B, 1, H, W) floats in [0, 1]; they are standardised inside the model with the
    training set's ``mean``/``std``, so callers never normalise.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels: tuple[int, int, int] = (32, 64, 128),
                 feature_dim: int = 128, dropout: float = 0.2, mean: float = 0.5, std: float = 0.5,
                 class_names: list[str] | None = None, info: dict[str, Any] | None = None):
        super().__init__()
        c0, c1, c2 = channels
        self.config = {"num_classes": num_classes, "in_channels": in_channels, "channels": [c0, c1, c2],
                       "feature_dim": feature_dim, "dropout": dropout, "mean": mean, "std": std,
                       "class_names": list(class_names) if class_names is not None else None}
        self.info = dict(info or {})
        """Free-form provenance saved beside the config (training settings, test accuracy)."""
        self.body = nn.Sequential(
            _conv_bn(in_channels, c0), _conv_bn(c0, c0), nn.MaxPool2d(2),
            _conv_bn(c0, c1), _conv_bn(c1, c1), nn.MaxPool2d(2),
            _conv_bn(c1, c2),
        )
        self.fc = nn.Linear(c2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return self.config["class_names"] or [str(i) for i in range(self.num_classes)]

    def _check(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if images_BCHW.dim() != 4 or images_BCHW.shape[1] != self.config["in_channels"]:
            raise TideError(f"the evaluation classifier takes (B, {self.config['in_channels']}, H, W) images "
                            f"in [0, 1], got shape {tuple(images_BCHW.shape)}")
        p = next(self.parameters())
        return images_BCHW.to(device=p.device, dtype=p.dtype)

    def features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim) of images in [0, 1]."""
        x = (self._check(images_BCHW) - self.config["mean"]) / self.config["std"]
        x = self.body(x).mean(dim=(2, 3))
        return F.relu(self.fc(x))

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) of images in [0, 1]."""
        return self.head(self.drop(self.features(images_BCHW)))

    @torch.no_grad()
    def predict(self, images_BCHW: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Predicted class ids (B,) on the CPU, computed in eval mode in batches."""
        with eval_mode(self):
            out = [self(images_BCHW[i:i + batch_size]).argmax(dim=1).cpu()
                   for i in range(0, images_BCHW.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def embed(self, images_BCHW: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """:meth:`features` in eval mode, in batches, on the CPU."""
        with eval_mode(self):
            out = [self.features(images_BCHW[i:i + batch_size]).cpu()
                   for i in range(0, images_BCHW.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config["feature_dim"])

    # ----------------------------------------------------------------------------- io
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (float32) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {"_class_name": type(self).__name__, **self.config, "info": self.info}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "EvalClassifier":
        """Read a classifier written by :meth:`save`; returned in eval mode on ``device``."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise TideError(f"{directory} is not an evaluation-classifier directory: expected "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE} in it")
        config = json.loads((directory / CONFIG_FILE).read_text())
        config.pop("_class_name", None)
        info = config.pop("info", None)
        config["channels"] = tuple(config["channels"])
        model = cls(**config, info=info)
        try:
            model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        except Exception as exc:  # wrong keys or shapes, or a damaged file
            raise TideError(f"cannot load evaluation-classifier weights from {directory}: {exc}") from exc
        return model.to(device).eval()


def load_classifier(backbone, device: str | torch.device = "cpu") -> EvalClassifier:
    """The evaluation classifier that ships with a backbone (``meta["classifier"]``, a path
    relative to the backbone's directory), or a clear error when the backbone has none."""
    meta = getattr(backbone, "meta", {}) or {}
    rel = meta.get("classifier")
    name = meta.get("name", getattr(backbone, "name", "this backbone"))
    if not rel:
        raise TideError(f"backbone {name!r} ships no evaluation classifier (no 'classifier' entry in its "
                        "tide.json): class agreement and Fréchet distance need one; use the embedded "
                        "models (fmnist-pixart, fmnist-dit) or add a classifier directory to the checkpoint")
    path = Path(rel)
    if not path.is_absolute():
        if "path" not in meta:
            raise TideError(f"backbone {name!r} names classifier {rel!r} but has no directory to resolve it from")
        path = Path(meta["path"]) / path
    return EvalClassifier.load(path, device=device)
