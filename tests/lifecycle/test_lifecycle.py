"""Lifecycle signals recover the known answers of constructed histories (tests/synthetic.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from spectral_plugins.core.snapshot import Snapshot
from spectral_plugins.lifecycle import wave
from spectral_plugins.lifecycle.asymmetry import asymmetry_index, depth_variance, trajectory_asymmetry
from spectral_plugins.lifecycle.depth_profile import delta_alpha, fit_inverted_u, settled_profile
from spectral_plugins.lifecycle.signals import (
    LifecycleConfig,
    SpectralLifecycle,
    asymmetry_series,
    lifecycle_state,
    summarize,
    wave_trajectory,
)
from spectral_plugins.lifecycle.timescales import fit_two_timescales
from tests.synthetic import layer, profile_history, wave_history

SPEED = 4.0  # blocks per 1k steps
T0, T_R, RAMP_TAU, RAMP_DEPTH, MARGIN = 2000.0, 7000.0, 2000.0, 0.2, 0.01
# The compression order is exactly 0 between the front and t_r, then falls linearly (tests/synthetic.py):
# late blocks cross early ones at t_r in every group (in "all" the ramp is only 4/6 as steep). The old
# detector reported the -margin crossing, t_r + margin * tau / B = 7100 here: four intervals late.
REVERSAL = T_R
FAST_CONFIG = LifecycleConfig(fit_timescales=False)


@pytest.fixture(scope="module")
def clean() -> object:
    return wave_history(speed=SPEED, t0=T0, t_r=T_R, ramp_tau=RAMP_TAU, ramp_depth=RAMP_DEPTH)


def test_wave_speed_and_reversal_recovered_exactly_without_noise(clean) -> None:
    w = wave_trajectory(clean, "qk", FAST_CONFIG)
    assert w.wave_speed == pytest.approx(SPEED, rel=0.01)  # tolerance 1 %
    assert w.wave_r2 > 0.999
    assert w.wave_arrivals == 12 and w.wave_stderr < 0.01 * SPEED  # exact arrivals: a tiny error
    assert w.reversal.reversed
    assert w.reversal.step == pytest.approx(REVERSAL, abs=1e-6)  # interpolating a line is exact
    assert w.reversal.stderr == pytest.approx(0.0, abs=1e-6)  # no noise: no jitter
    w_all = wave_trajectory(clean, "all", FAST_CONFIG)
    assert w_all.reversal.step == pytest.approx(REVERSAL, abs=1e-6)
    # V/O compress uniformly: no order, no reversal, no wave speed worth the name.
    w_vo = wave_trajectory(clean, "vo", FAST_CONFIG)
    assert not w_vo.reversal.reversed
    assert np.nanmax(np.abs(w_vo.order)) < 1e-12


def test_front_follows_the_known_trajectory_inside_the_depth_range(clean) -> None:
    w = wave_trajectory(clean, "qk", FAST_CONFIG)
    # a rate belongs to the middle of its 25-step interval; the centroid is pulled inward within about
    # two front widths of either end of the depth range, so compare three blocks inside it
    expected = SPEED / 1000.0 * (w.steps - 12.5 - T0)
    interior = (expected > 3) & (expected < 8) & (w.steps < T_R)
    assert interior.sum() >= 45
    np.testing.assert_allclose(w.front[interior], expected[interior], atol=0.15)  # 0.15 blocks
    assert np.nanmedian(w.speed[interior]) == pytest.approx(SPEED, rel=0.05)


def test_wave_survives_noise() -> None:
    noisy = wave_history(speed=SPEED, t0=T0, t_r=T_R, ramp_tau=RAMP_TAU, ramp_depth=RAMP_DEPTH,
                         noise=0.002, seed=3)
    config = LifecycleConfig(fit_timescales=False, lag=4)
    w = wave_trajectory(noisy, "qk", config)
    assert w.wave_speed == pytest.approx(SPEED, rel=0.1)  # tolerance 10 %
    assert abs(w.wave_speed - SPEED) < 3 * w.wave_stderr + 0.05 * SPEED
    assert w.reversal.reversed
    assert w.reversal.step == pytest.approx(REVERSAL, abs=150)  # tolerance 6 snapshot intervals
    assert abs(w.reversal.step - REVERSAL) < 3 * w.reversal.stderr + 25


def test_no_reversal_without_late_compression() -> None:
    h = wave_history(t_r=1e9, last=6000)
    w = wave_trajectory(h, "qk", FAST_CONFIG)
    assert not w.reversal.reversed and math.isnan(w.reversal.step)
    assert w.wave_speed == pytest.approx(SPEED, rel=0.01)


def test_reversal_detector_rules() -> None:
    steps = np.arange(8) * 10.0
    order = np.array([0, 0.05, 0.02, -0.02, -0.05, -0.05, -0.06, -0.07])
    r = wave.detect_reversal(steps, order, patience=30)
    assert r.reversed and r.index == 3
    assert r.step == pytest.approx(25.0)  # the zero crossing of 0.02 -> -0.02 between steps 20 and 30
    # the last zero crossing before the confirming snapshot, not the first dip inside the margin band
    dip = np.array([0, 0.05, -0.005, 0.003, -0.02, -0.05, -0.06, -0.07])
    assert wave.detect_reversal(steps, dip, patience=30).step == pytest.approx(30 + 10 * 0.003 / 0.023)
    never_positive = np.array([0, -0.05, -0.05, -0.05, -0.05, -0.05, -0.05, -0.05])
    assert not wave.detect_reversal(steps, never_positive).reversed
    blip = np.array([0, 0.05, -0.05, 0.05, 0.05, 0.05, 0.05, 0.05])  # one negative snapshot: not confirmed
    assert not wave.detect_reversal(steps, blip, patience=10).reversed
    pending = wave.detect_reversal(steps, order, patience=100)  # the history ends before 30 + 100
    assert not pending.reversed and "not confirmed yet" in pending.note


def test_reversal_patience_counts_steps_not_snapshots() -> None:
    """A 15-step negative excursion is jitter at any snapshot density; a lasting turn is not."""
    def order_at(s: np.ndarray) -> np.ndarray:
        jitter = np.where((s >= 300) & (s < 315), -0.05, 0.0)
        return np.where(s < 1000, 0.05 + jitter, -1e-4 * (s - 1000))

    for interval in (1.0, 5.0, 25.0):
        steps = np.arange(0, 2000, interval)
        r = wave.detect_reversal(steps, order_at(steps), patience=50)
        assert r.reversed and r.step == pytest.approx(1000.0, abs=1e-6)
        # counted in snapshots, 3 snapshots of 1 step would have fired on the jitter at step 300


def test_reversal_standard_error_matches_the_scatter_of_a_known_crossing() -> None:
    """order = -b (s - s_c) + N(0, sigma): the crossing's timing jitter is sigma / b = 10 steps."""
    steps = np.arange(0, 3000, 25.0)
    b, sigma, s_c = 1e-4, 1e-3, 1500.0
    errors, stderrs = [], []
    for seed in range(200):
        noise = sigma * np.random.default_rng(seed).standard_normal(steps.size)
        order = np.where(steps < 1000, 0.05, -b * (steps - s_c) + noise)
        r = wave.detect_reversal(steps, order, patience=100)
        assert r.reversed
        errors.append(r.step - s_c)
        stderrs.append(r.stderr)
    assert np.median(stderrs) == pytest.approx(sigma / b, rel=0.25)
    rms = float(np.sqrt(np.mean(np.square(errors))))
    # interpolating between two snapshots averages some noise: the error is at most, not below, the jitter
    assert 0.5 * np.mean(stderrs) < rms < 1.1 * np.mean(stderrs)
    assert abs(np.mean(errors)) < 3 * rms / np.sqrt(len(errors))  # unbiased


