"""The figures and the HTML page of a run comparison (``spectral-plugins compare --out DIR``).

Every figure overlays or aligns the runs so they can be read together:

- ``maps_<metric>.png``: each run's lifecycle map (a row per run, a panel per role group) on one
  colour scale shared by all runs (:mod:`spectral_plugins.lifecycle.maps`);
- ``series.png``: the headline lifecycle series over training, one colour per run, a column per role
  group: the wave-front depth, the mean normalised stable rank and Delta-alpha;
- ``profiles.png``: each run's final alpha depth profile per role group (x: relative depth, so runs
  of different depths line up);
- ``depth_scaling.png``: Delta-alpha against depth with its power-law fit, only with at least three
  distinct depths.

``compare.html`` shows them with a table of each run's parameters and run-level figures. matplotlib
is imported only when drawing (Agg canvas, no pyplot).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..lifecycle.depth_profile import delta_alpha
from ..lifecycle.maps import MAP_GROUPS, draw_map_panel, lifecycle_map, map_label, value_range
from ..lifecycle.signals import alpha_profiles, wave_trajectory
from .report import saved_figure

if TYPE_CHECKING:
    from .compare import Comparison

MAP_METRICS: tuple[str, ...] = ("stable_rank", "alpha")


@dataclass(frozen=True)
class ComparisonFiles:
    """What :meth:`Comparison.save` wrote: the page and its figures."""

    html: Path
    figures: tuple[Path, ...]


def draw_maps(comparison: Comparison, metric: str, path: Path) -> Path:
    """The runs' lifecycle maps of ``metric``, a row per run, on one colour scale."""
    maps = [lifecycle_map(run.history, metric, title=run.name) for run in comparison.runs]
    vmin, vmax = value_range(maps)
    ncols = max(len(MAP_GROUPS), 1)
    height = 2.6 * len(maps) + 0.8
    with saved_figure(path, tight=False, figsize=(3.8 * ncols + 1.2, height), dpi=90) as fig:
        fig.subplots_adjust(left=0.06, right=0.87, bottom=0.5 / height, top=1 - 0.55 / height, hspace=0.55,
                            wspace=0.25)
        axes = fig.subplots(len(maps), ncols, squeeze=False)
        mesh = None
        for row, lifecycle in zip(axes, maps):
            first = lifecycle.panels[0].stack if lifecycle.panels else None  # the first stack's panels
            panels = {p.group: p for p in lifecycle.panels if p.stack == first}
            for ax, group in zip(row, MAP_GROUPS):
                if group in panels:
                    mesh = draw_map_panel(ax, panels[group], metric, vmin, vmax)
                    ax.set_title(f"{lifecycle.title} · {group}", fontsize=9)
                else:
                    ax.set_axis_off()
        if mesh is not None:
            fig.colorbar(mesh, cax=fig.add_axes((0.895, 0.15, 0.015, 0.7)), label=map_label(metric))
        fig.suptitle(f"{map_label(metric)}: every run on one colour scale", fontsize=10)
    return path


