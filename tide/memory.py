"""Cheap estimates of the memory (and disk) a request needs, checked up front: a request that cannot fit is refused
in one line with the estimate, before anything is generated, instead of running out of memory hours later.

The estimates are deliberately simple and on the high side; their constants come from peak-RSS measurements of real
runs on the CPU (``VmHWM`` of ``tide sample`` / :func:`tide.sampling.sample` on the embedded models and tiny
diffusers models, torch 2.13, diffusers 0.42):

* one denoising batch keeps 11-16x ``tokens x d_model x itemsize`` bytes alive per model row (rows = samples, twice
  that under classifier-free guidance): :data:`ACTIVATION_FACTOR` is 20;
* a VAE decode keeps about 6.5x ``pixels x block_out_channels[0] x itemsize`` bytes per image: :data:`VAE_FACTOR` is 8;
* ``tide sample``'s labelled grid (a matplotlib figure of the whole grid) peaks at about 122 bytes per grid pixel:
  :data:`GRID_BYTES_PER_PIXEL` is 160 (fmnist-pixart: 1.6 MB per sample; 1,000 samples needed 1.65 GB);
* the latents and images of every sample stay in host memory until the grid is drawn (float32 each).

Available memory is ``MemAvailable`` of ``/proc/meminfo`` (bounded by a cgroup v2 limit when one is set) for the
host, and ``torch.cuda.mem_get_info`` (plus what torch's caching allocator holds free) on a GPU. Where neither can
be read (another OS), nothing is refused.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tide.errors import TideError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tide.models.base import Backbone

MEMINFO = Path("/proc/meminfo")
"""Where the host's available memory is read (``MemAvailable``)."""
CGROUP_MEMORY = Path("/sys/fs/cgroup")
"""cgroup v2 root: ``memory.max`` and ``memory.current`` bound the memory of a container."""

ACTIVATION_FACTOR = 20
"""Bytes alive per model row during a denoising step, in units of ``tokens x d_model x itemsize`` (measured 11-16)."""
VAE_FACTOR = 8
"""Bytes alive per image during a VAE decode, in units of ``pixels x block_out_channels[0] x itemsize`` (measured 6.5)."""
GRID_BYTES_PER_PIXEL = 160
"""Peak bytes per pixel of a labelled image grid drawn by :func:`tide.images.save_grid` (measured about 122)."""
CAPTURE_META_BYTES = 19
"""Bytes of per-row metadata a captured row stores beside its activations (timestep, step, sample, token, cond,
branch; docs/FORMAT.md)."""
CAPTURE_SHARDS_IN_MEMORY = 3
"""Shards of float32 rows the capture writer may hold at once: the one being filled, and the previous one being
concatenated and written."""

GiB = 1 << 30


def human_bytes(n: float) -> str:
    """``312 GiB``, ``1.5 GiB``, ``96 MiB``, ``12 TiB``: a size for a message."""
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    mib = max(n / (1 << 20), 0.1)
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


# ------------------------------------------------------------------------------------ what is there
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_host_bytes() -> int | None:
    """Memory the host can still give this process: ``MemAvailable``, bounded by the cgroup's limit; None when
    unknown."""
    available = None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        available = None
    limit, used = _read_int(CGROUP_MEMORY / "memory.max"), _read_int(CGROUP_MEMORY / "memory.current")
    if limit is not None and used is not None:
        room = max(limit - used, 0)
        available = room if available is None else min(available, room)
    return available


def available_device_bytes(device: "torch.device") -> int | None:
    """Free memory of a CUDA device (what the driver reports free plus what torch's cache holds unused); None for
    the CPU (its memory is the host's)."""
    import torch

    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes on the file system ``path`` is (or would be) on."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# ------------------------------------------------------------------------------------ what a request needs
def _itemsize(backbone: "Backbone") -> int:
    return max(backbone.dtype.itemsize, backbone.latent_dtype.itemsize)