def test_wave_speed_standard_error() -> None:
    """The speed's error is the least-squares slope error (scipy's linregress as the reference), and it
    matches the scatter of speeds fitted to arrivals with a known timing noise."""
    from scipy.stats import linregress

    depths = np.arange(10)
    rng = np.random.default_rng(0)
    arrivals = 2000 + depths / SPEED * 1000 + rng.normal(0, 40, depths.size)
    fit = wave.arrival_fit(depths, arrivals)
    reference = linregress(arrivals, depths)
    assert fit.speed == pytest.approx(1000 * reference.slope, rel=1e-12)
    assert fit.stderr == pytest.approx(1000 * reference.stderr, rel=1e-12)
    assert fit.r2 == pytest.approx(reference.rvalue**2, rel=1e-12) and fit.arrivals == 10
    speeds, stderrs = [], []
    for seed in range(400):
        noisy = 2000 + depths / SPEED * 1000 + np.random.default_rng(seed).normal(0, 40, depths.size)
        f = wave.arrival_fit(depths, noisy)
        speeds.append(f.speed)
        stderrs.append(f.stderr)
    assert np.std(speeds) == pytest.approx(np.mean(stderrs), rel=0.15)
    assert np.mean(speeds) == pytest.approx(SPEED, rel=0.02)
    two = wave.arrival_fit(depths[:2], arrivals[:2])
    assert math.isfinite(two.speed) and math.isnan(two.stderr) and "2 arrivals" in two.note
    one = wave.arrival_fit(depths[:1], arrivals[:1])
    assert math.isnan(one.speed) and "only 1 block" in one.note


