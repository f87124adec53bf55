"""Spectral metrics of one weight matrix: the single place that defines each name and formula.

Conventions (as in WeightWatcher and heavy-tailed self-regularisation theory): for a weight matrix
W (m x n) with singular values s_1 >= ... >= s_min(m,n), the eigenvalues of its correlation matrix
are lambda_i = s_i^2. Every function here is a pure function of those eigenvalues (a 1-D tensor or
array), so it can be tested alone against independent references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# WeightWatcher drops eigenvalues <= 1e-5 before its power-law fit (EVALS_THRESH); we do the same so
# that alpha agrees with it, and additionally drop those below the numerical precision floor.
WEIGHTWATCHER_EIGENVALUE_THRESHOLD = 1e-5
# Largest block of xmin candidates whose KS distances are evaluated at once (bounds memory:
# block x n float64 values).
_KS_BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class MetricSpec:
    """What one per-matrix metric means.

    Attributes:
        name: the metric's name, used in keys as ``spectral_<name>/<layer>``.
        formula: the definition, in the notation of this module.
        description: one line for tables and docs.
        summary: which aggregate a tracker should keep as the run summary ("last" or "min").
    """

    name: str
    formula: str
    description: str
    summary: str = "last"


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("spectral_norm", "s_1 = sqrt(lambda_max)", "largest singular value"),
        MetricSpec("frobenius_norm", "||W||_F = sqrt(sum_ij W_ij^2) = sqrt(sum_i lambda_i)",
                   "Frobenius norm"),
        MetricSpec("stable_rank", "||W||_F^2 / ||W||_2^2 = sum_i lambda_i / lambda_max",
                   "stable rank (Rudelson & Vershynin)", summary="min"),
        MetricSpec("effective_rank", "exp(-sum_i p_i ln p_i), p_i = s_i / sum_j s_j",
                   "effective rank (Roy & Vetterli 2007)", summary="min"),
        MetricSpec("alpha", "1 + n_tail / sum_{lambda_i >= xmin} ln(lambda_i / xmin), xmin by min KS",
                   "power-law exponent of the eigenvalue tail (Clauset et al. 2009 MLE)"),
        MetricSpec("alpha_weighted", "alpha * log10(lambda_max)", "alpha weighted by scale (WeightWatcher)"),
        MetricSpec("xmin", "lower edge of the fitted power-law tail", "power-law xmin"),
        MetricSpec("ks_distance", "D = max_x |F_emp(x) - F_fit(x)| over the tail", "KS distance of the fit"),
        MetricSpec("n_tail", "#{i : lambda_i >= xmin}", "eigenvalues in the fitted tail"),
        MetricSpec("sigma_alpha", "(alpha - 1) / sqrt(n_tail)", "standard error of alpha"),
        MetricSpec("lambda_max", "s_1^2", "largest eigenvalue of W^T W"),
    )
}
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)
# Published as per-matrix series by default (``metrics=None``): the two metrics the lifecycle is read
# from. Every metric is still computed and kept in the snapshot, its tables and its JSON.
DEFAULT_SERIES_METRICS: tuple[str, ...] = ("alpha", "stable_rank")


def validate_metric_names(names: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Return ``names`` as a tuple (all metrics when None); raise on an unknown name."""
    if names is None:
        return METRIC_NAMES
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric name(s) {unknown}; choose from {list(METRIC_NAMES)}")
    return tuple(names)


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`fit_alpha`.

    Attributes:
        alpha: power-law exponent, ``1 + n_tail / sum ln(lambda_i / xmin)`` over the tail.
        xmin: the eigenvalue chosen as the tail's lower edge (minimum KS distance).
        ks: Kolmogorov-Smirnov distance D between the tail and the fitted power law.
        n_tail: number of eigenvalues >= xmin.
        sigma: standard error ``(alpha - 1) / sqrt(n_tail)``.
    """

    alpha: float
    xmin: float
    ks: float
    n_tail: int
    sigma: float

    @classmethod
    def failed(cls) -> PowerLawFit:
        """The result for a spectrum with too few usable eigenvalues: every field NaN / 0."""
        return cls(math.nan, math.nan, math.nan, 0, math.nan)


def fit_alpha(eigenvalues: np.ndarray | torch.Tensor, threshold: float | None = None) -> PowerLawFit:
    """Fit a continuous power law to the tail of an eigenvalue spectrum.

    The estimator is WeightWatcher's default (``WWFit``), itself Clauset, Shalizi & Newman (2009):
    for every candidate xmin among the sorted eigenvalues x_1 <= ... <= x_N (all but the largest),
    the MLE ``alpha = 1 + n / sum_{j >= i} ln(x_j / x_i)`` with n = N - i, and the KS distance
    ``D = max_{j >= i} |1 - (x_j / x_i)^(1 - alpha) - (j - i) / n|`` (D = 1 where alpha <= 1); the
    candidate with the smallest D wins. All candidates are evaluated at once from cumulative sums
    of log-eigenvalues, in blocks, never in a Python loop over candidates.

    Args:
        eigenvalues: the spectrum, any order. Non-finite values are ignored.
        threshold: eigenvalues <= threshold are dropped first (default: WeightWatcher's 1e-5).

    Returns:
        A :class:`PowerLawFit`; :meth:`PowerLawFit.failed` when fewer than 3 eigenvalues remain.
    """
    values = torch.as_tensor(eigenvalues).detach().to(device="cpu", dtype=torch.float64).flatten()
    cut = WEIGHTWATCHER_EIGENVALUE_THRESHOLD if threshold is None else threshold
    values = values[torch.isfinite(values) & (values > cut)]
    if values.numel() < 3:
        return PowerLawFit.failed()
    x = torch.sort(values).values
    n_total = x.numel()
    log_x = torch.log(x)
    # Candidates are x[0..N-2]; tail of candidate i is x[i:], of size N - i.
    tail_sizes = torch.arange(n_total, 0, -1, dtype=torch.float64)[:-1]
    tail_log_sums = torch.flip(torch.cumsum(torch.flip(log_x, [0]), 0), [0])[:-1]
    log_spread = tail_log_sums - tail_sizes * log_x[:-1]
    alphas = 1.0 + tail_sizes / log_spread
    alphas = torch.where(log_spread > 0, alphas, torch.full_like(alphas, math.inf))
    distances = _ks_distances(x, log_x, alphas)
    best = int(torch.argmin(distances))
    alpha = float(alphas[best])
    if not math.isfinite(alpha) or alpha <= 1.0:
        return PowerLawFit.failed()
    n_tail = n_total - best
    return PowerLawFit(alpha=alpha, xmin=float(x[best]), ks=float(distances[best]), n_tail=n_tail,
                       sigma=(alpha - 1.0) / math.sqrt(n_tail))


def _ks_distances(x: torch.Tensor, log_x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """KS distance of every candidate xmin against its tail, in blocks of candidate rows.

    A block of rows [start, stop) only needs the columns j >= start (the tails), so the work is
    the upper triangle, not the full N x N square.
    """
    n_total = x.numel()
    n_candidates = alphas.numel()
    block = max(16, min(256, _KS_BLOCK_ELEMENTS // n_total))
    distances = torch.ones(n_candidates, dtype=torch.float64)
    for start in range(0, n_candidates, block):
        stop = min(start + block, n_candidates)
        rows = torch.arange(start, stop)
        cols = torch.arange(start, n_total)
        offset = (cols.unsqueeze(0) - rows.unsqueeze(1)).to(torch.float64)  # j - i
        tail_size = (n_total - rows).to(torch.float64).unsqueeze(1)
        log_ratio = (log_x[start:].unsqueeze(0) - log_x[start:stop].unsqueeze(1)).clamp_min_(0.0)
        block_alphas = alphas[start:stop]
        # 1 - F_fit = (x_j / x_i)^(1 - alpha); gap = |F_fit - F_emp| on the tail (offset >= 0).
        survival = torch.exp_(log_ratio.mul_((1.0 - block_alphas).unsqueeze(1)))
        gap = (1.0 - survival).sub_(offset / tail_size).abs_()
        gap.masked_fill_(offset < 0, 0.0)
        block_d = gap.amax(dim=1)
        valid = torch.isfinite(block_alphas) & (block_alphas > 1.0)
        distances[start:stop] = torch.where(valid, block_d, torch.ones_like(block_d))
    return distances


def spectral_norm(eigenvalues: torch.Tensor) -> torch.Tensor:
    """``s_1 = sqrt(lambda_max)`` along the last dimension."""
    return eigenvalues.amax(dim=-1).clamp_min(0).sqrt()


def stable_rank(eigenvalues: torch.Tensor, frobenius_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``||W||_F^2 / ||W||_2^2 = sum(lambda) / lambda_max`` (``frobenius_sq`` overrides the sum)."""
    total = eigenvalues.sum(dim=-1) if frobenius_sq is None else frobenius_sq
    return total / eigenvalues.amax(dim=-1)


def effective_rank(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007): ``exp(H(p))``, ``p_i = s_i / sum_j s_j``, ``H(p) = -sum p_i ln p_i``."""
    singular = eigenvalues.clamp_min(0).sqrt()
    p = singular / singular.sum(dim=-1, keepdim=True)
    entropy = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(dim=-1)
    return torch.exp(entropy)


def alpha_weighted(alpha: float, lambda_max: float) -> float:
    """WeightWatcher's ``alpha_weighted = alpha * log10(lambda_max)``."""
    if not (math.isfinite(alpha) and lambda_max > 0):
        return math.nan
    return alpha * math.log10(lambda_max)
