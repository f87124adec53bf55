"""The lifecycle map: one metric over depth x training step, one panel per role group, the wave front
drawn over it and the reversal marked (the central picture of Liu 2026).

:func:`lifecycle_map` reads a :class:`~spectral_plugins.lifecycle.history.SpectralHistory` into a
:class:`LifecycleMap` (small arrays); :meth:`LifecycleMap.to_rgb` draws it with matplotlib (Agg canvas,
no pyplot, imported only when drawing). :func:`draw_map_panel` draws one panel on given axes; the
report and the run comparison use it too, so every map in the package looks the same.

``stable_rank`` is drawn normalised (each matrix divided by its value at the first kept snapshot, then
averaged over the group's matrices of a block), every other metric as is (group mean per block). All
panels of a map share one colour scale, so the groups can be compared by colour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..core.heatmap import RENDER_LOCK, encode_png, render_figure
from .history import SpectralHistory
from .signals import LifecycleConfig, wave_trajectory

MAP_GROUPS: tuple[str, ...] = ("qk", "vo", "mlp")
# Metrics drawn normalised by their first kept value (the wave is read from these).
NORMALISED: frozenset[str] = frozenset({"stable_rank"})


def map_label(metric: str) -> str:
    """The colour-bar label of a map of ``metric``."""
    return f"{metric.replace('_', ' ')} / initial" if metric in NORMALISED else metric.replace("_", " ")


@dataclass(frozen=True, eq=False)  # holds arrays: compare the fields you need
class MapPanel:
    """One role group of a map.

    Attributes:
        group: the role group (``qk``, ``vo``, ``mlp``).
        steps: (T,) training steps. depths: (D,) blocks.
        values: (T, D) the metric (normalised for :data:`NORMALISED` metrics), NaN where missing.
        front: (T,) wave-front depth in blocks (NaN where the stack is not compressing).
        reversal_step: the step of the confirmed reversal, NaN if none.
        front_steps: the steps of ``front`` when they differ from ``steps`` (an alpha map, whose
            front comes from the fast lane's denser stable ranks); None: ``steps``.
        stack: the stack of blocks (None: a single-stack model).
    """

    group: str
    steps: np.ndarray
    depths: np.ndarray
    values: np.ndarray
    front: np.ndarray
    reversal_step: float
    front_steps: np.ndarray | None = None
    stack: str | None = None

    @property
    def label(self) -> str:
        """The panel's title: ``qk``, or ``encoder qk`` in a model of several stacks."""
        return self.group if self.stack is None else f"{self.stack} {self.group}"


@dataclass(frozen=True, eq=False)
class LifecycleMap:
    """A metric over depth x step for each role group (see the module docs).

    Attributes:
        metric: the metric name. step: the last step drawn. panels: one per role group with blocks
            (per stack and group in a model of several stacks, stack by stack).
        title: a prefix for the figure title (a run name in comparisons), may be empty.
    """

    metric: str
    step: int
    panels: tuple[MapPanel, ...]
    title: str = ""

    @property
    def label(self) -> str:
        return map_label(self.metric)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the figure: one row per stack, one column per role group."""
        stacks = list(dict.fromkeys(p.stack for p in self.panels)) or [None]
        columns = max((sum(p.stack == s for p in self.panels) for s in stacks), default=1)
        return len(stacks), max(columns, 1)

    def value_range(self) -> tuple[float, float]:
        """(min, max) of the finite values over every panel; (0, 1) when there are none."""
        return value_range([self])

    def to_rgb(self, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
        """An (H, W, 3) uint8 image: the panels side by side on one colour scale (``vmin`` /
        ``vmax``, default: this map's own range). Drawn once per scale, however many publishers ask."""
        if vmin is None or vmax is None:
            low, high = self.value_range()
            vmin, vmax = (low if vmin is None else vmin), (high if vmax is None else vmax)
        with RENDER_LOCK:  # several publishers' threads ask at once: draw once, one at a time
            cache = self.__dict__.setdefault("_rgb", {})
            if (vmin, vmax) not in cache:
                rows, columns = self.grid
                cache[(vmin, vmax)] = render_figure(lambda fig: draw_map(fig, self, vmin, vmax),
                                                    figsize=(3.6 * columns + 1.2, 3.4 * rows))
            return cache[(vmin, vmax)]

    def to_png(self) -> bytes:
        """The image as PNG bytes."""
        return encode_png(self.to_rgb())


def lifecycle_map(history: SpectralHistory, metric: str, groups: Sequence[str] = MAP_GROUPS,
                  config: LifecycleConfig | None = None, title: str = "",
                  waves: SpectralHistory | None = None) -> LifecycleMap:
    """The map of ``metric`` over every kept step of ``history`` (groups without blocks are left out).
    With ``waves`` (the fast lane's stable ranks, :attr:`SpectralLifecycle.waves`), the wave front
    and reversal come from it, and so does a stable-rank map: step resolution."""
    return lifecycle_maps(history, (metric,), groups, config, title, waves)[metric]


def lifecycle_maps(history: SpectralHistory, metrics: Sequence[str], groups: Sequence[str] = MAP_GROUPS,
                   config: LifecycleConfig | None = None, title: str = "",
                   waves: SpectralHistory | None = None) -> dict[str, LifecycleMap]:
    """:func:`lifecycle_map` of each of ``metrics``, the wave of each stack and group computed once
    for all of them."""
    config = config or LifecycleConfig()
    step = int(history.steps[-1]) if len(history) else 0
    waves = waves if waves is not None and len(waves) else None
    stacks = history.stacks
    trajectories = [(stack, group, wave_trajectory(waves or history, group, config, full_speed=False,
                                                   stack=stack, until=step))
                    for stack in stacks for group in groups]
    maps = {}
    for metric in metrics:
        source = waves if waves is not None and metric in waves.metrics else history
        panels = []
        for stack, group, wave in trajectories:
            if wave.depths.size == 0:
                continue
            profile = source.profile(metric, group, normalise=metric in NORMALISED, stack=stack)
            kept = profile.steps <= step
            reversal = float(wave.reversal.step) if wave.reversal.reversed else math.nan
            front_steps = None if source is (waves or history) else wave.steps
            panels.append(MapPanel(group, profile.steps[kept], profile.depths, profile.values[kept],
                                   wave.front, reversal, front_steps, stack if len(stacks) > 1 else None))
        maps[metric] = LifecycleMap(metric, step, tuple(panels), title)
    return maps


def value_range(maps: Sequence[LifecycleMap]) -> tuple[float, float]:
    """One colour scale for several maps: (min, max) of their finite values, (0, 1) if none."""
    finite = [p.values[np.isfinite(p.values)] for m in maps for p in m.panels]
    data = np.concatenate(finite) if finite else np.array([])
    if data.size == 0:
        return 0.0, 1.0
    low, high = float(data.min()), float(data.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def draw_map(fig, lifecycle: LifecycleMap, vmin: float, vmax: float, axes=None) -> None:  # noqa: ANN001
    """Draw every panel of ``lifecycle`` on ``axes`` (default: a new row of subplots of ``fig``) and one
    colour bar for the row."""
    if axes is None:  # placed by hand: matplotlib's layout engines cost more than the drawing
        rows, columns = lifecycle.grid
        fig.subplots_adjust(left=0.05, right=0.9, bottom=0.14 / rows, top=1 - 0.16 / rows, wspace=0.25,
                            hspace=0.45)
        grid = fig.subplots(rows, columns, squeeze=False)
        rows_of = {stack: row for row, stack in enumerate(dict.fromkeys(p.stack for p in lifecycle.panels))}
        used = [0] * rows
        placed: list = []
        for panel in lifecycle.panels:  # row: the panel's stack; column: the next free one in that row
            row = rows_of[panel.stack]
            placed.append(grid[row][used[row]])
            used[row] += 1
        axes = placed + [ax for row in range(rows) for ax in grid[row][used[row]:]]
    mesh = None
    for ax, panel in zip(axes, lifecycle.panels):
        mesh = draw_map_panel(ax, panel, lifecycle.metric, vmin, vmax)
    for ax in list(axes)[len(lifecycle.panels):]:
        ax.set_axis_off()
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes), label=lifecycle.label, fraction=0.04, pad=0.015)
    title = f"{lifecycle.title}: " if lifecycle.title else ""
    fig.suptitle(f"{title}{lifecycle.label} over depth and training step (up to step {lifecycle.step})",
                 fontsize=10)


def draw_map_panel(ax, panel: MapPanel, metric: str, vmin: float, vmax: float):  # noqa: ANN001, ANN201
    """One group's panel: the metric as a step x depth mesh, the wave front (white line), the reversal
    (dashed cyan line). Returns the mesh (for a colour bar)."""
    from matplotlib.colors import LogNorm, Normalize

    cmap = "magma" if metric in NORMALISED else "viridis"
    # A log scale when the values are positive: the first snapshots (normalised stable rank 1, alpha
    # of a random matrix ~10) would otherwise leave the trained state in one colour.
    norm = LogNorm(vmin, vmax) if vmin > 0 else Normalize(vmin, vmax)
    mesh = ax.pcolormesh(panel.steps, panel.depths, np.ma.masked_invalid(panel.values.T), shading="nearest",
                         cmap=cmap, norm=norm)
    if np.isfinite(panel.front).any():
        front_steps = panel.steps if panel.front_steps is None else panel.front_steps
        ax.plot(front_steps, panel.front, color="white", lw=1.4, marker=".", ms=3, label="wave front")
    if math.isfinite(panel.reversal_step):
        ax.axvline(panel.reversal_step, color="cyan", ls="--", lw=1.2,
                   label=f"reversal @ {panel.reversal_step:.0f}")
    ax.set_title(panel.label, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("depth (block)", fontsize=8)
    ax.set_yticks(panel.depths)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="lower right")
    return mesh