def test_front_has_a_value_wherever_the_stack_compresses_slowly() -> None:
    """A fast early compression followed by a 100x slower late one: the front exists in both phases."""
    steps = np.arange(0, 2000, 25.0)
    depths = np.arange(6)
    fast = 0.3 * (1 - np.exp(-steps / 100.0))[:, None] * np.ones(depths.size)
    slow = 1e-5 * steps[:, None] * (depths / 5.0)  # late blocks compress slowly, late in the run
    nsr = 1.0 - fast - slow
    front = wave.wave_front(steps, depths, nsr)
    assert np.isfinite(front[1:]).all()  # the old running-max floor left the slow phase empty
    assert front[-1] == pytest.approx((depths * depths).sum() / depths.sum(), rel=0.05)
    rising = nsr.copy()
    rising[40:] = nsr[40] + 1e-4 * (steps[40:, None] - steps[40])  # the stack decompresses: no front
    assert np.isnan(wave.wave_front(steps, depths, rising)[41:]).all()


def test_compression_rate_and_front_definitions() -> None:
    steps = np.array([0.0, 10.0, 20.0])
    nsr = np.array([[1.0, 1.0, 1.0], [0.9, 1.0, 1.0], [0.9, 1.0, 0.8]])
    np.testing.assert_allclose(wave.compression_rate(steps, nsr), [[0, 0, 0], [0.01, 0, 0], [0, 0, 0.02]])
    front = wave.wave_front(steps, np.array([0, 1, 2]), nsr)
    assert math.isnan(front[0]) and front[1] == 0.0 and front[2] == 2.0


def test_inverted_u_recovers_a_known_peak() -> None:
    depths = np.arange(16)
    rng = np.random.default_rng(0)
    profile = 3.0 - 0.02 * (depths - 6.3) ** 2 + rng.normal(0, 0.02, depths.size)
    fit = fit_inverted_u(depths, profile)
    assert fit.is_inverted_u and fit.confidence > 0.99
    assert fit.peak_depth == pytest.approx(6.3, abs=0.3)  # tolerance 0.3 blocks
    assert abs(fit.peak_depth - 6.3) < 4 * fit.peak_stderr + 1e-9
    assert fit.peak_relative_depth == pytest.approx(6.3 / 15, abs=0.02)
    assert fit.curvature == pytest.approx(-0.02, rel=0.1)


def test_profiles_that_are_not_an_inverted_u() -> None:
    depths = np.arange(12)
    rng = np.random.default_rng(1)
    linear = 2.0 + 0.1 * depths + rng.normal(0, 0.02, depths.size)
    assert not fit_inverted_u(depths, linear).is_inverted_u
    u_shape = 3.0 + 0.02 * (depths - 5.5) ** 2
    fit = fit_inverted_u(depths, u_shape)
    assert not fit.is_inverted_u and fit.confidence < 0.01 and math.isnan(fit.peak_depth)
    concave_rising = 3.0 - 0.01 * (depths - 20.0) ** 2  # peak beyond the last block
    fit = fit_inverted_u(depths, concave_rising)
    assert not fit.is_inverted_u and fit.peak_depth > 11
    assert not fit_inverted_u(depths[:3], linear[:3]).is_inverted_u  # too few depths


