"""Pictures of one feature for the atlas, cheap enough for every feature of a wide SAE.

* The timestep profile, the per-class plot and the activation histogram are small inline SVG strings, built
  from numbers with no plotting library (a 16k-feature atlas draws 48k of them; matplotlib would take an hour);
  every text in them goes through :func:`tide.analysis.dashboard_html.E`.
* Sample pictures are uint8 arrays written once per sample (:func:`sample_picture`): the image, or for a video a
  film strip of evenly spread frames (:func:`video_frames`) that the heat maps line up with. The heat map itself
  is drawn over the picture by the page's script (bilinear, 'inferno'), so no per-feature image is written.
"""

from __future__ import annotations

import numpy as np
import torch

from tide.analysis.dashboard_html import E

W, H = 360, 150
"""Plot size in CSS pixels."""
L, R, T, B = 44, 44, 18, 30
"""Margins (left, right, top, bottom)."""


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _count(v: float) -> str:
    """A count in at most four characters: 950, 12k, 3.4M."""
    v = float(v)
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.2g}{unit}" if v < 10 * div else f"{v / div:.0f}{unit}"
    return f"{v:.0f}"


def _axes(title: str, x_label: str, y_left: str, y_right: str | None, left_colour: str, right_colour: str) -> list[str]:
    parts = [f'<svg class="plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             f'role="img" aria-label="{E(title)}">',
             f'<text x="{W / 2}" y="12" text-anchor="middle" class="t">{E(title)}</text>',
             f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" class="ax"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" class="ax"/>',
             f'<text x="{W / 2}" y="{H - 4}" text-anchor="middle" class="l">{E(x_label)}</text>',
             f'<text x="10" y="{(H - B + T) / 2}" text-anchor="middle" class="l" fill="{left_colour}" '
             f'transform="rotate(-90 10 {(H - B + T) / 2})">{E(y_left)}</text>']
    if y_right:
        parts.append(f'<text x="{W - 8}" y="{(H - B + T) / 2}" text-anchor="middle" class="l" fill="{right_colour}" '
                     f'transform="rotate(90 {W - 8} {(H - B + T) / 2})">{E(y_right)}</text>')
    return parts


def _scale(v: np.ndarray, top: float) -> np.ndarray:
    """Values to y pixel positions (0 at the axis, ``top`` at the top margin)."""
    top = top if top > 0 else 1.0
    return (H - B) - np.nan_to_num(np.asarray(v, dtype=float)) / top * (H - B - T)


