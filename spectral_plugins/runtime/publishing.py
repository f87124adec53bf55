"""What the core hands to publishers, and the publisher protocol. Publishers are called from an
:class:`~spectral_plugins.runtime.outbox.Outbox`, off the training thread, so a failing or slow
tracker never reaches the training loop."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..core.heatmap import ColourScale, Heatmap, heatmaps
from ..core.metrics import METRIC_NAMES
from ..core.snapshot import Snapshot
from .outbox import Outbox

log = logging.getLogger("spectral_plugins")


@runtime_checkable
class Image(Protocol):
    """A figure a publisher can show: a heatmap, a lifecycle map. Drawn lazily, once."""

    def to_rgb(self) -> Any:
        """An (H, W, 3) uint8 array."""

    def to_png(self) -> bytes:
        """PNG bytes."""


@dataclass(frozen=True)
class StepReport:
    """Everything published for one snapshot step.

    Attributes:
        step: the training step the weights belong to.
        snapshot: the per-matrix spectra and metrics.
        metrics: the metric names to publish (a subset of :data:`~spectral_plugins.core.metrics.METRICS`).
        extra_scalars: canonical scalars computed beyond the snapshot (lifecycle ``spectral_lifecycle/...``,
            attention ``spectral_attention/...``), already keyed.
        tables: named tables (``{name: list of row dicts}``) such as per-head attention bounds.
        heatmap_metrics: the metrics drawn as depth x role heatmaps (None: every published metric).
        per_expert: publish every expert matrix of a mixture of experts under its own key, besides
            the per-layer mean, min and max over experts (:meth:`Snapshot.scalars`).
        full: False for a fast-lane step (:mod:`spectral_plugins.runtime.fast`): its snapshot is
            empty and its per-matrix values are in ``extra_scalars``; publishers log its
            :meth:`scalars` and nothing else (no images, tables or layouts).
        heatmap_scales: each heatmap metric's colour scale, fixed for the whole run.
        images: figures computed beyond the snapshot, under canonical keys (the lifecycle maps
            ``spectral_map/<metric>``), drawn when a publisher first asks.
    """

    step: int
    snapshot: Snapshot
    metrics: tuple[str, ...] = METRIC_NAMES
    extra_scalars: Mapping[str, float] = field(default_factory=dict)
    tables: Mapping[str, list[dict[str, Any]]] = field(default_factory=dict)
    heatmap_metrics: tuple[str, ...] | None = None
    per_expert: bool = False
    full: bool = True
    heatmap_scales: Mapping[str, ColourScale] = field(default_factory=dict)
    images: Mapping[str, Image] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """All scalars of this step under their canonical keys (NaN values dropped)."""
        return _finite({**self.snapshot.scalars(self.metrics, self.per_expert), **self.extra_scalars})

    def heatmaps(self) -> list[Heatmap]:
        """One depth x role grid per heatmap metric, computed once for all publishers."""
        cached = self.__dict__.get("_heatmaps")
        if cached is None:
            chosen = self.metrics if self.heatmap_metrics is None else self.heatmap_metrics
            cached = heatmaps(self.snapshot, chosen, self.heatmap_scales)
            object.__setattr__(self, "_heatmaps", cached)  # a cache, not state: frozen otherwise
        return list(cached)


@dataclass(frozen=True)
class RunSummary:
    """What is published once at the end of a run.

    Attributes:
        last: the last step's report (final per-layer table = ``last.snapshot.to_records()``).
        summary_scalars: every run-level figure (lifecycle summaries, pruning ranks, time constants),
            under ``spectral_run/...`` keys: one value per run, never a time series.
        text: a human-readable summary for consoles and text panels.
        config: the monitor's configuration, for trackers that record parameters.
        headline: the keys of ``summary_scalars`` that trackers whose run-level figures are metrics
            (MLflow, TensorBoard's HParams) receive as such; None: all of them. The rest go into
            the summary text and files.
    """

    last: StepReport
    summary_scalars: Mapping[str, float] = field(default_factory=dict)
    text: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    headline: tuple[str, ...] | None = None

    def headline_scalars(self) -> dict[str, float]:
        """The finite headline run-level figures (all of them when ``headline`` is None)."""
        keys = self.summary_scalars.keys() if self.headline is None else self.headline
        return _finite({key: self.summary_scalars.get(key) for key in keys})

    def finite_scalars(self) -> dict[str, float]:
        """Every finite run-level figure."""
        return _finite(self.summary_scalars)


def _finite(values: Mapping[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``[(key, value)]`` with nested mappings flattened into ``a/b`` keys (params, text tables)."""
    flat: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.extend(flatten_config(value, name + "/"))
        else:
            flat.append((name, value))
    return flat


@runtime_checkable
class Publisher(Protocol):
    """A tracker sink. Implementations translate core results into one tracker's native form."""

    name: str

    def publish_config(self, config: Mapping[str, Any]) -> None:
        """Record the monitor's configuration once (params / hyper-parameters)."""

    def publish_step(self, report: StepReport) -> None:
        """Publish one snapshot step."""

    def publish_summary(self, summary: RunSummary) -> None:
        """Publish the end-of-run summary."""

    def close(self) -> None:
        """Flush and release what the publisher opened itself (never a run the user owns)."""


# Kept for code written against the synchronous guard: every publisher now sits behind an outbox.
GuardedPublisher = Outbox


def console() -> logging.Logger:
    """The ``spectral_plugins.console`` logger, writing to stderr at INFO level when the application
    configured no logging itself (as Lightning does for its own logger)."""
    logger = logging.getLogger("spectral_plugins.console")
    if not logger.handlers and not logging.getLogger().hasHandlers():
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
