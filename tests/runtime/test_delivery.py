"""Delivery you can trust: publishers fed from outboxes off the training thread, failed deliveries
retried, losses counted and warned about, background skips reported."""

from __future__ import annotations

import threading
import time
import warnings

import pytest

from spectral_plugins.demo.model import CharGPT
from spectral_plugins.runtime.outbox import Outbox
from spectral_plugins.runtime.publishing import StepReport
from spectral_plugins.runtime.tracker import SpectralTracker
from tests.publishers import RecordingPublisher
from tests.runtime.test_tracker import TINY
from tests.runtime.test_tracker import train as train_loop


class FailingOnceAt(RecordingPublisher):
    """Fault injection: the first delivery of each of ``steps`` raises; a retry succeeds."""

    name = "flaky"

    def __init__(self, steps: set[int]) -> None:
        super().__init__()
        self.failed: list[int] = []
        self.steps = set(steps)

    def publish_step(self, report: StepReport) -> None:
        if report.step in self.steps:
            self.steps.discard(report.step)
            self.failed.append(report.step)
            raise ConnectionError(f"injected: sink unavailable at step {report.step}")
        super().publish_step(report)


class SlowPublisher(RecordingPublisher):
    """A real publisher that takes ``seconds`` per step report (a slow remote sink)."""

    name = "slow"

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def publish_step(self, report: StepReport) -> None:
        time.sleep(self.seconds)
        super().publish_step(report)


class GatedPublisher(RecordingPublisher):
    """Blocks every step report until the gate opens."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def publish_step(self, report: StepReport) -> None:
        self.gate.wait(30)
        super().publish_step(report)


class Timed:
    """Stands in for the tracker in the training loop, timing each ``step`` call."""

    def __init__(self, tracker: SpectralTracker) -> None:
        self.tracker, self.waits = tracker, []  # type: list[float]

    def step(self, step: int) -> None:
        started = time.perf_counter()
        self.tracker.step(step)
        self.waits.append(time.perf_counter() - started)


def train(model: CharGPT, tracker: SpectralTracker, steps: range) -> list[float]:
    """The plain PyTorch loop of the tracker tests; returns the seconds each ``tracker.step`` took."""
    timed = Timed(tracker)
    train_loop(model, timed, steps)  # type: ignore[arg-type]
    return timed.waits


def test_a_publisher_failing_once_at_three_steps_gets_all_three_by_retry() -> None:
    flaky, model = FailingOnceAt({6, 20, 30}), CharGPT(TINY)
    tracker = SpectralTracker(model, every_n_steps=2, publishers=[flaky], heatmap=False, history=False,
                              fast_every_n_steps=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, tracker, range(30))
        tracker.finish()
    assert flaky.failed == [6, 20, 30]
    assert [r.step for r in flaky.reports] == list(range(2, 31, 2))  # all of them, in order
    stats = tracker.stats.publishers[0]
    assert (stats.delivered, stats.retries, stats.lost) == (15 + 2, 3, 0)  # config + 15 steps + summary
    assert any("'flaky' failed in publish_step" in str(w.message) for w in caught)


def test_a_slow_publisher_never_slows_a_background_training_step() -> None:
    model = CharGPT(TINY)
    slow = SlowPublisher(2.0)
    tracker = SpectralTracker(model, every_n_steps=2, publishers=[slow], heatmap=False, background=True,
                              fast_every_n_steps=None,
                              publish_timeout_s=60.0)
    waits = train(model, tracker, range(6))
    assert max(waits) < 0.2, waits
    summary = tracker.finish()
    steps = [r.step for r in slow.reports]  # a due step reached while a snapshot computes is skipped
    assert summary is not None and steps[-1] == 6 and set(steps) <= {2, 4, 6}  # 6 by finish() if skipped
    assert len(steps) >= 3 - tracker.stats.skipped
    assert tracker.stats.publishers[0].lost == 0 and slow.closed == 1


def test_background_skips_are_counted_warned_and_summarised() -> None:
    model = CharGPT(TINY)
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=1, publishers=[recorder], heatmap=False, background=True,
                              fast_every_n_steps=None)
    with pytest.warns(RuntimeWarning, match="is skipped .*raise every_n_steps"):
        for step in range(1, 6):  # due every step, no time in between: the first is still computing
            tracker.step(step)
    skipped = tracker.stats.skipped
    assert skipped >= 1
    summary = tracker.finish()
    assert tracker.snapshotter is None and tracker.stats.skipped == skipped  # kept after finish()
    assert f"{skipped} due steps skipped" in summary.text
    steps = [r.step for r in recorder.reports]
    assert steps[0] == 1 and steps[-1] == 5 and steps == sorted(set(steps))
    assert tracker.stats.snapshots == len(steps) and len(steps) <= 5 - skipped + 1


def test_a_full_outbox_drops_the_oldest_and_counts_it() -> None:
    gated = GatedPublisher()
    outbox = Outbox(gated, capacity=2)
    reports = [StepReport(step=s, snapshot=None) for s in range(5)]  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for report in reports:
            outbox.publish_step(report)
            time.sleep(0.05)  # the worker takes the first one and blocks in it
        gated.gate.set()
        stats = outbox.close(10.0)
    # step 0 was being delivered (never dropped); 1 and 2 were the oldest waiting when 3 and 4 came
    assert [r.step for r in gated.reports] == [0, 3, 4]
    assert stats.lost == 2 and stats.lost_steps == (1, 2) and stats.delivered == 3
    assert sum("'gated' lost the report of step" in str(w.message) for w in caught) == 1  # rate-limited


def test_close_waits_no_longer_than_its_deadline() -> None:
    gated = GatedPublisher()
    outbox = Outbox(gated)
    outbox.publish_config({"a": 1})
    outbox.publish_step(StepReport(step=1, snapshot=None))  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="lost the report of step 1"):
        stats = outbox.close(0.5)
    assert time.monotonic() - started < 5.0
    assert stats.delivered == 1 and stats.lost == 1 and stats.lost_steps == (1,)
    gated.gate.set()
