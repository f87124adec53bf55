"""Result objects of the engine: one :class:`LayerSpectrum` per matrix, one :class:`Snapshot` per step."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from .keys import matrix_key
from .metrics import METRIC_NAMES

# Columns of the per-layer text table, in this order when among the metrics shown.
TABLE_COLUMNS: tuple[str, ...] = ("alpha", "stable_rank", "effective_rank", "spectral_norm", "alpha_weighted",
                                  "frobenius_norm", "ks_distance", "n_tail")
_EXPERT_SUFFIX = re.compile(r"_e\d+$")


@dataclass(frozen=True)
class LayerSpectrum:
    """Spectral metrics of one weight matrix at one step (formulas: :mod:`spectral_plugins.core.metrics`).

    Attributes:
        name: unique, stable matrix name (parameter path, with ``[q]``/``[k]``/``[v]`` for a split).
        key: short layer id used in metric keys (``L03_q``, ``embed``).
        module_name: the module owning the parameter.
        depth: block index, or None outside the repeated blocks.
        role: q, k, v, o, mlp_in, mlp_gate, mlp_out, embed, pos_embed, lm_head or other.
        shape: (rows, columns) of the matrix as the model applies it (out x in).
        finite: False when the matrix held NaN/Inf; then every metric is NaN.
        precision_floor: eigenvalues below this (about eps * lambda_max * size) are not trusted.
        n_below_floor: how many eigenvalues fell below the precision floor.
        stack: the stack of blocks (``encoder``, ``vision``...) in a model of several, else None.
        expert: the expert of a mixture-of-experts layer, else None.
        eigenvalues: the full spectrum (ascending), kept only when the engine is asked to.
    """

    name: str
    key: str
    module_name: str
    depth: int | None
    role: str
    shape: tuple[int, int]
    spectral_norm: float
    frobenius_norm: float
    stable_rank: float
    effective_rank: float
    alpha: float
    alpha_weighted: float
    xmin: float
    ks_distance: float
    n_tail: int
    sigma_alpha: float
    lambda_max: float
    finite: bool = True
    precision_floor: float = 0.0
    n_below_floor: int = 0
    stack: str | None = None
    expert: int | None = None
    eigenvalues: np.ndarray | None = field(default=None, compare=False, repr=False)

    def metric(self, name: str) -> float:
        """The value of metric ``name`` (see :data:`spectral_plugins.core.metrics.METRICS`)."""
        return float(getattr(self, name))

    def to_record(self) -> dict[str, Any]:
        """A flat JSON-ready dict of every field except the eigenvalues."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "eigenvalues"}
        record["shape"] = list(self.shape)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LayerSpectrum:
        """Inverse of :meth:`to_record` (``None`` stands for NaN in JSON)."""
        values = dict(record)
        values["shape"] = tuple(values["shape"])
        for name in METRIC_NAMES:
            if values.get(name) is None:
                values[name] = math.nan
        values["n_tail"] = int(values["n_tail"]) if math.isfinite(values["n_tail"]) else 0
        return cls(**values)


@dataclass(frozen=True)
class Snapshot:
    """Spectra of every mapped matrix of a model at one training step.

    Attributes:
        step: the training step the weights belong to (None outside training).
        layers: one :class:`LayerSpectrum` per matrix, in model order.
        method: "gram" or "svd".
        dtype: the floating type the spectra were computed in.
        device: where they were computed.
        seconds: wall time of the computation.
    """

    step: int | None
    layers: tuple[LayerSpectrum, ...]
    method: str = "gram"
    dtype: str = "float64"
    device: str = "cpu"
    seconds: float = 0.0

    def __iter__(self) -> Iterator[LayerSpectrum]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, key_or_name: str) -> LayerSpectrum:
        """The layer whose key (``L03_q``) or name equals ``key_or_name``."""
        for layer in self.layers:
            if key_or_name in (layer.key, layer.name):
                return layer
        raise KeyError(f"no layer {key_or_name!r}; keys: {[layer.key for layer in self.layers]}")

    def scalars(self, metrics: tuple[str, ...] | list[str] = METRIC_NAMES,
                per_expert: bool = False) -> dict[str, float]:
        """Every value as ``{spectral_<metric>/<layer_key>: value}``, the keys all trackers use.

        The matrices of a mixture's experts (``L03_mlp_in_e0``, ``..._e1``, ...) are published as their
        mean, min and max over the experts (``L03_mlp_in_experts_mean``, ``_min``, ``_max``; NaN
        values ignored), and each one under its own key too when ``per_expert`` is True: a model of
        64 experts would otherwise flood every panel with 64 lines per layer.
        """
        out = {matrix_key(m, layer.key): layer.metric(m) for m in metrics for layer in self.layers
               if per_expert or layer.expert is None}
        groups: dict[str, list[LayerSpectrum]] = {}
        for layer in self.layers:
            if layer.expert is not None:
                groups.setdefault(_EXPERT_SUFFIX.sub("", layer.key), []).append(layer)
        for base, members in groups.items():
            for m in metrics:
                values = np.array([layer.metric(m) for layer in members])
                finite = values[np.isfinite(values)]
                if finite.size:
                    out |= {matrix_key(m, f"{base}_experts_{name}"): float(fn(finite))
                            for name, fn in (("mean", np.mean), ("min", np.min), ("max", np.max))}
        return out

    def with_step(self, step: int | None) -> Snapshot:
        """A copy tagged with another step."""
        return replace(self, step=step)

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per matrix, each with the step (for pandas / CSV)."""
        return [{"step": self.step, **layer.to_record()} for layer in self.layers]

    def to_json(self, indent: int | None = None) -> str:
        """A JSON document (NaN written as null) that :meth:`from_json` reads back."""
        header = {k: v for k, v in asdict(self).items() if k != "layers"}
        body = {**header, "layers": [_nan_to_none(layer.to_record()) for layer in self.layers]}
        return json.dumps(body, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        """Read a snapshot written by :meth:`to_json`."""
        body = json.loads(text)
        layers = tuple(LayerSpectrum.from_record(r) for r in body.pop("layers"))
        return cls(layers=layers, **body)


def layer_table(snapshot: Snapshot, metrics: Sequence[str]) -> str:
    """The per-layer table of a snapshot as fixed-width text (one row per matrix)."""
    columns = [m for m in TABLE_COLUMNS if m in metrics] or list(metrics)[:6]
    header = ["layer", "shape", *columns]
    rows = [[layer.key, f"{layer.shape[0]}x{layer.shape[1]}", *(fmt(layer.metric(m)) for m in columns)]
            for layer in snapshot.layers]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).rjust(w) if i > 1 else str(cell).ljust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in [header, *rows]]
    at_step = "" if snapshot.step is None else f" at step {snapshot.step}"
    return f"per-layer spectra{at_step}:\n" + "\n".join(lines)


def fmt(value: float) -> str:
    """A number for text output: four significant digits, ``nan`` for anything not finite."""
    return "nan" if not math.isfinite(value) else f"{value:.4g}"


def _nan_to_none(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