def sequence_tokens(backbone: "Backbone") -> int:
    """Tokens per model row: the image tokens, plus the prompt tokens of a text family (a joint-attention model
    runs them in the same sequence)."""
    tokens = backbone.num_tokens
    if backbone.text_conditioned and backbone.prompts is not None:
        embeds = backbone.prompts.tensors.get("prompt_embeds")
        if embeds is not None and embeds.dim() == 3:
            tokens += int(embeds.shape[1])
    return tokens


def image_shape(backbone: "Backbone") -> tuple[int, ...]:
    """(C, H, W) of a decoded image ((C, F, H, W) for video): the latent shape for pixel-space models, scaled by
    the VAE's compression otherwise."""
    shape = tuple(int(s) for s in backbone.latent_shape())
    vae = backbone.vae
    if vae is None:
        return shape
    cfg = vae.config
    spatial = getattr(backbone, "vae_scale_factor", None) or getattr(vae, "spatial_compression_ratio", None)
    if not spatial:
        spatial = 2 ** (len(getattr(cfg, "block_out_channels", None) or (0, 0, 0, 0)) - 1)
    channels = int(getattr(cfg, "out_channels", None) or 3)
    if len(shape) == 4:
        temporal = int(getattr(cfg, "scale_factor_temporal", None) or 4)
        return channels, (shape[1] - 1) * temporal + 1, shape[2] * int(spatial), shape[3] * int(spatial)
    return channels, shape[1] * int(spatial), shape[2] * int(spatial)


def batch_bytes(backbone: "Backbone", batch: int, guidance_scale: float | None, decode: bool = True) -> int:
    """Peak bytes one denoising batch of ``batch`` samples keeps alive on its device: the transformer's activations
    (twice the rows under classifier-free guidance) and, with ``decode``, the VAE decode of the batch."""
    rows = batch * (2 if backbone.uses_cfg(backbone.resolve_guidance(guidance_scale)) else 1)
    item = _itemsize(backbone)
    need = rows * sequence_tokens(backbone) * backbone.d_model * item * ACTIVATION_FACTOR
    if decode and backbone.vae is not None:
        cfg = backbone.vae.config
        width = (getattr(cfg, "block_out_channels", None) or [getattr(cfg, "base_dim", None) or 128])[0]
        pixels = math.prod(image_shape(backbone)[1:])
        need += batch * pixels * int(width) * item * VAE_FACTOR
    return int(need)


def grid_pixels(backbone: "Backbone") -> int:
    """Pixels one sample takes in a :func:`tide.images.save_grid` grid (upscaled, padded; videos as film strips)."""
    from tide.images import STRIP_FRAMES, grid_scale

    shape = image_shape(backbone)
    h, w = shape[-2], shape[-1]
    if len(shape) == 4:
        w *= min(STRIP_FRAMES, shape[1])
    scale = grid_scale(shape[-2], shape[-1])
    return (h * scale + 2) * (w * scale + 2)


def sample_output_bytes(backbone: "Backbone", num_samples: int, decode: bool = True, grid: bool = False) -> int:
    """Host bytes the outputs of ``num_samples`` samples take: their float32 latents, float32 images (``decode``)
    and their share of a drawn grid (``grid``)."""
    per = math.prod(backbone.latent_shape()) * 4
    if decode:
        per += math.prod(image_shape(backbone)) * 4
    if grid:
        per += grid_pixels(backbone) * GRID_BYTES_PER_PIXEL
    return int(num_samples) * int(per)


# ------------------------------------------------------------------------------------ refusals
def _refuse(what: str, need: int, available: int, where: str, fix: str) -> None:
    raise TideError(f"{what} needs about {human_bytes(need)} of {where} (estimate) but {human_bytes(available)} "
                    f"{'are free' if where == 'disk' else 'are available'}: {fix}")


