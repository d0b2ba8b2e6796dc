"""The Fréchet distance against closed forms."""

import numpy as np
import pytest
import torch

from tide.errors import TideError
from tide.eval import frechet_distance


def _exact_moments(rng, n: int, d: int) -> np.ndarray:
    """n samples whose sample mean is exactly 0 and sample covariance (N-1 normalised) exactly I."""
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    w, v = np.linalg.eigh(np.cov(z, rowvar=False))
    return z @ v @ np.diag(w ** -0.5) @ v.T


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((200, 8)) * 3 + 1
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    as_tensor = torch.from_numpy(feats).float()
    assert frechet_distance(as_tensor, as_tensor) == pytest.approx(0.0, abs=1e-5)


def test_frechet_distance_matches_the_closed_form_for_commuting_gaussians():
    # covariances Q diag(s) Q^T share eigenvectors: FD = |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2
    rng = np.random.default_rng(1)
    d = 6
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s_a, s_b = rng.uniform(0.5, 4.0, d), rng.uniform(0.1, 2.0, d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d) + 2
    a = _exact_moments(rng, 300, d) @ np.diag(np.sqrt(s_a)) @ q.T + mu_a
    b = _exact_moments(rng, 500, d) @ np.diag(np.sqrt(s_b)) @ q.T + mu_b
    want = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(s_a) - np.sqrt(s_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_stays_exact_with_singular_covariances():
    # a dead feature (always 0) and fewer samples than dimensions in one set
    rng = np.random.default_rng(2)
    a = np.concatenate([_exact_moments(rng, 50, 3) * 2.0, np.zeros((50, 1))], axis=1)
    b = np.concatenate([_exact_moments(rng, 80, 3) + 1.0, np.zeros((80, 1))], axis=1)
    want = 3 * 1.0 + 3 * (2.0 - 1.0) ** 2
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    few = rng.standard_normal((3, 10))
    assert np.isfinite(frechet_distance(few, rng.standard_normal((40, 10))))


def test_frechet_distance_refuses_mismatched_or_too_small_sets():
    with pytest.raises(TideError, match="same width"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(TideError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