def profile_svg(steps: np.ndarray, frequency: np.ndarray, mean_act: np.ndarray) -> str:
    """Firing frequency (blue, left axis) and mean activation (orange, right axis) against the step."""
    order = np.argsort(steps, kind="stable")
    x_steps = np.asarray(steps)[order]
    fr, ma = np.asarray(frequency, float)[order], np.asarray(mean_act, float)[order]
    n = len(x_steps)
    xs = L + (np.arange(n) + 0.5) / max(n, 1) * (W - L - R)
    f_top, m_top = float(np.nanmax(fr)) if n and np.isfinite(fr).any() else 0.0, \
        float(np.nanmax(ma)) if n and np.isfinite(ma).any() else 0.0
    parts = _axes("timestep profile", "step (0 = noisiest)", "firing frequency", "mean activation",
                  "#1f77b4", "#ff7f0e")
    for vals, top, colour in ((fr, f_top, "#1f77b4"), (ma, m_top, "#ff7f0e")):
        ys = _scale(vals, top)
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
    parts += [f'<text x="{L - 3}" y="{T + 4}" text-anchor="end" class="v" fill="#1f77b4">{_fmt(f_top)}</text>',
              f'<text x="{W - R + 3}" y="{T + 4}" class="v" fill="#ff7f0e">{_fmt(m_top)}</text>']
    for i in sorted({0, n // 2, n - 1}) if n else []:
        parts.append(f'<text x="{xs[i]:.1f}" y="{H - B + 12}" text-anchor="middle" class="v">{int(x_steps[i])}</text>')
    return "".join(parts) + "</svg>"


def classes_svg(names: list[str], class_mean: np.ndarray, auroc: np.ndarray) -> str:
    """Mean image-level activation per class (green bars, left axis) and one-vs-rest AUROC (dots, right axis
    from 0 to 1, with a dashed line at 0.5)."""
    c = len(names)
    cm, au = np.asarray(class_mean, float), np.asarray(auroc, float)
    top = float(np.nanmax(cm)) if c and np.isfinite(cm).any() else 0.0
    step = (W - L - R) / max(c, 1)
    parts = _axes("per class", "class", "mean image activation", "AUROC", "#2ca02c", "#000")
    ys = _scale(cm, top)
    y_half = _scale(np.array([0.5]), 1.0)[0]
    parts.append(f'<line x1="{L}" y1="{y_half:.1f}" x2="{W - R}" y2="{y_half:.1f}" class="half"/>')
    for i, name in enumerate(names):
        x = L + i * step
        h = (H - B) - ys[i]
        parts.append(f'<rect x="{x + step * 0.15:.1f}" y="{ys[i]:.1f}" width="{step * 0.7:.1f}" height="{h:.1f}" '
                     f'fill="#2ca02c"><title>{E(name)}: mean {_fmt(cm[i]) if np.isfinite(cm[i]) else "–"}, AUROC '
                     f'{_fmt(au[i]) if np.isfinite(au[i]) else "–"}</title></rect>')
        if np.isfinite(au[i]):
            parts.append(f'<circle cx="{x + step / 2:.1f}" cy="{_scale(au[i:i + 1], 1.0)[0]:.1f}" r="2.5" fill="#000"/>')
        if c <= 12:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{H - B + 11}" text-anchor="middle" class="v">'
                         f'{E(str(name)[:4])}</text>')
    parts += [f'<text x="{L - 3}" y="{T + 4}" text-anchor="end" class="v" fill="#2ca02c">{_fmt(top)}</text>',
              f'<text x="{W - R + 3}" y="{T + 4}" class="v">1</text>']
    return "".join(parts) + "</svg>"


def histogram_svg(edges: np.ndarray, counts: np.ndarray) -> str:
    """Counts of the feature's firing activations in log-spaced bins (the bins between its first and last
    non-empty one), on a log count axis."""
    counts = np.asarray(counts, float)
    nz = np.flatnonzero(counts)
    parts = _axes("activation histogram (when firing)", "activation (log scale)", "rows (log scale)", None,
                  "#6a3d9a", "#000")
    if not len(nz):
        parts.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="l">never fires</text>')
        return "".join(parts) + "</svg>"
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    c = counts[lo:hi]
    logc = np.log10(c + 1)
    top = float(logc.max())
    ys = _scale(logc, top)
    step = (W - L - R) / len(c)
    for i, v in enumerate(c):
        if v > 0:
            parts.append(f'<rect x="{L + i * step:.1f}" y="{ys[i]:.1f}" width="{max(step - 0.5, 0.5):.1f}" '
                         f'height="{(H - B) - ys[i]:.1f}" fill="#6a3d9a"><title>{_fmt(edges[lo + i])} – '
                         f'{_fmt(edges[lo + i + 1])}: {int(v)}</title></rect>')
    parts += [f'<text x="{L}" y="{H - B + 12}" class="v">{_fmt(edges[lo])}</text>',
              f'<text x="{W - R}" y="{H - B + 12}" text-anchor="end" class="v">{_fmt(edges[hi])}</text>',
              f'<text x="{L - 3}" y="{T + 4}" text-anchor="end" class="v">{_count(10 ** top - 1)}</text>']
    return "".join(parts) + "</svg>"


def video_frames(num_latent: int, num_pixel: int, keep: int | None = None,
                 max_frames: int = 8) -> list[tuple[int, int]]:
    """(latent frame, pixel frame) pairs to show for a video: at most ``max_frames`` latent frames evenly
    spread (plus ``keep``), each with the decoded frame it lines up with (latent frame k <-> pixel frame
    k * (num_pixel - 1) / (num_latent - 1): Wan's causal VAE decodes latent frame 0 to frame 0 and each later one
    to the next ``temporal_scale`` frames)."""
    picked = set(np.linspace(0, num_latent - 1, min(max_frames, num_latent)).round().astype(int).tolist())
    if keep is not None:
        picked.add(int(keep))
    scale = (num_pixel - 1) / max(num_latent - 1, 1)
    return [(k, min(num_pixel - 1, round(k * scale))) for k in sorted(picked)]


def sample_picture(image: torch.Tensor, grid: tuple[int, ...]) -> tuple[np.ndarray, list[int] | None]:
    """(H, W', 3) uint8 picture of a sample, and for a video the latent frames it shows (None for an image): a
    video (C, F, H, W) becomes the frames of :func:`video_frames` side by side, one panel per latent frame of
    the heat maps."""
    from tide.images import to_uint8

    if image.dim() == 4:
        pairs = video_frames(int(grid[0]), image.shape[1])
        frames = to_uint8(torch.stack([image[:, p] for _, p in pairs]))
        return np.concatenate(list(frames), axis=1), [k for k, _ in pairs]
    return to_uint8(image[None])[0], None
