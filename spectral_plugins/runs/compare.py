"""Compare runs of different depth: does the persistent alpha gradient grow with depth L?

For each run, Delta-alpha is the spread over depth of its settled alpha profile (see
:mod:`~spectral_plugins.lifecycle.depth_profile`) in one role group, and L its number of blocks.
Across runs we
fit the power law ``Delta_alpha = c * L^beta`` by least squares in log-log space,
``ln Delta_alpha = ln c + beta ln L``, and report ``beta`` (Liu 2026 finds about 0.26), its standard
error and ``R^2`` of the log-log fit. ``spectral-plugins compare`` prints a table of every run's
lifecycle figures and writes a plot.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from ..lifecycle.history import SpectralHistory
from ..lifecycle.signals import LifecycleConfig, LifecycleSummary, summarize
from .report import fixed, saved_figure

DEFAULT_PLOT = "spectral_compare.png"


@dataclass(frozen=True)
class DepthScalingFit:
    """``Delta_alpha = prefactor * L^exponent`` fitted in log-log space.

    Attributes:
        exponent: ``beta``. exponent_stderr: its standard error (NaN with fewer than 3 runs).
        prefactor: ``c``. r2: ``R^2`` of the log-log line. n_runs: runs used (finite, positive values).
    """

    exponent: float
    exponent_stderr: float
    prefactor: float
    r2: float
    n_runs: int


def fit_depth_scaling(depths: ArrayLike, delta_alphas: ArrayLike) -> DepthScalingFit:
    """Least squares of ``ln Delta_alpha`` on ``ln L`` over the pairs where both are finite and > 0."""
    x = np.asarray(depths, dtype=np.float64)
    y = np.asarray(delta_alphas, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[keep]), np.log(y[keep])
    n = int(keep.sum())
    if n < 2 or np.ptp(lx) == 0:
        return DepthScalingFit(math.nan, math.nan, math.nan, math.nan, n)
    xc = lx - lx.mean()
    beta = float(xc @ (ly - ly.mean()) / (xc @ xc))
    intercept = float(ly.mean() - beta * lx.mean())
    residual = ly - (intercept + beta * lx)
    sse, sst = float(residual @ residual), float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - sse / sst if sst > 0 else math.nan
    stderr = math.sqrt(sse / (n - 2) / float(xc @ xc)) if n > 2 else math.nan
    return DepthScalingFit(beta, stderr, math.exp(intercept), r2, n)


@dataclass(frozen=True)
class RunFigures:
    """One run's row of the comparison: its ``name``, block count and lifecycle ``summary``."""

    name: str
    num_blocks: int
    steps: int
    summary: LifecycleSummary


@dataclass(frozen=True)
class Comparison:
    """Every run's figures and the depth-scaling fit of Delta-alpha in role group ``group``."""

    group: str
    runs: tuple[RunFigures, ...]
    fit: DepthScalingFit

    def delta_alphas(self) -> np.ndarray:
        return np.array([r.summary.group(self.group).delta_alpha for r in self.runs])

    def depths(self) -> np.ndarray:
        return np.array([r.num_blocks for r in self.runs], dtype=np.float64)


def compare_histories(runs: Sequence[tuple[str, SpectralHistory]], group: str = "all",
                      config: LifecycleConfig | None = None) -> Comparison:
    """Summarise each named history (without per-layer timescale fits) and fit Delta-alpha against L
    (in a model of several stacks: the first stack's Delta-alpha against its own depth)."""
    config = replace(config or LifecycleConfig(), fit_timescales=False)
    if group not in config.groups:
        config = replace(config, groups=(*config.groups, group))
    figures = tuple(RunFigures(name, h.stack_blocks(), int(h.steps[-1]) if len(h) else 0,
                               summarize(h, config)) for name, h in runs)
    comparison = Comparison(group, figures, DepthScalingFit(math.nan, math.nan, math.nan, math.nan, 0))
    return replace(comparison, fit=fit_depth_scaling(comparison.depths(), comparison.delta_alphas()))


