"""Feature labels: a short automatic label from a feature's statistics, and user-written labels.

:func:`auto_label` reads three statistics of :class:`~tide.analysis.FeatureStats` and joins them
with `` · ``, e.g. ``"Sneaker · late steps · lower half"``:

- **class**: the condition with the highest one-vs-rest AUROC if it exceeds
  :data:`CLASS_AUROC_THRESHOLD` (0.75), else ``mixed``;
- **phase**: where the timestep profile (firing frequency per recorded step) peaks, among the
  recorded steps in schedule order (step 0 is the noisiest): ``early steps``, ``middle steps`` or
  ``late steps`` by thirds; ``all steps`` when the profile is flat (peak below 1.25 x its mean) and
  ``never fires`` when it never fired;
- **where**: where the mass of the mean spatial map lies: ``centre`` (over half of it in the central
  box spanning the middle half of both axes), else the ``upper``/``lower``/``left``/``right half``
  holding over 65% of it, else ``everywhere``. Omitted for a 1-D token grid.

A labels file is JSON mapping feature ids (as strings) to labels, ``{"12": "sneaker sole"}``;
:func:`load_labels` reads and validates it. Where the dashboard has a user label for a feature it
shows that instead of the automatic one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tide.errors import TideError

CLASS_AUROC_THRESHOLD = 0.75
FLAT_PROFILE_RATIO = 1.25
CENTRE_FRACTION = 0.5
HALF_FRACTION = 0.65
SEPARATOR = " · "


def class_part(stats, f: int) -> str:
    """The top class by AUROC when above the threshold, else ``mixed``."""
    auroc = np.asarray(stats.auroc[:, f], dtype=np.float64)
    if auroc.size == 0 or not np.isfinite(auroc).any():
        return "mixed"
    c = int(np.nanargmax(auroc))
    if auroc[c] <= CLASS_AUROC_THRESHOLD:
        return "mixed"
    names = stats.condition_names
    return names[c] if c < len(names) else f"class {c}"


def phase_part(stats, f: int) -> str:
    """Where the timestep profile peaks: early (noisy) / middle / late steps, all steps, or never fires."""
    profile = np.nan_to_num(np.asarray(stats.frequency_step[:, f], dtype=np.float64))
    if profile.size == 0 or profile.max() <= 0:
        return "never fires"
    if profile.size == 1 or profile.max() < FLAT_PROFILE_RATIO * profile.mean():
        return "all steps"
    order = np.argsort(np.asarray(stats.steps), kind="stable")  # schedule order, noisiest first
    pos = int(np.argmax(profile[order])) / (profile.size - 1)
    if pos < 1 / 3:
        return "early steps"
    return "middle steps" if pos < 2 / 3 else "late steps"


def spatial_part(stats, f: int) -> str | None:
    """Where the mean spatial map's mass is; None for a 1-D token grid or an empty map."""
    grid = stats.patch_grid
    if len(grid) != 2:
        return None
    m = np.clip(np.nan_to_num(np.asarray(stats.spatial_mean[f], dtype=np.float64)), 0, None)
    total = m.sum()
    if total <= 0:
        return None
    h, w = m.shape
    y = (np.arange(h) + 0.5) / h
    x = (np.arange(w) + 0.5) / w

    def side(coord, low):  # weight of each row/column in a half; the middle one counts one half
        inside = coord < 0.5 if low else coord > 0.5
        return np.where(np.isclose(coord, 0.5), 0.5, inside.astype(np.float64))

    rows, cols = m.sum(1) / total, m.sum(0) / total
    central = np.outer((y > 0.25) & (y < 0.75), (x > 0.25) & (x < 0.75))
    if (m * central).sum() / total > CENTRE_FRACTION:
        return "centre"
    halves = {"upper half": (rows * side(y, True)).sum(), "lower half": (rows * side(y, False)).sum(),
              "left half": (cols * side(x, True)).sum(), "right half": (cols * side(x, False)).sum()}
    best = max(halves, key=halves.get)
    return best if halves[best] > HALF_FRACTION else "everywhere"


def auto_label(stats, f: int) -> str:
    """A short label of feature ``f`` from its statistics, e.g. ``"Sneaker · late steps · lower half"``."""
    if not 0 <= f < stats.num_features:
        raise TideError(f"feature {f} is out of range: the statistics have {stats.num_features} features")
    parts = [class_part(stats, f), phase_part(stats, f), spatial_part(stats, f)]
    return SEPARATOR.join(p for p in parts if p)


def load_labels(path: str | Path, num_features: int | None = None) -> dict[int, str]:
    """Read a labels file, JSON ``{"feature_id": "label", ...}``; ``num_features`` bounds the ids."""
    path = Path(path)
    if not path.is_file():
        raise TideError(f"labels file {path} does not exist: write a JSON object such as "
                        '{"12": "sneaker sole", "40": "background"}')
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TideError(f"labels file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise TideError(f"labels file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise TideError(f"labels file {path} must hold a JSON object {{\"feature_id\": \"label\"}}, "
                        f"not a {type(data).__name__}")
    labels: dict[int, str] = {}
    for key, value in data.items():
        if not (key.isascii() and key.isdigit()):
            raise TideError(f"labels file {path}: key {key!r} is not a feature id (a non-negative integer as a string)")
        fid = int(key)
        if num_features is not None and fid >= num_features:
            raise TideError(f"labels file {path}: feature {fid} is out of range (the SAE has {num_features} features)")
        if not isinstance(value, str) or not value.strip():
            raise TideError(f"labels file {path}: the label of feature {key} must be a non-empty string, got {value!r}")
        if fid in labels:
            raise TideError(f"labels file {path}: feature {fid} is labelled twice")
        labels[fid] = value.strip()
    return labels
