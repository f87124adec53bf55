"""Run-level lifecycle figures in words, with their uncertainty (console text, reports, tables).

A figure that cannot be determined is written as ``undetermined (why)``, never as ``nan``.
"""

from __future__ import annotations

import math

from .signals import GroupSummary

UNDETERMINED = "undetermined"


def number(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, or ``undetermined`` when it is not finite."""
    return f"{value:.{digits}g}" if value is not None and math.isfinite(value) else UNDETERMINED


def with_error(value: float, stderr: float, digits: int = 3) -> str:
    """``value ± stderr`` (``value (error undetermined)`` when only the value is finite); an error below
    1e-9 of the value's scale, the round-off of an exact answer, prints as 0."""
    if value is None or not math.isfinite(value):
        return UNDETERMINED
    if stderr is None or not math.isfinite(stderr):
        return f"{value:.{digits}g} (error undetermined)"
    shown = 0.0 if abs(stderr) <= 1e-9 * max(abs(value), 1.0) else stderr
    return f"{value:.{digits}g} ± {shown:.2g}"


def wave_speed_text(g: GroupSummary) -> str:
    """E.g. ``4.01 ± 0.05 blocks/1k steps (R² 0.99, 12 arrivals)`` or ``undetermined (why)``."""
    if not math.isfinite(g.wave_speed):
        return f"{UNDETERMINED} ({g.wave_note or 'no block compressed'})"
    fit = f"R² {g.wave_r2:.2f}, {g.wave_arrivals} arrivals" if math.isfinite(g.wave_r2) else \
        f"{g.wave_arrivals} arrivals"
    if not math.isfinite(g.wave_speed_stderr):
        return f"{g.wave_speed:.3g} blocks/1k steps ({fit}; error undetermined: {g.wave_note or 'unknown'})"
    return f"{with_error(g.wave_speed, g.wave_speed_stderr)} blocks/1k steps ({fit})"


def reversal_text(g: GroupSummary) -> str:
    """E.g. ``reversed at step 7000 ± 12`` or ``no confirmed reversal`` (with the reason)."""
    if not g.reversed:
        return g.reversal_note or "no confirmed reversal"
    if math.isfinite(g.reversal_stderr):
        return f"reversed at step {with_error(round(g.reversal_step), g.reversal_stderr, 12)}"
    return f"reversed at step {g.reversal_step:.0f} ({g.reversal_note or 'uncertainty undetermined'})"
def group_text(g: GroupSummary) -> str:
    """One line: the compression wave's speed and reversal, and the alpha depth profile."""
    return (f"{g.label:>4}: compression wave {wave_speed_text(g)}, {reversal_text(g)}; "
            f"delta alpha {number(g.delta_alpha, 4)}, "
            f"alpha depth gradient {number(g.alpha_depth_gradient, 4)}")
