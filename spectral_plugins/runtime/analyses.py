"""Analyses that run on every snapshot: the tracker's optional hooks, and the built-in ones.

An :class:`Analysis` receives each :class:`~spectral_plugins.core.snapshot.Snapshot` (and the model map)
and returns extra scalars and tables for the same step; at the end of the run it returns run-level
figures and summary text. :class:`~spectral_plugins.runtime.tracker.SpectralTracker` runs them after the
engine and before publishing; one that raises is disabled with a warning, the others go on.

Built in: :class:`LifecycleAnalysis` (:mod:`spectral_plugins.lifecycle.signals`, on by default) and
:class:`AttentionAnalysis` (:mod:`spectral_plugins.attention.bounds`, opt-in). Each imports its module when
created, so the tracker works without them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..core.keys import LIFECYCLE_SECTION, lifecycle_key, map_key, run_key
from ..core.model_map import ModelMap
from ..core.options import SERIES, choice
from ..core.snapshot import Snapshot, fmt, layer_table
from .publishing import RunSummary, StepReport

log = logging.getLogger("spectral_plugins")

HEADLINE_GROUPS: tuple[str, ...] = ("qk", "vo", "mlp")
# The lifecycle series a run publishes by default (``series="headline"``): what a person reads the
# lifecycle from. ``series="all"`` publishes every signal of every group (docs/lifecycle.md).
HEADLINE_LIFECYCLE: tuple[str, ...] = (
    *(lifecycle_key("wave_front_depth", g) for g in HEADLINE_GROUPS),
    *(lifecycle_key("nsr_mean", g) for g in HEADLINE_GROUPS),
    *(lifecycle_key("delta_alpha", g) for g in HEADLINE_GROUPS),
    lifecycle_key("alpha_depth_gradient", "all"),
    lifecycle_key("qk_vo_asymmetry"),
)
# The run-level figures that trackers keeping them as metrics (MLflow, TensorBoard HParams) receive by
# default; every figure is in the W&B run summary, the summary text and MLflow's run_summary.json.
HEADLINE_RUN: tuple[str, ...] = (
    *(run_key("wave_speed", g) for g in HEADLINE_GROUPS),
    *(run_key("wave_reversal_step", g) for g in HEADLINE_GROUPS),
    *(run_key("delta_alpha", g) for g in HEADLINE_GROUPS),
    run_key("alpha_depth_gradient", "all"),
    run_key("qk_vo_asymmetry"),
    run_key("num_blocks"),
)
# Attention quantities published per attention layer by default; the per-head table has them all.
HEADLINE_ATTENTION: tuple[str, ...] = ("logit_bound_rank_aware", "fp8_e4m3_scale_rank_aware")


def is_headline(key: str, headline: Sequence[str]) -> bool:
    """Whether ``key`` is one of ``headline``, or the same key of one stack of a multi-stack model
    (``.../wave_front_depth/encoder_qk`` for ``.../wave_front_depth/qk``,
    ``spectral_run/wave_speed_encoder_qk`` for ``spectral_run/wave_speed_qk``,
    ``.../qk_vo_asymmetry/encoder`` for ``.../qk_vo_asymmetry``, ``spectral_run/qk_vo_asymmetry_encoder``)."""
    if key in headline:
        return True
    return any(key.startswith((h + "/", h + "_")) or _stack_variant(key, h) for h in headline)


def _stack_variant(key: str, headline_key: str) -> bool:
    head, _, group = headline_key.rpartition("/")
    if head.count("/") and key.startswith(head + "/"):  # .../<name>/<stack>_<group>
        return key.rpartition("/")[2].endswith("_" + group)
    name_group = group.rsplit("_", 1)  # spectral_run/<name>_<group> -> <name>_<stack>_<group>
    body = key.partition("/")[2]
    return (len(name_group) == 2 and key.partition("/")[0] == head and body.startswith(name_group[0] + "_")
            and body.endswith("_" + name_group[1]) and len(body) > len(group) + 1)


def run_figure_key(lifecycle_summary_key: str) -> str:
    """``spectral_lifecycle/<name>[_run][/<group>]`` (a run-level figure) -> ``spectral_run/<name>[_<group>]``
    (the key of the same figure in its own section)."""
    _, name, *rest = lifecycle_summary_key.split("/")
    return run_key(name.removesuffix("_run"), "_".join(rest) or None)


@dataclass(frozen=True)
class AnalysisOutput:
    """What an :class:`Analysis` adds to a step or to the run summary.

    Attributes:
        scalars: canonical keys (``spectral_lifecycle/...``, ``spectral_attention/...``) to values.
        tables: named tables, each a list of row dicts.
        text: lines for the console summary.
        images: figures under canonical keys (``spectral_map/<metric>``), objects with ``to_rgb()``
            and ``to_png()`` drawn when a publisher first asks.
    """

    scalars: Mapping[str, float] = field(default_factory=dict)
    tables: Mapping[str, list[dict[str, Any]]] = field(default_factory=dict)
    text: str = ""
    images: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Analysis(Protocol):
    """A computation over snapshots, run by the tracker after each snapshot (optional hook).

    An analysis may also define ``update_fast(snapshot, model_map) -> AnalysisOutput``: it then
    receives the fast lane's snapshots too (stable ranks and norms only, every
    ``fast_every_n_steps``, full-snapshot steps included, in step order) and its scalars are published
    with the fast-lane step.
    """

    name: str

    def update(self, snapshot: Snapshot, model_map: ModelMap) -> AnalysisOutput:
        """Consume one snapshot; return this step's extra scalars and tables."""

    def summary(self) -> AnalysisOutput:
        """Run-level figures for the end-of-run summary."""

    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, numbers, strings, None) to resume from."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


