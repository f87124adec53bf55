"""Compare tracked runs: their lifecycles side by side, and whether the alpha gradient grows with depth.

:func:`compare_runs` reads any mix of runs (MLflow runs or experiments, TensorBoard folders, offline
or online W&B runs, saved histories; :mod:`spectral_plugins.runs.readers`), recomputes each run's
run-level lifecycle figures from its series, and returns a :class:`Comparison`: a table of every
run's figures next to its parameters, and ``.save(dir)`` for ``compare.html`` with the maps on one
colour scale, the headline series and the final alpha profiles overlaid
(:mod:`spectral_plugins.runs.compare_page`).

Across runs of different depth the persistent alpha gradient is fitted as a power law: Delta-alpha
(the spread over depth of the settled alpha profile in one role group) against the block count L,
``Delta_alpha = c * L^beta`` by least squares in log-log space, reporting ``beta`` (Liu 2026 finds
about 0.26), its standard error and ``R^2``. A line through two points says nothing, so the fit is
made only with at least :data:`MIN_DEPTHS` distinct depths; otherwise the comparison says why not.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..lifecycle.history import SpectralHistory
from ..lifecycle.signals import LifecycleConfig, LifecycleSummary, summarize
from .compare_page import ComparisonFiles, figure, save_comparison
from .report import fixed, saved_figure

DEFAULT_OUT = "spectral_compare"
MIN_DEPTHS = 3


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
    """One run of the comparison: its ``name``, block count, last step, lifecycle ``summary``, its
    ``history``, and, when read from a tracker, where it came from and its parameters."""

    name: str
    num_blocks: int
    steps: int
    summary: LifecycleSummary
    history: SpectralHistory = field(repr=False)
    source: str = ""
    params: Mapping[str, str] = field(default_factory=dict)


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

    def fit_note(self) -> str | None:
        """Why there is no depth-scaling fit (None when there is one)."""
        depths = sorted({int(d) for d in self.depths() if d > 0})
        usable = sorted({int(d) for d, v in zip(self.depths(), self.delta_alphas())
                         if d > 0 and math.isfinite(v) and v > 0})
        if len(depths) < MIN_DEPTHS:
            found = ", ".join(map(str, depths)) or "none"
            return (f"No Delta-alpha vs depth fit: it needs runs of at least {MIN_DEPTHS} distinct depths; "
                    f"these runs have {len(depths)} (L = {found}).")
        if len(usable) < MIN_DEPTHS:
            return (f"No Delta-alpha vs depth fit: Delta-alpha is defined (> 0) at only {len(usable)} of the "
                    f"{len(depths)} depths; it needs {MIN_DEPTHS}.")
        return None

    def fit_line(self) -> str:
        """The fit in one line (or :meth:`fit_note`)."""
        note = self.fit_note()
        if note is not None:
            return note
        fit = self.fit
        return (f"Delta-alpha[{self.group}] = {fixed(fit.prefactor)} * L^{fixed(fit.exponent)} "
                f"(+- {fixed(fit.exponent_stderr)}), R^2 = {fixed(fit.r2)}, {fit.n_runs} runs  "
                "(Liu 2026: L^0.26)")

    def table(self) -> list[dict[str, Any]]:
        """One row per run: name, source, depth, last step, the run-level figures of :attr:`group`
        ("undetermined" where the run does not determine one) and the run's ``params``."""
        rows = []
        for run in self.runs:
            g = run.summary.group(self.group)
            rows.append({
                "run": run.name, "source": run.source, "blocks": run.num_blocks, "last step": run.steps,
                "Δα": figure(g.delta_alpha), "α depth gradient": figure(g.alpha_depth_gradient),
                "wave speed (blocks/1k steps)": figure(g.wave_speed), "wave R²": figure(g.wave_r2),
                "reversal step": figure(g.reversal_step, 0) if g.reversed else "none",
                "Q/K vs V/O asymmetry": figure(run.summary.qk_vo_asymmetry), "params": dict(run.params)})
        return rows

    def save(self, out_dir: str | Path) -> ComparisonFiles:
        """Write ``compare.html`` and its PNG figures into ``out_dir``."""
        return save_comparison(self, out_dir)


