"""Handing a tracker's reports to its publishers: each guarded, each told the configuration once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .publishing import GuardedPublisher, Publisher, RunSummary, StepReport


class Delivery:
    """The publishers of one tracker. A publisher receives the configuration before its first step
    report (one attached later gets it with the next report); none of their errors reach training."""

    def __init__(self, publishers: Sequence[Publisher] = ()) -> None:
        self.publishers: list[GuardedPublisher] = []
        self._configured: set[int] = set()  # ids of the publishers that got the configuration
        for publisher in publishers:
            self.add(publisher)

    def add(self, publisher: Publisher) -> None:
        """Attach one more publisher (wrapped in a :class:`GuardedPublisher` unless it is one)."""
        guarded = publisher if isinstance(publisher, GuardedPublisher) else GuardedPublisher(publisher)
        self.publishers.append(guarded)

    def step(self, report: StepReport, config: Callable[[], Mapping[str, Any]]) -> None:
        """Publish one step report; ``config()`` first to the publishers that have not had it."""
        new = [p for p in self.publishers if id(p) not in self._configured]
        if new:
            settings = config()
            for publisher in new:
                publisher.publish_config(settings)
                self._configured.add(id(publisher))
        for publisher in self.publishers:
            publisher.publish_step(report)

    def summary(self, summary: RunSummary) -> None:
        """Publish the end-of-run summary."""
        for publisher in self.publishers:
            publisher.publish_summary(summary)

    def close(self) -> None:
        """Close every publisher (each closes only what it opened itself)."""
        for publisher in self.publishers:
            publisher.close()
