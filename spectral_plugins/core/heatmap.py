"""Depth x role grids of one metric, and their rendering to an RGB image for image panels."""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .options import DEFAULT_HEATMAP_METRICS  # noqa: F401 - the heatmaps' default, checked in options
from .roles import ROLES
from .snapshot import Snapshot

# Column order of the grids: attention first, then MLP (roles absent from a model are dropped).
BLOCK_ROLES: tuple[str, ...] = tuple(r for r in ROLES if r not in ("embed", "pos_embed", "lm_head"))


# Fixed colour ranges by metric (linear): alpha's band of Martin & Mahoney / WeightWatcher, where 2-6
# is "well trained"; values outside are clipped and the colour bar shows arrows.
FIXED_RANGES: dict[str, tuple[float, float]] = {"alpha": (1.5, 6.0)}
# Other metrics: a log scale from the first snapshot's smallest value / 30 to its largest x 1.5, so
# a compression by up to ~30x (the demo's stable rank falls ~20x) stays inside the range.
LOG_RANGE_BELOW, LOG_RANGE_ABOVE = 30.0, 1.5
# matplotlib is not thread-safe (its mathtext parser keeps global pyparsing state), and every
# publisher's outbox thread may draw: all drawing in the package holds this lock. Re-entrant, so a
# cached ``to_rgb`` can hold it across check-and-draw while ``render_figure`` takes it again.
RENDER_LOCK = threading.RLock()


@dataclass(frozen=True)
class ColourScale:
    """One colour range kept for a whole run, so that a step slider compares colours.

    Attributes:
        low, high: the ends of the scale (values beyond are drawn in the end colours).
        log: a logarithmic scale.
    """

    low: float
    high: float
    log: bool = False

    def norm(self) -> Any:
        """The matplotlib ``Normalize`` / ``LogNorm`` of this scale."""
        from matplotlib.colors import LogNorm, Normalize

        return (LogNorm if self.log else Normalize)(vmin=self.low, vmax=self.high, clip=False)

    def to_state(self) -> list[Any]:
        return [self.low, self.high, self.log]


def colour_scales(snapshot: Snapshot, metrics: tuple[str, ...] | list[str]) -> dict[str, ColourScale]:
    """The run-long colour scale of each metric, set from its first snapshot (see :data:`FIXED_RANGES`)."""
    scales = {}
    for metric in metrics:
        if metric in FIXED_RANGES:
            scales[metric] = ColourScale(*FIXED_RANGES[metric])
            continue
        values = np.array([layer.metric(metric) for layer in snapshot.layers if layer.depth is not None])
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        low, high = float(values.min()), float(values.max())
        if low > 0:
            scales[metric] = ColourScale(low / LOG_RANGE_BELOW, high * LOG_RANGE_ABOVE, log=True)
        else:
            span = max(high - low, abs(high), 1e-12)
            scales[metric] = ColourScale(low - span, high + span)
    return scales


@dataclass(frozen=True)
class Heatmap:
    """``values[d, r]`` is ``metric`` of the matrix at depth ``depths[d]`` (of stack ``stacks[d]`` in a
    model of several stacks: one row per stack and depth) with role ``roles[r]`` (NaN where the model
    has no such matrix; the mean where several share a cell, e.g. the experts of a mixture); ``scale``
    is the run-long colour scale (None: this grid's own range)."""

    metric: str
    step: int | None
    depths: tuple[int, ...]
    roles: tuple[str, ...]
    values: np.ndarray
    stacks: tuple[str | None, ...] = ()
    scale: ColourScale | None = None

    @property
    def row_labels(self) -> tuple[str, ...]:
        """``"3"`` per row, or ``"encoder 3"`` in a model of several stacks."""
        stacks = self.stacks or (None,) * len(self.depths)
        return tuple(f"{s} {d}" if s else str(d) for s, d in zip(stacks, self.depths))

    def to_rgb(self, cell: int = 24) -> np.ndarray:
        """An (H, W, 3) uint8 image, depth down, role across; matplotlib-rendered with axis labels
        when matplotlib is installed, else plain colour cells. Rendered once (about 0.2 s) however
        many publishers ask."""
        with RENDER_LOCK:  # several publishers' threads ask at once: draw once, one at a time
            cached = self.__dict__.get("_rgb")
            if cached is None:
                try:
                    cached = _render_matplotlib(self)
                except ImportError:
                    cached = _render_cells(self, cell)
                object.__setattr__(self, "_rgb", cached)  # a cache, not state: frozen otherwise
        return cached

    def to_png(self) -> bytes:
        """The image as PNG bytes."""
        return encode_png(self.to_rgb())