def draw_series(comparison: Comparison, path: Path) -> Path:
    """Wave-front depth, mean normalised stable rank and Delta-alpha over training, one colour per run."""
    rows = ("wave-front depth (block)", "mean stable rank / initial", "Δα (alpha spread over depth)")
    with saved_figure(path, figsize=(4.2 * len(MAP_GROUPS), 8.4), dpi=90) as fig:
        axes = fig.subplots(len(rows), len(MAP_GROUPS), squeeze=False)
        for index, run in enumerate(comparison.runs):
            color = f"C{index % 10}"
            for col, group in enumerate(MAP_GROUPS):
                wave = wave_trajectory(run.history, group, full_speed=False)
                if wave.depths.size == 0:
                    continue
                steps, _, alpha = alpha_profiles(run.history, group)
                with np.errstate(all="ignore"):
                    nsr_mean = np.nanmean(np.where(np.isfinite(wave.nsr), wave.nsr, np.nan), axis=1)
                for ax, values in zip(axes[:, col], (wave.front, nsr_mean, delta_alpha(alpha))):
                    ax.plot(steps, values, color=color, marker=".", lw=1.2, label=run.name)
        for ax, label in zip(axes[:, 0], rows):
            ax.set_ylabel(label, fontsize=8)
        for ax, group in zip(axes[0], MAP_GROUPS):
            ax.set_title(group, fontsize=9)
        for ax in axes[-1]:
            ax.set_xlabel("step", fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Headline lifecycle series, one colour per run", fontsize=10)
    return path


def draw_profiles(comparison: Comparison, path: Path) -> Path:
    """Each run's final alpha depth profile per role group (x: relative depth d / (L - 1))."""
    with saved_figure(path, figsize=(4.2 * len(MAP_GROUPS), 3.4), dpi=90) as fig:
        axes = fig.subplots(1, len(MAP_GROUPS), squeeze=False)[0]
        for index, run in enumerate(comparison.runs):
            for ax, group in zip(axes, MAP_GROUPS):
                steps, depths, alpha = alpha_profiles(run.history, group)
                if alpha.size == 0:
                    continue
                relative = depths / max(float(depths.max()), 1.0)
                ax.plot(relative, alpha[-1], color=f"C{index % 10}", marker="o", lw=1.2,
                        label=f"{run.name} (L={run.num_blocks}, step {int(steps[-1])})")
        for ax, group in zip(axes, MAP_GROUPS):
            ax.set_title(f"final alpha over depth · {group}", fontsize=9)
            ax.set_xlabel("relative depth (block / last block)", fontsize=8)
        axes[0].set_ylabel("alpha", fontsize=8)
        axes[0].legend(fontsize=7)
    return path


def save_comparison(comparison: Comparison, out_dir: str | Path) -> ComparisonFiles:
    """Write every figure and ``compare.html`` into ``out_dir`` (created)."""
    from .compare import plot_comparison

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [draw_maps(comparison, metric, out / f"maps_{metric}.png") for metric in MAP_METRICS]
    figures += [draw_series(comparison, out / "series.png"), draw_profiles(comparison, out / "profiles.png")]
    if comparison.fit_note() is None:
        figures.append(plot_comparison(comparison, out / "depth_scaling.png"))
    page = out / "compare.html"
    page.write_text(comparison_html(comparison, figures), encoding="utf-8")
    return ComparisonFiles(page, tuple(figures))


_STYLE = ("body{font-family:sans-serif;max-width:1500px;margin:1em auto}td,th{padding:2px 8px;"
          "text-align:left;vertical-align:top;border-bottom:1px solid #ddd}table{border-collapse:collapse}"
          "img{max-width:100%;margin:0.5em 0}.params{font-size:smaller;color:#444}")


def comparison_html(comparison: Comparison, figures: Sequence[Path]) -> str:
    """The page: the table of runs (parameters next to run-level figures), the fit or why there is
    none, then the figures (linked by file name, beside the page)."""
    rows = comparison.table()
    columns = [c for c in rows[0] if c != "params"] if rows else []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "<th>parameters</th>"
    keys = {k for row in rows for k in row["params"]}
    # The parameters that tell the runs apart come first, in bold; the rest fold away.
    differing = sorted(k for k in keys if len({row["params"].get(k) for row in rows}) > 1)
    body = []
    for row in rows:
        params = row["params"]
        first = "<br>".join(f"<b>{html.escape(k)} = {html.escape(params.get(k, '-'))}</b>" for k in differing)
        rest = "<br>".join(f"{html.escape(k)} = {html.escape(v)}" for k, v in params.items()
                           if k not in differing)
        more = len(params) - len(differing)
        folded = f"<details><summary>{more} more</summary>{rest}</details>" if rest else ""
        cells = "".join(f"<td>{html.escape(str(row[c]))}</td>" for c in columns)
        body.append(f"<tr>{cells}<td class='params'>{first}{folded or ('' if first else '-')}</td></tr>")
    note = comparison.fit_note()
    fit = html.escape(note) if note else html.escape(comparison.fit_line())
    images = "\n".join(f'<h3>{html.escape(p.stem.replace("_", " "))}</h3><img src="{html.escape(p.name)}" '
                       f'alt="{html.escape(p.stem)}">' for p in figures)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Spectral lifecycle: {len(rows)} runs compared</title>
<style>{_STYLE}</style></head><body>
<h1>Spectral lifecycle: {len(rows)} runs compared</h1>
<p>Run-level figures are recomputed from each run's spectral series (role group
{html.escape(comparison.group)}; definitions in docs/lifecycle.md); "undetermined" marks a figure the run
does not determine.</p>
<table><tr>{head}</tr>
{chr(10).join(body)}</table>
<h2>Delta-alpha against depth</h2><p>{fit}</p>
{images}
</body></html>
"""


def figure(value: float, digits: int = 3) -> str:
    """A run-level figure for a person: the number, or "undetermined" (never "nan")."""
    return "undetermined" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"
