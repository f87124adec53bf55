"""Q/K versus V/O asymmetry (Liu 2026, phenomenon 3): which projections carry the depth dependence.

Notation: ``n_g[t, d]``, the normalised stable rank of role group g (``qk`` = query and key, ``vo`` =
value and output) averaged over the group at block d, snapshot t. Definitions (also in
``docs/lifecycle.md``):

- depth variance: ``V_g(t) = (1/D) sum_d (n_g[t, d] - mean_d n_g[t, d])^2`` over the finite entries;
- asymmetry index: ``A(t) = (V_qk(t) - V_vo(t)) / (V_qk(t) + V_vo(t))`` in [-1, 1]; +1 when all the
  depth dependence is in Q/K (V/O compress uniformly over depth), -1 when it is all in V/O, 0 when
  equal; NaN while both variances are below ``floor`` (at the first snapshot both are 0);
- run-level index: the same formula on the time means ``S_g = mean_t V_g(t)``.
"""

from __future__ import annotations

import math

import numpy as np

VARIANCE_FLOOR = 1e-12


def depth_variance(values: np.ndarray) -> np.ndarray:
    """(T,) population variance over depth of each row, finite entries only (NaN with fewer than 2)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    finite = np.isfinite(values)
    n = finite.sum(axis=1)
    v = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = v.sum(axis=1) / n
        var = (np.where(finite, (values - mean[:, None]) ** 2, 0.0)).sum(axis=1) / n
    return np.where(n >= 2, var, np.nan)


def asymmetry_index(var_qk: np.ndarray, var_vo: np.ndarray, floor: float = VARIANCE_FLOOR) -> np.ndarray:
    """``(V_qk - V_vo) / (V_qk + V_vo)``, NaN where the sum is at most ``floor`` or either is NaN."""
    var_qk = np.asarray(var_qk, dtype=np.float64)
    var_vo = np.asarray(var_vo, dtype=np.float64)
    total = var_qk + var_vo
    with np.errstate(invalid="ignore", divide="ignore"):
        index = (var_qk - var_vo) / total
    return np.where(total > floor, index, np.nan)


def trajectory_asymmetry(var_qk: np.ndarray, var_vo: np.ndarray, floor: float = VARIANCE_FLOOR) -> float:
    """Run-level index: :func:`asymmetry_index` of the time means of the two depth variances."""
    qk, vo = np.asarray(var_qk, dtype=np.float64), np.asarray(var_vo, dtype=np.float64)
    both = np.isfinite(qk) & np.isfinite(vo)
    if not both.any():
        return math.nan
    return float(asymmetry_index(qk[both].mean(), vo[both].mean(), floor))
