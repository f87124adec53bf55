"""The transient compression wave (Liu 2026, phenomenon 1), as pure functions on depth profiles.

Notation: steps ``s_t`` (t = 0..T-1), depths ``d`` (block indices, D of them), and the group's
normalised stable rank ``n[t, d] = stable_rank[t, d] / stable_rank[0, d]`` (1 at the first snapshot;
below 1 means the matrix has compressed). Definitions (also in ``docs/lifecycle.md``):

- compression rate: ``r[t, d] = max(0, -(n[t, d] - n[t-k, d]) / (s_t - s_{t-k}))`` per step, with lag
  k (``lag``; rows t < k use t - k := 0). Only falling stable rank counts.
- wave-front depth: the depth centroid of the current compression rate,
  ``front[t] = sum_d d r[t, d] / sum_d r[t, d]``, in block units, defined at every snapshot where the
  stack compresses: its net fall ``c[t] = -sum_d (n[t, d] - n[t-k, d])`` is positive and at least
  ``rate_floor`` times its gross movement ``sum_d |n[t, d] - n[t-k, d]|``. The test is local to the
  snapshot (no comparison with the fast early compression), so slow late compression has a front too;
  it is causal, so online and offline agree.
- front speed at a snapshot: least-squares slope of ``front`` against ``s_t`` over the last ``window``
  defined fronts, times 1000 (blocks per 1k steps).
- arrival step of block d: the step at which its compression rate peaks, ``argmax_t r[t, d]``,
  the rate being placed at the middle of its interval ``(s_t + s_{t-k}) / 2`` (refined by a
  parabola through the peak and its neighbours), searched before ``until`` (the reversal step, if
  any). The run's wave speed is the least-squares slope of ``d`` against its
  arrival step, times 1000, with the ordinary least-squares standard error of that slope
  ``se = sqrt(SSR / (N - 2) / sum_d (a_d - mean a)^2)`` over the N blocks that have an arrival
  (undetermined below 3 arrivals); ``R^2`` of that line says how wave-like the compression was (1: a
  front travelling at constant speed; near 0: blocks compressed in no depth order). Unlike a fit of
  the centroid, it has no bias where the front enters or leaves the depth range.
- compression order: least-squares slope of ``n[t, d]`` against relative depth ``x_d = (d - d_0) /
  (d_{D-1} - d_0)``: positive while early blocks are more compressed than late ones (the wave phase),
  negative once late blocks are the more compressed (the reversal).
- reversal, detected: the first snapshot t with order < -margin, after some earlier snapshot had
  order > +margin, such that every snapshot in the ``patience`` steps from ``s_t`` on has order < 0 and
  the history reaches ``s_t + patience`` (patience counts steps, so dense snapshots do not make the
  detector hastier). The margin only guards the detection against jitter around 0.
- reversal, located: once confirmed, its step is the zero crossing of the order: the last finite
  snapshot u before t with order >= 0 and the next finite snapshot v, ``s_u + (s_v - s_u) order[u] /
  (order[u] - order[v])``. Its standard error is the timing jitter of a noisy line crossing zero,
  ``sigma / |b|``: ``b`` the least-squares slope of the order over the snapshots within ``h`` steps of
  the crossing, ``h = max(s_t - crossing, 2 * (s_v - s_u))``, and ``sigma`` the order's noise from
  the median absolute deviation of its second differences in that window (``/ sqrt(6)``), which a
  straight or once-kinked trend does not inflate. Undetermined with fewer than 4 snapshots there or
  a slope that does not fall.
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
        step: interpolated step at which the order crossed zero (NaN if none).
        index: the snapshot that confirmed it (-1 if none).
        stderr: standard error of ``step`` in steps (NaN when undetermined; see ``note``).
        note: why there is no reversal or why its uncertainty is undetermined ("" otherwise).
    """

    reversed: bool
    step: float
    index: int
    stderr: float = math.nan
    note: str = ""

    @classmethod
    def none(cls, note: str = "no confirmed reversal") -> Reversal:
        return cls(False, math.nan, -1, math.nan, note)


