"""Attribute words measured on images: brightness (dark / light) and size (small / large).

Both are read off the item's *ink*, the pixels brighter than ``INK_THRESHOLD``:

- **brightness**: the mean intensity of the ink pixels (the garment's own shade, not how much of the
  frame it fills, so it does not follow size);
- **size**: the area of the ink's bounding box, in pixels.

Labels are per class (a dark coat and a dark sandal differ): on the training set, images below a
class's lower tertile get the low word (dark, small), those above its upper tertile the high word
(light, large), and the middle third neither. A generated image agrees with a requested word when its
measure falls on that word's side of the class's median.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INK_THRESHOLD = 0.15
"""Pixels above this (images in [0, 1]) belong to the item."""


def brightness(images_B1HW: torch.Tensor) -> torch.Tensor:
    """Mean intensity of each image's ink pixels (B,); 0 for an empty image."""
    x = images_B1HW.float().flatten(1)
    ink = x > INK_THRESHOLD
    return (x * ink).sum(1) / ink.sum(1).clamp(min=1)


def bbox_area(images_B1HW: torch.Tensor) -> torch.Tensor:
    """Area in pixels of the bounding box of each image's ink (B,); 0 for an empty image."""
    ink = images_B1HW.float()[:, 0] > INK_THRESHOLD  # (B, H, W)

    def extent(any_BN: torch.Tensor) -> torch.Tensor:
        n = any_BN.shape[1]
        idx = torch.arange(n)
        first = torch.where(any_BN, idx, n).min(1).values
        last = torch.where(any_BN, idx, -1).max(1).values
        return (last - first + 1).clamp(min=0)

    return (extent(ink.any(2)) * extent(ink.any(1))).float()


MEASURES = {"brightness": brightness, "size": bbox_area}
"""Attribute group -> measure on (B, 1, H, W) images in [0, 1]."""
WORDS = {"brightness": ("dark", "light"), "size": ("small", "large")}
"""Attribute group -> (low word, high word)."""


@dataclass
class AttributeThresholds:
    """Per-class tertiles and medians of each measure on the training images."""

    low_GK: dict[str, list[float]]
    """Group -> lower tertile per class: below it an image is labelled with the low word."""
    high_GK: dict[str, list[float]]
    """Group -> upper tertile per class: above it an image is labelled with the high word."""
    median_GK: dict[str, list[float]]
    """Group -> median per class: the boundary a generated image is judged against."""

    @classmethod
    def fit(cls, images_B1HW: torch.Tensor, labels_B: torch.Tensor, num_classes: int) -> "AttributeThresholds":
        low, high, median = {}, {}, {}
        for group, measure in MEASURES.items():
            values = measure(images_B1HW).numpy()
            labels = labels_B.numpy()
            q = [np.quantile(values[labels == k], [1 / 3, 0.5, 2 / 3]) for k in range(num_classes)]
            low[group] = [float(v[0]) for v in q]
            median[group] = [float(v[1]) for v in q]
            high[group] = [float(v[2]) for v in q]
        return cls(low, high, median)

    def to_dict(self) -> dict:
        return {group: {"measure": MEASURES[group].__name__, "words": list(WORDS[group]),
                        "ink_threshold": INK_THRESHOLD, "low": self.low_GK[group], "median": self.median_GK[group],
                        "high": self.high_GK[group]} for group in MEASURES}

    @classmethod
    def from_dict(cls, data: dict) -> "AttributeThresholds":
        return cls({g: list(d["low"]) for g, d in data.items()}, {g: list(d["high"]) for g, d in data.items()},
                   {g: list(d["median"]) for g, d in data.items()})

    def label(self, images_B1HW: torch.Tensor, labels_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """Group -> (B,) word per image: 0 = low word, 1 = high word, -1 = neither (middle third)."""
        out = {}
        for group, measure in MEASURES.items():
            v = measure(images_B1HW)
            lo = torch.tensor(self.low_GK[group])[labels_B]
            hi = torch.tensor(self.high_GK[group])[labels_B]
            word = torch.full_like(labels_B, -1)
            word[v < lo] = 0
            word[v > hi] = 1
            out[group] = word
        return out

    def agrees(self, images_B1HW: torch.Tensor, classes_B: torch.Tensor, group: str, word_B: torch.Tensor) -> torch.Tensor:
        """(B,) bool: whether each image's measure lies on the requested word's side (0 low, 1 high) of
        the class median."""
        v = MEASURES[group](images_B1HW)
        med = torch.tensor(self.median_GK[group])[classes_B]
        return torch.where(word_B == 0, v < med, v > med)
