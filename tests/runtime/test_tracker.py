"""SpectralTracker: schedule, values, heatmaps, guarded publishers and analyses, summary, resume."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from spectral_plugins import SpectralEngine
from spectral_plugins.core.metrics import DEFAULT_SERIES_METRICS
from spectral_plugins.demo.model import CharGPT, GPTConfig
from spectral_plugins.runtime.analyses import (
    HEADLINE_ATTENTION,
    HEADLINE_LIFECYCLE,
    HEADLINE_RUN,
    AnalysisOutput,
)
from spectral_plugins.runtime.tracker import SpectralTracker
from tests.publishers import FaultInjectingPublisher, RecordingPublisher

TINY = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32)




class FailingAnalysis:
    name = "failing"

    def update(self, snapshot: Any, model_map: Any) -> AnalysisOutput:
        raise ZeroDivisionError("injected")

    def summary(self) -> AnalysisOutput:
        return AnalysisOutput()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def train(model: CharGPT, tracker: SpectralTracker | None, steps: range, seed: int = 0) -> None:
    """A plain PyTorch loop; ``tracker.step(s)`` sees the weights after ``s`` updates."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in steps:
        x = torch.randint(0, TINY.vocab_size, (4, TINY.block_size), generator=generator)
        _, loss = model(x, x.roll(-1, dims=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if tracker is not None:
            tracker.step(step + 1)


@pytest.fixture
def model() -> CharGPT:
    return CharGPT(TINY)


@pytest.mark.parametrize("every", [0, -3, 2.5, True, "5"])
def test_invalid_every_n_steps_fails_at_construction(model: CharGPT, every: Any) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        SpectralTracker(model, every_n_steps=every)


def test_invalid_options_fail_at_construction_with_clear_messages(model: CharGPT) -> None:
    with pytest.raises(ValueError, match=r"unknown metric name\(s\) \['alpah'\]"):
        SpectralTracker(model, metrics=["alpha", "alpah"])
    with pytest.raises(ValueError, match="at least one metric"):
        SpectralTracker(model, metrics=[])
    with pytest.raises(ValueError, match=r"unknown metric name\(s\) \['heat'\]"):
        SpectralTracker(model, heatmap=["heat"])
    with pytest.raises(ValueError, match="method="):
        SpectralTracker(model, method="qr")
    with pytest.raises(ValueError, match="history must be"):
        SpectralTracker(model, history=0)


def test_snapshots_follow_the_schedule_once_per_step(model: CharGPT) -> None:
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=4, publishers=[recorder])
    assert tracker.step(0) is not None
    train(model, tracker, range(10))
    assert tracker.step(8) is None and tracker.step(4) is None  # already done / before the last one
    tracker.flush()  # the publishers take their reports on their own threads
    assert [r.step for r in recorder.reports] == [0, 4, 8]
    assert len(recorder.configs) == 1 and recorder.configs[0]["every_n_steps"] == 4
    assert recorder.configs[0]["num_matrices"] == len(tracker.model_map) == 15
    assert list(tracker.history.steps) == [0, 4, 8]


def test_published_values_equal_an_independent_snapshot(model: CharGPT) -> None:
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=3, publishers=[recorder], metrics=["alpha", "stable_rank"],
                              fast_every_n_steps=None)
    train(model, tracker, range(3))
    tracker.flush()
    report = recorder.reports[-1]
    expected = SpectralEngine().analyze(model, step=3)
    assert report.step == 3
    assert {k: v for k, v in report.scalars().items() if not k.startswith("spectral_lifecycle")} == {
        k: v for k, v in expected.scalars(["alpha", "stable_rank"]).items() if math.isfinite(v)}
    assert report.metrics == ("alpha", "stable_rank")
    assert any(k.startswith("spectral_lifecycle/") for k in report.extra_scalars)


def test_heatmaps_are_limited_and_rendered_once(model: CharGPT) -> None:
    default = SpectralTracker(model, every_n_steps=1).step(0)
    assert [h.metric for h in default.heatmaps()] == ["alpha", "stable_rank"]
    first, second = default.heatmaps()[0].to_rgb(), default.heatmaps()[0].to_rgb()
    assert first is second and first.ndim == 3
    assert SpectralTracker(model, every_n_steps=1, heatmap=False).step(0).heatmaps() == []
    chosen = SpectralTracker(model, every_n_steps=1, heatmap=["spectral_norm"]).step(0)
    [heatmap] = chosen.heatmaps()
    layer = chosen.snapshot.layer("L01_v")
    assert heatmap.metric == "spectral_norm" and heatmap.depths == (0, 1)
    assert heatmap.values[1, heatmap.roles.index("v")] == layer.spectral_norm