def test_delta_alpha_gradient_and_settled_profile() -> None:
    values = np.array([[1.0, 2.0, 4.0], [1.0, np.nan, 3.0], [np.nan, np.nan, 2.0]])
    np.testing.assert_array_equal(delta_alpha(values)[:2], [3.0, 2.0])
    assert math.isnan(delta_alpha(values)[2])
    np.testing.assert_array_equal(settled_profile(values, 0.5), [1.0, np.nan, 2.5])
    h = profile_history(2.0 + 0.3 * np.arange(6))
    s = summarize(h, FAST_CONFIG).group("all")
    assert s.delta_alpha == pytest.approx(1.5)
    assert s.alpha_depth_gradient == pytest.approx(1.5)  # alpha per full depth


def test_two_timescales_recovered() -> None:
    steps = np.arange(0, 10001, 25.0)
    rng = np.random.default_rng(2)
    y = 2.5 + 1.0 * np.exp(-steps / 100) + 0.8 * np.exp(-steps / 3000) + rng.normal(0, 0.005, steps.size)
    fit = fit_two_timescales(steps + 500, y)  # the fit counts time from the first point
    assert fit.ok and fit.r2 > 0.99
    assert fit.tau_fast == pytest.approx(100, rel=0.1)  # tolerance 10 %
    assert fit.tau_slow == pytest.approx(3000, rel=0.1)
    assert fit.amp_fast == pytest.approx(1.0, rel=0.05) and fit.amp_slow == pytest.approx(0.8, rel=0.05)
    assert fit.drift_rate == pytest.approx(-0.8 / 3000, rel=0.1)
    assert not fit_two_timescales(steps[:5], y[:5]).ok


def test_asymmetry_index_definition() -> None:
    qk = np.array([[1.0, 0.8, 0.6], [1.0, 1.0, 1.0]])
    vo = np.array([[0.9, 0.9, 0.9], [1.0, 1.0, 1.0]])
    v_qk, v_vo = depth_variance(qk), depth_variance(vo)
    assert v_qk[0] == pytest.approx(np.var([1.0, 0.8, 0.6]))
    index = asymmetry_index(v_qk, v_vo)
    assert index[0] == pytest.approx(1.0) and math.isnan(index[1])
    assert asymmetry_index(np.array([1.0]), np.array([3.0]))[0] == pytest.approx(-0.5)
    assert trajectory_asymmetry(np.array([1.0, 3.0]), np.array([1.0, 1.0])) == pytest.approx(1 / 3)


def test_state_and_summary_of_the_synthetic_run(clean) -> None:
    state = lifecycle_state(clean, FAST_CONFIG)
    assert state.step == 10000
    assert state.qk_vo_asymmetry == pytest.approx(1.0)  # V/O uniform over depth
    assert state.group("qk").reversed
    scalars = state.scalars()
    assert scalars["spectral_lifecycle/qk_vo_asymmetry"] == pytest.approx(1.0)
    assert scalars["spectral_lifecycle/wave_reversal_step/qk"] == pytest.approx(REVERSAL, abs=1e-6)
    assert all(k.startswith("spectral_lifecycle/") and math.isfinite(v) for k, v in scalars.items())
    assert "spectral_lifecycle/wave_front_depth/mlp" in scalars
    # V/O still compress slowly and uniformly at the end: their front is the middle of the stack
    assert scalars["spectral_lifecycle/wave_front_depth/vo"] == pytest.approx(5.5)
    # after t_r the Q/K rate is proportional to relative depth: the centroid is sum d^2 / sum d
    assert scalars["spectral_lifecycle/wave_front_depth/qk"] == pytest.approx(506 / 66)
    summary = summarize(clean, FAST_CONFIG)
    assert summary.qk_vo_asymmetry == pytest.approx(1.0)
    assert summary.group("qk").wave_speed == pytest.approx(SPEED, rel=0.01)
    qk = summary.group("qk")
    assert qk.wave_arrivals == 12 and qk.reversal_stderr == pytest.approx(0.0, abs=1e-6)
    assert summary.scalars()["spectral_lifecycle/wave_arrivals/qk"] == 12.0
    assert "spectral_lifecycle/wave_speed_stderr/qk" in summary.scalars()
    assert summary.num_blocks == 12
    json.dumps(summary.to_dict(), allow_nan=False)