def heatmaps(snapshot: Snapshot, metrics: tuple[str, ...] | list[str],
             scales: Mapping[str, ColourScale] | None = None) -> list[Heatmap]:
    """One :class:`Heatmap` per metric over the snapshot's block matrices, each drawn on its scale of
    ``scales`` (when given)."""
    scales = scales or {}
    block_layers = [(layer.depth, layer) for layer in snapshot.layers if layer.depth is not None]
    if not block_layers:
        return []
    stack_order = list(dict.fromkeys(layer.stack for _, layer in block_layers))
    rows = sorted({(layer.stack, depth) for depth, layer in block_layers},
                  key=lambda sd: (stack_order.index(sd[0]), sd[1]))
    roles = tuple(r for r in BLOCK_ROLES if any(layer.role == r for _, layer in block_layers))
    row = {sd: i for i, sd in enumerate(rows)}
    depths = tuple(d for _, d in rows)
    stacks = tuple(s for s, _ in rows) if len(stack_order) > 1 else ()
    col = {r: j for j, r in enumerate(roles)}
    result = []
    for metric in metrics:
        total = np.zeros((len(rows), len(roles)))
        count = np.zeros_like(total)
        for depth, layer in block_layers:
            value = layer.metric(metric)
            if math.isfinite(value):
                total[row[layer.stack, depth], col[layer.role]] += value
                count[row[layer.stack, depth], col[layer.role]] += 1
        with np.errstate(invalid="ignore"):
            values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        result.append(Heatmap(metric, snapshot.step, depths, roles, values, stacks, scales.get(metric)))
    return result


def render_figure(draw: Callable[[Any], None], figsize: tuple[float, float], dpi: int = 100,
                  tight: bool = False) -> np.ndarray:
    """Draw on a fresh matplotlib ``Figure`` (Agg canvas, no pyplot: the user's backend and pyplot
    state are never touched) and return the pixels as an (H, W, 3) uint8 array. ``tight``: apply
    ``tight_layout`` (else ``draw`` places its axes itself)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with RENDER_LOCK:
        figure = Figure(figsize=figsize, dpi=dpi)
        canvas = FigureCanvasAgg(figure)
        draw(figure)
        if tight:
            figure.tight_layout()
        canvas.draw()
        rgb: np.ndarray = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return rgb


def _render_matplotlib(heatmap: Heatmap) -> np.ndarray:
    def draw(figure: Any) -> None:
        axes = figure.add_subplot()
        norm = heatmap.scale.norm() if heatmap.scale is not None else None
        image = axes.imshow(np.ma.masked_invalid(heatmap.values), aspect="auto", cmap="viridis", norm=norm)
        axes.set_xticks(range(len(heatmap.roles)), heatmap.roles, rotation=45, ha="right", fontsize=8)
        axes.set_yticks(range(len(heatmap.depths)), heatmap.row_labels, fontsize=8)
        axes.set_ylabel("depth")
        step = "" if heatmap.step is None else f" @ step {heatmap.step}"
        axes.set_title(f"{heatmap.metric}{step}", fontsize=9)
        figure.colorbar(image, ax=axes, extend="neither" if heatmap.scale is None else "both")

    height = max(2.5, 0.3 * len(heatmap.depths) + 1.2)
    return render_figure(draw, (1.0 + 0.7 * len(heatmap.roles), height), tight=True)


def _render_cells(heatmap: Heatmap, cell: int) -> np.ndarray:
    values = heatmap.values
    finite = np.isfinite(values)
    if heatmap.scale is not None:
        low, high = heatmap.scale.low, heatmap.scale.high
        if heatmap.scale.log:
            values = np.log(np.where(finite & (values > 0), values, low))
            low, high = math.log(low), math.log(high)
    else:
        low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 1.0)
    scaled = np.clip(np.where(finite, (values - low) / (high - low if high > low else 1.0), 0.0), 0.0, 1.0)
    # A two-stop blue -> yellow ramp; missing cells grey.
    rgb = np.stack([scaled * 253 + 68 * (1 - scaled), scaled * 231 + 1 * (1 - scaled),
                    37 * scaled + 84 * (1 - scaled)], axis=-1)
    rgb[~finite] = 128
    return np.kron(rgb, np.ones((cell, cell, 1))).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array (Pillow when present, else a minimal encoder)."""
    try:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        return buffer.getvalue()
    except ImportError:
        import struct
        import zlib

        height, width, _ = rgb.shape
        raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + \
            chunk(b"IEND", b"")
