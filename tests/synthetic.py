"""Constructed spectral histories whose lifecycle answers are known in closed form (test helpers).

The synthetic run (steps 0, ``interval``, ..., ``last``; blocks d = 0..D-1):

- Q/K and MLP stable rank ``10 * n_d(t)`` with
  ``n_d(t) = 1 - A step((v (t - t0) - d) / w) - B x_d max(0, t - t_r) / tau``, ``x_d = d / (D-1)``,
  ``step(z)`` the cubic smooth step from 0 (z <= -1) to 1 (z >= 1), ``1/2 + 3z/4 - z^3/4`` between:
  a compression front at depth ``v (t - t0)`` (v in blocks per step) whose rate ``(1 - z^2)`` is a
  parabola peaking at block d's arrival ``t0 + d / v``; then, from ``t_r``, late blocks compressing
  more than early ones. The step has compact support, so before the front every block is exactly at
  1 and after it exactly at ``1 - A``: the compression order (slope of n over relative depth) is
  exactly 0 until ``t_r`` and ``-B (t - t_r) / tau`` after it (once the front has passed), so its zero
  crossing, the reversal, is ``t_r``.
- V/O stable rank ``10 * (1 - 0.2 (1 - exp(-t / 1000)))``: uniform over depth (zero depth variance).
- alpha of every matrix ``profile(d) + 1.0 exp(-t / 100) + 0.5 exp(-t / 3000)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from spectral_plugins.core.snapshot import LayerSpectrum
from spectral_plugins.lifecycle.history import SpectralHistory

WAVE_ROLES = ("q", "k", "mlp_in", "mlp_out")
UNIFORM_ROLES = ("v", "o")


def layer(key: str, depth: int | None, role: str, stable_rank: float = 5.0, alpha: float = 3.0,
          name: str | None = None) -> LayerSpectrum:
    """A LayerSpectrum with the given stable rank and alpha (other metrics arbitrary but consistent)."""
    return LayerSpectrum(
        name=name or f"blocks.{depth}.{role}.weight", key=key, module_name=f"blocks.{depth}.{role}",
        depth=depth, role=role, shape=(16, 16), spectral_norm=2.0, frobenius_norm=2.0 * stable_rank**0.5,
        stable_rank=stable_rank, effective_rank=stable_rank * 1.5, alpha=alpha, alpha_weighted=alpha * 0.6,
        xmin=0.5, ks_distance=0.1, n_tail=8, sigma_alpha=(alpha - 1) / 8**0.5, lambda_max=4.0)


def wave_nsr(t: np.ndarray, depths: np.ndarray, speed_per_step: float, t0: float, amplitude: float,
             width: float, t_r: float, ramp_depth: float, ramp_tau: float) -> np.ndarray:
    """(T, D) the Q/K normalised-stable-rank field of the module docs (before normalisation)."""
    t = np.asarray(t, dtype=np.float64)[:, None]
    d = np.asarray(depths, dtype=np.float64)[None, :]
    x = d / max(d.max(), 1.0)
    z = np.clip((speed_per_step * (t - t0) - d) / width, -1.0, 1.0)
    front = amplitude * (0.5 + 0.75 * z - 0.25 * z**3)
    return 1.0 - front - ramp_depth * x * np.clip((t - t_r) / ramp_tau, 0.0, None)


def wave_history(num_blocks: int = 12, speed: float = 4.0, t0: float = 2000.0, t_r: float = 7000.0,
                 ramp_tau: float = 2000.0, ramp_depth: float = 0.2, amplitude: float = 0.3,
                 width: float = 2.0, interval: int = 25, last: int = 10000, noise: float = 0.0,
                 alpha_profile: Callable[[np.ndarray], np.ndarray] | None = None, seed: int = 0,
                 max_steps: int = 4096) -> SpectralHistory:
    """The synthetic run of the module docs; ``speed`` in blocks per 1k steps, ``noise`` the relative
    standard deviation of multiplicative Gaussian noise on every stable rank and alpha."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, last + 1, interval)
    depths = np.arange(num_blocks)
    nsr = wave_nsr(steps, depths, speed / 1000.0, t0, amplitude, width, t_r, ramp_depth, ramp_tau)
    uniform = 1.0 - 0.2 * (1.0 - np.exp(-steps / 1000.0))
    profile = alpha_profile(depths) if alpha_profile is not None else 3.0 + 0.0 * depths
    alpha = profile[None, :] + 1.0 * np.exp(-steps / 100.0)[:, None] + 0.5 * np.exp(-steps / 3000.0)[:, None]
    history = SpectralHistory(max_steps=max_steps)
    for t, step in enumerate(steps):
        values = {}
        for d in depths:
            for role in WAVE_ROLES + UNIFORM_ROLES:
                sr = 10.0 * (nsr[t, d] if role in WAVE_ROLES else uniform[t])
                a = alpha[t, d]
                if noise:
                    sr *= 1.0 + noise * rng.standard_normal()
                    a *= 1.0 + noise * rng.standard_normal()
                values[f"L{d:02d}_{role}"] = [sr, a, 2.0, sr * 1.5]
        history.append_values(int(step), values)
    return history


def profile_history(profile: np.ndarray, steps: int = 20, interval: int = 50) -> SpectralHistory:
    """A history whose alpha depth profile is ``profile`` (D,) at every step (all block roles)."""
    history = SpectralHistory()
    for s in range(steps):
        values = {f"L{d:02d}_{role}": [5.0, float(a), 2.0, 7.0]
                  for d, a in enumerate(profile) for role in ("q", "k", "v", "o", "mlp_in", "mlp_out")}
        history.append_values(s * interval, values)
    return history
