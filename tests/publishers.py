"""Test publishers: one that records what it receives, and a fault injector that raises on every
call (the only stand-in for a tracker the project allows: it injects a fault)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spectral_plugins.runtime.publishing import RunSummary, StepReport


class RecordingPublisher:
    """A real publisher that keeps what it receives (the reference the trackers are compared to)."""

    name = "recording"

    def __init__(self) -> None:
        self.configs: list[Mapping[str, Any]] = []
        self.reports: list[StepReport] = []  # full snapshots
        self.fast_reports: list[StepReport] = []  # fast-lane steps (scalars only)
        self.summaries: list[RunSummary] = []
        self.closed = 0

    def publish_config(self, config: Mapping[str, Any]) -> None:
        self.configs.append(dict(config))

    def publish_step(self, report: StepReport) -> None:
        (self.reports if report.full else self.fast_reports).append(report)

    def publish_summary(self, summary: RunSummary) -> None:
        self.summaries.append(summary)

    def close(self) -> None:
        self.closed += 1


class FaultInjectingPublisher:
    """Raises on every call."""

    name = "fault-injector"

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, *args: Any) -> None:
        self.calls += 1
        raise OSError("injected fault: disk full")

    publish_config = publish_step = publish_summary = close = _fail
