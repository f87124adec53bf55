"""SpectralHistory: recording, depth profiles, bounded memory, exact resume round-trip."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from spectral_plugins.core.snapshot import Snapshot
from spectral_plugins.lifecycle.history import (
    SpectralHistory,
    parse_layer_key,
    parse_matrix_tag,
)
from tests.synthetic import layer, wave_history


def _snapshot(step: int | None, scale: float = 1.0) -> Snapshot:
    return Snapshot(step, (
        layer("L00_q", 0, "q", 4.0 * scale, 3.0),
        layer("L00_v", 0, "v", 6.0 * scale, 4.0),
        layer("L01_q", 1, "q", 8.0 * scale, 5.0),
        layer("embed", None, "embed", 9.0, 2.5),
    ))


def test_append_and_read_back() -> None:
    h = SpectralHistory(metrics=("stable_rank", "alpha"))
    h.append(_snapshot(0))
    h.append(_snapshot(10, scale=0.5))
    assert h.steps.tolist() == [0, 10]
    assert [m.key for m in h.matrices] == ["L00_q", "L00_v", "L01_q", "embed"]
    assert h.values("stable_rank")[:, 0].tolist() == [4.0, 2.0]
    assert h.reference("stable_rank").tolist() == [4.0, 6.0, 8.0, 9.0]
    np.testing.assert_allclose(h.normalised("stable_rank")[1], [0.5, 0.5, 0.5, 1.0])
    steps, series = h.series("L01_q", "alpha")
    assert steps.tolist() == [0, 10] and series.tolist() == [5.0, 5.0]
    with pytest.raises(KeyError, match="not kept"):
        h.values("xmin")


def test_profile_averages_the_group_per_depth() -> None:
    h = SpectralHistory(metrics=("stable_rank", "alpha"))
    h.append(_snapshot(0))
    p = h.profile("alpha", "all")
    assert p.depths.tolist() == [0, 1]
    assert p.values[0].tolist() == [3.5, 5.0]  # depth 0: mean of q (3) and v (4)
    assert h.profile("alpha", "qk").values[0].tolist() == [3.0, 5.0]
    assert h.profile("alpha", "vo").depths.tolist() == [0]
    assert h.profile("alpha", "mlp").empty
    assert h.profile("alpha", ["embed"]).empty  # outside the blocks: no depth
    assert h.num_blocks == 2


def test_step_none_counts_snapshots_and_repeated_steps_replace() -> None:
    h = SpectralHistory()
    h.append(_snapshot(None))
    h.append(_snapshot(None))
    assert h.steps.tolist() == [0, 1]
    h.append(_snapshot(5))
    h.append(_snapshot(9))
    h.append(_snapshot(5, scale=2.0))  # a resumed run repeating step 5 drops 5 and 9
    assert h.steps.tolist() == [0, 1, 5]
    assert h.values("stable_rank")[-1, 0] == 8.0


def test_late_matrices_are_padded_and_reference_is_first_finite() -> None:
    h = SpectralHistory(metrics=("stable_rank",))
    h.append_values(0, {"L00_q": [math.nan]})
    h.append_values(1, {"L00_q": [3.0]})
    h.append_values(2, {"L00_q": [1.5], "L01_k": [4.0]})
    v = h.values("stable_rank")
    assert np.isnan(v[0, 0]) and np.isnan(v[:2, 1]).all()
    assert h.reference("stable_rank").tolist() == [3.0, 4.0]
    assert h.matrices[1].depth == 1 and h.matrices[1].role == "k"


def test_parse_keys_and_tags() -> None:
    assert parse_layer_key("L03_q") == (3, "q")
    assert parse_layer_key("L12_mlp_gate") == (12, "mlp_gate")
    assert parse_layer_key("L03_mlp_in_c_fc") == (3, "mlp_in")
    assert parse_layer_key("lm_head") == (None, "lm_head")
    assert parse_layer_key("L02_weird") == (2, "other")
    assert parse_matrix_tag("spectral_alpha/L03_q") == ("alpha", "L03_q")
    assert parse_matrix_tag("spectral_lifecycle/wave_front_depth") is None
    assert parse_matrix_tag("train/loss") is None


def test_thinning_keeps_first_and_recent_steps() -> None:
    h = SpectralHistory(metrics=("stable_rank",), max_steps=16)
    for step in range(0, 1000, 10):
        h.append_values(step, {"L00_q": [float(step)]})
    steps = h.steps
    assert len(steps) <= 16 and steps[0] == 0 and steps[-1] == 990
    assert np.all(np.diff(steps) > 0)
    gaps = np.diff(steps[1:])
    assert gaps[-1] == 10 and gaps[0] > gaps[-1]  # dense recent past, sparse distant past
    assert h.reference("stable_rank")[0] == 0.0 or h.values("stable_rank")[0, 0] == 0.0


def test_memory_stays_bounded_over_100k_steps() -> None:
    cap = 64
    h = SpectralHistory(max_steps=cap)
    layers = _snapshot(0).layers
    sizes = []
    for step in range(100_000):
        h.append(Snapshot(step, layers))
        if step in (1_000, 10_000, 99_999):
            sizes.append(h.nbytes())
    assert len(h) <= cap and h.appended == 100_000
    assert h.steps[0] == 0 and h.steps[-1] == 99_999
    bound = (cap + 1) * len(h.metrics) * len(h.matrices) * 8  # cap rows + the reference row
    assert max(sizes) <= bound  # the same bound at 1k, 10k and 100k steps: no growth


def _state_bytes(state: dict) -> str:
    return json.dumps(state, sort_keys=True)


def test_state_round_trip_is_exact_through_json_and_torch() -> None:
    h = wave_history(num_blocks=4, last=2000, noise=0.01, max_steps=32)
    h.append_values(2025, {"L00_q": [math.nan, math.inf, -math.inf, 1e-300], "L09_zz": [1.0, 2.0, 3.0, 4.0]})
    state = h.to_state()
    text = json.dumps(state, allow_nan=False)  # strict JSON: NaN/inf are encoded
    restored = SpectralHistory.from_state(json.loads(text))
    assert _state_bytes(restored.to_state()) == _state_bytes(state)
    np.testing.assert_array_equal(restored.values("alpha"), h.values("alpha"))
    np.testing.assert_array_equal(restored.reference("stable_rank"), h.reference("stable_rank"))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert _state_bytes(SpectralHistory.from_state(loaded).to_state()) == _state_bytes(state)
    assert SpectralHistory.from_json(h.to_json()).to_state() == SpectralHistory.from_state(state).to_state()


def test_resumed_history_equals_uninterrupted_one() -> None:
    def run(h: SpectralHistory, steps: range) -> None:
        for s in steps:
            h.append_values(s, {"L00_q": [math.sin(s), s * 0.5], "L01_k": [math.cos(s), 1.0]})

    full = SpectralHistory(metrics=("stable_rank", "alpha"), max_steps=10)
    run(full, range(0, 200))
    first = SpectralHistory(metrics=("stable_rank", "alpha"), max_steps=10)
    run(first, range(0, 77))
    resumed = SpectralHistory.from_state(json.loads(json.dumps(first.to_state())))
    run(resumed, range(77, 200))
    assert resumed.to_state() == full.to_state()


def test_bad_state_and_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        SpectralHistory(max_steps=2)
    with pytest.raises(ValueError, match="not a spectral history"):
        SpectralHistory.from_state({"format": "something else"})


def test_from_scalars_builds_a_history_from_tracked_series() -> None:
    series = {
        "spectral_stable_rank/L00_q": [(0, 4.0), (10, 2.0)],
        "spectral_alpha/L00_q": [(0, 3.0), (10, 2.5)],
        "spectral_alpha/L01_mlp_in": [(10, 4.0)],
        "spectral_lifecycle/wave_front_depth/qk": [(10, 1.0)],
        "train/loss": [(0, 1.0)],
    }
    h = SpectralHistory.from_scalars(series)
    assert h.metrics == ("stable_rank", "alpha")
    assert h.steps.tolist() == [0, 10]
    assert [(m.key, m.depth, m.role) for m in h.matrices] == [("L00_q", 0, "q"), ("L01_mlp_in", 1, "mlp_in")]
    np.testing.assert_array_equal(h.values("alpha"), [[3.0, np.nan], [2.5, 4.0]])
