"""How a tracker's snapshots are computed: one interface, four strategies behind it.

The :class:`~spectral_plugins.runtime.tracker.SpectralTracker` decides *which* steps are snapshotted;
a :class:`SnapshotStrategy` decides *how*. The tracker asks it to snapshot a step
(:meth:`~SnapshotStrategy.submit`) and what is finished (:meth:`~SnapshotStrategy.collect`), and never
asks which strategy it has:

- :class:`Synchronous`: the spectra computed inline, on the training thread;
- :class:`Distributed`: each rank computes its cost-balanced share and rank 0 assembles the snapshot
  (a collective, :class:`~spectral_plugins.runtime.distributed.DistributedAnalyzer`);
- :class:`Background`: the weights copied at the step, the spectra computed by a worker thread
  (:class:`~spectral_plugins.runtime.background.BackgroundSnapshotter`); a due step reached while one
  is in flight is skipped and counted;
- :class:`SharedBackground`: each rank's share computed by its worker, the shares gathered at the next
  due step (so a snapshot is published one period late; never skipped, since every rank must agree).

The background strategies wrap a worker and the inline strategy they hand over to when they are
closed (the tracker's last snapshot at :meth:`~SpectralTracker.finish` is computed inline, exactly as
the synchronous mode computes it). :func:`make_strategy` chooses one, once, at construction.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from ..core.engine import SpectralEngine, cpu_threads
from ..core.model_map import ModelMap
from ..core.snapshot import Snapshot
from .background import BackgroundSnapshotter
from .distributed import DistributedAnalyzer
from .outbox import RateLimitedWarning

log = logging.getLogger("spectral_plugins")


@dataclass(frozen=True)
class Finished:
    """A snapshot step done on this process: its snapshot to publish, or None when there is nothing
    to publish here (a rank other than 0 of a distributed run, or a distributed snapshot that failed;
    every rank still records the step, so all of them agree on the next due one)."""

    step: int
    snapshot: Snapshot | None


class SnapshotCounts:
    """What the strategies of one tracker did, kept across a strategy hand-over (the training thread
    is the only writer). ``skipped``: due steps refused because a snapshot was still in flight;
    ``failed``: snapshots whose computation raised (the first one warns, the others are counted)."""

    def __init__(self) -> None:
        self.skipped = 0
        self.failed = 0
        self.warn_skipped = RateLimitedWarning()

    def fail(self, step: int, error: BaseException) -> None:
        self.failed += 1
        log.debug("snapshot at step %s failed", step, exc_info=error)
        if self.failed == 1:
            warnings.warn(f"spectral-plugins: the snapshot at step {step} failed "
                          f"({type(error).__name__}: {error}); training continues and later steps "
                          "are tried again", RuntimeWarning, stacklevel=5)


class SnapshotStrategy:
    """The interface: snapshot a step, hand out what is finished, wait, stop, forget.

    Attributes:
        background: whether spectra are computed off the training thread.
        ranks: how many processes share each snapshot.
        is_main: whether this process publishes (rank 0, or the only process).
        worker: the background worker, or None.
    """

    background = False
    ranks = 1
    is_main = True
    worker: BackgroundSnapshotter | None = None

    def __init__(self, counts: SnapshotCounts) -> None:
        self.counts = counts
        self._ready: list[Finished] = []

    def submit(self, step: int) -> bool:
        """Snapshot the weights as they are now, tagged ``step`` (a collective under torch.distributed:
        every rank submits the same steps). False when the step was not taken and may be tried again."""
        raise NotImplementedError

    def collect(self) -> list[Finished]:
        """The steps finished since the last call, without waiting (never a collective)."""
        ready, self._ready = self._ready, []
        return ready

    def flush(self, timeout: float | None = None) -> None:
        """Wait (up to ``timeout`` seconds) for the snapshot in flight, so that :meth:`collect` hands it
        out (a collective for :class:`SharedBackground`)."""

    def reset(self) -> None:
        """Forget every unpublished result (resuming from a checkpoint abandons their timeline)."""
        self._ready = []

    def close(self) -> SnapshotStrategy:
        """Stop the worker, if any (a snapshot in flight is waited for and dropped), and return the
        strategy that computes inline from here on."""
        return self


class Synchronous(SnapshotStrategy):
    """Computes each snapshot inline, in :meth:`submit`, with ``threads`` CPU threads."""

    def __init__(self, compute: Callable[[int], Snapshot | None], counts: SnapshotCounts,
                 threads: int | None) -> None:
        super().__init__(counts)
        self.compute, self.threads = compute, threads

    def submit(self, step: int) -> bool:
        try:
            with cpu_threads(self.threads):
                snapshot = self.compute(step)
        except Exception as error:  # noqa: BLE001 - monitoring must never break training
            self.counts.fail(step, error)
            return False
        self._ready.append(Finished(step, snapshot))
        return True


class Distributed(Synchronous):
    """Each rank computes its share inline and rank 0 receives the assembled snapshot (a collective;
    the others finish each step with nothing to publish)."""

    def __init__(self, analyzer: DistributedAnalyzer, model_map: ModelMap, counts: SnapshotCounts,
                 threads: int | None) -> None:
        super().__init__(lambda step: analyzer.analyze(model_map, step=step), counts, threads)
        self.ranks = dist.get_world_size(analyzer.group)
        self.is_main = dist.get_rank(analyzer.group) == analyzer.dst

    def submit(self, step: int) -> bool:
        if not super().submit(step):  # every rank records the step, so all agree on the next due one
            self._ready.append(Finished(step, None))
        return True


class Background(SnapshotStrategy):
    """Copies the weights in :meth:`submit` and computes on ``worker``'s thread; ``inline`` takes over
    once closed. A due step reached while a snapshot is in flight is skipped and counted."""

    background = True
    worker: BackgroundSnapshotter

    def __init__(self, worker: BackgroundSnapshotter, inline: SnapshotStrategy) -> None:
        super().__init__(inline.counts)
        self.worker, self.inline = worker, inline

    def submit(self, step: int) -> bool:
        skipped, busy = self.worker.stats.skipped, self.worker.pending_step
        accepted = self.worker.submit(step)
        if self.worker.stats.skipped > skipped:
            self.counts.skipped += 1
            self.counts.warn_skipped(
                f"spectral-plugins: step {step} was due but the snapshot of step {busy} is still "
                f"computing, so it is skipped ({self.counts.skipped} so far, tracker.stats.skipped). "
                "A snapshot takes longer than every_n_steps steps: raise every_n_steps, analyse fewer "
                "matrices (include=/exclude=), or set background=False to take every due step",
                stacklevel=4)
        return accepted

    def collect(self) -> list[Finished]:
        return [*super().collect(), *_finished(self.worker.poll())]

    def flush(self, timeout: float | None = None) -> None:
        self._ready.extend(_finished(self.worker.drain(timeout)))

    def reset(self) -> None:
        super().reset()
        self.worker.drain()

    def close(self) -> SnapshotStrategy:
        self.worker.close()
        return self.inline


class SharedBackground(SnapshotStrategy):
    """Under torch.distributed with replicated weights: each rank's ``worker`` computes its share of
    the map between due steps, and the shares are gathered to rank 0 at the next due step (or at
    :meth:`flush`), a collective; a rank whose share is still computing then is waited for."""

    background = True
    worker: BackgroundSnapshotter

    def __init__(self, analyzer: DistributedAnalyzer, model_map: ModelMap, worker: BackgroundSnapshotter,
                 inline: Distributed) -> None:
        super().__init__(inline.counts)
        self.analyzer, self.model_map, self.worker, self.inline = analyzer, model_map, worker, inline
        self.ranks, self.is_main = inline.ranks, inline.is_main
        self._pending: int | None = None  # the step whose shares are computing

    def submit(self, step: int) -> bool:
        self.flush()
        self.worker.submit(step)  # idle after the gather, so never skipped; a failure is gathered later
        self._pending = step  # on every rank, even if the copy failed (the gather must happen)
        return True

    def flush(self, timeout: float | None = None) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        finished = [s for s in self.worker.drain(timeout) if s.step == pending]
        error = self.worker.last_error
        reason = None if finished else (f"{type(error).__name__}: {error}" if error else None)
        try:
            snapshot = self.analyzer.gather_share(self.model_map, finished[-1] if finished else None,
                                                  pending, error=reason)
        except Exception as error:  # noqa: BLE001 - monitoring must never break training
            self.counts.fail(pending, error)
            snapshot = None
        self._ready.append(Finished(pending, snapshot))

    def reset(self) -> None:
        super().reset()
        self.worker.drain()
        self._pending = None

    def close(self) -> SnapshotStrategy:
        self.worker.close()
        return self.inline


def make_strategy(engine: SpectralEngine, model_map: ModelMap, threads: int | None, background: bool,
                  distributed: bool | None) -> SnapshotStrategy:
    """The strategy for these settings: ``distributed`` None shares the work when a process group of
    more than one rank is initialised; ``background`` on sharded weights falls back, with a warning,
    to synchronous shares (sharded weights are materialised by collectives)."""
    counts = SnapshotCounts()
    if not _use_distributed(distributed):
        inline = Synchronous(lambda step: engine.analyze(model_map, step=step), counts, threads)
        if not background:
            return inline
        return Background(BackgroundSnapshotter(engine, model_map, threads=threads), inline)
    analyzer = DistributedAnalyzer(engine)
    shared = Distributed(analyzer, model_map, counts, threads)
    if not background:
        return shared
    try:
        share = analyzer.local_share(model_map)
    except ValueError as error:
        warnings.warn(f"spectral-plugins: background=True is not available here ({error}); "
                      "each rank computes its share synchronously instead", RuntimeWarning, stacklevel=3)
        return shared
    worker = BackgroundSnapshotter(engine, share, threads=threads)
    return SharedBackground(analyzer, model_map, worker, shared)


def _finished(snapshots: list[Snapshot]) -> list[Finished]:
    """The worker's snapshots as finished steps (the worker tags each with the step submitted)."""
    return [Finished(s.step, s) for s in snapshots if s.step is not None]


def _use_distributed(distributed: bool | None) -> bool:
    """Whether a tracker shares its work across ranks: ``distributed``, or by default whether a
    process group with more than one rank is initialised."""
    initialised = dist.is_available() and dist.is_initialized()
    if distributed and not initialised:
        raise ValueError("distributed=True needs an initialised torch.distributed process group "
                         "(call torch.distributed.init_process_group first, on every rank)")
    return bool(distributed) if distributed is not None else initialised and dist.get_world_size() > 1