def test_summary_timescales_and_inverted_u_on_a_known_alpha_profile() -> None:
    h = wave_history(num_blocks=10, alpha_profile=lambda d: 3.0 - 0.02 * (d - 4.0) ** 2, last=6000)
    summary = summarize(h, LifecycleConfig(groups=("qk", "all"), importance_method="alpha"))
    g = summary.group("all")
    assert g.inverted_u.is_inverted_u and g.inverted_u.peak_depth == pytest.approx(4.0, abs=0.05)
    assert g.tau_fast == pytest.approx(100, rel=0.05) and g.tau_slow == pytest.approx(3000, rel=0.05)
    assert len(summary.timescales) == 10 * 6
    scalars = summary.scalars()
    assert scalars["spectral_lifecycle/alpha_tau_fast/L04_q"] == pytest.approx(100, rel=0.05)
    assert scalars["spectral_lifecycle/alpha_peak_depth/all"] == pytest.approx(4.0, abs=0.05)
    # importance (alpha method): the lowest-alpha blocks (the edges of the inverted U) are the most important
    assert summary.advice.order[0] == 4


def test_spectral_lifecycle_updates_and_resumes_exactly() -> None:
    lc = SpectralLifecycle(LifecycleConfig(fit_timescales=False), max_steps=16)
    resumed = None
    for step in range(40):
        layers = tuple(layer(f"L{d:02d}_{r}", d, r, stable_rank=10 - 0.1 * step * (d + 1) / 4,
                             alpha=3 + 0.01 * d) for d in range(4) for r in ("q", "k", "v", "o"))
        state = lc.update(Snapshot(step * 10, layers))
        if step == 20:
            resumed = SpectralLifecycle()
            resumed.load_state_dict(json.loads(json.dumps(lc.state_dict())))
        elif resumed is not None:
            resumed.update(Snapshot(step * 10, layers))
    assert state.step == 390 and len(lc.history) <= 16
    assert resumed.state_dict() == lc.state_dict()
    assert resumed.state().scalars() == lc.state().scalars()
    with pytest.raises(ValueError, match="needs metrics"):
        SpectralLifecycle(metrics=("alpha",))
    with pytest.raises(ValueError, match="unknown role group"):
        LifecycleConfig(groups=("nope",))


def test_summary_text_gives_uncertainty_or_says_undetermined_and_why(clean) -> None:
    from spectral_plugins.lifecycle.describe import group_text
    from spectral_plugins.runtime.analyses import lifecycle_text

    summary = summarize(clean, FAST_CONFIG)
    qk = group_text(summary.group("qk"))
    assert "4 ± " in qk and "12 arrivals" in qk and "reversed at step 7000 ± 0" in qk
    flat = summarize(profile_history(np.full(4, 3.0)), FAST_CONFIG)  # nothing ever compresses
    text = lifecycle_text(flat)
    assert "undetermined (only 0 block(s) compressed before the reversal)" in text
    assert "no confirmed reversal" in text
    two = summarize(wave_history(num_blocks=2, last=3000), FAST_CONFIG)
    assert "2 arrivals; error undetermined: 2 arrivals fit any line exactly" in group_text(two.group("qk"))
    for t in (lifecycle_text(summary), text, lifecycle_text(two)):
        assert "nan" not in t.lower()


# A wave too fast for full snapshots every 25 steps: 12 blocks in 30 steps (the demo's whole stack
# compresses within ~100 steps). The fast lane samples it every 2 steps.
QUICK = dict(speed=400.0, t0=100.0, t_r=1e9, width=1.0, last=600)


def as_snapshots(history, every: int = 1) -> list[Snapshot]:
    """The history's kept steps (every ``every``-th) as snapshots of its stable ranks and alphas."""
    sr, alpha = history.values("stable_rank"), history.values("alpha")

    def layers(t: int) -> tuple:
        return tuple(layer(info.key, info.depth, info.role, float(sr[t, j]), float(alpha[t, j]))
                     for j, info in enumerate(history.matrices))

    return [Snapshot(int(step), layers(t)) for t, step in enumerate(history.steps) if t % every == 0]