def check_fits(device: "torch.device", host_need: int, device_need: int, what: str, fix: str,
               batch_what: str, batch_fix: str) -> None:
    """Refuse a request whose estimate exceeds the memory available. ``host_need``: bytes kept in host memory for
    the whole request (its outputs); ``device_need``: one batch's peak on ``device`` (the host's memory on the CPU).
    A batch too large for the device alone is named by ``batch_what``/``batch_fix``, the rest by ``what``/``fix``."""
    host = available_host_bytes()
    gpu = available_device_bytes(device)
    if gpu is not None:
        if device_need > gpu:
            _refuse(batch_what, device_need, gpu, "GPU memory", batch_fix)
        if host is not None and host_need > host:
            _refuse(what, host_need, host, "memory", fix)
        return
    if host is None:
        return
    if device_need > host:
        _refuse(batch_what, device_need, host, "memory", batch_fix)
    if host_need + device_need > host:
        _refuse(what, host_need + device_need, host, "memory", fix)


def check_sample(backbone: "Backbone", n: int, num_conditions: int, batch_size: int,
                 guidance_scale: float | None) -> None:
    """`tide sample`: refuse ``n`` samples for each of ``num_conditions`` rows when their latents, images and grid
    (kept until the grid is drawn) plus one batch do not fit in memory."""
    total = n * num_conditions
    batch = min(batch_size, total)
    what = f"--n {n}" + (f" for {num_conditions:,} --classes rows ({total:,} samples)" if num_conditions > 1 else "")
    fix = "lower --n" + (" or pass fewer --classes" if num_conditions > 1 else "")
    check_fits(backbone.device, sample_output_bytes(backbone, total, decode=True, grid=True),
               batch_bytes(backbone, batch, guidance_scale, decode=True), what, fix,
               f"--batch-size {batch_size}", "lower --batch-size")


def capture_row_bytes(backbone: "Backbone", num_hooks: int, storage_dtype: str) -> int:
    """Bytes one captured row (one token of one sample at one step) takes on disk."""
    item = 2 if storage_dtype == "float16" else 4
    return num_hooks * backbone.d_model * item + CAPTURE_META_BYTES


def check_capture(config, backbone: "Backbone") -> None:
    """`tide capture`: refuse a capture whose shard batch does not fit in memory (a shard's samples are denoised as
    one batch, and the writer holds shards of float32 rows), or whose dataset does not fit on the disk of
    ``config.out`` (free space plus what a ``--resume``/``--overwrite`` there already holds)."""
    from tide.capture.run import parse_record_steps

    steps = parse_record_steps(config.record_steps, config.num_steps)
    num_hooks = len(config.hooks) if config.hooks else 1
    kept = max(1, round(backbone.num_tokens * config.token_fraction))
    rows_per_sample = len(steps) * (2 if config.cfg_branch == "both" else 1) * kept
    shard = min(config.samples_per_shard, config.num_samples)
    shard_f32 = shard * rows_per_sample * (num_hooks * backbone.d_model * 4 + CAPTURE_META_BYTES)
    check_fits(backbone.device, CAPTURE_SHARDS_IN_MEMORY * shard_f32,
               batch_bytes(backbone, shard, config.guidance_scale, decode=False),
               f"--samples-per-shard {config.samples_per_shard}", "lower --samples-per-shard",
               f"--samples-per-shard {config.samples_per_shard}", "lower --samples-per-shard")
    need = config.num_samples * rows_per_sample * capture_row_bytes(backbone, num_hooks, config.storage_dtype)
    out = Path(config.out)
    resumed = (config.resume or config.overwrite) and out.is_dir()  # its files are kept (resume) or freed first
    held = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if resumed else 0
    free = free_disk_bytes(out) + held
    if need > free:
        _refuse(f"--num-samples {config.num_samples:,} ({rows_per_sample:,} rows per sample)", need, free, "disk",
                f"lower --num-samples, record fewer steps (--record-steps) or tokens (--token-fraction), or choose an "
                f"--out on a larger disk (in {out})")
