"""The metric history of a run: per matrix, each metric's series over snapshot steps, bounded in memory.

A :class:`SpectralHistory` receives one :class:`~spectral_plugins.core.snapshot.Snapshot` per analysed step
and keeps, for a fixed set of metrics, one float64 value per (step, matrix). When it holds more than
``max_steps`` steps it thins the *older half* (keeping every second step there); the first snapshot
is never dropped, because it is the normalisation reference (``stable_rank / stable_rank at the first
snapshot``). Repeated thinning leaves the recent past dense and the distant past sparse, so memory is
``O(max_steps * metrics * matrices)`` however long the run.

The lifecycle signals read depth profiles from it: :meth:`SpectralHistory.profile` averages a metric
over the matrices of a role group at each depth of one stack, giving a ``steps x depths`` array (a
model of several stacks, such as an encoder and a decoder, has one profile per stack).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.options import MIN_HISTORY_STEPS
from ..core.roles import CROSS_ROLES, ROLES
from ..core.snapshot import Snapshot

STATE_FORMAT = "spectral_plugins.history"  # the saved-state name since 0.1.0, not a module path
STATE_VERSION = 1
DEFAULT_METRICS: tuple[str, ...] = ("stable_rank", "alpha", "spectral_norm", "effective_rank")
DEFAULT_MAX_STEPS = 512
MIN_MAX_STEPS = MIN_HISTORY_STEPS  # one rule for the tracker's history= option and this class

BLOCK_ROLES: tuple[str, ...] = ("q", "k", "v", "o", *CROSS_ROLES, "mlp_in", "mlp_gate", "mlp_out")
# Role groups of the lifecycle signals; "all" is every matrix inside the repeated blocks.
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "qk": ("q", "k"),
    "vo": ("v", "o"),
    "mlp": ("mlp_in", "mlp_gate", "mlp_out"),
    "all": BLOCK_ROLES,
}

_LAYER_KEY = re.compile(r"^(?:([A-Za-z0-9_]+?)_)?L(\d+)_(.+)$")
_ROLES_LONGEST_FIRST = sorted(ROLES, key=len, reverse=True)
_EXPERT_SPREAD = re.compile(r"_experts_(min|max)$")


def parse_key(key: str) -> tuple[str | None, int | None, str]:
    """Stack, depth and role encoded in a layer key: ``L03_q`` -> (None, 3, "q"), ``L03_mlp_in_fc`` ->
    (None, 3, "mlp_in"), ``decoder_L01_cross_k`` -> ("decoder", 1, "cross_k"), ``embed`` ->
    (None, None, "embed"), ``vision_pos_embed`` -> ("vision", None, "pos_embed"); the min and max over
    a mixture's experts (``L03_mlp_in_experts_max``) and anything unrecognised -> (stack, depth or
    None, "other"); their mean (``L03_mlp_in_experts_mean``) stands for the experts' role."""
    match = _LAYER_KEY.match(key)
    if match and _EXPERT_SPREAD.search(key):  # the spread over experts is no matrix of the group
        return match.group(1), int(match.group(2)), "other"
    if match:
        return match.group(1), int(match.group(2)), _role_prefix(match.group(3)) or "other"
    if _role_prefix(key) is None and "_" in key:
        stack, rest = key.split("_", 1)
        if _role_prefix(rest) is not None:
            return stack, None, _role_prefix(rest) or "other"
    return None, None, _role_prefix(key) or "other"


def parse_layer_key(key: str) -> tuple[int | None, str]:
    """Depth and role encoded in a layer key (:func:`parse_key` without the stack)."""
    _, depth, role = parse_key(key)
    return depth, role


def _role_prefix(text: str) -> str | None:
    for role in _ROLES_LONGEST_FIRST:
        if text == role or text.startswith(role + "_"):
            return role
    return None


@dataclass(frozen=True)
class MatrixInfo:
    """Identity of one tracked matrix: layer ``key`` (``L03_q``), full ``name``, ``depth``, ``role``,
    and ``stack`` in a model of several stacks of blocks."""

    key: str
    name: str
    depth: int | None
    role: str
    stack: str | None = None


@dataclass(frozen=True, eq=False)  # holds arrays: compare the fields you need
class DepthProfile:
    """A metric averaged over a role group at each depth, at each kept step.

    Attributes:
        steps: (T,) training steps, increasing.
        depths: (D,) block indices present in the group, increasing.
        values: (T, D); ``values[t, d]`` is the mean (ignoring NaN) over the group's matrices at
            depth ``depths[d]`` of the metric at ``steps[t]``; NaN where none is finite.
    """

    steps: np.ndarray
    depths: np.ndarray
    values: np.ndarray

    @property
    def empty(self) -> bool:
        return self.values.size == 0


