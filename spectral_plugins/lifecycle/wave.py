"""The transient compression wave (Liu 2026, phenomenon 1), as pure functions on depth profiles.

Notation: steps ``s_t`` (t = 0..T-1), depths ``d`` (block indices, D of them), and the group's
normalised stable rank ``n[t, d] = stable_rank[t, d] / stable_rank[0, d]`` (1 at the first snapshot;
below 1 means the matrix has compressed). Definitions (also in ``docs/lifecycle.md``):

- compression rate: ``r[t, d] = max(0, -(n[t, d] - n[t-k, d]) / (s_t - s_{t-k}))`` per step, with lag
  k (``lag``; rows t < k use t - k := 0). Only falling stable rank counts.
- wave-front depth: the depth centroid of the current compression rate,
  ``front[t] = sum_d d r[t, d] / sum_d r[t, d]``, in block units; NaN where nothing compresses, i.e.
  ``sum_d r[t, d] <= rate_floor * max_{t' <= t} sum_d r[t', d]`` (causal, so online and offline agree).
- front speed at a snapshot: least-squares slope of ``front`` against ``s_t`` over the last ``window``
  defined fronts, times 1000 (blocks per 1k steps).
- arrival step of block d: the step at which its compression rate peaks, ``argmax_t r[t, d]``,
  the rate being placed at the middle of its interval ``(s_t + s_{t-k}) / 2`` (refined by a
  parabola through the peak and its neighbours), searched before ``until`` (the reversal step, if
  any). The run's wave speed is the least-squares slope of ``d`` against its
  arrival step, times 1000; ``R^2`` of that line says how wave-like the compression was (1: a front
  travelling at constant speed; near 0: blocks compressed in no depth order). Unlike a fit of the
  centroid, it has no bias where the front enters or leaves the depth range.
- compression order: least-squares slope of ``n[t, d]`` against relative depth ``x_d = (d - d_0) /
  (d_{D-1} - d_0)``: positive while early blocks are more compressed than late ones (the wave phase),
  negative once late blocks are the more compressed (the reversal).
- reversal: the first snapshot t with order < -margin, after some earlier snapshot had order > +margin,
  such that the order stays < 0 for ``patience`` snapshots from t on; its step is where the order
  crossed -margin, linearly interpolated between snapshot t and the previous one. (The band
  [-margin, +margin] is neutral: after the front has passed, the order hovers near 0 and its exact
  zero crossing would be noise.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STEPS_PER_SPEED_UNIT = 1000.0


@dataclass(frozen=True)
class Reversal:
    """Where the compression order turned (see the module docs).

    Attributes:
        reversed: whether a confirmed reversal happened.
        step: interpolated step at which the order crossed -margin (NaN if none).
        index: the snapshot that confirmed it (-1 if none).
    """

    reversed: bool
    step: float
    index: int

    @classmethod
    def none(cls) -> Reversal:
        return cls(False, math.nan, -1)


def compression_rate(steps: np.ndarray, nsr: np.ndarray, lag: int = 1) -> np.ndarray:
    """(T, D) ``r[t, d] = max(0, -(n[t, d] - n[t-k, d]) / (s_t - s_{t-k}))``; row 0 is 0; NaN stays NaN."""
    steps = np.asarray(steps, dtype=np.float64)
    nsr = np.asarray(nsr, dtype=np.float64)
    rate = np.zeros_like(nsr)
    if nsr.shape[0] < 2:
        return rate
    lag = max(1, int(lag))
    previous = np.maximum(np.arange(nsr.shape[0]) - lag, 0)
    dt = (steps - steps[previous])[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(dt > 0, -(nsr - nsr[previous]) / np.where(dt > 0, dt, 1.0), 0.0)
    return np.where(np.isnan(rate), np.nan, np.maximum(rate, 0.0))


def wave_front(steps: np.ndarray, depths: np.ndarray, nsr: np.ndarray, lag: int = 1,
               rate_floor: float = 0.05) -> np.ndarray:
    """(T,) depth centroid of the compression rate, ``sum_d d r[t,d] / sum_d r[t,d]``; NaN when idle.

    A snapshot is idle when its total rate is at most ``rate_floor`` times the largest total rate seen
    up to it (and always at t = 0).
    """
    rate = np.nan_to_num(compression_rate(steps, nsr, lag), nan=0.0)
    total = rate.sum(axis=1)
    running_max = np.maximum.accumulate(total) if total.size else total
    active = (total > 0) & (total > rate_floor * running_max)
    with np.errstate(invalid="ignore", divide="ignore"):
        front = (rate @ np.asarray(depths, dtype=np.float64)) / total
    return np.where(active, front, np.nan)


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y against x over the finite pairs (NaN with fewer than 2 distinct x)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2 or np.ptp(x) == 0:
        return math.nan
    xc = x - x.mean()
    return float(xc @ (y - y.mean()) / (xc @ xc))


def front_speed(steps: np.ndarray, front: np.ndarray) -> float:
    """Blocks per 1k steps: ``1000 * slope(front, steps)`` over the snapshots where the front exists."""
    return slope(steps, front) * STEPS_PER_SPEED_UNIT


def arrival_steps(steps: np.ndarray, nsr: np.ndarray, lag: int = 1, until: float = math.inf) -> np.ndarray:
    """(D,) step of each block's peak compression rate before ``until`` (NaN if it never compressed)."""
    steps = np.asarray(steps, dtype=np.float64)
    rate = np.nan_to_num(compression_rate(steps, nsr, lag), nan=0.0)
    previous = np.maximum(np.arange(steps.size) - max(1, int(lag)), 0)
    window = steps < until
    rate = rate[window]
    steps = 0.5 * (steps + steps[previous])[window]  # a rate belongs to the middle of its interval
    out = np.full(rate.shape[1], np.nan)
    if rate.shape[0] == 0:
        return out
    for d in range(rate.shape[1]):
        t = int(np.argmax(rate[:, d]))
        if rate[t, d] <= 0:
            continue
        out[d] = steps[t]
        if 0 < t < rate.shape[0] - 1:
            y0, y1, y2 = rate[t - 1, d], rate[t, d], rate[t + 1, d]
            curvature = y0 - 2 * y1 + y2
            if curvature < 0 and steps[t + 1] - steps[t] == steps[t] - steps[t - 1]:
                out[d] = steps[t] + 0.5 * (y0 - y2) / curvature * (steps[t + 1] - steps[t])
    return out


