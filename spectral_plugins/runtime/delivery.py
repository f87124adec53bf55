"""Handing a tracker's reports to its publishers: each behind its own outbox (off the training
thread), each told the configuration once."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .outbox import DEFAULT_CAPACITY, DeliveryStats, Outbox
from .publishing import Publisher, RunSummary, StepReport


@dataclass(frozen=True)
class TrackerStats:
    """What a tracker did, so that nothing is lost in silence (``tracker.stats``, also after
    ``finish()``).

    Attributes:
        snapshots: snapshots published on this process.
        skipped: due steps skipped in background mode (a snapshot was still computing).
        failed: snapshots whose computation failed.
        publishers: each publisher's deliveries, retries and losses.
    """

    snapshots: int = 0
    skipped: int = 0
    failed: int = 0
    publishers: tuple[DeliveryStats, ...] = ()

    @property
    def lost(self) -> int:
        """Entries lost over all publishers."""
        return sum(p.lost for p in self.publishers)

    def text(self) -> str:
        """One line for the run summary."""
        parts = [f"{self.snapshots} snapshots", f"{self.skipped} due steps skipped", f"{self.failed} failed",
                 *(p.text() for p in self.publishers)]
        return "delivery: " + "; ".join(parts)


class Delivery:
    """The publishers of one tracker, each in an :class:`~spectral_plugins.runtime.outbox.Outbox`
    of ``capacity`` entries. A publisher receives the configuration before its first step report
    (one attached later gets it with the next report)."""

    def __init__(self, publishers: Sequence[Publisher] = (), capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.publishers: list[Outbox] = []
        self._configured: set[int] = set()  # ids of the outboxes that got the configuration
        for publisher in publishers:
            self.add(publisher)

    def add(self, publisher: Publisher) -> None:
        """Attach one more publisher (in an outbox of its own unless it is one)."""
        outbox = publisher if isinstance(publisher, Outbox) else Outbox(publisher, self.capacity)
        self.publishers.append(outbox)

    def step(self, report: StepReport, config: Callable[[], Mapping[str, Any]]) -> None:
        """Queue one step report; ``config()`` first for the publishers that have not had it."""
        new = [p for p in self.publishers if id(p) not in self._configured]
        if new:
            settings = config()
            for publisher in new:
                publisher.publish_config(settings)
                self._configured.add(id(publisher))
        for publisher in self.publishers:
            publisher.publish_step(report)

    def summary(self, summary: RunSummary) -> None:
        """Queue the end-of-run summary."""
        for publisher in self.publishers:
            publisher.publish_summary(summary)

    def close(self, timeout: float) -> None:
        """Deliver what waits and close every publisher, all within ``timeout`` seconds (their
        outboxes drain in parallel); what is left then is counted lost."""
        deadline = time.monotonic() + timeout
        for publisher in self.publishers:
            publisher.request_close()
        for publisher in self.publishers:
            publisher.close(max(0.0, deadline - time.monotonic()))

    @property
    def stats(self) -> tuple[DeliveryStats, ...]:
        """Each publisher's counters."""
        return tuple(p.stats for p in self.publishers)
