"""Pictures of one feature for the dashboard: its timestep profile, its per-class activation and
AUROC, and its activation heat map over a regenerated image (a film strip of frames for video).

Plots are drawn through :mod:`tide.plots` and returned as base64 PNGs, ready for a
``data:image/png;base64,...`` URL; overlays are (H, W, 3) uint8 arrays.
"""

from __future__ import annotations

import numpy as np
import torch

from tide.analysis.feature_stats import FeatureStats
from tide.plots import colormap, figure_png_base64, new_figure


def profile_plot(stats: FeatureStats, f: int) -> str:
    """Firing frequency and mean activation of feature ``f`` against the step (base64 PNG)."""
    order = np.argsort(stats.steps, kind="stable")
    x = stats.steps[order]
    fig, ax = new_figure((4.2, 2.4))
    ax.plot(x, stats.frequency_step[order, f], marker="o", ms=3, color="tab:blue")
    ax.set_xlabel("step (0 = noisiest)")
    ax.set_ylabel("firing frequency", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(x, np.nan_to_num(stats.mean_act_step[order, f]), color="tab:orange", lw=1)
    ax2.set_ylabel("mean activation", color="tab:orange")
    ax.set_title("timestep profile", fontsize=9)
    return figure_png_base64(fig, dpi=100)


def class_plot(names: list[str], auroc: np.ndarray, class_mean: np.ndarray) -> str:
    """Mean image activation per class (bars) and one-vs-rest AUROC (dots) (base64 PNG)."""
    c = len(names)
    fig, ax = new_figure((max(3.0, 0.45 * c + 1.5), 2.6))
    ax.bar(np.arange(c), np.nan_to_num(class_mean), color="tab:green")
    ax.set_ylabel("mean image activation")
    ax.set_xticks(np.arange(c), labels=[n[:14] for n in names], rotation=60, fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(np.arange(c), auroc, "o", color="black", ms=3)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("AUROC")
    ax.set_title("per class", fontsize=9)
    return figure_png_base64(fig, dpi=100)


def overlay(image_CHW: torch.Tensor, heat_grid: np.ndarray, min_px: int = 160, alpha: float = 0.55):
    """(plain, overlaid) (H', W', 3) uint8 images: the heat map upsampled (bilinear) to the image,
    coloured with 'inferno' scaled to its own maximum, blended over the image; both enlarged
    (nearest) to at least ``min_px``."""
    from PIL import Image

    from tide.images import to_uint8

    img = to_uint8(image_CHW[None])[0]
    h, w = img.shape[:2]
    heat = np.nan_to_num(np.asarray(heat_grid, dtype=np.float32))
    heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h), Image.BILINEAR))
    peak = heat.max()
    norm = heat / peak if peak > 0 else np.zeros_like(heat)
    colour = colormap("inferno")(norm)[..., :3] * 255
    blend = ((1 - alpha) * img + alpha * colour).round().clip(0, 255).astype(np.uint8)
    scale = max(1, -(-min_px // max(h, w)))
    big = [a.repeat(scale, 0).repeat(scale, 1) for a in (img, blend)]
    return big[0], big[1]


def video_frames(num_latent: int, num_pixel: int, keep: int | None = None,
                 max_frames: int = 8) -> list[tuple[int, int]]:
    """(latent frame, pixel frame) pairs to show for a video: at most ``max_frames`` latent frames evenly
    spread (plus ``keep``, the frame of the top token), each with the decoded frame it lines up with
    (latent frame k <-> pixel frame k * (num_pixel - 1) / (num_latent - 1): Wan's causal VAE decodes
    latent frame 0 to frame 0 and each later one to the next ``temporal_scale`` frames)."""
    picked = set(np.linspace(0, num_latent - 1, min(max_frames, num_latent)).round().astype(int).tolist())
    if keep is not None:
        picked.add(int(keep))
    scale = (num_pixel - 1) / max(num_latent - 1, 1)
    return [(k, min(num_pixel - 1, round(k * scale))) for k in sorted(picked)]


def overlay_video(video_CFHW: torch.Tensor, heat_FRC: np.ndarray, min_px: int = 160, keep: int | None = None,
                  gap: int = 4):
    """(plain, overlaid) film strips of a video: :func:`overlay` of each shown latent frame's heat map
    on its decoded frame (see :func:`video_frames`), side by side with a white ``gap``."""
    pairs = video_frames(heat_FRC.shape[0], video_CFHW.shape[1], keep)
    frames = [overlay(video_CFHW[:, p], heat_FRC[k], min_px) for k, p in pairs]
    strips = []
    for which in (0, 1):
        tiles = [frames[0][which]]
        for f in frames[1:]:
            tiles += [np.full((f[which].shape[0], gap, 3), 255, np.uint8), f[which]]
        strips.append(np.concatenate(tiles, axis=1))
    return strips[0], strips[1]


def occurrence_overlay(image: torch.Tensor, heat: np.ndarray, token: int, min_px: int = 160):
    """(plain, overlaid) pictures of one occurrence: a film strip holding the top token's frame for a
    video heat map (frames, rows, cols), a single overlay for an image."""
    if heat.ndim == 3:
        frame = int(np.unravel_index(token, heat.shape)[0])
        return overlay_video(image, heat, min_px, keep=frame)
    return overlay(image, np.atleast_2d(heat), min_px)
