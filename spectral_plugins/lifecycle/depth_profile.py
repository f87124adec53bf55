"""The persistent spectral gradient (Liu 2026, phenomenon 2): alpha as a function of depth.

Notation: a role group's alpha depth profile ``a[t, d]`` (mean alpha over the group's matrices at
block ``d``, snapshot ``t``), relative depth ``x_d = (d - d_0) / (d_{D-1} - d_0)``. Definitions (also in
``docs/lifecycle.md``):

- Delta-alpha: ``max_d a[t, d] - min_d a[t, d]``, the spread of the profile over depth (alpha units).
- alpha depth gradient: least-squares slope of ``a[t, d]`` against ``x_d`` (alpha per full depth).
- settled profile: the mean over the last ``ceil(tail_fraction * T)`` snapshots (at least one) of
  ``a[t, d]``; run-level figures (Delta-alpha of a run, the inverted-U fit) use it.
- inverted U: least-squares fit ``a_d = b0 + b1 u + b2 u^2`` with ``u = d - mean(d)``; the peak is at
  ``d* = mean(d) - b1 / (2 b2)``. The profile is an inverted U when ``b2 < 0``, ``d*`` lies strictly
  inside ``(d_0, d_{D-1})`` and ``confidence >= level``, where ``confidence = 1 - P(T_{D-3} <= t2)`` is
  one minus the one-sided p-value of the curvature, ``t2 = b2 / se(b2)`` (Student t, D - 3 degrees of
  freedom). The peak's standard error comes from the delta method on ``d*(b1, b2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .wave import depth_slopes

MIN_DEPTHS_FOR_QUADRATIC = 4


def delta_alpha(values: np.ndarray) -> np.ndarray:
    """(T,) ``max_d a[t, d] - min_d a[t, d]`` over the finite entries of each row (NaN with < 2)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    finite = np.isfinite(values)
    hi = np.where(finite, values, -np.inf).max(axis=1)
    lo = np.where(finite, values, np.inf).min(axis=1)
    return np.where(finite.sum(axis=1) >= 2, hi - lo, np.nan)


def alpha_depth_gradient(depths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(T,) slope of alpha over relative depth (alpha per full depth)."""
    return depth_slopes(depths, np.atleast_2d(values))


def settled_profile(values: np.ndarray, tail_fraction: float = 0.1) -> np.ndarray:
    """(D,) mean of the last ``ceil(tail_fraction * T)`` rows (at least one), ignoring NaN. Rows
    without any finite value (steps where the metric was not measured, such as fast-lane steps in a
    history read back from a tracker) are not counted."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    values = values[np.isfinite(values).any(axis=1)]
    if values.shape[0] == 0:
        return np.full(values.shape[1], np.nan)
    n = max(1, math.ceil(tail_fraction * values.shape[0]))
    tail = values[-n:]
    finite = np.isfinite(tail)
    count = finite.sum(axis=0)
    total = np.where(finite, tail, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True)
class InvertedU:
    """Quadratic fit of an alpha depth profile (formulas in the module docs).

    Attributes:
        is_inverted_u: ``curvature < 0``, peak strictly inside the depth range, ``confidence >= level``.
        peak_depth: ``d*`` in block units (NaN when the curvature is not negative).
        peak_relative_depth: ``(d* - d_0) / (d_{D-1} - d_0)``.
        peak_stderr: delta-method standard error of ``d*`` (blocks).
        curvature: ``b2`` (alpha per block^2).
        confidence: ``1 - p`` of the one-sided test ``b2 < 0``.
        r2: coefficient of determination of the quadratic fit.
        r2_linear: of a straight-line fit, for comparison.
    """

    is_inverted_u: bool
    peak_depth: float
    peak_relative_depth: float
    peak_stderr: float
    curvature: float
    confidence: float
    r2: float
    r2_linear: float

    @classmethod
    def undefined(cls) -> InvertedU:
        return cls(False, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)


def fit_inverted_u(depths: np.ndarray, profile: np.ndarray, level: float = 0.95) -> InvertedU:
    """Fit ``a_d = b0 + b1 u + b2 u^2`` (``u = d - mean d``) and test for an interior maximum."""
    d = np.asarray(depths, dtype=np.float64)
    a = np.asarray(profile, dtype=np.float64)
    keep = np.isfinite(d) & np.isfinite(a)
    d, a = d[keep], a[keep]
    if d.size < MIN_DEPTHS_FOR_QUADRATIC or np.unique(d).size < 3:
        return InvertedU.undefined()
    center = d.mean()
    u = d - center
    design = np.stack([np.ones_like(u), u, u**2], axis=1)
    coef, *_ = np.linalg.lstsq(design, a, rcond=None)
    residual = a - design @ coef
    dof = d.size - 3
    sst = float(((a - a.mean()) ** 2).sum())
    sse = float(residual @ residual)
    r2 = 1.0 - sse / sst if sst > 0 else math.nan
    lin = np.polyfit(u, a, 1)
    sse_lin = float(((a - np.polyval(lin, u)) ** 2).sum())
    r2_linear = 1.0 - sse_lin / sst if sst > 0 else math.nan
    cov = (sse / dof if dof > 0 else 0.0) * np.linalg.inv(design.T @ design)
    b1, b2 = float(coef[1]), float(coef[2])
    se2 = math.sqrt(max(cov[2, 2], 0.0))
    exact = 1.0 if b2 < 0 else 0.0  # a perfect fit: the sign of the curvature is certain
    confidence = float(stats.t.sf(b2 / se2, dof)) if se2 > 0 and dof > 0 else exact
    if b2 >= 0:
        return InvertedU(False, math.nan, math.nan, math.nan, b2, confidence, r2, r2_linear)
    peak = center - b1 / (2.0 * b2)
    grad = np.array([0.0, -1.0 / (2.0 * b2), b1 / (2.0 * b2**2)])
    peak_se = math.sqrt(max(float(grad @ cov @ grad), 0.0))
    interior = d.min() < peak < d.max()
    rel = float((peak - d.min()) / np.ptp(d))
    return InvertedU(bool(interior and confidence >= level), float(peak), rel, peak_se, b2, confidence,
                     r2, r2_linear)


def inverted_u_series(depths: np.ndarray, values: np.ndarray, level: float = 0.95) -> list[InvertedU]:
    """:func:`fit_inverted_u` of every row of ``values`` (T, D)."""
    return [fit_inverted_u(depths, row, level) for row in np.atleast_2d(values)]