def format_table(comparison: Comparison) -> str:
    """A plain-text table: one row per run, then the fit."""
    g = comparison.group
    header = ("run", "L", "last step", "d_alpha", "grad", "U peak", "wave/1k", "reversal", "qk-vo")
    rows = [header]
    for r in comparison.runs:
        s = r.summary.group(g)
        peak = s.inverted_u.peak_relative_depth if s.inverted_u.is_inverted_u else math.nan
        rows.append((r.name, str(r.num_blocks), str(r.steps), fixed(s.delta_alpha),
                     fixed(s.alpha_depth_gradient), fixed(peak), fixed(s.wave_speed),
                     fixed(s.reversal_step, 0), fixed(r.summary.qk_vo_asymmetry)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    fit = comparison.fit
    lines.append("")
    lines.append(f"Delta-alpha[{g}] = {fixed(fit.prefactor)} * L^{fixed(fit.exponent)} "
                 f"(+- {fixed(fit.exponent_stderr)}), R^2 = {fixed(fit.r2)}, {fit.n_runs} runs  "
                 "(Liu 2026: L^0.26)")
    return "\n".join(lines)


def plot_comparison(comparison: Comparison, path: str | Path) -> Path:
    """Write a log-log plot of Delta-alpha against L with the fitted power law (PNG)."""
    depths, deltas = comparison.depths(), comparison.delta_alphas()
    with saved_figure(path, figsize=(5.5, 4.0), dpi=110) as fig:
        ax = fig.subplots()
        ax.scatter(depths, deltas, color="C0", zorder=3)
        for r, x, y in zip(comparison.runs, depths, deltas):
            if math.isfinite(y) and y > 0:
                ax.annotate(r.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        fit = comparison.fit
        if math.isfinite(fit.exponent):
            grid = np.geomspace(depths[depths > 0].min(), depths.max(), 50)
            ax.plot(grid, fit.prefactor * grid**fit.exponent, color="C1",
                    label=f"{fit.prefactor:.3g} L^{fit.exponent:.3f}, R²={fit.r2:.3f}")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("depth L (blocks)")
        ax.set_ylabel(f"Δα ({comparison.group})")
        ax.set_title("Persistent spectral gradient vs depth")
    return Path(path)


def add_compare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``spectral-plugins compare`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "compare", help="fit Delta-alpha against depth across tracked runs",
        description="Read several runs (TensorBoard log dirs, saved history .json files, mlflow:<run_id>), "
                    "print each run's lifecycle figures and fit Delta-alpha = c L^beta across them.")
    parser.add_argument("runs", nargs="*", help="TensorBoard log dir, history .json, or mlflow:<run_id>")
    parser.add_argument("--mlflow-experiment", action="append", default=[], metavar="NAME_OR_ID",
                        help="add every run of this MLflow experiment (repeatable)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--group", default="all", choices=["qk", "vo", "mlp", "all"],
                        help="role group of Delta-alpha (default all)")
    parser.add_argument("--plot", default=DEFAULT_PLOT,
                        help=f"where to write the plot (default {DEFAULT_PLOT})")
    parser.set_defaults(handler=run_compare)
    return parser


def run_compare(args: argparse.Namespace) -> int:
    """The ``compare`` command: load, summarise, print, plot. Returns the exit status."""
    from .readers import load_run, mlflow_experiment_runs

    specs = list(args.runs)
    if args.mlflow_experiment:
        specs += mlflow_experiment_runs(args.mlflow_experiment, args.tracking_uri)
    if not specs:
        print("compare: give at least one run (or --mlflow-experiment)")
        return 2
    try:
        loaded = [load_run(spec, args.tracking_uri) for spec in specs]
    except (FileNotFoundError, ValueError) as error:
        print(f"compare: {error}")
        return 2
    names = [run.name for run in loaded]
    named = [(run.name if names.count(run.name) == 1 else run.source, run.history) for run in loaded]
    comparison = compare_histories(named, group=args.group)
    print(format_table(comparison))
    print(f"\nplot: {plot_comparison(comparison, args.plot)}")
    return 0