class SpectralHistory:
    """Per matrix, the series of selected metrics over snapshot steps, with a memory cap.

    Args:
        metrics: the :class:`~spectral_plugins.core.snapshot.LayerSpectrum` metrics to keep.
        max_steps: most steps held at once (>= 8); beyond it the older half is thinned 2:1.
    """

    def __init__(self, metrics: Sequence[str] = DEFAULT_METRICS, max_steps: int = DEFAULT_MAX_STEPS) -> None:
        if max_steps < MIN_MAX_STEPS:
            raise ValueError(f"max_steps must be >= {MIN_MAX_STEPS}, got {max_steps}")
        self.metrics: tuple[str, ...] = tuple(metrics)
        if not self.metrics:
            raise ValueError("a history needs at least one metric")
        self.max_steps = int(max_steps)
        self._infos: list[MatrixInfo] = []
        self._index: dict[str, int] = {}
        self._steps: list[int] = []
        self._rows: list[np.ndarray] = []  # one (n_metrics, n_matrices at that time) array per step
        self._reference = np.zeros((len(self.metrics), 0))
        self._appended = 0
        self._cache: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ recording
    def append(self, snapshot: Snapshot) -> None:
        """Record a snapshot (``step=None`` counts as the number of snapshots appended so far).

        A step not after the last kept one replaces the kept steps from it on (a resumed run that
        repeats steps after its checkpoint overwrites them rather than interleaving).
        """
        step = self._appended if snapshot.step is None else int(snapshot.step)
        values: dict[str, list[float]] = {}
        for layer in snapshot.layers:
            key = layer.key if layer.key not in values else layer.name
            self._register(MatrixInfo(key, layer.name, layer.depth, layer.role, layer.stack))
            values[key] = [layer.metric(m) for m in self.metrics]
        self.append_values(step, values)

    def append_values(self, step: int, values: Mapping[str, Sequence[float]],
                      infos: Iterable[MatrixInfo] = ()) -> None:
        """Record raw values: ``values[key]`` lists one value per metric of :attr:`metrics`.

        Keys not seen before are registered from ``infos`` or, failing that, from the key itself
        (:func:`parse_layer_key`).
        """
        for info in infos:
            self._register(info)
        for key in values:
            if key not in self._index:
                stack, depth, role = parse_key(key)
                self._register(MatrixInfo(key, key, depth, role, stack))
        row = np.full((len(self.metrics), len(self._infos)), np.nan)
        for key, metric_values in values.items():
            row[:, self._index[key]] = np.asarray(metric_values, dtype=np.float64)
        while self._steps and self._steps[-1] >= step:
            self._steps.pop()
            self._rows.pop()
        self._steps.append(int(step))
        self._rows.append(row)
        self._update_reference(row)
        self._appended += 1
        self._cache.clear()
        if len(self._steps) > self.max_steps:
            self._thin()

    def _register(self, info: MatrixInfo) -> None:
        if info.key in self._index:
            return
        self._index[info.key] = len(self._infos)
        self._infos.append(info)
        self._reference = np.concatenate([self._reference, np.full((len(self.metrics), 1), np.nan)], axis=1)

    def _update_reference(self, row: np.ndarray) -> None:
        """The reference of a matrix is its value at the first snapshot where it was finite."""
        ref = self._reference[:, : row.shape[1]]
        missing = ~np.isfinite(ref) & np.isfinite(row)
        ref[missing] = row[missing]

    def _thin(self) -> None:
        """Drop every second step of the older half (excluding the first snapshot)."""
        n_old = (len(self._steps) - 1) // 2
        drop = set(range(2, 1 + n_old, 2))
        self._steps = [s for i, s in enumerate(self._steps) if i not in drop]
        self._rows = [r for i, r in enumerate(self._rows) if i not in drop]

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> np.ndarray:
        """(T,) the kept steps, increasing."""
        return np.asarray(self._steps, dtype=np.int64)

    @property
    def matrices(self) -> tuple[MatrixInfo, ...]:
        """Every matrix seen, in order of first appearance."""
        return tuple(self._infos)

    @property
    def appended(self) -> int:
        """Snapshots appended over the history's life (kept or thinned)."""
        return self._appended

    @property
    def num_blocks(self) -> int:
        """Number of distinct blocks among the matrices (the model's block count L, over every stack)."""
        return len({(i.stack, i.depth) for i in self._infos if i.depth is not None})

    @property
    def stacks(self) -> tuple[str | None, ...]:
        """The stacks of the block matrices in order of appearance: ``(None,)`` for a single-stack
        model (also before any block is seen), ``("encoder", "decoder")`` for several."""
        found = tuple(dict.fromkeys(i.stack for i in self._infos if i.depth is not None))
        return found or (None,)

    def stack_blocks(self, stack: str | None = None) -> int:
        """Number of blocks of one stack (None: the first)."""
        chosen = self.stacks[0] if stack is None else stack
        return len({i.depth for i in self._infos if i.depth is not None and i.stack == chosen})

    def values(self, metric: str, last: int | None = None) -> np.ndarray:
        """(T, M) every kept value of ``metric``; column j belongs to ``matrices[j]``. ``last``: only
        the last that many kept steps (cheap: what a per-step signal needs)."""
        if last is not None:
            return self._stack(self._metric_index(metric), self._rows[-last:] if last > 0 else [])
        if metric not in self._cache:
            self._cache[metric] = self._stack(self._metric_index(metric), self._rows)
        return self._cache[metric]

    def _stack(self, m: int, rows: Sequence[np.ndarray]) -> np.ndarray:
        out = np.full((len(rows), len(self._infos)), np.nan)
        for t, row in enumerate(rows):
            out[t, : row.shape[1]] = row[m]
        return out

    def reference(self, metric: str) -> np.ndarray:
        """(M,) each matrix's first finite value of ``metric`` (NaN if never finite)."""
        return self._reference[self._metric_index(metric)].copy()

    def normalised(self, metric: str, last: int | None = None) -> np.ndarray:
        """(T, M) ``values / reference``: 1 at the first snapshot, NaN where the reference is 0 or NaN
        (``last``: only the last that many kept steps)."""
        ref = self.reference(metric)
        ref = np.where(np.isfinite(ref) & (ref != 0), ref, np.nan)
        return self.values(metric, last) / ref

    def series(self, key: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one matrix's metric."""
        return self.steps, self.values(metric)[:, self._index[key]].copy()

    def profile(self, metric: str, roles: Sequence[str] | str = "all",
                normalise: bool = False, stack: str | None = None, last: int | None = None) -> DepthProfile:
        """The depth profile of ``metric`` over a role group (a name of :data:`ROLE_GROUPS` or roles)
        in one stack (None: the first of :attr:`stacks`, the only one of a single-stack model).

        ``normalise=True`` divides each matrix by its reference before averaging over the group;
        ``last``: only the last that many kept steps.
        """
        chosen = self.stacks[0] if stack is None else stack
        wanted = set(ROLE_GROUPS[roles] if isinstance(roles, str) and roles in ROLE_GROUPS else
                     ((roles,) if isinstance(roles, str) else roles))
        data = self.normalised(metric, last) if normalise else self.values(metric, last)
        columns: dict[int, list[int]] = {}
        for j, info in enumerate(self._infos):
            if info.depth is not None and info.role in wanted and info.stack == chosen:
                columns.setdefault(info.depth, []).append(j)
        depths = np.asarray(sorted(columns), dtype=np.int64)
        out = np.full((data.shape[0], len(depths)), np.nan)
        for d, depth in enumerate(depths):
            block = data[:, columns[int(depth)]]
            finite = np.isfinite(block)
            count = finite.sum(axis=1)
            total = np.where(finite, block, 0.0).sum(axis=1)
            out[:, d] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        steps = self.steps if last is None else self.steps[len(self._steps) - data.shape[0]:]
        return DepthProfile(steps, depths, out)

    def nbytes(self) -> int:
        """Bytes held by the stored values (the part that grows with the run)."""
        return sum(r.nbytes for r in self._rows) + self._reference.nbytes

    def _metric_index(self, metric: str) -> int:
        try:
            return self.metrics.index(metric)
        except ValueError:
            raise KeyError(f"metric {metric!r} is not kept by this history; "
                           f"it keeps {list(self.metrics)}") from None

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """Plain dicts, lists, ints, floats and None (for NaN): JSON- and ``torch.save``-friendly.

        :meth:`from_state` rebuilds an equal history: ``from_state(h.to_state()).to_state() == h.to_state()``.
        """
        n = len(self._infos)
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "metrics": list(self.metrics),
            "max_steps": self.max_steps,
            "appended": self._appended,
            "matrices": [{"key": i.key, "name": i.name, "depth": i.depth, "role": i.role, "stack": i.stack}
                         for i in self._infos],
            "reference": [_to_list(r) for r in self._reference],
            "steps": list(self._steps),
            "values": {m: [_to_list(_padded(row[k], n)) for row in self._rows]
                       for k, m in enumerate(self.metrics)},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SpectralHistory:
        """Rebuild a history from :meth:`to_state` output."""
        if state.get("format") != STATE_FORMAT or int(state.get("version", -1)) > STATE_VERSION:
            raise ValueError(f"not a spectral history state (format {state.get('format')!r}, "
                             f"version {state.get('version')!r})")
        history = cls(metrics=state["metrics"], max_steps=int(state["max_steps"]))
        for m in state["matrices"]:
            depth = None if m["depth"] is None else int(m["depth"])
            stack = m.get("stack")
            history._register(MatrixInfo(str(m["key"]), str(m["name"]), depth, str(m["role"]),
                                         None if stack is None else str(stack)))
        history._reference = np.array([_from_list(r) for r in state["reference"]], dtype=np.float64)
        history._reference = history._reference.reshape(len(history.metrics), len(history._infos))
        history._steps = [int(s) for s in state["steps"]]
        per_metric = [state["values"][m] for m in history.metrics]
        history._rows = [np.array([_from_list(per_metric[k][t]) for k in range(len(history.metrics))],
                                  dtype=np.float64).reshape(len(history.metrics), len(history._infos))
                         for t in range(len(history._steps))]
        history._appended = int(state["appended"])
        return history

    def to_json(self, path: str | Path | None = None) -> str:
        """The state as JSON text (written to ``path`` if given)."""
        text = json.dumps(self.to_state())
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> SpectralHistory:
        """Read :meth:`to_json` output from a string or a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_state(json.loads(text))

    @classmethod
    def from_scalars(cls, series: Mapping[str, Sequence[tuple[int, float]]],
                     max_steps: int = 1 << 20) -> SpectralHistory:
        """Build a history from tracked scalars ``{"spectral_<metric>/<layer_key>": [(step, value), ...]}``.

        This is how a run logged to TensorBoard or MLflow is read back; keys of other forms are ignored.
        """
        by_metric: dict[str, dict[str, dict[int, float]]] = {}
        for tag, points in series.items():
            parsed = parse_matrix_tag(tag)
            if parsed is None:
                continue
            metric, key = parsed
            by_metric.setdefault(metric, {}).setdefault(key, {}).update({int(s): float(v) for s, v in points})
        metrics = tuple(m for m in DEFAULT_METRICS if m in by_metric) + tuple(
            sorted(m for m in by_metric if m not in DEFAULT_METRICS))
        if not metrics:
            raise ValueError("no spectral_<metric>/<layer_key> series found")
        history = cls(metrics=metrics, max_steps=max(max_steps, MIN_MAX_STEPS))
        keys = sorted({k for per_key in by_metric.values() for k in per_key})
        steps = sorted({s for per_key in by_metric.values() for pts in per_key.values() for s in pts})
        for step in steps:
            values = {k: [by_metric.get(m, {}).get(k, {}).get(step, math.nan) for m in metrics] for k in keys}
            history.append_values(step, values)
        return history


def parse_matrix_tag(tag: str) -> tuple[str, str] | None:
    """``spectral_alpha/L03_q`` -> ("alpha", "L03_q"); None for any other kind of tag."""
    if not tag.startswith("spectral_") or "/" not in tag:
        return None
    section, key = tag.split("/", 1)
    metric = section[len("spectral_"):]
    if not metric or metric in ("lifecycle", "attention") or "/" in key:
        return None
    return metric, key


def _padded(row: np.ndarray, n: int) -> np.ndarray:
    return row if row.shape[0] == n else np.concatenate([row, np.full(n - row.shape[0], np.nan)])


def _to_list(values: np.ndarray) -> list[float | str | None]:
    """NaN -> None and +-inf -> "inf"/"-inf", so that strict JSON holds every value exactly."""
    return [float(v) if math.isfinite(v) else (None if math.isnan(v) else str(v)) for v in values.tolist()]


def _from_list(values: Sequence[float | str | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]
