"""Two-timescale fit of one metric's trajectory: a fast transient on top of a slow drift.

Model, with ``t = step - step_0`` counted from the first finite point::

    y(t) = c + A_f exp(-t / tau_f) + A_s exp(-t / tau_s),      0 < tau_f <= tau_s

fitted by least squares in two stages: (1) variable projection on a log-spaced grid of
``(tau_f, tau_s)`` pairs (for fixed time constants the model is linear in ``c, A_f, A_s``, solved for
every pair at once), then (2) ``scipy.optimize.curve_fit`` from the best pair, over
``(c, A_f, A_s, ln tau_f, ln tau_s)`` with the time constants bounded to
``[min_dt / 2, max_tau_factor * span]``. A drift much slower than the run is nearly linear, so its
``tau_s`` and ``A_s`` are individually poorly determined; their ratio is not, and is reported as the
initial drift rate ``-A_s / tau_s`` (units per step).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

MIN_POINTS = 7
GRID_SIZE = 28


@dataclass(frozen=True)
class TwoTimescaleFit:
    """Result of :func:`fit_two_timescales` (formula in the module docs).

    Attributes:
        tau_fast: fast time constant ``tau_f`` (steps).
        tau_slow: slow time constant ``tau_s`` (steps), ``>= tau_fast``.
        amp_fast: ``A_f`` (metric units; positive = the metric falls over the transient).
        amp_slow: ``A_s``.
        offset: ``c``, the asymptote.
        drift_rate: ``-A_s / tau_s``, slope of the slow part at ``t = 0`` (units per step).
        r2: coefficient of determination of the fit.
        n_points: finite points used.
        ok: a fit was possible (enough finite points, finite result).
    """

    tau_fast: float
    tau_slow: float
    amp_fast: float
    amp_slow: float
    offset: float
    drift_rate: float
    r2: float
    n_points: int
    ok: bool

    @classmethod
    def failed(cls, n_points: int = 0) -> TwoTimescaleFit:
        nan = math.nan
        return cls(nan, nan, nan, nan, nan, nan, nan, n_points, False)


def two_timescale_model(t: np.ndarray, c: float, a_f: float, a_s: float, log_tau_f: float,
                        log_tau_s: float) -> np.ndarray:
    """``c + a_f exp(-t / e^log_tau_f) + a_s exp(-t / e^log_tau_s)``."""
    return c + a_f * np.exp(-t / math.exp(log_tau_f)) + a_s * np.exp(-t / math.exp(log_tau_s))


def fit_two_timescales(steps: np.ndarray, values: np.ndarray,
                       max_tau_factor: float = 100.0) -> TwoTimescaleFit:
    """Fit the two-timescale model to one series (NaN points are ignored)."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(steps) & np.isfinite(values)
    t, y = steps[keep], values[keep]
    if t.size < MIN_POINTS:
        return TwoTimescaleFit.failed(int(t.size))
    t = t - t[0]
    span = float(t[-1])
    gaps = np.diff(t)
    if span <= 0 or np.any(gaps <= 0):
        return TwoTimescaleFit.failed(int(t.size))
    lo, hi = math.log(gaps.min() / 2.0), math.log(max_tau_factor * span)
    sst = float(((y - y.mean()) ** 2).sum())
    start = _grid_start(t, y, np.exp(np.linspace(lo, hi, GRID_SIZE)))
    params = start
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            bounds = ([-np.inf, -np.inf, -np.inf, lo, lo], [np.inf, np.inf, np.inf, hi, hi])
            refined, _ = curve_fit(two_timescale_model, t, y, p0=start, bounds=bounds, max_nfev=2000)
        if _sse(t, y, refined) <= _sse(t, y, start):
            params = refined
    except (RuntimeError, ValueError):
        pass
    c, a_f, a_s, log_f, log_s = (float(p) for p in params)
    if log_f > log_s:
        a_f, a_s, log_f, log_s = a_s, a_f, log_s, log_f
    tau_f, tau_s = math.exp(log_f), math.exp(log_s)
    sse = _sse(t, y, params)
    r2 = 1.0 - sse / sst if sst > 0 else math.nan
    ok = all(math.isfinite(v) for v in (c, a_f, a_s, tau_f, tau_s))
    return TwoTimescaleFit(tau_f, tau_s, a_f, a_s, c, -a_s / tau_s, r2, int(t.size), ok)


def _sse(t: np.ndarray, y: np.ndarray, params: np.ndarray) -> float:
    residual = y - two_timescale_model(t, *params)
    return float(residual @ residual)


def _grid_start(t: np.ndarray, y: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Best ``(c, A_f, A_s, ln tau_f, ln tau_s)`` over the grid pairs ``tau_f < tau_s`` (variable
    projection: the linear coefficients are solved for every pair at once)."""
    i, j = np.triu_indices(taus.size, k=1)
    decay = np.exp(-t[None, :] / taus[:, None])  # (G, T)
    design = np.stack([np.ones((i.size, t.size)), decay[i], decay[j]], axis=2)  # (P, T, 3)
    gram = np.einsum("ptk,ptl->pkl", design, design) + 1e-12 * np.eye(3)
    rhs = np.einsum("ptk,t->pk", design, y)
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]  # (P, 3)
    residual = y[None, :] - np.einsum("ptk,pk->pt", design, coef)
    best = int(np.argmin((residual**2).sum(axis=1)))
    return np.array([*coef[best], math.log(taus[i[best]]), math.log(taus[j[best]])])
