"""One-page lifecycle report of a run: an HTML page around one PNG figure.

The figure shows, from a :class:`~spectral_plugins.lifecycle.history.SpectralHistory`: per role group, the
normalised stable rank as a depth x step heatmap with the wave front (white) and the reversal
(dashed); alpha depth profiles at evenly spaced steps (dark to light = early to late) with the
settled profile's quadratic fit; the Q/K vs V/O asymmetry series; and the block importance behind
the pruning advice (with the measured single-removal loss when a
:class:`~spectral_plugins.lifecycle.pruning.PruningEvaluation` is given). Matplotlib is imported lazily.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..lifecycle.history import SpectralHistory
from ..lifecycle.importance import PruningAdvice
from ..lifecycle.maps import LifecycleMap, MapPanel, draw_map_panel, map_label, value_range
from ..lifecycle.pruning import PruningEvaluation
from ..lifecycle.signals import (
    LifecycleConfig,
    LifecycleSummary,
    alpha_profiles,
    asymmetry_series,
    summarize,
    wave_trajectory,
)

PROFILE_LINES = 6


@dataclass(frozen=True)
class ReportFiles:
    """Paths of the written ``html`` page and its ``png`` figure."""

    html: Path
    png: Path


def _groups(history: SpectralHistory, config: LifecycleConfig) -> list[str]:
    return [g for g in config.groups if not history.profile("stable_rank", g).empty]


def plot_report(history: SpectralHistory, summary: LifecycleSummary, path: str | Path,
                config: LifecycleConfig | None = None, pruning: PruningEvaluation | None = None) -> Path:
    """Draw the report figure to ``path`` (PNG)."""
    config = config or LifecycleConfig()
    groups = _groups(history, config) or ["all"]
    stacks = history.stacks
    # A model of several stacks: the qk and all panels of every stack (one wave front per stack).
    shown = groups if len(stacks) == 1 else [g for g in ("qk", "all") if g in groups] or groups[:1]
    waves = [(stack, group) for stack in stacks for group in shown]
    ncols = max(len(waves), 3)
    with saved_figure(path, figsize=(4.2 * ncols, 10.5), dpi=100) as fig:
        axes = fig.subplots(3, ncols, squeeze=False)
        for ax, (stack, group) in zip(axes[0], waves):
            _heatmap(fig, ax, wave_trajectory(history, group, config, stack=stack))
        profile_groups = [g for g in ("all", "qk") if g in groups][:2] or groups[:1]
        profiles = [(None, g) for g in profile_groups] if len(stacks) == 1 else \
            [(stack, profile_groups[0]) for stack in stacks][:ncols - 1]
        for ax, (stack, group) in zip(axes[1], profiles):
            _alpha_profiles(ax, history, group, summary, stack)
        _asymmetry(axes[1][len(profiles)], history)
        _importance(axes[2][0], summary, pruning)
        if pruning is not None:
            _strategies(axes[2][1], pruning)
        for row in axes:
            for ax in row:
                if not ax.has_data():
                    ax.set_axis_off()
        fig.suptitle(f"Spectral lifecycle up to step {summary.step} ({summary.num_blocks} blocks)")
    return Path(path)


@contextlib.contextmanager
def saved_figure(path: str | Path, tight: bool = True, **figure_options: Any) -> Iterator[Any]:
    """A matplotlib ``Figure`` (no pyplot, so the user's backend is left alone) written to ``path``
    as PNG when the block ends without error (``tight``: after ``tight_layout``, else as the block
    placed its axes); matplotlib is imported only here."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**figure_options)
    FigureCanvasAgg(fig)
    yield fig
    if tight:
        fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _heatmap(fig, ax, w) -> None:  # noqa: ANN001 - matplotlib objects
    if w.nsr.size == 0:
        return
    reversal = float(w.reversal.step) if w.reversal.reversed else math.nan
    panel = MapPanel(w.group, w.steps, w.depths, w.nsr, w.front, reversal)
    low, high = value_range([LifecycleMap("stable_rank", 0, (panel,))])
    mesh = draw_map_panel(ax, panel, "stable_rank", low, high)
    fig.colorbar(mesh, ax=ax, label=map_label("stable_rank"))
    speed = "" if not math.isfinite(w.wave_speed) else f", {w.wave_speed:.2f} blocks/1k steps"
    ax.set_title(f"{_named(w.stack, w.group)}: normalised stable rank{speed}", fontsize=9)


def _named(stack: str | None, group: str) -> str:
    return group if stack is None else f"{stack} {group}"


def _alpha_profiles(ax, history: SpectralHistory, group: str, summary: LifecycleSummary,  # noqa: ANN001
                    stack: str | None = None) -> None:
    from matplotlib import colormaps

    steps, depths, alpha = alpha_profiles(history, group, stack)
    if alpha.size == 0:
        return
    rows = np.unique(np.linspace(0, len(steps) - 1, min(PROFILE_LINES, len(steps))).round().astype(int))
    colors = colormaps["viridis"](np.linspace(0, 1, len(rows)))
    for color, t in zip(colors, rows):
        ax.plot(depths, alpha[t], color=color, marker=".", lw=1, label=f"step {steps[t]}")
    g = summary.group(group, stack)
    u = g.inverted_u
    finite = np.isfinite(g.settled_alpha)
    if math.isfinite(u.curvature) and finite.sum() >= 4:
        coef = np.polyfit(depths[finite], g.settled_alpha[finite], 2)
        grid = np.linspace(depths.min(), depths.max(), 100)
        ax.plot(grid, np.polyval(coef, grid), color="red", ls=":", lw=1.2, label="quadratic fit")
    peak = f"\ninverted U, peak at block {u.peak_depth:.1f} (confidence {u.confidence:.2f})" \
        if u.is_inverted_u else ""
    ax.set_title(f"alpha depth profile ({_named(stack, group)}), Δα = {g.delta_alpha:.3f}{peak}", fontsize=9)
    ax.set_xlabel("depth (block)")
    ax.set_ylabel("alpha")
    ax.legend(fontsize=6)


def _asymmetry(ax, history: SpectralHistory) -> None:  # noqa: ANN001
    runs = []
    for i, stack in enumerate(history.stacks):  # one line per stack
        steps, index, run_index = asymmetry_series(history, stack)
        if np.isfinite(index).any():
            ax.plot(steps, index, color=f"C{2 + i}", label=_named(stack, f"run {run_index:.2f}"))
            runs.append(run_index)
    if not runs:
        return
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    if len(history.stacks) > 1:
        ax.legend(fontsize=7)
    ax.set_title(f"Q/K vs V/O asymmetry (run: {', '.join(f'{r:.2f}' for r in runs)})", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("(V_qk - V_vo) / (V_qk + V_vo)")


def _importance(ax, summary: LifecycleSummary, pruning: PruningEvaluation | None) -> None:  # noqa: ANN001
    imp = pruning.importance if pruning is not None else summary.importance
    if imp.depths.size == 0:
        return
    bars = ax.bar(imp.depths, imp.scores, color="C0", label=f"importance I_b ({imp.method})")
    rank = {depth: i + 1 for i, depth in enumerate(imp.removal_order())}
    for bar, depth in zip(bars, imp.depths):
        if not math.isfinite(bar.get_height()):
            continue
        ax.annotate(str(rank[int(depth)]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom" if bar.get_height() >= 0 else "top", fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    if pruning is not None:
        twin = ax.twinx()
        increase = np.asarray(pruning.single_losses) - pruning.baseline_loss
        twin.plot(range(len(increase)), increase, color="C3", marker="o",
                  label="loss increase, block removed")
        twin.set_ylabel("loss increase")
        twin.legend(fontsize=7, loc="upper right")
    ax.set_title("block importance (numbers: removal order, 1 = first)", fontsize=9)
    ax.set_xlabel("block")
    ax.legend(fontsize=7, loc="best")


def _strategies(ax, pruning: PruningEvaluation) -> None:  # noqa: ANN001
    names = ["spectral", f"last {pruning.n_remove}", "random", "oracle"]
    losses = [pruning.spectral_loss, pruning.last_loss, pruning.random_loss, pruning.oracle_loss]
    ax.bar(names, [v - pruning.baseline_loss for v in losses], color=["C0", "C1", "C7", "C2"])
    ax.set_title(f"loss increase removing {pruning.n_remove} blocks (vs last: {pruning.ratio_vs_last:.2f}x)",
                 fontsize=9)


_STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:1em auto}"
          "td,th{padding:2px 8px;text-align:right}table{border-collapse:collapse}"
          "tr:nth-child(even){background:#f3f3f3}")
_COLUMNS = ("group", "blocks", "wave speed (blocks/1k steps)", "wave R²", "reversal step", "Δα", "α gradient",
            "inverted-U peak", "U confidence", "τ fast", "τ slow")


def _row(cells: list[str]) -> str:
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def _pruning_paragraph(p: PruningEvaluation) -> str:
    parts = [
        f"Removing {p.n_remove} of {p.num_blocks} blocks (loss without removal {p.baseline_loss:.4f}):",
        f"spectral {list(p.spectral_blocks)} &rarr; {p.spectral_loss:.4f};",
        f"last-N {list(p.last_blocks)} &rarr; {p.last_loss:.4f};",
        f"random (mean of {len(p.random_losses)}) &rarr; {p.random_loss:.4f};",
        f"oracle {list(p.oracle_blocks)} &rarr; {p.oracle_loss:.4f}.",
        f"Loss-increase ratio last-N / spectral = {fixed(p.ratio_vs_last)},",
        f"random / spectral = {fixed(p.ratio_vs_random)};",
        f"Spearman rho(importance, single-removal loss increase) = {fixed(p.spearman_rho)}",
        f"(p = {fixed(p.spearman_p)}).",
    ]
    return "<p>" + " ".join(parts) + "</p>"


def report_html(title: str, summary: LifecycleSummary, png: Path,
                pruning: PruningEvaluation | None = None) -> str:
    """The HTML page (figure embedded as base64, so the page stands alone)."""
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    rows = "\n".join(_row([
        g.label, str(g.num_blocks), fixed(g.wave_speed), fixed(g.wave_r2),
        fixed(g.reversal_step, 0) if g.reversed else "no", fixed(g.delta_alpha),
        fixed(g.alpha_depth_gradient),
        fixed(g.inverted_u.peak_depth, 1) if g.inverted_u.is_inverted_u else "no",
        fixed(g.inverted_u.confidence),
        fixed(g.tau_fast, 0), fixed(g.tau_slow, 0)]) for g in summary.groups)
    header = "<tr>" + "".join(f"<th>{c}</th>" for c in _COLUMNS) + "</tr>"
    per_stack: list[tuple[str | None, float, PruningAdvice]] = [(s[0], s[1], s[3]) for s in summary.stacks]
    per_stack = per_stack or [(None, summary.qk_vo_asymmetry, summary.advice)]
    asymmetry = ", ".join(f"{html.escape(_named(stack, ''))}{fixed(index)}" for stack, index, _ in per_stack)
    advice = "; ".join(f"{html.escape(_named(stack, ''))}{', '.join(str(d) for d in a.order)}"
                       for stack, _, a in per_stack)
    method = html.escape(summary.importance.method)
    measured = _pruning_paragraph(pruning) if pruning is not None else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Up to step {summary.step}, {summary.num_blocks} blocks. Q/K vs V/O asymmetry (run level):
{asymmetry}. Definitions: docs/lifecycle.md.</p>
<table>{header}
{rows}</table>
<h2>Pruning advice</h2>
<p>Blocks in removal order (least important first, by {method}): {advice}</p>
{measured}
<img src="data:image/png;base64,{image}" alt="lifecycle figure" style="max-width:100%">
</body></html>
"""


def fixed(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, ``-`` when missing or not finite (tables)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def render_report(history: SpectralHistory, out_dir: str | Path, title: str = "Spectral lifecycle report",
                  config: LifecycleConfig | None = None, pruning: PruningEvaluation | None = None,
                  stem: str = "spectral_report") -> ReportFiles:
    """Write ``<out_dir>/<stem>.png`` and ``<out_dir>/<stem>.html``."""
    config = config or LifecycleConfig()
    summary = summarize(history, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_report(history, summary, out / f"{stem}.png", config, pruning)
    page = out / f"{stem}.html"
    page.write_text(report_html(title, summary, png, pruning), encoding="utf-8")
    return ReportFiles(page, png)


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``spectral-plugins report`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "report", help="render a one-page HTML/PNG lifecycle report of a run",
        description="Render the wave-front heatmaps, alpha depth profiles, Q/K-V/O asymmetry and pruning "
                    "advice of one run (TensorBoard log dir, saved history .json, or mlflow:<run_id>).")
    parser.add_argument("run", help="TensorBoard log dir, history .json, or mlflow:<run_id>")
    parser.add_argument("--out", default="spectral_report",
                        help="output directory (default ./spectral_report)")
    parser.add_argument("--title", default=None, help="page title (default: the run's name)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--no-timescales", action="store_true", help="skip the per-layer two-timescale fits")
    parser.set_defaults(handler=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """The ``report`` command. Returns the exit status."""
    from .readers import load_run

    try:
        run = load_run(args.run, args.tracking_uri)
    except (FileNotFoundError, ValueError) as error:
        print(f"report: {error}")
        return 2
    config = LifecycleConfig(fit_timescales=not args.no_timescales)
    files = render_report(run.history, args.out, args.title or f"Spectral lifecycle: {run.name}", config)
    print(f"report: {files.html}\nfigure: {files.png}")
    return 0
