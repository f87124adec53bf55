"""Metrics against independent references: published estimator definitions, known power laws,
and WeightWatcher itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectral_plugins import METRICS, fit_alpha
from spectral_plugins.core.metrics import effective_rank, stable_rank, validate_metric_names


def reference_fit(eigenvalues: np.ndarray, threshold: float = 1e-5) -> tuple[float, float, float, int]:
    """Clauset, Shalizi & Newman (2009) continuous MLE with min-KS xmin, written as a plain loop
    over candidates straight from the definition (WeightWatcher's WWFit does the same)."""
    x = np.sort(eigenvalues[eigenvalues > threshold])
    best = (math.inf, math.nan, math.nan, 0)
    for i in range(len(x) - 1):
        tail = x[i:]
        n = len(tail)
        alpha = 1 + n / np.sum(np.log(tail / x[i]))
        distance = 1.0
        if alpha > 1:
            distance = np.max(np.abs(1 - (tail / x[i]) ** (1 - alpha) - np.arange(n) / n))
        if distance < best[0]:
            best = (distance, alpha, x[i], n)
    return best[1], best[2], best[0], best[3]


def power_law_sample(alpha: float, n: int, xmin: float, seed: int) -> np.ndarray:
    """Inverse-CDF draws from p(x) ~ x^-alpha on [xmin, inf)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


def heavy_tailed_spectrum(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(df=3, size=(rows, cols)) / math.sqrt(cols)
    return np.linalg.svd(w, compute_uv=False) ** 2


@pytest.mark.parametrize("shape", [(120, 80), (300, 300), (64, 500)])
def test_fit_alpha_equals_the_published_estimator(shape):
    eigenvalues = heavy_tailed_spectrum(*shape, seed=sum(shape))
    fit = fit_alpha(eigenvalues)
    alpha, xmin, distance, n_tail = reference_fit(eigenvalues)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.xmin == pytest.approx(xmin, rel=1e-12)
    assert fit.ks == pytest.approx(distance, rel=1e-9)
    assert fit.n_tail == n_tail
    assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(n_tail))


@pytest.mark.parametrize("true_alpha", [1.8, 2.5, 3.5, 5.0])
def test_fit_alpha_recovers_a_known_power_law(true_alpha):
    # A pure power law above xmin=1 plus a bulk below it that the fit must cut away.
    rng = np.random.default_rng(7)
    tail = power_law_sample(true_alpha, 3000, xmin=1.0, seed=int(true_alpha * 10))
    bulk = rng.uniform(0.05, 0.6, size=1500)
    fit = fit_alpha(np.concatenate([bulk, tail]))
    assert abs(fit.alpha - true_alpha) <= 2 * fit.sigma, (fit, true_alpha)
    assert fit.xmin >= 0.6 - 1e-12


def test_fit_alpha_matches_weightwatcher_fit_exactly():
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    for seed, shape in enumerate([(200, 100), (768, 768), (400, 1000)]):
        eigenvalues = heavy_tailed_spectrum(*shape, seed=seed)
        ours = fit_alpha(eigenvalues)
        theirs = ww_powerlaw.WWFit(eigenvalues[eigenvalues > 1e-5])
        assert ours.alpha == pytest.approx(theirs.alpha, abs=1e-9)
        assert ours.xmin == pytest.approx(theirs.xmin, rel=1e-12)
        assert ours.ks == pytest.approx(theirs.D, abs=1e-9)


def test_fit_alpha_degenerate_inputs_give_nan_not_errors():
    assert math.isnan(fit_alpha(np.array([1.0, 2.0])).alpha)
    assert math.isnan(fit_alpha(np.zeros(50)).alpha)
    assert math.isnan(fit_alpha(np.full(50, np.nan)).alpha)
    assert fit_alpha(torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])).n_tail >= 2


def test_stable_and_effective_rank_match_their_definitions():
    s = np.array([4.0, 2.0, 1.0, 0.5])
    lam = torch.tensor(s**2, dtype=torch.float64)
    assert float(stable_rank(lam)) == pytest.approx(np.sum(s**2) / 16.0)
    p = s / s.sum()
    assert float(effective_rank(lam)) == pytest.approx(math.exp(-np.sum(p * np.log(p))))
    # A rank-1 matrix has effective rank 1; an isotropic one has full effective rank.
    assert float(effective_rank(torch.tensor([0.0, 0.0, 9.0], dtype=torch.float64))) == pytest.approx(1.0)
    assert float(effective_rank(torch.ones(5, dtype=torch.float64))) == pytest.approx(5.0)


def test_metric_registry_names_formulas_and_validation():
    assert {"alpha", "stable_rank", "effective_rank", "spectral_norm", "frobenius_norm",
            "alpha_weighted", "xmin", "ks_distance", "n_tail", "sigma_alpha"} <= set(METRICS)
    assert all(spec.formula for spec in METRICS.values())
    assert validate_metric_names(["alpha"]) == ("alpha",)
    with pytest.raises(ValueError, match="unknown metric"):
        validate_metric_names(["alpah"])
