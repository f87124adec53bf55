"""Delivery off the training thread: each publisher gets a bounded outbox drained by its own worker.

Modelled on OpenTelemetry's batch span processor and MLflow's asynchronous logging: the training
thread only appends to a bounded queue; a daemon worker hands the entries to the publisher in order.
Unlike them, a failed delivery is not dropped: the entry stays at the head of the outbox and is
retried with exponential backoff (capped, so a sink that is down is probed again every
``max_backoff_s`` and gets what it missed once it is back). What is lost is counted and warned
about: the oldest entry when the outbox is full, and whatever is left when :meth:`Outbox.close`
reaches its deadline.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..core.options import DEFAULT_OUTBOX_SIZE

if TYPE_CHECKING:
    from .publishing import Publisher

log = logging.getLogger("spectral_plugins")

DEFAULT_CAPACITY = DEFAULT_OUTBOX_SIZE
WARN_INTERVAL_S = 60.0  # the same kind of warning at most this often (the first one at once)
EXIT_TIMEOUT_S = 5.0  # at interpreter exit, how long outboxes never closed get to deliver what waits


@dataclass(frozen=True)
class DeliveryStats:
    """What one publisher's outbox did.

    Attributes:
        name: the publisher's name.
        delivered: entries delivered (the configuration, step reports, the summary).
        retries: failed deliveries that were tried again.
        lost: entries never delivered: dropped from a full outbox, or still waiting when it closed.
        lost_steps: the steps of the step reports among them, in order.
        pending: entries waiting now.
        failing: whether the last delivery attempt failed (the sink may be down).
    """

    name: str
    delivered: int = 0
    retries: int = 0
    lost: int = 0
    lost_steps: tuple[int, ...] = ()
    pending: int = 0
    failing: bool = False

    def text(self) -> str:
        """``mlflow: 12 delivered, 2 retries, 0 lost``."""
        waiting = f", {self.pending} waiting" if self.pending else ""
        return f"{self.name}: {self.delivered} delivered, {self.retries} retries, {self.lost} lost{waiting}"


class RateLimitedWarning:
    """Warns about one kind of event at once the first time, then at most every ``interval_s``
    seconds, each time with the count since the last warning (so no loss goes unreported)."""

    def __init__(self, interval_s: float = WARN_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")
        self._unreported = 0

    def __call__(self, message: str, stacklevel: int = 2) -> None:
        self._unreported += 1
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        more = f" ({self._unreported - 1} more since the last warning)" if self._unreported > 1 else ""
        self._last, self._unreported = now, 0
        warnings.warn(f"{message}{more}", RuntimeWarning, stacklevel=stacklevel + 1)


@dataclass
class _Entry:
    method: str  # publish_config, publish_step, publish_summary, close
    argument: Any
    step: int | None = None


class Outbox:
    """A publisher behind a bounded queue and a worker thread; no call blocks and none raises.

    Args:
        publisher: the sink (:class:`~spectral_plugins.runtime.publishing.Publisher`).
        capacity: entries kept waiting while the sink is slow or down (besides the one being
            delivered); a full outbox drops its oldest waiting entry.
        min_backoff_s, max_backoff_s: the wait after a failed delivery doubles from the first to
            the second (the probe interval of a sink that stays down).
        close_timeout_s: how long :meth:`close` waits for the outbox to drain.
    """

    def __init__(self, publisher: Publisher, capacity: int = DEFAULT_CAPACITY, min_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, close_timeout_s: float = 30.0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.publisher = publisher
        self.name: str = getattr(publisher, "name", type(publisher).__name__)
        self.capacity, self.close_timeout_s = capacity, close_timeout_s
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self._queue: deque[_Entry] = deque()
        self._busy: _Entry | None = None  # the entry being delivered (never dropped)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._hurry = False  # set by flush/close: one retry now instead of sleeping out the backoff
        self._stopped = False
        self._close_requested = False
        self._stats = DeliveryStats(self.name)
        self._lost_steps: list[int] = []
        self._warn_failed, self._warn_lost = RateLimitedWarning(), RateLimitedWarning()
        _OPEN.add(self)

    # ------------------------------------------------------------------ the training thread
    def publish_config(self, config: Mapping[str, Any]) -> None:
        """Queue the configuration."""
        self._put(_Entry("publish_config", config))

    def publish_step(self, report: Any) -> None:
        """Queue a step report (anything with a ``step``)."""
        self._put(_Entry("publish_step", report, getattr(report, "step", None)))

    def publish_summary(self, summary: Any) -> None:
        """Queue the run summary."""
        self._put(_Entry("publish_summary", summary))

    @property
    def stats(self) -> DeliveryStats:
        """The counters now (a frozen copy)."""
        with self._cond:
            return self._snapshot_stats()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: as long as it takes) until every entry is delivered;
        whether it was. A sink in backoff is tried again at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: not self._queue or self._stopped,
                                       None if deadline is None else max(0.0, deadline - time.monotonic()))
            self._hurry = False
            return done and not self._queue

    def close(self, timeout: float | None = None) -> DeliveryStats:
        """Deliver what waits, then close the publisher, within ``timeout`` seconds (at most
        ``close_timeout_s``); what is still waiting then is counted lost (with a warning) and the
        worker is abandoned (a daemon thread). Returns the final counters."""
        with self._cond:
            if self._stopped:
                return self._snapshot_stats()
        self.request_close()
        self.flush(self.close_timeout_s if timeout is None else min(timeout, self.close_timeout_s))
        with self._cond:
            self._stopped = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for entry in left:
            if entry.method == "close":
                warnings.warn(f"spectral-plugins: publisher {self.name!r} could not be closed in time "
                              "(what it opened itself, such as a run, may stay open)", RuntimeWarning,
                              stacklevel=2)
            else:
                self._count_lost(entry, "the sink did not take it before the run ended")
        return self.stats

    def request_close(self) -> None:
        """Queue the publisher's ``close`` after what waits (once), without waiting; :meth:`close`
        then waits for it. Lets several outboxes drain in parallel."""
        with self._cond:
            if self._close_requested or self._stopped:
                return
            self._close_requested = True
        self._put(_Entry("close", None))

    # ------------------------------------------------------------------ internals
    def _put(self, entry: _Entry) -> None:
        with self._cond:
            if self._stopped:
                dropped: _Entry | None = entry
            else:
                dropped = None
                index = 1 if self._queue and self._queue[0] is self._busy else 0  # never the one in hand
                if entry.method != "close" and len(self._queue) - index >= self.capacity:
                    dropped = self._queue[index]
                    del self._queue[index]
                self._queue.append(entry)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=f"spectral-outbox-{self.name}",
                                                    daemon=True)
                    self._thread.start()
                self._cond.notify_all()
        if dropped is not None:
            self._count_lost(dropped, f"its outbox is full ({self.capacity} entries)")

    def _count_lost(self, entry: _Entry, why: str) -> None:
        with self._cond:
            if entry.step is not None and entry.method == "publish_step":
                self._lost_steps.append(entry.step)
            self._stats = _bump(self._stats, lost=1)
            lost = self._stats.lost
        what = f"the report of step {entry.step}" if entry.method == "publish_step" else entry.method
        self._warn_lost(f"spectral-plugins: publisher {self.name!r} lost {what}: {why} "
                        f"({lost} lost so far, tracker.stats)", stacklevel=3)

    def _snapshot_stats(self) -> DeliveryStats:
        return replace(self._stats, lost_steps=tuple(self._lost_steps), pending=len(self._queue))

    def _run(self) -> None:
        delay = self.min_backoff_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopped)
                if self._stopped:
                    return
                entry = self._busy = self._queue[0]
            try:
                getattr(self.publisher, entry.method)(*(() if entry.method == "close" else (entry.argument,)))
            except Exception as error:  # noqa: BLE001 - a sink's failure never reaches training
                log.debug("publisher %s.%s failed", self.name, entry.method, exc_info=True)
                with self._cond:
                    self._busy = None
                    self._stats = _bump(self._stats, retries=1, failing=True)
                    waiting = len(self._queue)
                self._warn_failed(f"spectral-plugins: publisher {self.name!r} failed in {entry.method} "
                                  f"({type(error).__name__}: {error}); training continues, its {waiting} "
                                  f"waiting entries are kept and retried in {delay:g} s")
                with self._cond:
                    self._cond.wait_for(lambda: self._hurry or self._stopped, delay)
                    self._hurry = False  # consumed: later failures back off again
                delay = min(2 * delay, self.max_backoff_s)
                continue
            with self._cond:
                if self._stats.failing:
                    log.info("spectral-plugins: publisher %r delivers again", self.name)
                self._busy = None
                if self._queue and self._queue[0] is entry:
                    self._queue.popleft()
                self._stats = _bump(self._stats, delivered=int(entry.method != "close"), failing=False)
                self._cond.notify_all()
            delay = self.min_backoff_s


def _bump(stats: DeliveryStats, failing: bool | None = None, **increments: int) -> DeliveryStats:
    values: dict[str, Any] = {k: getattr(stats, k) + v for k, v in increments.items()}
    if failing is not None:
        values["failing"] = failing
    return replace(stats, **values)


_OPEN: weakref.WeakSet[Outbox] = weakref.WeakSet()


@atexit.register
def _deliver_at_exit() -> None:
    """A program that ends without ``tracker.finish()`` / ``close()``: give the outboxes that still
    hold entries a few seconds, and log what is lost (the worker threads are daemons)."""
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    for outbox in list(_OPEN):
        if outbox.flush(max(0.0, deadline - time.monotonic())):
            continue
        left = outbox.stats.pending
        log.warning("spectral-plugins: publisher %r lost %d entries at exit (call tracker.finish() or "
                    "close() before the program ends)", outbox.name, left)
