"""Tracking a training run: snapshots every N steps, optional analyses, publishing, resumable state.

:class:`SpectralTracker` is the loop-agnostic core of every integration (the Lightning
:class:`~spectral_plugins.lightning.SpectralMonitor` is a thin shell around it)::

    tracker = SpectralTracker(model, every_n_steps=25, publishers=[TensorBoardPublisher("runs")])
    for step in range(num_steps):
        ...  # forward, backward, optimizer.step()
        tracker.step(step + 1)   # weights after step + 1 updates
    tracker.finish()

It never imports a tracker library. Analyses that build on snapshots (the lifecycle signals, the
attention bounds) plug in through the small :class:`~spectral_plugins.runtime.analyses.Analysis` protocol; an
analysis or a publisher that fails warns once and never reaches the training loop.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.engine import SpectralEngine
from ..core.metrics import validate_metric_names
from ..core.model_map import ModelMap, map_model
from ..core.options import positive_int
from ..core.snapshot import Snapshot
from .analyses import Analysis, AnalysisOutput, AttentionAnalysis, default_analyses, fmt
from .background import BackgroundSnapshotter
from .distributed import DistributedAnalyzer
from .publishing import GuardedPublisher, Publisher, RunSummary, StepReport

log = logging.getLogger("spectral_plugins")

STATE_FORMAT = "spectral_plugins.runtime.tracker"
STATE_VERSION = 1
# Heatmap images cost ~0.2 s each to render; by default only these (if published) are drawn.
DEFAULT_HEATMAP_METRICS: tuple[str, ...] = ("alpha", "stable_rank")
# Columns of the final per-layer table, in this order when published.
TABLE_COLUMNS: tuple[str, ...] = ("alpha", "stable_rank", "effective_rank", "spectral_norm", "alpha_weighted",
                                  "frobenius_norm", "ks_distance", "n_tail")


class SpectralTracker:
    """Snapshots a model's weight spectra every ``every_n_steps`` steps and publishes them.

    Args:
        model: the model being trained; it is mapped once, here (the map holds live views of the
            weights, so later snapshots see the trained values).
        every_n_steps: snapshot when ``step % every_n_steps == 0`` (>= 1).
        publishers: tracker sinks (:class:`~spectral_plugins.runtime.publishing.Publisher`); each is
            wrapped in
            a :class:`~spectral_plugins.runtime.publishing.GuardedPublisher`.
        metrics: metric names to publish (default: all of :data:`~spectral_plugins.core.metrics.METRICS`).
        include, exclude, roles: passed to :func:`~spectral_plugins.core.model_map.map_model`.
        method: engine method ("auto", "gram", "svd").
        heatmap: publish depth x role heatmap images: True for :data:`DEFAULT_HEATMAP_METRICS`
            (those published), False for none, or the metric names to draw.
        history: keep a metric history and the lifecycle signals computed from it: True (default
            cap of kept steps), an int (that cap), or False (no history, no lifecycle).
        attention: also compute the attention logit bounds (:mod:`spectral_plugins.attention.bounds`) at each
            snapshot: True, or keyword arguments of
            :func:`~spectral_plugins.attention.bounds.attention_bounds` (e.g. ``{"sample_batch": x}``).
        analyses: further :class:`Analysis` hooks run after each snapshot.
        device: where spectra are computed (default: where the weights live).
        threads: CPU threads (``torch.set_num_threads``) while a snapshot is computed, restored after;
            None keeps the current setting. One thread is the default because the CPU eigensolver on
            matrices up to ~2k wide spends far more CPU multi-threaded, catastrophically so on a
            busy machine (measured 250x at 512 x 512 with two threads on two shared cores).
            With ``background=True`` it applies to the snapshot worker thread too (None: the
            training thread's count), so both modes compute the same bits.
        background: compute the spectra off the training path: a due :meth:`step` copies the weights
            into reused buffers and a worker thread computes the snapshot
            (:class:`~spectral_plugins.runtime.background.BackgroundSnapshotter`); each finished snapshot is
            published, tagged with its own step, at a later :meth:`step` call (or at :meth:`finish` /
            :meth:`state_dict`, which wait for the one in flight). At most one snapshot is in flight:
            a due step reached while one is running is skipped and counted
            (``tracker.snapshotter.stats.skipped``). The metrics equal the synchronous ones.
        distributed: share the work across the ranks of ``torch.distributed`` (a
            :class:`~spectral_plugins.runtime.distributed.DistributedAnalyzer`): None (default) when a
            process group with more than one rank is initialised. Then *every* rank constructs a
            tracker and calls :meth:`step`, :meth:`finish` (and :meth:`state_dict`) at the same steps;
            each computes its cost-balanced share and rank 0 assembles, analyses and publishes
            (publishers on the other ranks are never called; their :meth:`step` and :meth:`finish`
            return None). DDP and FSDP2 (DTensor) weights; FSDP1 is not supported here. With
            ``background=True`` (replicated weights only) each rank computes its share on its worker
            thread and the shares are gathered at the next due step (or at :meth:`finish` /
            :meth:`state_dict`), so a snapshot is published one period after its step; a rank whose
            share is still computing then is waited for (skipping needs every rank to agree).

    Raises:
        ValueError: ``every_n_steps < 1``, an unknown metric name, or a bad option.
    """

    def __init__(
        self,
        model: nn.Module | ModelMap,
        every_n_steps: int = 25,
        publishers: Sequence[Publisher] = (),
        metrics: Sequence[str] | None = None,
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
    ) -> None:
        positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        positive_int("threads", threads, optional=True)
        self.threads = threads
        self.metrics = validate_metric_names(None if metrics is None else list(metrics))
        if not self.metrics:
            raise ValueError("metrics must name at least one metric (None publishes all)")
        self.heatmap_metrics = self._heatmap_metrics(heatmap)
        self.engine = SpectralEngine(method=method, device=device)
        self.include, self.exclude, self.method = include, exclude, method
        self.model_map = model if isinstance(model, ModelMap) else map_model(
            model, include=_as_list(include), exclude=_as_list(exclude), roles=roles)
        self.analyses: list[Analysis] = [*default_analyses(history), *analyses]
        if attention is not False and not isinstance(model, ModelMap):
            options = {} if attention is True else dict(attention)
            self.analyses.append(AttentionAnalysis(model, **options))
        self.publishers: list[GuardedPublisher] = []
        for publisher in publishers:
            self.add_publisher(publisher)
        self.last_step: int | None = None  # the last step snapshotted (also across a resume)
        self.last_report: StepReport | None = None
        self._seen_step: int | None = None
        self._config_published = False
        self._failed_analyses: set[str] = set()
        self.snapshot_failures = 0
        self.analyzer = DistributedAnalyzer(self.engine) if _use_distributed(distributed) else None
        # Rank 0 analyses and publishes; the other ranks of a distributed tracker only compute shares.
        self.is_main = self.analyzer is None or dist.get_rank() == 0
        self._analyzed = False  # whether this process took any snapshot (the same on every rank)
        self.background = bool(background)
        # The worker of background mode (None when synchronous, and again once closed); under
        # torch.distributed it computes this rank's share only.
        self.snapshotter: BackgroundSnapshotter | None = None
        if self.background:
            work_map: ModelMap | None = self.model_map
            if self.analyzer is not None:
                try:
                    work_map = self.analyzer.local_share(self.model_map)
                except ValueError as error:  # sharded weights are materialised by collectives
                    warnings.warn(f"spectral-plugins: background=True is not available here ({error}); "
                                  "each rank computes its share synchronously instead",
                                  RuntimeWarning, stacklevel=2)
                    work_map, self.background = None, False
            if work_map is not None:
                self.snapshotter = BackgroundSnapshotter(self.engine, work_map, threads=threads)
        self._last_submitted: int | None = None  # the last step handed to the snapshotter

    def _heatmap_metrics(self, heatmap: bool | Sequence[str]) -> tuple[str, ...]:
        if heatmap is True:
            return tuple(m for m in DEFAULT_HEATMAP_METRICS if m in self.metrics)
        if heatmap is False:
            return ()
        if isinstance(heatmap, str):
            heatmap = [heatmap]
        return validate_metric_names(list(heatmap))

    # ------------------------------------------------------------------ publishers and analyses
    def add_publisher(self, publisher: Publisher) -> None:
        """Attach one more sink (guarded); it receives the configuration with the next snapshot."""
        guarded = publisher if isinstance(publisher, GuardedPublisher) else GuardedPublisher(publisher)
        self.publishers.append(guarded)
        self._config_published = False

    @property
    def history(self) -> Any:
        """The :class:`~spectral_plugins.lifecycle.history.SpectralHistory` of the lifecycle analysis,
        or None."""
        for analysis in self.analyses:
            if hasattr(analysis, "history"):
                return analysis.history
        return None

    def config(self) -> dict[str, Any]:
        """The tracker's settings and what it found, as flat strings and numbers (tracker params)."""
        return {
            "every_n_steps": self.every_n_steps,
            "metrics": ",".join(self.metrics),
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
            "ranks": dist.get_world_size() if self.analyzer is not None else 1,
        }

    # ------------------------------------------------------------------ stepping
    def should_snapshot(self, step: int) -> bool:
        """Whether :meth:`step` would take (or, in background mode, submit) a snapshot at ``step``."""
        latest = self._latest_step()
        return step % self.every_n_steps == 0 and (latest is None or step > latest)

    def _latest_step(self) -> int | None:
        """The last step snapshotted or submitted to the background worker."""
        steps = [s for s in (self.last_step, self._last_submitted) if s is not None]
        return max(steps) if steps else None

    def step(self, step: int, force: bool = False) -> StepReport | None:
        """Snapshot and publish if ``step`` is due (a multiple of ``every_n_steps`` after the last
        snapshotted step); ``force`` snapshots any step after the last one. Returns the report or None.

        Steps at or before the last snapshotted step are skipped, so a series never repeats a step.

        With ``background=True`` a due step is submitted to the worker instead, and the snapshots
        finished since the last call are published (oldest first, each with its own step); the
        return value is the report of the latest of them, or None.
        """
        step = int(step)
        self._seen_step = step if self._seen_step is None else max(self._seen_step, step)
        if self.snapshotter is not None:
            latest = self._latest_step()
            due = self.should_snapshot(step) or (force and (latest is None or step > latest))
            if self.analyzer is not None:
                return self._step_distributed_background(step) if due else None
            if due and self.snapshotter.submit(step):
                self._last_submitted = step
            return self._publish_ready(self.snapshotter.poll())
        due = self.should_snapshot(step) or (force and (self.last_step is None or step > self.last_step))
        if not due:
            return None
        with cpu_threads(self.threads):
            snapshot = self._analyze(step)
        self._analyzed = True
        if self.analyzer is not None:
            self.last_step = step  # on every rank, so all of them agree on the next due step
        if snapshot is None:
            return None
        return self._publish(snapshot)

    def _step_distributed_background(self, step: int) -> StepReport | None:
        """A due step under torch.distributed with background shares: gather the shares of the
        previous submission (waiting for this rank's worker), then submit this step's share."""
        report = self._gather_pending()
        assert self.snapshotter is not None
        self.snapshotter.submit(step)  # idle after the gather, so never skipped; failures are reported
        self._last_submitted = step  # on every rank, even if the copy failed (the gather must happen)
        return report

    def _gather_pending(self) -> StepReport | None:
        """Distributed background mode, collective: the shares of the submitted step to rank 0,
        which publishes the assembled snapshot. None on the other ranks or when nothing is pending."""
        if self._last_submitted is None or self.snapshotter is None or self.analyzer is None:
            return None
        pending, self._last_submitted = self._last_submitted, None
        finished = [s for s in self.snapshotter.drain() if s.step == pending]
        error = self.snapshotter.last_error
        reason = None if finished else (f"{type(error).__name__}: {error}" if error else None)
        try:
            snapshot = self.analyzer.gather_share(self.model_map, finished[-1] if finished else None,
                                                  pending, error=reason)
        except Exception as error:  # noqa: BLE001 - monitoring must never break training
            self._warn_snapshot_failed(pending, error)
            snapshot = None
        self._analyzed = True
        self.last_step = pending
        return None if snapshot is None else self._publish(snapshot)

    def _publish_ready(self, snapshots: Sequence[Snapshot]) -> StepReport | None:
        """Publish finished background snapshots in step order (any at or before the last published
        step is dropped, so a series never repeats a step); the last report or None."""
        report = None
        for snapshot in sorted(snapshots, key=lambda s: s.step):
            if self.last_step is None or snapshot.step > self.last_step:
                report = self._publish(snapshot)
        return report

    def flush(self, timeout: float | None = None) -> None:
        """Background mode: wait (up to ``timeout`` seconds) for the snapshot in flight and publish
        every finished one; synchronous mode: nothing. Under torch.distributed this gathers the
        pending shares, a collective: call it on every rank."""
        if self.snapshotter is not None and self.analyzer is not None:
            self._gather_pending()
        elif self.snapshotter is not None:
            self._publish_ready(self.snapshotter.drain(timeout))

    def _publish(self, snapshot: Snapshot) -> StepReport:
        """Run the analyses on ``snapshot``, publish it (with the configuration the first time) and
        make it the last snapshotted step."""
        step = int(snapshot.step)
        extra: dict[str, float] = {}
        tables: dict[str, list[dict[str, Any]]] = {}
        with cpu_threads(self.threads):
            for analysis in self.analyses:
                output = self._run_analysis(analysis, "update", snapshot, self.model_map)
                if output is not None:
                    extra.update(output.scalars)
                    tables.update(output.tables)
        report = StepReport(step=step, snapshot=snapshot, metrics=self.metrics, extra_scalars=extra,
                                   tables=tables, heatmap_metrics=self.heatmap_metrics)
        if not self._config_published:
            config = self.config()
            for publisher in self.publishers:
                publisher.publish_config(config)
            self._config_published = True
        for publisher in self.publishers:
            publisher.publish_step(report)
        self.last_step, self.last_report = step, report
        return report

    def _analyze(self, step: int) -> Snapshot | None:
        """The snapshot at ``step``, or None (with a warning the first time) if the engine fails.
        Under torch.distributed a collective: the snapshot on rank 0, None on the others."""
        try:
            if self.analyzer is not None:
                return self.analyzer.analyze(self.model_map, step=step)
            return self.engine.analyze(self.model_map, step=step)
        except Exception as error:  # noqa: BLE001 - monitoring must never break training
            self._warn_snapshot_failed(step, error)
            return None

    def _warn_snapshot_failed(self, step: int, error: BaseException) -> None:
        self.snapshot_failures += 1
        log.debug("snapshot at step %s failed", step, exc_info=True)
        if self.snapshot_failures == 1:
            warnings.warn(f"spectral-plugins: the snapshot at step {step} failed "
                          f"({type(error).__name__}: {error}); training continues and later steps "
                          "are tried again", RuntimeWarning, stacklevel=5)

    def _run_analysis(self, analysis: Analysis, method: str, *args: Any) -> AnalysisOutput | None:
        if analysis.name in self._failed_analyses:
            return None
        try:
            return getattr(analysis, method)(*args)
        except Exception as error:  # noqa: BLE001 - an analysis must never break training
            self._failed_analyses.add(analysis.name)
            log.debug("analysis %s.%s failed", analysis.name, method, exc_info=True)
            warnings.warn(f"spectral-plugins: analysis {analysis.name!r} failed in {method} "
                          f"({type(error).__name__}: {error}); it is disabled, snapshots continue",
                          RuntimeWarning, stacklevel=3)
            return None

    # ------------------------------------------------------------------ end of run
    def finish(self, step: int | None = None, close: bool = True) -> RunSummary | None:
        """Take a last snapshot at ``step`` (default: the latest step seen) unless it was taken,
        publish the run summary to every publisher, log it to the console, and close the publishers.

        In background mode the snapshot in flight is waited for and published first, and the last
        snapshot is computed inline (exactly as the synchronous mode does).

        Returns the summary, or None when no snapshot could be computed at all.
        """
        if self.snapshotter is not None:
            self.flush()  # publishes the snapshot in flight (distributed: gathers the shares, a collective)
            snapshotter, self.snapshotter = self.snapshotter, None  # from here on, snapshots are inline
            snapshotter.close()  # nothing is left after the flush
            self._last_submitted = None
        step = self._seen_step if step is None else int(step)
        if step is None:
            step = 0 if self.last_step is None else self.last_step
        if self.last_report is None or self.last_step is None or step > self.last_step:
            self.step(step, force=True)
        # Resumed at a step already snapshotted: describe it unpublished. Under torch.distributed the
        # condition must be the same on every rank (the snapshot is a collective).
        if (not self._analyzed) if self.analyzer is not None else self.last_report is None:
            last = int(self.last_step if self.last_step is not None else step)
            with cpu_threads(self.threads):
                snapshot = self._analyze(last)
            if snapshot is None:
                if close:
                    self.close()
                return None
            self.last_report = StepReport(step=last, snapshot=snapshot, metrics=self.metrics,
                                          heatmap_metrics=self.heatmap_metrics)
        if not self.is_main or self.last_report is None:  # the other ranks of a distributed tracker
            if close:
                self.close()
            return None
        scalars: dict[str, float] = {}
        texts: list[str] = []
        for analysis in self.analyses:
            with cpu_threads(self.threads):
                output = self._run_analysis(analysis, "summary")
            if output is not None:
                scalars.update(output.scalars)
                if output.text:
                    texts.append(output.text)
        text = "\n\n".join([layer_table(self.last_report.snapshot, self.metrics), *texts])
        summary = RunSummary(last=self.last_report, summary_scalars=scalars, text=text, config=self.config())
        for publisher in self.publishers:
            publisher.publish_summary(summary)
        console().info("spectral-plugins summary at step %s\n%s", self.last_report.step, text)
        if close:
            self.close()
        return summary

    def close(self) -> None:
        """Stop the background worker, if any (a snapshot still in flight is waited for and dropped
        unpublished), and close every publisher (each closes only what it opened itself)."""
        if self.snapshotter is not None:
            snapshotter, self.snapshotter = self.snapshotter, None
            snapshotter.close()
            self._last_submitted = None
        for publisher in self.publishers:
            publisher.close()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume from: the last snapshotted step and every analysis' state (history).

        In background mode the snapshot in flight is waited for and published first, so the state
        includes it."""
        self.flush()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "every_n_steps": self.every_n_steps,
            "last_step": self.last_step,
            "seen_step": self._seen_step,
            "analyses": {a.name: a.state_dict() for a in self.analyses},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the series continue after the restored last step."""
        if state.get("format") != STATE_FORMAT or int(state.get("version", -1)) > STATE_VERSION:
            raise ValueError(f"not a SpectralTracker state (format {state.get('format')!r}, "
                             f"version {state.get('version')!r})")
        self.last_step = None if state["last_step"] is None else int(state["last_step"])
        self._seen_step = None if state.get("seen_step") is None else int(state["seen_step"])
        self.last_report = None
        if self.snapshotter is not None:  # snapshots of the abandoned timeline are never published
            self.snapshotter.drain()
            self._last_submitted = None
        saved = state.get("analyses", {})
        for analysis in self.analyses:
            if analysis.name in saved:
                analysis.load_state_dict(saved[analysis.name])


# ---------------------------------------------------------------------- text
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


def _use_distributed(distributed: bool | None) -> bool:
    """Whether a tracker shares its work across ranks: ``distributed``, or by default whether a
    process group with more than one rank is initialised."""
    initialised = dist.is_available() and dist.is_initialized()
    if distributed and not initialised:
        raise ValueError("distributed=True needs an initialised torch.distributed process group "
                         "(call torch.distributed.init_process_group first, on every rank)")
    return bool(distributed) if distributed is not None else initialised and dist.get_world_size() > 1


def _as_list(patterns: Sequence[str] | str | None) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def console() -> logging.Logger:
    """The ``spectral_plugins.console`` logger, writing to stderr at INFO level when the application
    configured no logging itself (as Lightning does for its own logger)."""
    logger = logging.getLogger("spectral_plugins.console")
    if not logger.handlers and not logging.getLogger().hasHandlers():
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