@dataclass(frozen=True)
class WaveSpeed:
    """The run's wave speed from the arrivals (see the module docs).

    Attributes:
        speed: blocks per 1k steps (NaN when undetermined). stderr: its standard error (NaN below 3
        arrivals). r2: R^2 of the line ``depth ~ arrival``. arrivals: blocks with an arrival step.
        note: why the speed or its error is undetermined ("" otherwise).
    """

    speed: float
    stderr: float
    r2: float
    arrivals: int
    note: str = ""


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

    A snapshot has a front when the stack compresses there: the net fall of the normalised stable rank
    over the lag, summed over depth, is positive and at least ``rate_floor`` times the summed absolute
    change (always idle at t = 0). Being local, the test keeps slow late compression.
    """
    rate = np.nan_to_num(compression_rate(steps, nsr, lag), nan=0.0)
    total = rate.sum(axis=1)
    change = _lagged_change(nsr, lag)
    net_fall = -np.nansum(change, axis=1)
    gross = np.nansum(np.abs(change), axis=1)
    active = (total > 0) & (net_fall > 0) & (net_fall >= rate_floor * gross)
    with np.errstate(invalid="ignore", divide="ignore"):
        front = (rate @ np.asarray(depths, dtype=np.float64)) / total
    return np.where(active, front, np.nan)


def _lagged_change(nsr: np.ndarray, lag: int) -> np.ndarray:
    """(T, D) ``n[t, d] - n[t-k, d]`` (row 0 and NaN entries: 0)."""
    nsr = np.asarray(nsr, dtype=np.float64)
    if nsr.shape[0] < 2:
        return np.zeros_like(nsr)
    previous = np.maximum(np.arange(nsr.shape[0]) - max(1, int(lag)), 0)
    return np.nan_to_num(nsr - nsr[previous], nan=0.0)


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
    fit = arrival_fit(depths, arrivals)
    return fit.speed, fit.r2


def arrival_fit(depths: np.ndarray, arrivals: np.ndarray) -> WaveSpeed:
    """The least-squares line ``depth ~ arrival step``: speed, its standard error, R^2 and arrivals."""
    d = np.asarray(depths, dtype=np.float64)
    a = np.asarray(arrivals, dtype=np.float64)
    keep = np.isfinite(d) & np.isfinite(a)
    d, a = d[keep], a[keep]
    n = int(d.size)
    speed = slope(a, d)
    if n < 2:
        return WaveSpeed(math.nan, math.nan, math.nan, n, f"only {n} block(s) compressed before the reversal")
    if not math.isfinite(speed):
        return WaveSpeed(math.nan, math.nan, math.nan, n, "every block compressed fastest at the same step")
    residual = d - (d.mean() + speed * (a - a.mean()))
    ssr = float(residual @ residual)
    sst = float(((d - d.mean()) ** 2).sum())
    r2 = 1.0 - ssr / sst if sst > 0 else math.nan
    if n < 3:
        return WaveSpeed(speed * STEPS_PER_SPEED_UNIT, math.nan, r2, n,
                         "2 arrivals fit any line exactly")
    stderr = math.sqrt(ssr / (n - 2) / float(((a - a.mean()) ** 2).sum()))
    return WaveSpeed(speed * STEPS_PER_SPEED_UNIT, stderr * STEPS_PER_SPEED_UNIT, r2, n)


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
                    patience: float = 100.0) -> Reversal:
    """The first confirmed turn of the compression order from above ``+margin`` to below ``-margin``.

    Snapshot t confirms a reversal when some earlier order exceeded ``+margin``, ``order[t] < -margin``,
    the history reaches ``s_t + patience`` and every snapshot in ``[s_t, s_t + patience]`` has order
    < 0 (``patience`` in steps). The reversal step is then the order's zero crossing before t (the
    module docs), with its standard error.
    """
    steps = np.asarray(steps, dtype=np.float64)
    order = np.asarray(order, dtype=np.float64)
    patience = max(0.0, float(patience))
    seen_positive = False
    pending = False
    for t, value in enumerate(order):
        if not np.isfinite(value):
            continue
        if value > margin:
            seen_positive = True
        elif seen_positive and value < -margin:
            if steps[-1] < steps[t] + patience:
                pending = True
                break
            window = order[(steps >= steps[t]) & (steps <= steps[t] + patience)]
            if np.all(window[np.isfinite(window)] < 0):
                step, stderr, note = _zero_crossing(steps, order, t)
                return Reversal(True, step, t, stderr, note)
    if pending:
        return Reversal.none(f"not confirmed yet: the order must stay negative for {patience:g} steps")
    return Reversal.none()


def _zero_crossing(steps: np.ndarray, order: np.ndarray, t: int) -> tuple[float, float, str]:
    """(step, standard error, note) of the order's last zero crossing before snapshot t (order[t] < 0)."""
    finite = np.flatnonzero(np.isfinite(order[:t + 1]))
    nonnegative = finite[order[finite] >= 0]
    u = int(nonnegative[-1])  # exists: an earlier order exceeded +margin
    v = int(finite[finite > u][0])
    crossing = float(steps[u] + (steps[v] - steps[u]) * order[u] / (order[u] - order[v]))
    half_width = max(steps[t] - crossing, 2.0 * (steps[v] - steps[u]))
    near = np.flatnonzero(np.isfinite(order) & (np.abs(steps - crossing) <= half_width))
    if near.size < 4:
        return crossing, math.nan, f"uncertainty undetermined: only {near.size} snapshots near the crossing"
    fall = slope(steps[near], order[near])
    if not fall < 0:
        return crossing, math.nan, "uncertainty undetermined: the order does not fall across the crossing"
    second = np.diff(order[near], 2)
    noise = 1.4826 * float(np.median(np.abs(second - np.median(second)))) / math.sqrt(6.0)
    return crossing, noise / abs(fall), ""
