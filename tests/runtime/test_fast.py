"""The tracker's fast lane through real TensorBoard event files: a stable-rank value at every step for
every matrix, each within 1e-3 of a float64 SVD of the weights at that step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spectral_plugins import SpectralTracker
from spectral_plugins.core.keys import matrix_key
from spectral_plugins.demo.model import CharGPT, GPTConfig
from spectral_plugins.runtime.fast import HONESTY_KEY
from spectral_plugins.tensorboard import TensorBoardPublisher
from tests.publishers import RecordingPublisher
from tests.tracker_readers import read_tensorboard_scalars

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIG = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32)


def exact_stable_ranks(tracker: SpectralTracker) -> dict[str, float]:
    out = {}
    for ref in tracker.model_map.matrices:
        singular = torch.linalg.svdvals(ref.weight().double())
        out[ref.key] = float(singular.square().sum() / singular[0] ** 2)
    return out


def train(model: CharGPT, tracker: SpectralTracker, steps: range, after_step=None) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for step in steps:
        idx = torch.randint(0, CONFIG.vocab_size, (8, CONFIG.block_size + 1), generator=generator)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tracker.step(step + 1)
        if after_step is not None:
            after_step(step + 1)


@pytest.mark.slow
@pytest.mark.parametrize("background", [False, True])
def test_tensorboard_has_a_stable_rank_at_every_step_within_1e_3_of_svd(tmp_path: Path, background: bool):
    torch.manual_seed(0)
    model = CharGPT(CONFIG)
    tracker = SpectralTracker(model, every_n_steps=25, fast_every_n_steps=1, metrics=["alpha", "stable_rank"],
                              publishers=[TensorBoardPublisher(str(tmp_path))], background=background)
    exact: dict[int, dict[str, float]] = {}

    def record(step: int) -> None:
        exact[step] = exact_stable_ranks(tracker)

    train(model, tracker, range(150), after_step=record)
    tracker.finish()
    scalars = read_tensorboard_scalars(tmp_path)
    for key in exact[1]:
        series = dict(scalars[matrix_key("stable_rank", key)])
        assert set(range(1, 151)) <= set(series), (key, sorted(set(range(1, 151)) - set(series))[:5])
        for step in range(1, 151):
            assert abs(series[step] - exact[step][key]) / exact[step][key] < 1e-3, (key, step)
    honesty = dict(scalars[HONESTY_KEY])
    assert set(honesty) == {25, 50, 75, 100, 125, 150} and max(honesty.values()) < 1e-3


def test_fast_steps_are_scalars_only_and_full_steps_check_the_lane():
    torch.manual_seed(0)
    model = CharGPT(CONFIG)
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=10, fast_every_n_steps=2, publishers=[recorder],
                              metrics=["alpha", "stable_rank", "spectral_norm"])
    tracker.step(0)
    train(model, tracker, range(20))
    tracker.flush()  # publishers take their reports on their outboxes' threads
    assert [r.step for r in recorder.reports] == [0, 10, 20]
    assert [r.step for r in recorder.fast_reports] == [2, 4, 6, 8, 12, 14, 16, 18]
    fast = recorder.fast_reports[0]
    assert not fast.full and fast.heatmaps() == [] and fast.snapshot.method == "fast_lane"
    keys = set(fast.scalars())
    layer_keys = [ref.key for ref in tracker.model_map.matrices]
    per_matrix = {matrix_key(m, k) for m in ("stable_rank", "spectral_norm") for k in layer_keys}
    assert keys - per_matrix == set(fast.extra_scalars)  # the rest: the stable-rank lifecycle signals
    for report in recorder.reports:
        assert 0 <= report.extra_scalars[HONESTY_KEY] < 1e-3
    assert tracker.config()["fast_every_n_steps"] == 2


def test_a_full_snapshot_that_finds_the_lane_off_the_top_restarts_it():
    from tests.core.test_fast_lane import crossing_model

    model, set_weights = crossing_model(new_top=1.05)
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=5, fast_every_n_steps=1, roles={"0": "mlp_in"},
                              metrics=["stable_rank", "spectral_norm"], publishers=[recorder])
    key = matrix_key("spectral_norm", tracker.model_map.matrices[0].key)
    for step in range(9):
        top = set_weights(step)
        tracker.step(step)
        tracker.flush()
        reports = {r.step: r for r in recorder.reports + recorder.fast_reports}
        if step == 5:  # the warm start stayed on the old top: the check shows it and restarts the lane
            assert reports[5].extra_scalars[HONESTY_KEY] > 0.05 and tracker.fast.restarted == 1
        else:
            assert abs(reports[step].scalars()[key] - top) / top < 1e-3
    assert tracker.fast.restarted == 1
    tracker.finish()


def test_fast_steps_carry_the_stable_rank_lifecycle_signals_from_the_lanes_own_values():
    torch.manual_seed(0)
    model = CharGPT(CONFIG)
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=10, fast_every_n_steps=2, publishers=[recorder])
    tracker.step(0)
    train(model, tracker, range(20))
    tracker.flush()
    waves = tracker.analyses.analyses[0].lifecycle.waves  # the lifecycle's fast series: every 2 steps
    assert waves is not None and list(waves.steps) == list(range(0, 21, 2))
    initial = {}  # the lane's step-0 stable ranks (measured with the first full snapshot): nsr = 1 there
    for key, value in zip(waves.matrices, waves.values("stable_rank")[0]):
        initial[key.key] = value
    qk = [ref.key for ref in tracker.model_map.matrices if ref.role in ("q", "k")]
    for fast in recorder.fast_reports:
        assert not any(key.startswith("spectral_alpha") or "alpha" in key for key in fast.extra_scalars)
        # independent: the mean over Q/K matrices of the published fast stable rank over its initial value
        nsr = [fast.scalars()[matrix_key("stable_rank", key)] / initial[key] for key in qk]
        assert fast.extra_scalars["spectral_lifecycle/nsr_mean/qk"] == pytest.approx(sum(nsr) / len(nsr))
        assert "spectral_lifecycle/qk_vo_asymmetry" in fast.extra_scalars
    # full snapshots still carry the alpha signals, and their stable-rank ones come from the lane too
    assert "spectral_lifecycle/delta_alpha/qk" in recorder.reports[-1].extra_scalars
    with_front = [r for r in [*recorder.fast_reports, *recorder.reports]
                  if "spectral_lifecycle/wave_front_depth/qk" in r.extra_scalars]
    assert len(with_front) >= len(recorder.fast_reports) // 2  # the stack compresses from the first steps


def test_resumed_tracker_continues_the_fast_series_after_its_checkpoint():
    torch.manual_seed(0)
    model = CharGPT(CONFIG)
    first = SpectralTracker(model, every_n_steps=5, fast_every_n_steps=1)
    train(model, first, range(7))
    state = first.state_dict()
    recorder = RecordingPublisher()
    second = SpectralTracker(model, every_n_steps=5, fast_every_n_steps=1, publishers=[recorder])
    second.load_state_dict(state)
    for step in (6, 7, 8, 9, 10, 11):  # 6 and 7 replay steps already published before the checkpoint
        second.step(step)
    second.flush()  # publishers take their reports on their outboxes' threads
    assert [r.step for r in recorder.fast_reports] == [6, 7, 8, 9, 11]
    assert [r.step for r in recorder.reports] == [10]


def test_off_and_invalid_settings():
    model = CharGPT(CONFIG)
    recorder = RecordingPublisher()
    tracker = SpectralTracker(model, every_n_steps=5, fast_every_n_steps=None, publishers=[recorder])
    for step in range(1, 11):
        tracker.step(step)
    assert recorder.fast_reports == [] and tracker.config()["fast_every_n_steps"] == "off"
    with pytest.raises(ValueError, match="fast_every_n_steps must be None or an integer >= 1"):
        SpectralTracker(model, fast_every_n_steps=0)
    quiet = SpectralTracker(model, every_n_steps=5, metrics=["alpha"], publishers=[recorder])
    assert quiet.fast is not None and quiet.fast.lane is None  # publishes no fast metric: stays off
    assert math.isnan(quiet.fast.last_error)