def arrival_speed(depths: np.ndarray, arrivals: np.ndarray) -> tuple[float, float]:
    """(blocks per 1k steps, R^2) of the least-squares line ``depth ~ arrival step``."""
    d = np.asarray(depths, dtype=np.float64)
    a = np.asarray(arrivals, dtype=np.float64)
    keep = np.isfinite(d) & np.isfinite(a)
    d, a = d[keep], a[keep]
    speed = slope(a, d)
    if not math.isfinite(speed):
        return math.nan, math.nan
    residual = d - (d.mean() + speed * (a - a.mean()))
    sst = float(((d - d.mean()) ** 2).sum())
    r2 = 1.0 - float(residual @ residual) / sst if sst > 0 else math.nan
    return speed * STEPS_PER_SPEED_UNIT, r2


def trailing_speed(steps: np.ndarray, front: np.ndarray, window: int = 5) -> np.ndarray:
    """(T,) front speed at each snapshot over its last ``window`` defined fronts (blocks per 1k steps)."""
    steps = np.asarray(steps, dtype=np.float64)
    front = np.asarray(front, dtype=np.float64)
    out = np.full(front.shape, np.nan)
    defined = np.flatnonzero(np.isfinite(front))
    for i, t in enumerate(defined):
        recent = defined[max(0, i - window + 1): i + 1]
        if recent.size >= 2:
            out[t] = slope(steps[recent], front[recent]) * STEPS_PER_SPEED_UNIT
    return out


def relative_depth(depths: np.ndarray) -> np.ndarray:
    """``x_d = (d - d_0) / (d_{D-1} - d_0)`` in [0, 1] (zeros for a single depth)."""
    depths = np.asarray(depths, dtype=np.float64)
    if depths.size < 2 or np.ptp(depths) == 0:
        return np.zeros_like(depths)
    return (depths - depths.min()) / np.ptp(depths)


def depth_slopes(depths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(T,) least-squares slope of ``values[t, :]`` against relative depth, per row (finite entries only)."""
    x = relative_depth(depths)
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    w = finite.astype(np.float64)
    v = np.where(finite, values, 0.0)
    n = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        x_mean = (w @ x) / n
        y_mean = v.sum(axis=1) / n
        xc = x[None, :] - x_mean[:, None]
        sxx = (w * xc**2).sum(axis=1)
        sxy = (w * xc * (v - y_mean[:, None])).sum(axis=1)
        out = sxy / sxx
    return np.where((n >= 2) & (sxx > 0), out, np.nan)


def compression_order(depths: np.ndarray, nsr: np.ndarray) -> np.ndarray:
    """(T,) slope of the normalised stable rank over relative depth (> 0: early blocks more compressed)."""
    return depth_slopes(depths, nsr)


def detect_reversal(steps: np.ndarray, order: np.ndarray, margin: float = 0.01,
                    patience: int = 3) -> Reversal:
    """The first confirmed turn of the compression order from above ``+margin`` to below ``-margin``.

    Snapshot t confirms a reversal when some earlier order exceeded ``+margin``, ``order[t] < -margin``,
    and the ``patience`` snapshots from t on all have order < 0. The step is where the order crossed
    ``-margin``, linearly interpolated between snapshot t and the previous finite one.
    """
    steps = np.asarray(steps, dtype=np.float64)
    order = np.asarray(order, dtype=np.float64)
    patience = max(1, int(patience))
    seen_positive = False
    for t, value in enumerate(order):
        if not np.isfinite(value):
            continue
        if value > margin:
            seen_positive = True
        elif seen_positive and value < -margin:
            window = order[t: t + patience]
            if window.size == patience and np.all(window < 0):
                return Reversal(True, _crossing(steps, order, t, -margin), t)
    return Reversal.none()


def _crossing(steps: np.ndarray, order: np.ndarray, t: int, level: float) -> float:
    """Step where ``order`` passed ``level`` between the finite snapshot before t and t."""
    before = t - 1
    while before >= 0 and not np.isfinite(order[before]):
        before -= 1
    if before < 0 or order[before] == order[t]:
        return float(steps[t])
    fraction = (order[before] - level) / (order[before] - order[t])
    return float(steps[before] + (steps[t] - steps[before]) * min(max(fraction, 0.0), 1.0))
