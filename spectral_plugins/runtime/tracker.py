"""Tracking a training run: snapshots every N steps, optional analyses, publishing, resumable state.

:class:`SpectralTracker` is the loop-agnostic core of every integration (the Lightning
:class:`~spectral_plugins.lightning.SpectralMonitor` is a thin shell around it)::

    tracker = SpectralTracker(model, every_n_steps=25, publishers=[TensorBoardPublisher("runs")])
    for step in range(num_steps):
        ...  # forward, backward, optimizer.step()
        tracker.step(step + 1)   # weights after step + 1 updates
    tracker.finish()

The tracker decides which steps are due, runs the analyses on each finished snapshot, hands the
reports to the publishers and keeps the state to resume from; how a snapshot is computed is a
:class:`~spectral_plugins.runtime.strategies.SnapshotStrategy` chosen once, at construction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from ..core.engine import SpectralEngine, cpu_threads
from ..core.heatmap import ColourScale, colour_scales
from ..core.model_map import ModelMap, map_model
from ..core.options import DEFAULT_OUTBOX_SIZE, DEFAULT_PUBLISH_TIMEOUT_S, check_options
from ..core.snapshot import Snapshot
from .analyses import HEADLINE_RUN, Analyses, Analysis, default_analyses
from .background import BackgroundSnapshotter
from .delivery import Delivery, TrackerStats
from .fast import FastLaneRunner
from .outbox import Outbox
from .publishing import Publisher, RunSummary, StepReport, console
from .strategies import make_strategy

STATE_FORMAT = "spectral_plugins.tracker"  # the saved-state name since 0.1.0, not a module path
STATE_VERSION = 1
DEFAULT_FAST_EVERY_N_STEPS = 5


class SpectralTracker:
    """Snapshots a model's weight spectra every ``every_n_steps`` steps and publishes them.

    Args:
        model: the model being trained; it is mapped once, here (the map holds live views of the
            weights, so later snapshots see the trained values).
        every_n_steps: snapshot when ``step % every_n_steps == 0`` (>= 1).
        publishers: tracker sinks (:class:`~spectral_plugins.runtime.publishing.Publisher`); each is
            fed from an :class:`~spectral_plugins.runtime.outbox.Outbox` by a worker thread: the
            training thread only enqueues; failed deliveries are retried, losses counted (:attr:`stats`).
        metrics: metric names to publish as per-matrix series (default
            :data:`~spectral_plugins.core.metrics.DEFAULT_SERIES_METRICS`: alpha and stable rank;
            ``"all"`` for every metric of :data:`~spectral_plugins.core.metrics.METRICS`). Every metric
            is computed either way and kept in the snapshot and its JSON.
        series: ``"headline"`` (default) publishes the short list of lifecycle and attention series
            and run-level figures of :mod:`~spectral_plugins.runtime.analyses`
            (``HEADLINE_LIFECYCLE``, ``HEADLINE_ATTENTION``, ``HEADLINE_RUN``); ``"all"`` every one.
        include, exclude, roles: passed to :func:`~spectral_plugins.core.model_map.map_model`.
        method: engine method ("auto", "gram", "svd").
        heatmap: publish depth x role heatmap images (one colour scale for the whole run) and lifecycle
            maps ``spectral_map/<metric>`` (depth x step, for the metrics the history keeps): True for
            :data:`~spectral_plugins.core.options.DEFAULT_HEATMAP_METRICS` (those published), False for
            none, or the metric names to draw.
        history: keep a metric history and the lifecycle signals computed from it: True (default
            cap of kept steps), an int (that cap), or False (no history, no lifecycle).
        attention: also compute the attention logit bounds (:mod:`spectral_plugins.attention.bounds`) at each
            snapshot: True, or keyword arguments of
            :func:`~spectral_plugins.attention.bounds.attention_bounds` (e.g. ``{"sample_batch": x}``).
        analyses: further :class:`Analysis` hooks run after each snapshot.
        per_expert: in a mixture of experts, publish every expert's matrices under their own keys
            too; by default only each layer's mean, min and max over the experts are published.
        device: where spectra are computed (default: where the weights live).
        threads: CPU threads (``torch.set_num_threads``) while a snapshot is computed, restored after
            (also on the background worker); None keeps the current setting. One is the default: the
            CPU eigensolver on matrices up to ~2k wide spends far more CPU multi-threaded (measured
            250x at 512 x 512 with two threads on two busy cores).
        background: copy the weights at a due :meth:`step` and compute the spectra on a worker thread;
            each snapshot is published, tagged with its own step, at a later call (:meth:`flush`,
            :meth:`finish` and :meth:`state_dict` wait for it). A due step reached while one is in
            flight is skipped and counted. The metrics equal the synchronous ones.
        distributed: share each snapshot across the ranks of ``torch.distributed``: None (default)
            when a process group of more than one rank is initialised. Then *every* rank constructs a
            tracker and calls :meth:`step`, :meth:`finish` (and :meth:`state_dict`) at the same steps;
            rank 0 publishes (on the others they return None). DDP and FSDP2 weights; with
            ``background=True`` (replicated weights only) a snapshot is published one period late.
            The strategies (:mod:`spectral_plugins.runtime.strategies`) say more.
        fast_every_n_steps: between full snapshots, publish the cheap per-matrix metrics (stable
            rank; spectral and Frobenius norm when ``metrics`` publishes them) every this many steps
            from warm-started Lanczos (:mod:`spectral_plugins.runtime.fast`), under the same keys, so
            the compression wave is resolved; each full snapshot publishes the lane's largest relative
            error against the exact values (``spectral_fast/max_rel_error``). Default
            :data:`DEFAULT_FAST_EVERY_N_STEPS` (5: 20 points per 100 steps, the demo's compression
            phase); None turns it off.
        outbox_size: entries each publisher's outbox keeps while its sink is slow or down (a full
            outbox drops its oldest entry, counted and warned about).
        publish_timeout_s: how long :meth:`close` (and :meth:`finish`) wait for the outboxes to drain.

    Raises:
        ValueError: ``every_n_steps < 1``, an unknown metric name, or a bad option.
    """

    def __init__(
        self,
        model: nn.Module | ModelMap,
        every_n_steps: int = 25,
        publishers: Sequence[Publisher] = (),
        metrics: Sequence[str] | str | None = None,
        series: str = "headline",
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        roles: Mapping[str, str] | None = None,
        method: str = "auto",
        heatmap: bool | Sequence[str] = True,
        history: bool | int = True,
        attention: bool | Mapping[str, Any] = False,
        analyses: Sequence[Analysis] = (),
        device: str | None = None,
        threads: int | None = 1,
        background: bool = False,
        distributed: bool | None = None,
        per_expert: bool = False,
        fast_every_n_steps: int | None = DEFAULT_FAST_EVERY_N_STEPS,
        outbox_size: int = DEFAULT_OUTBOX_SIZE,
        publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S,
    ) -> None:
        options = check_options(every_n_steps=every_n_steps, metrics=metrics, series=series, heatmap=heatmap,
                                include=include, exclude=exclude, roles=roles, method=method, history=history,
                                attention=attention, device=device, threads=threads, background=background,
                                distributed=distributed, fast_every_n_steps=fast_every_n_steps,
                                outbox_size=outbox_size, publish_timeout_s=publish_timeout_s)
        include, exclude, roles = options.include, options.exclude, options.roles
        history, attention, threads = options.history, options.attention, options.threads
        self.every_n_steps = options.every_n_steps
        self.per_expert = bool(per_expert)
        self.threads = threads
        self.metrics = options.metrics
        self.series = options.series
        self.heatmap_metrics = options.heatmap
        self.heatmap_scales: dict[str, ColourScale] = {}  # set by the first snapshot published
        self.engine = SpectralEngine(method=method, device=device)
        self.include, self.exclude, self.method = include, exclude, method
        self.model_map = model if isinstance(model, ModelMap) else map_model(
            model, include=_as_list(include), exclude=_as_list(exclude), roles=roles)
        builtin = default_analyses(history, attention, model, self.series, self.heatmap_metrics)
        self.analyses = Analyses([*builtin, *analyses])
        self.delivery = Delivery(publishers, options.outbox_size)
        self.publish_timeout_s = options.publish_timeout_s
        self.strategy = make_strategy(self.engine, self.model_map, threads, bool(background), distributed)
        self.counts = self.strategy.counts  # kept when the strategy hands over to its inline one
        self.background, self.ranks = self.strategy.background, self.strategy.ranks
        self.last_step: int | None = None  # the last step snapshotted (also across a resume)
        self.last_report: StepReport | None = None
        self._seen_step: int | None = None
        self._submitted: int | None = None  # the last step the strategy took (maybe still in flight)
        self._collected = False  # whether a snapshot finished here (the same on every rank)
        self.fast = None if options.fast_every_n_steps is None else FastLaneRunner(
            self.model_map, options.fast_every_n_steps, self.metrics, self.per_expert, self.ranks > 1)
        self._snapshots = 0

    # ------------------------------------------------------------------ publishers and analyses
    def add_publisher(self, publisher: Publisher) -> None:
        """Attach one more sink (guarded); it receives the configuration with the next snapshot."""
        self.delivery.add(publisher)

    @property
    def publishers(self) -> list[Outbox]:
        """The attached publishers, each in its outbox."""
        return self.delivery.publishers

    @property
    def history(self) -> Any:
        """The :class:`~spectral_plugins.lifecycle.history.SpectralHistory` of the lifecycle analysis,
        or None."""
        return self.analyses.history

    @property
    def snapshotter(self) -> BackgroundSnapshotter | None:
        """The background worker (None when synchronous, and once closed by :meth:`finish`)."""
        return self.strategy.worker

    @property
    def stats(self) -> TrackerStats:
        """Snapshots taken, due steps skipped, failures, and each publisher's deliveries, retries and
        losses (also after :meth:`finish`)."""
        return TrackerStats(self._snapshots, self.counts.skipped, self.counts.failed, self.delivery.stats)

    @property
    def snapshot_failures(self) -> int:
        """How many snapshots failed so far (each is tried again at the next due step)."""
        return self.counts.failed

    def config(self) -> dict[str, Any]:
        """The tracker's settings and what it found, as flat strings and numbers (tracker params)."""
        return {
            "every_n_steps": self.every_n_steps,
            "metrics": ",".join(self.metrics),
            "series": self.series,
            "heatmap_metrics": ",".join(self.heatmap_metrics) or "none",
            "method": self.engine.method,
            "include": ",".join(_as_list(self.include) or []) or "all",
            "exclude": ",".join(_as_list(self.exclude) or []) or "none",
            "num_matrices": len(self.model_map),
            "num_blocks": self.model_map.num_blocks,
            "model_type": str(self.model_map.model_type),
            "analyses": ",".join(a.name for a in self.analyses) or "none",
            "threads": "unchanged" if self.threads is None else self.threads,
            "background": self.background,
            "ranks": self.ranks,
            "fast_every_n_steps": "off" if self.fast is None else self.fast.every_n_steps,
        }

    # ------------------------------------------------------------------ stepping
    def should_snapshot(self, step: int) -> bool:
        """Whether :meth:`step` would take (or, in background mode, submit) a snapshot at ``step``."""
        return step % self.every_n_steps == 0 and self._after_latest(step)

    def _after_latest(self, step: int) -> bool:
        """Whether ``step`` comes after the last step snapshotted or submitted."""
        latest = max((s for s in (self.last_step, self._submitted) if s is not None), default=None)
        return latest is None or step > latest

    def step(self, step: int, force: bool = False) -> StepReport | None:
        """Snapshot ``step`` if it is due (a multiple of ``every_n_steps`` after the last snapshotted
        step; ``force``: any step after it) and publish the snapshots finished since the last call
        (background mode: oldest first, each with its own step). Returns the last report, or None."""
        step = int(step)
        self._seen_step = step if self._seen_step is None else max(self._seen_step, step)
        due = self.should_snapshot(step) or (force and self._after_latest(step))
        taken = due and self.strategy.submit(step)
        if taken:
            self._submitted = step
            checked = None if self.fast is None else self.fast.measure_for_check(step)
            if checked is not None:  # the fast series (wave front) gets the full steps too, in step order
                self.analyses.update_fast(checked, self.model_map)
        report = self._publish_finished()
        # Between full snapshots (and at a due step background mode skipped), the fast lane.
        if not taken and self.fast is not None and self.fast.due(step) and self._after_latest(step):
            fast_report = self.fast.report(step)
            if fast_report is not None:
                output = self.analyses.update_fast(fast_report.snapshot, self.model_map)
                self.delivery.step(replace(fast_report, extra_scalars=dict(output.scalars)), self.config)
        return report

    def flush(self, timeout: float | None = None) -> None:
        """Publish the snapshot in flight (background mode; under torch.distributed this gathers the
        shares, a collective: call it on every rank), then wait up to ``timeout`` seconds (default
        ``publish_timeout_s``) until the publishers have taken every report."""
        deadline = time.monotonic() + (self.publish_timeout_s if timeout is None else timeout)
        self._flush_snapshots(timeout)
        for outbox in self.delivery.publishers:
            outbox.flush(max(0.0, deadline - time.monotonic()))

    def _flush_snapshots(self, timeout: float | None = None) -> None:
        self.strategy.flush(timeout)
        self._publish_finished()

    def _publish_finished(self) -> StepReport | None:
        """Publish the finished steps in step order, none at or before the last one (a series never
        repeats a step); the last report or None."""
        report = None
        for done in sorted(self.strategy.collect(), key=lambda finished: finished.step):
            self._collected = True
            if self.last_step is None or done.step > self.last_step:
                self.last_step = done.step  # on every rank, so all of them agree on the next due step
                report = self._publish(done.snapshot) if done.snapshot is not None else report
        return report

    def _publish(self, snapshot: Snapshot) -> StepReport:
        with cpu_threads(self.threads):
            output = self.analyses.update(snapshot, self.model_map)
        honesty = {} if self.fast is None else self.fast.check(snapshot)
        if not self.heatmap_scales:
            self.heatmap_scales = colour_scales(snapshot, self.heatmap_metrics)
        report = StepReport(step=int(snapshot.step or 0), snapshot=snapshot, metrics=self.metrics,
                            extra_scalars={**output.scalars, **honesty}, tables=dict(output.tables),
                            heatmap_metrics=self.heatmap_metrics, per_expert=self.per_expert,
                            heatmap_scales=self.heatmap_scales, images=dict(output.images))
        self.delivery.step(report, self.config)
        self.last_report, self._snapshots = report, self._snapshots + 1
        return report

    # ------------------------------------------------------------------ end of run
    def finish(self, step: int | None = None, close: bool = True) -> RunSummary | None:
        """Publish the snapshot in flight, take a last one inline at ``step`` (default: the latest step
        seen) unless it was taken, publish the run summary, log it to the console and (``close``) close
        the publishers. Returns the summary, or None when no snapshot could be computed at all."""
        self._flush_snapshots()  # the snapshot in flight (distributed: gathers the shares, a collective)
        self.strategy, self._submitted = self.strategy.close(), None  # from here on, snapshots are inline
        step = self._seen_step if step is None else int(step)
        if step is None:
            step = 0 if self.last_step is None else self.last_step
        if self.last_report is None or self.last_step is None or step > self.last_step:
            self.step(step, force=True)
        if not self._collected:  # resumed at a step already snapshotted: describe it, unpublished
            last = int(self.last_step if self.last_step is not None else step)
            self.strategy.submit(last)
            snapshot = next((done.snapshot for done in self.strategy.collect()), None)
            self.last_report = None if snapshot is None else StepReport(
                step=last, snapshot=snapshot, metrics=self.metrics, heatmap_metrics=self.heatmap_metrics,
                per_expert=self.per_expert, heatmap_scales=self.heatmap_scales)
        summary = None
        if self.last_report is not None:  # None on the other ranks of a distributed tracker
            with cpu_threads(self.threads):
                summary = self.analyses.summarize(self.last_report, self.config(),
                                                  HEADLINE_RUN if self.series == "headline" else None,
                                                  self.stats.text())
            self.delivery.summary(summary)
            console().info("spectral-plugins summary at step %s\n%s", summary.last.step, summary.text)
        if close:
            self.close()
            if summary is not None:
                console().info("spectral-plugins %s", self.stats.text())
        return summary

    def close(self) -> None:
        """Stop the background worker, if any (a snapshot still in flight is waited for and dropped
        unpublished); deliver what the outboxes hold and close every publisher (each closes only what
        it opened itself), within ``publish_timeout_s`` in all (what is left is counted lost)."""
        self.strategy, self._submitted = self.strategy.close(), None
        self.delivery.close(self.publish_timeout_s)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume from: the last snapshotted step and every analysis' state (history),
        after publishing the snapshot in flight (background mode), so the state includes it."""
        self._flush_snapshots()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "every_n_steps": self.every_n_steps,
            "last_step": self.last_step,
            "seen_step": self._seen_step,
            "heatmap_scales": {m: scale.to_state() for m, scale in self.heatmap_scales.items()},
            "analyses": self.analyses.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the series continue after the restored last step."""
        if state.get("format") != STATE_FORMAT or int(state.get("version", -1)) > STATE_VERSION:
            raise ValueError(f"not a SpectralTracker state (format {state.get('format')!r}, "
                             f"version {state.get('version')!r})")
        self.last_step = None if state["last_step"] is None else int(state["last_step"])
        self._seen_step = None if state.get("seen_step") is None else int(state["seen_step"])
        self.heatmap_scales = {m: ColourScale(float(low), float(high), bool(log))
                               for m, (low, high, log) in state.get("heatmap_scales", {}).items()}
        self.last_report, self._submitted, self._collected = None, None, False
        self.strategy.reset()  # snapshots of the abandoned timeline are never published
        self.analyses.load_state_dict(state.get("analyses", {}))


def _as_list(patterns: Sequence[str] | str | None) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)