class LifecycleAnalysis:
    """The lifecycle signals (:mod:`spectral_plugins.lifecycle.signals`) as a tracker hook: per-step
    ``spectral_lifecycle/...`` scalars (the :data:`HEADLINE_LIFECYCLE` ones unless ``series="all"``)
    and lifecycle maps ``spectral_map/<metric>`` (:mod:`spectral_plugins.lifecycle.maps`) of
    ``map_metrics``; the run-level figures ``spectral_run/...`` plus pruning advice at the end."""

    name = "lifecycle"

    def __init__(self, max_steps: int | None = None, series: str = "headline",
                 map_metrics: Sequence[str] = ("stable_rank", "alpha")) -> None:
        from ..lifecycle.signals import SpectralLifecycle

        self.lifecycle = SpectralLifecycle() if max_steps is None else SpectralLifecycle(max_steps=max_steps)
        self.series = choice("series", series, SERIES)
        self.map_metrics = tuple(m for m in map_metrics if m in self.lifecycle.history.metrics)

    @property
    def history(self) -> Any:
        return self.lifecycle.history

    def update(self, snapshot: Snapshot, model_map: ModelMap) -> AnalysisOutput:
        from ..lifecycle.maps import lifecycle_maps

        scalars = self._headline(self.lifecycle.update(snapshot).scalars())
        history, config, waves = self.lifecycle.history, self.lifecycle.config, self.lifecycle.waves
        maps = {map_key(metric): figure for metric, figure
                in lifecycle_maps(history, self.map_metrics, config=config, waves=waves).items()}
        return AnalysisOutput(scalars=scalars, images=maps)

    def update_fast(self, snapshot: Snapshot, model_map: ModelMap) -> AnalysisOutput:
        """A fast-lane step (stable ranks only): the stable-rank signals at its step (wave front,
        compression order, asymmetry), no maps."""
        return AnalysisOutput(scalars=self._headline(self.lifecycle.update_fast(snapshot).scalars()))

    def _headline(self, scalars: dict[str, float]) -> dict[str, float]:
        if self.series == "headline":
            return {key: value for key, value in scalars.items() if is_headline(key, HEADLINE_LIFECYCLE)}
        return scalars

    def summary(self) -> AnalysisOutput:
        """Run-level figures under ``spectral_run/<name>[_<group>]`` (a section apart from the series)."""
        if len(self.lifecycle.history) == 0:
            return AnalysisOutput()
        result = self.lifecycle.summary()
        scalars = {run_figure_key(key): value for key, value in result.scalars().items()
                   if key.startswith(LIFECYCLE_SECTION + "/")}
        return AnalysisOutput(scalars=scalars, text=lifecycle_text(result))

    def state_dict(self) -> dict[str, Any]:
        return self.lifecycle.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lifecycle.load_state_dict(state)