def test_a_failing_publisher_is_retried_never_disabled_and_its_losses_counted(model: CharGPT) -> None:
    faulty, recorder = FaultInjectingPublisher(), RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=2, publishers=[faulty, recorder], publish_timeout_s=2.0,
                              fast_every_n_steps=None)  # full snapshots only: the counts below are theirs
    with pytest.warns(RuntimeWarning) as caught:
        tracker.step(0)
        train(model, tracker, range(8))
        summary = tracker.finish()
    assert [r.step for r in recorder.reports] == [0, 2, 4, 6, 8]
    assert recorder.summaries == [summary] and recorder.closed == 1
    messages = [str(w.message) for w in caught]
    assert sum("'fault-injector' failed" in m for m in messages) == 1  # rate-limited: the first at once
    assert any("'fault-injector' lost" in m for m in messages)
    faulty_stats, recorder_stats = tracker.stats.publishers
    # config, five step reports and the summary: retried until the deadline, then counted lost
    # backoff between attempts (0.5 s, doubling), never a busy loop; a call may still be running
    assert 2 <= faulty_stats.retries <= faulty.calls < 20 and faulty_stats.delivered == 0
    assert faulty_stats.lost == 7 and faulty_stats.lost_steps == (0, 2, 4, 6, 8)
    assert (recorder_stats.delivered, recorder_stats.retries, recorder_stats.lost) == (7, 0, 0)
    assert "fault-injector: 0 delivered" in summary.text and "recording: " in summary.text


def test_a_failing_analysis_is_disabled_and_snapshots_continue(model: CharGPT) -> None:
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=1, publishers=[recorder], analyses=[FailingAnalysis()])
    with pytest.warns(RuntimeWarning, match="analysis 'failing' failed in update"):
        tracker.step(0)
    tracker.step(1)
    tracker.flush()
    assert [r.step for r in recorder.reports] == [0, 1]
    assert any(k.startswith("spectral_lifecycle/") for k in recorder.reports[-1].extra_scalars)


def test_finish_snapshots_the_last_step_and_publishes_the_summary(
        model: CharGPT, caplog: pytest.LogCaptureFixture) -> None:
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=5, publishers=[recorder])
    tracker.step(0)
    train(model, tracker, range(12))
    with caplog.at_level(logging.INFO, logger="spectral_plugins"):
        summary = tracker.finish()
    assert [r.step for r in recorder.reports] == [0, 5, 10, 12]
    assert summary.last is recorder.reports[-1] and recorder.summaries == [summary]
    assert summary.config == recorder.configs[0]
    assert "per-layer spectra at step 12" in summary.text and "L01_mlp_out" in summary.text
    assert "pruning advice" in summary.text
    assert summary.summary_scalars["spectral_run/num_blocks"] == 2.0
    # run-level figures live in their own section, never in a per-step series
    assert all(key.startswith("spectral_run/") and "/" not in key.split("/", 1)[1]
               for key in summary.summary_scalars)
    assert "spectral_run/delta_alpha_all" in summary.summary_scalars
    assert "spectral_run/prune_rank_L00" in summary.summary_scalars  # every figure is kept ...
    headline = summary.headline_scalars()  # ... but trackers keeping them as metrics get the headline
    assert set(headline) <= set(HEADLINE_RUN) and "spectral_run/num_blocks" in headline
    assert "per-layer spectra at step 12" in caplog.text


def test_finish_without_any_step_still_summarises(model: CharGPT) -> None:
    summary = SpectralTracker(model, every_n_steps=10).finish()
    assert summary.last.step == 0 and len(summary.last.snapshot) == 15