def compare_histories(runs: Sequence[tuple[str, SpectralHistory]], group: str = "all",
                      config: LifecycleConfig | None = None,
                      sources: Sequence[tuple[str, Mapping[str, str]]] | None = None) -> Comparison:
    """Summarise each named history (without per-layer timescale fits) and fit Delta-alpha against L
    (in a model of several stacks: the first stack's Delta-alpha against its own depth); ``sources``:
    each run's (source, params), for the table."""
    config = replace(config or LifecycleConfig(), fit_timescales=False)
    if group not in config.groups:
        config = replace(config, groups=(*config.groups, group))
    extra = list(sources) if sources is not None else [("", {})] * len(runs)
    figures = tuple(RunFigures(name, h.stack_blocks(), int(h.steps[-1]) if len(h) else 0,
                               summarize(h, config), h, source, params)
                    for (name, h), (source, params) in zip(runs, extra))
    comparison = Comparison(group, figures, DepthScalingFit(math.nan, math.nan, math.nan, math.nan, 0))
    return replace(comparison, fit=fit_depth_scaling(comparison.depths(), comparison.delta_alphas()))


def compare_runs(specs: Sequence[str], tracking_uri: str | None = None, group: str = "all") -> Comparison:
    """Read the runs named by ``specs`` (:mod:`spectral_plugins.runs.readers`; ``mlflow-experiment:<name>``
    expands to its runs) and compare them; ``.save(dir)`` writes the page.

    Raises:
        RunNotFound: a run, experiment or MLflow store that does not exist (one line, naming the
            tracking URI and how to set it); nothing is created on disk.
        ValueError: no runs, or a run without spectral series.
    """
    from .readers import expand_specs, load_run

    expanded = expand_specs(specs, tracking_uri)
    if not expanded:
        raise ValueError("give at least one run to compare")
    loaded = [load_run(spec, tracking_uri) for spec in expanded]
    names = [run.name for run in loaded]
    named = [(run.name if names.count(run.name) == 1 else f"{run.name} ({run.source})", run.history)
             for run in loaded]
    return compare_histories(named, group=group, sources=[(run.source, run.params) for run in loaded])


def format_table(comparison: Comparison) -> str:
    """A plain-text table: one row per run, then the fit (or why there is none)."""
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
    lines += ["", "(- : undetermined)", comparison.fit_line()]
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
    from .readers import SPEC_HELP

    parser = subparsers.add_parser(
        "compare", help="compare tracked runs: lifecycle maps, series and figures side by side",
        description="Read several runs, print each run's lifecycle figures, and write DIR/compare.html with "
                    "their lifecycle maps on one colour scale, the headline series and final alpha profiles "
                    "overlaid, and a table of figures next to each run's parameters. Delta-alpha is fitted "
                    f"against depth when the runs have at least {MIN_DEPTHS} distinct depths.")
    parser.add_argument("runs", nargs="*", help=SPEC_HELP)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    parser.add_argument("--mlflow-experiment", action="append", default=[], metavar="NAME_OR_ID",
                        help="add every run of this MLflow experiment (repeatable)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default)")
    parser.add_argument("--group", default="all", choices=["qk", "vo", "mlp", "all"],
                        help="role group of the figures and the Delta-alpha fit (default all)")
    parser.set_defaults(handler=run_compare)
    return parser


def run_compare(args: argparse.Namespace) -> int:
    """The ``compare`` command: load, compare, print, save. Returns the exit status (2 with one line
    when a run cannot be read; nothing is written then)."""
    from .readers import MLFLOW_EXPERIMENT_PREFIX, RunNotFound

    specs = [*args.runs, *(f"{MLFLOW_EXPERIMENT_PREFIX}{e}" for e in args.mlflow_experiment)]
    try:
        comparison = compare_runs(specs, args.tracking_uri, args.group)
    except (RunNotFound, FileNotFoundError, ValueError, ModuleNotFoundError) as error:
        print(f"compare: {error}")
        return 2
    print(format_table(comparison))
    files = comparison.save(args.out)
    print(f"\ncompare: {files.html} ({len(files.figures)} figures beside it)")
    return 0
