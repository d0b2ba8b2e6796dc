"""Figures: the one place tide sets up matplotlib, makes a figure and writes it out.

The eval report (``eval.png``), the dashboard (timestep-profile and per-class plots, activation
overlays) and labelled image grids (:func:`tide.images.save_grid`) all draw through here.

* matplotlib is imported on first use, so ``import tide`` stays light;
* figures are drawn on the Agg canvas they are created with (:func:`new_figure`), never through
  ``pyplot``'s global backend: tide does not call ``matplotlib.use``, so a notebook's inline backend
  (or a user's own figures) are left as they were, and nothing leaks into pyplot's figure manager;
* :func:`save_figure` (a PNG file) and :func:`figure_png_base64` (a PNG inline in HTML) lay the figure
  out tightly, render it once and let it go.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Iterable

import numpy as np


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, dpi: float | None = None,
               squeeze: bool = True):
    """``(figure, axes)`` like ``pyplot.subplots``, on its own Agg canvas (no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def _render(fig, target, dpi: float | None, tight: bool) -> None:
    if tight:
        fig.tight_layout()
    kwargs = {"format": "png"} if not isinstance(target, (str, Path)) else {}
    fig.savefig(target, dpi=dpi, **kwargs)  # dpi None: rcParams["savefig.dpi"] (default: the figure's)
    fig.clear()


def save_figure(fig, path: str | Path, dpi: float | None = None, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` (PNG; the format follows the suffix), laid out tightly; returns the path."""
    path = Path(path)
    _render(fig, path, dpi, tight)
    return path


def figure_png_base64(fig, dpi: float | None = 100, tight: bool = True) -> str:
    """``fig`` as a base64 PNG, for a ``data:image/png;base64,...`` URL."""
    buf = io.BytesIO()
    _render(fig, buf, dpi, tight)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_png_base64(array_HWC: np.ndarray) -> str:
    """A (H, W, 3) uint8 image as a base64 PNG (PIL, no figure)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array_HWC).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def colormap(name: str):
    """A registered matplotlib colormap (``colormap("inferno")(values)`` gives RGBA in [0, 1])."""
    from matplotlib import colormaps

    return colormaps[name]


def finite_or_nan(values: Iterable) -> np.ndarray:
    """A float array of ``values`` with ``None`` (a JSON null) as NaN, which matplotlib leaves undrawn."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)