def test_state_round_trip_continues_the_series_without_gaps_or_repeats() -> None:
    torch.manual_seed(1)
    reference_model = CharGPT(TINY)
    resumed_model = CharGPT(TINY)
    resumed_model.load_state_dict(reference_model.state_dict())

    reference = RecordingPublisher()
    # The fast lane restarts cold after a resume (its vectors are not state): off here, see test_fast.
    uninterrupted = SpectralTracker(reference_model, every_n_steps=3, publishers=[reference],
                                    fast_every_n_steps=None)
    uninterrupted.step(0)
    train(reference_model, uninterrupted, range(12))

    first = SpectralTracker(resumed_model, every_n_steps=3, fast_every_n_steps=None)
    first.step(0)
    train(resumed_model, first, range(7))
    state = json.loads(json.dumps(first.state_dict()))  # plain data only
    assert state["last_step"] == 6 and state["seen_step"] == 7

    after = RecordingPublisher()
    second = SpectralTracker(resumed_model, every_n_steps=3, publishers=[after], fast_every_n_steps=None)
    second.load_state_dict(state)
    assert second.step(6) is None
    generator_state = torch.Generator().manual_seed(0)  # replay the same batches as the reference
    optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.5)
    for step in range(12):
        x = torch.randint(0, TINY.vocab_size, (4, TINY.block_size), generator=generator_state)
        if step < 7:
            continue
        _, loss = resumed_model(x, x.roll(-1, dims=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        second.step(step + 1)
    second.flush()
    uninterrupted.flush()
    assert [r.step for r in after.reports] == [9, 12]
    assert list(second.history.steps) == [0, 3, 6, 9, 12]
    np.testing.assert_allclose(second.history.values("alpha"), uninterrupted.history.values("alpha"))
    assert after.reports[-1].extra_scalars.keys() == reference.reports[-1].extra_scalars.keys()
    for key, value in reference.reports[-1].extra_scalars.items():
        assert after.reports[-1].extra_scalars[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_state_of_another_format_is_refused(model: CharGPT) -> None:
    with pytest.raises(ValueError, match="not a SpectralTracker state"):
        SpectralTracker(model).load_state_dict({"format": "other"})


def test_saved_states_keep_their_names_across_the_package_layout(model: CharGPT) -> None:
    """Checkpoints written before the folder layout name their state "spectral_plugins.tracker" and
    "spectral_plugins.history": they must still load."""
    tracker = SpectralTracker(model, every_n_steps=1)
    tracker.step(1)
    state = tracker.state_dict()
    assert state["format"] == "spectral_plugins.tracker"
    assert state["analyses"]["lifecycle"]["history"]["format"] == "spectral_plugins.history"
    SpectralTracker(model, every_n_steps=1).load_state_dict(state)


def test_attention_bounds_plug_in_as_an_analysis(model: CharGPT) -> None:
    sample = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    tracker = SpectralTracker(model, every_n_steps=1, attention={"sample_batch": sample})
    report = tracker.step(0)
    keys = [k for k in report.extra_scalars if k.startswith("spectral_attention/")]
    assert sorted(keys) == sorted(f"spectral_attention/{name}/L{d:02d}_attn"
                                  for name in HEADLINE_ATTENTION for d in range(TINY.n_layer))
    full = SpectralTracker(model, every_n_steps=1, attention={"sample_batch": sample}, series="all").step(0)
    assert "spectral_attention/interaction_norm/L00_attn" in full.extra_scalars
    assert len(report.tables["attention_heads"]) == TINY.n_layer * TINY.n_head
    summary = tracker.finish()
    assert "attention logit bounds" in summary.text


def test_without_history_there_is_no_lifecycle(model: CharGPT) -> None:
    tracker = SpectralTracker(model, every_n_steps=1, history=False, fast_every_n_steps=None)
    report = tracker.step(0)
    assert tracker.history is None and not report.extra_scalars
    assert tracker.finish().summary_scalars == {}


class ThreadProbe(FailingAnalysis):
    name = "thread-probe"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def update(self, snapshot: Any, model_map: Any) -> AnalysisOutput:
        self.seen.append(torch.get_num_threads())
        return AnalysisOutput()


def test_snapshots_run_single_threaded_and_restore_the_setting(model: CharGPT) -> None:
    previous, probe = torch.get_num_threads(), ThreadProbe()
    SpectralTracker(model, every_n_steps=1, analyses=[probe]).step(0)
    SpectralTracker(model, every_n_steps=1, analyses=[probe], threads=None).step(0)
    assert probe.seen == [1, previous] and torch.get_num_threads() == previous
    with pytest.raises(ValueError, match="threads must be None or an integer >= 1"):
        SpectralTracker(model, threads=0)


def test_a_failing_snapshot_warns_and_training_goes_on(model: CharGPT) -> None:
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=1, publishers=[recorder])
    model.blocks[0].attn.q_proj.weight.data = torch.zeros(3)  # the mapped matrix is no longer 2-D
    with pytest.warns(RuntimeWarning, match="the snapshot at step 0 failed"):
        assert tracker.step(0) is None
    assert tracker.step(1) is None and tracker.snapshot_failures == 2
    assert tracker.finish() is None and recorder.reports == [] and recorder.closed == 1


def test_background_snapshots_publish_the_same_steps_and_values_as_synchronous() -> None:
    """A background tracker in a plain loop publishes exactly the synchronous tracker's steps, with
    bit-identical snapshots and analysis scalars (the lifecycle sees them in step order)."""
    import copy
    import dataclasses
    import time

    from tests.conftest import tiny_gpt2

    torch.manual_seed(0)
    reference = tiny_gpt2(n_layer=2).eval()  # eval: no dropout, both runs see identical updates
    data = torch.randint(0, 64, (12, 2, 16), generator=torch.Generator().manual_seed(1))
    runs: dict[bool, tuple[RecordingPublisher, SpectralTracker]] = {}
    for background in (False, True):
        model = copy.deepcopy(reference)
        recorder = RecordingPublisher()
        tracker = SpectralTracker(model, every_n_steps=3, publishers=[recorder], heatmap=False,
                                  background=background)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step, batch in enumerate(data, start=1):
            loss = model(batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if background and step % 3 == 0:
                # Let the previous snapshot finish so no due step is skipped (skips: test_background).
                while tracker.snapshotter is not None and tracker.snapshotter.busy:
                    time.sleep(0.001)
            tracker.step(step)
        if background:
            assert tracker.snapshotter is not None and tracker.snapshotter.stats.skipped == 0
            assert tracker.state_dict()["last_step"] == 12  # a checkpoint includes the step in flight
        tracker.finish()
        runs[background] = recorder, tracker

    (sync, _), (bg, bg_tracker) = runs[False], runs[True]
    assert [r.step for r in sync.reports] == [3, 6, 9, 12]
    assert [r.step for r in bg.reports] == [r.step for r in sync.reports]
    for expected, got in zip(sync.reports, bg.reports):
        # every value bit-identical; only the wall-clock timing field differs
        assert (dataclasses.replace(got.snapshot, seconds=0.0).to_json()
                == dataclasses.replace(expected.snapshot, seconds=0.0).to_json())
        assert got.scalars() == expected.scalars()
    assert len(bg.summaries) == 1 and bg.summaries[0].summary_scalars == sync.summaries[0].summary_scalars
    assert bg_tracker.snapshotter is None and bg_tracker.last_step == 12


def test_by_default_a_run_publishes_a_short_readable_list(model: CharGPT) -> None:
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=2, publishers=[recorder])
    train(model, tracker, range(6))
    tracker.flush()  # publishing is asynchronous: wait until the recorder has taken every report
    report = recorder.reports[-1]
    assert report.metrics == DEFAULT_SERIES_METRICS == ("alpha", "stable_rank")
    lifecycle = {k for k in report.scalars() if k.startswith("spectral_lifecycle/")}
    assert lifecycle and lifecycle <= set(HEADLINE_LIFECYCLE)
    assert len(report.scalars()) <= 2 * len(tracker.model_map) + len(HEADLINE_LIFECYCLE)
    # every metric is still computed and kept in the snapshot
    assert math.isfinite(report.snapshot.layer("L01_q").metric("spectral_norm"))
    # the lifecycle maps ride along as images; the heatmaps keep the first snapshot's colour scale
    assert set(report.images) == {"spectral_map/stable_rank", "spectral_map/alpha"}
    lifecycle_map = report.images["spectral_map/stable_rank"]
    assert [p.group for p in lifecycle_map.panels] == ["qk", "vo", "mlp"]
    assert [r.step for r in recorder.reports] == [2, 4, 6]
    # the stable-rank map has the fast lane's steps too (every 5 by default); the alpha map the full ones
    assert list(lifecycle_map.panels[0].steps) == [2, 4, 5, 6]
    assert list(report.images["spectral_map/alpha"].panels[0].steps) == [2, 4, 6]
    assert lifecycle_map.to_rgb().shape[2] == 3
    scales = [{h.metric: h.scale for h in r.heatmaps()} for r in recorder.reports]
    assert all(s == scales[0] for s in scales) and scales[0]["alpha"] is not None

    everything = RecordingPublisher()
    full = SpectralTracker(model, every_n_steps=2, publishers=[everything], metrics="all", series="all")
    full.step(8)
    full.step(10)
    full.flush()
    keys = set(everything.reports[-1].scalars())
    assert {k.split("/")[0] for k in keys} >= {"spectral_spectral_norm", "spectral_effective_rank"}
    assert {k for k in keys if k.startswith("spectral_lifecycle/")} > set(HEADLINE_LIFECYCLE) & keys
    with pytest.raises(ValueError, match="series='some'; choose one of"):
        SpectralTracker(model, series="some")


def test_the_headline_lists_hold_for_every_stack_of_a_multi_stack_model() -> None:
    from spectral_plugins.runtime.analyses import is_headline

    assert is_headline("spectral_lifecycle/wave_front_depth/encoder_qk", HEADLINE_LIFECYCLE)
    assert is_headline("spectral_lifecycle/qk_vo_asymmetry/decoder", HEADLINE_LIFECYCLE)
    assert not is_headline("spectral_lifecycle/wave_front_speed/qk", HEADLINE_LIFECYCLE)
    assert not is_headline("spectral_lifecycle/wave_front_depth/all", HEADLINE_LIFECYCLE)
    assert is_headline("spectral_run/wave_speed_encoder_qk", HEADLINE_RUN)
    assert not is_headline("spectral_run/wave_r2_qk", HEADLINE_RUN)
    assert not is_headline("spectral_run/prune_rank_L00", HEADLINE_RUN)