class AttentionAnalysis:
    """The attention logit bounds (:func:`~spectral_plugins.attention.bounds.attention_bounds`) as a tracker
    hook: per-step ``spectral_attention/<name>/<layer>`` scalars and an ``attention_heads`` table."""

    name = "attention"

    def __init__(self, model: nn.Module, series: str = "headline", **options: Any) -> None:
        from ..attention.bounds import attention_bounds

        self._bounds = attention_bounds
        self.model = model
        self.series = choice("series", series, SERIES)
        self.options = options
        self.last: Any = None

    def update(self, snapshot: Snapshot, model_map: ModelMap) -> AnalysisOutput:
        self.last = self._bounds(self.model, model_map=model_map, **self.options)
        scalars = self.last.scalars()
        if self.series == "headline":
            scalars = {k: v for k, v in scalars.items() if k.split("/")[1] in HEADLINE_ATTENTION}
        return AnalysisOutput(scalars=scalars, tables={"attention_heads": self.last.head_rows()})

    def summary(self) -> AnalysisOutput:
        if self.last is None:
            return AnalysisOutput()
        lines = [f"attention logit bounds (delta {self.last.delta:g}, n {self.last.seq_len}):"]
        for layer in self.last.layers:
            lines.append(f"  {layer.key}: |logit| <= {fmt(layer.bound())}, "
                         f"rank-aware {fmt(layer.bound('rank_aware'))}, "
                         f"FP8 E4M3 scale {fmt(layer.fp8_scale('e4m3', 'rank_aware'))}")
        return AnalysisOutput(text="\n".join(lines))  # the scalars' last points are the final ones

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: the bounds depend only on the current weights."""


class Analyses:
    """A tracker's analyses, run together: the outputs merged, each one that raises disabled with a
    warning while the others go on, and nothing reaching the training loop."""

    def __init__(self, analyses: Sequence[Analysis]) -> None:
        self.analyses = list(analyses)
        self.disabled: set[str] = set()

    def __iter__(self) -> Iterator[Analysis]:
        return iter(self.analyses)

    @property
    def history(self) -> Any:
        """The :class:`~spectral_plugins.lifecycle.history.SpectralHistory` of the lifecycle analysis,
        or None."""
        return next((a.history for a in self.analyses if hasattr(a, "history")), None)

    def update(self, snapshot: Snapshot, model_map: ModelMap) -> AnalysisOutput:
        """Every analysis' scalars and tables for ``snapshot``."""
        return self._run("update", snapshot, model_map)

    def update_fast(self, snapshot: Snapshot, model_map: ModelMap) -> AnalysisOutput:
        """The scalars of the analyses that read fast-lane steps (an optional ``update_fast`` method,
        same signature as ``update``) for a fast-lane ``snapshot``."""
        return self._run("update_fast", snapshot, model_map)

    def summarize(self, last: StepReport, config: Mapping[str, Any],
                  headline: tuple[str, ...] | None = HEADLINE_RUN, footer: str = "") -> RunSummary:
        """The run summary: the per-layer table of the ``last`` report, then each analysis' run-level
        figures (``headline``: those trackers keep as metrics, None: all) and text, then ``footer``."""
        output = self._run("summary")
        text = "\n\n".join(t for t in (layer_table(last.snapshot, last.metrics), output.text, footer) if t)
        if headline is not None:  # the headline figures of every stack of a multi-stack model
            headline = tuple(key for key in output.scalars if is_headline(key, headline))
        return RunSummary(last=last, summary_scalars=dict(output.scalars), text=text, config=dict(config),
                          headline=headline)

    def state_dict(self) -> dict[str, Any]:
        """Each analysis' state, by name."""
        return {a.name: a.state_dict() for a in self.analyses}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (an analysis missing from it keeps its state)."""
        for analysis in self.analyses:
            if analysis.name in saved:
                analysis.load_state_dict(saved[analysis.name])

    def _run(self, method: str, *args: Any) -> AnalysisOutput:
        scalars: dict[str, float] = {}
        tables: dict[str, list[dict[str, Any]]] = {}
        images: dict[str, Any] = {}
        texts: list[str] = []
        for analysis in self.analyses:
            if analysis.name in self.disabled:
                continue
            if not hasattr(analysis, method):  # update_fast is optional
                continue
            try:
                output: AnalysisOutput = getattr(analysis, method)(*args)
            except Exception as error:  # noqa: BLE001 - an analysis must never break training
                self.disabled.add(analysis.name)
                log.debug("analysis %s.%s failed", analysis.name, method, exc_info=True)
                warnings.warn(f"spectral-plugins: analysis {analysis.name!r} failed in {method} "
                              f"({type(error).__name__}: {error}); it is disabled, snapshots continue",
                              RuntimeWarning, stacklevel=4)
                continue
            scalars.update(output.scalars)
            tables.update(output.tables)
            images.update(output.images)
            texts += [output.text] if output.text else []
        return AnalysisOutput(scalars=scalars, tables=tables, text="\n\n".join(texts), images=images)


def default_analyses(history: bool | int, attention: bool | Mapping[str, Any] = False,
                     model: nn.Module | ModelMap | None = None, series: str = "headline",
                     map_metrics: Sequence[str] = ("stable_rank", "alpha")) -> list[Analysis]:
    """The built-in analyses for a tracker's ``history`` and ``attention`` options (the attention
    bounds need the module itself, not only its map), publishing the ``series`` list and drawing
    lifecycle maps of ``map_metrics``."""
    if isinstance(history, int) and not isinstance(history, bool) and history < 1:
        raise ValueError(f"history must be True, False or a positive number of kept steps, got {history!r}")
    analyses: list[Analysis] = []
    if history is not False:
        try:
            analyses.append(LifecycleAnalysis(None if history is True else int(history), series, map_metrics))
        except ImportError:  # the lifecycle module is optional for the tracker
            log.debug("lifecycle analysis unavailable", exc_info=True)
    if attention is not False and isinstance(model, nn.Module):
        analyses.append(AttentionAnalysis(model, series, **({} if attention is True else dict(attention))))
    return analyses


def lifecycle_text(result: Any) -> str:
    """Lines summarising a :class:`~spectral_plugins.lifecycle.signals.LifecycleSummary`."""
    from ..lifecycle.describe import group_text, number

    lines = [f"lifecycle over {result.num_blocks} blocks (step {result.step}); "
             f"Q/K vs V/O asymmetry {number(result.qk_vo_asymmetry, 4)}"]
    lines += [f"  {group_text(g)}" for g in result.groups]
    if result.advice.order:
        method = result.importance.method
        lines.append(f"  pruning advice (least important block first, by {method}): {result.advice.text()}")
    return "\n".join(lines)
