"""Fréchet distance between Gaussians fitted to two sets of features (as FID does, in any feature space)."""

from __future__ import annotations

import numpy as np

from tide.errors import TideError


def frechet_distance(a_NF, b_MF) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples).

    ||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr sqrt(C_a^1/2 C_b C_a^1/2), with sample covariances
    (``np.cov``, N - 1 normalisation). The trace of the matrix square root is taken from the
    eigenvalues of the symmetric PSD matrix C_a^1/2 C_b C_a^1/2, so singular covariances (dead
    ReLU features, fewer samples than dimensions) stay exact. Accepts numpy arrays or tensors.
    """
    a = np.asarray(a_NF.detach().cpu() if hasattr(a_NF, "detach") else a_NF, dtype=np.float64)
    b = np.asarray(b_MF.detach().cpu() if hasattr(b_MF, "detach") else b_MF, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise TideError(f"Fréchet distance needs two (N, F) feature sets of the same width, got shapes "
                        f"{a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise TideError(f"Fréchet distance needs at least 2 samples per set (covariances), got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)
    return max(fd, 0.0)