def test_the_fast_lanes_dense_series_resolve_a_wave_the_full_snapshots_cannot() -> None:
    full, dense = wave_history(interval=25, **QUICK), wave_history(interval=2, **QUICK)
    coarse, fine = summarize(full, FAST_CONFIG), summarize(full, FAST_CONFIG, waves=dense)
    assert fine.group("qk").wave_speed == pytest.approx(400.0, rel=0.02)
    assert fine.group("qk").wave_r2 > 0.99 and fine.group("qk").wave_arrivals == 12
    assert abs(coarse.group("qk").wave_speed - 400.0) > 50.0 and coarse.group("qk").wave_r2 < 0.8
    # alpha keeps the full snapshots' cadence: its figures do not change
    assert fine.group("all").delta_alpha == coarse.group("all").delta_alpha
    assert [g.alpha_depth_gradient for g in fine.groups] == [g.alpha_depth_gradient for g in coarse.groups]
    # the state at a full step reads the dense series up to that step, not beyond it
    head = wave_history(interval=25, **{**QUICK, "last": 125})
    state = lifecycle_state(head, FAST_CONFIG, waves=dense)
    expected = wave_trajectory(dense, "qk", FAST_CONFIG, until=125)
    assert state.step == 125 and expected.steps[-1] == 124
    assert state.group("qk").front_depth == pytest.approx(expected.front[-1])
    assert state.group("qk").nsr_mean == pytest.approx(float(np.mean(expected.nsr[-1])))


def test_lifecycle_takes_fast_steps_between_late_full_snapshots_and_resumes_exactly() -> None:
    dense, full = wave_history(interval=2, **QUICK), wave_history(interval=20, **QUICK)
    lc = SpectralLifecycle(FAST_CONFIG)
    fulls = {s.step: s for s in as_snapshots(full)}
    pending: list[Snapshot] = []
    resumed = None
    for snapshot in as_snapshots(dense):
        fast = lc.update_fast(snapshot)
        assert fast.step == snapshot.step and math.isnan(fast.group("all").delta_alpha)
        assert "spectral_lifecycle/nsr_mean/qk" in fast.scalars()
        assert not any("alpha" in key for key in fast.scalars())
        if snapshot.step % 50 == 10:  # the cheap state (last few steps) = the whole series' last point
            for name in ("qk", "vo", "mlp", "all"):
                whole = wave_trajectory(lc.waves, name, FAST_CONFIG, full_speed=False)
                cheap = fast.group(name)
                assert cheap.front_depth == pytest.approx(whole.front[-1], nan_ok=True)
                assert cheap.front_speed == pytest.approx(whole.speed[-1], nan_ok=True)
                assert cheap.nsr_mean == pytest.approx(float(np.mean(whole.nsr[-1])))
                assert cheap.nsr_order == pytest.approx(whole.order[-1])
            assert fast.qk_vo_asymmetry == pytest.approx(asymmetry_series(lc.waves)[1][-1], nan_ok=True)
            assert "spectral_lifecycle/wave_reversed/qk" not in fast.scalars()  # evaluated at full steps
        if snapshot.step in fulls:
            pending.append(fulls[snapshot.step])
        if pending and snapshot.step - pending[0].step >= 10:  # a background snapshot, published late
            late = pending.pop(0)
            state = lc.update(late)
            assert state.step == late.step
            assert state.group("qk").front_depth == pytest.approx(lifecycle_state(
                lc.history, FAST_CONFIG, waves=wave_history(interval=2, **{**QUICK, "last": late.step})
            ).group("qk").front_depth, nan_ok=True)
        if snapshot.step == 300:
            resumed = SpectralLifecycle()
            resumed.load_state_dict(json.loads(json.dumps(lc.state_dict())))
            assert resumed.state_dict() == lc.state_dict()
    assert len(lc.waves) == len(dense) and lc.history.steps[-1] == 580
    assert lc.summary().group("qk").wave_speed == pytest.approx(400.0, rel=0.02)
    assert resumed is not None and resumed.waves is not None and resumed.waves.steps[-1] == 300
    old = lc.state_dict()
    del old["waves"]  # a checkpoint from before the fast lane
    before = SpectralLifecycle()
    before.load_state_dict(old)
    assert before.waves is None and before.summary().group("qk").wave_speed == pytest.approx(
        summarize(lc.history, FAST_CONFIG).group("qk").wave_speed)
