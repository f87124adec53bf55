"""benchmarks/wave_search.py: the depth-arrival Spearman test on constructed histories with known answers
(a front travelling to deeper blocks, one travelling back), its p-values against scipy's, the pooled
result, and the doc block it writes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from benchmarks.reproduce_lifecycle import parse_args
from benchmarks.wave_search import (
    analyze,
    depth_correlation,
    pooled_correlation,
    replace_block,
    section,
)
from spectral_plugins.lifecycle.history import SpectralHistory
from tests.synthetic import wave_history, wave_nsr

BLOCKS = 8


def reversed_front(num_blocks: int = BLOCKS, interval: int = 25, last: int = 6000) -> SpectralHistory:
    """The synthetic Q/K front of tests.synthetic travelling from the last block to the first."""
    steps = np.arange(0, last + 1, interval)
    nsr = wave_nsr(steps, np.arange(num_blocks), 4.0 / 1000.0, 2000.0, 0.3, 2.0, 1e9, 0.0, 1.0)[:, ::-1]
    history = SpectralHistory()
    for t, step in enumerate(steps):
        history.append_values(int(step), {f"L{d:02d}_{role}": [10.0 * nsr[t, d], 3.0, 2.0, 15.0 * nsr[t, d]]
                                          for d in range(num_blocks) for role in ("q", "k")})
    return history


def test_a_front_moving_to_deeper_blocks_gives_rho_one() -> None:
    (qk,) = analyze(wave_history(num_blocks=BLOCKS), depth=BLOCKS, seed=0, groups=("qk",))
    assert np.all(np.diff(qk.arrivals) > 0)  # the known answer: arrivals t0 + d / v
    c = qk.correlation
    assert c.rho == pytest.approx(1.0) and c.n == BLOCKS and c.moves_with_depth
    assert c.p == pytest.approx(spearmanr(qk.depths, qk.arrivals).pvalue, rel=1e-12) and c.p < 1e-6


def test_a_front_moving_back_gives_rho_minus_one() -> None:
    (qk,) = analyze(reversed_front(), depth=BLOCKS, seed=0, groups=("qk",))
    assert np.all(np.diff(qk.arrivals) < 0)
    c = qk.correlation
    assert c.rho == pytest.approx(-1.0) and not c.moves_with_depth
    assert c.p == pytest.approx(spearmanr(qk.depths, qk.arrivals).pvalue, rel=1e-12)


def test_p_values_and_pooled_result_equal_scipys_on_the_same_pairs() -> None:
    rng = np.random.default_rng(0)
    depths = np.arange(BLOCKS, dtype=float)
    runs = [(depths, 100 + 5 * depths + rng.normal(0, 15, BLOCKS)) for _ in range(3)]
    runs[1][1][2] = math.nan  # a block that never compressed: its pair is left out
    for d, a in runs:
        keep = np.isfinite(a)
        reference = spearmanr(d[keep], a[keep])
        c = depth_correlation(d, a)
        expected = (reference.statistic, reference.pvalue, keep.sum())
        assert (c.rho, c.p, c.n) == pytest.approx(expected, rel=1e-12)
    pooled = pooled_correlation(runs)
    d_all, a_all = np.concatenate([d for d, _ in runs]), np.concatenate([a for _, a in runs])
    keep = np.isfinite(a_all)
    reference = spearmanr(d_all[keep], a_all[keep])
    expected = (reference.statistic, reference.pvalue, 23)
    assert (pooled.rho, pooled.p, pooled.n) == pytest.approx(expected, rel=1e-12)
    ties = depth_correlation(depths, np.array([7, 7, 9, 7, 11, 12, 12, 15.0]))  # tied arrivals: mean ranks
    assert ties.rho == pytest.approx(spearmanr(depths, [7, 7, 9, 7, 11, 12, 12, 15]).statistic)


def test_undetermined_correlations_are_nan() -> None:
    for d, a in (([0, 1], [5, 6]), ([0, 1, 2], [5, 5, 5]), ([0, 1, 2], [math.nan, 1, math.nan])):
        c = depth_correlation(np.array(d, float), np.array(a, float))
        assert math.isnan(c.rho) and math.isnan(c.p) and not c.moves_with_depth
    assert pooled_correlation([]).n == 0


def test_the_doc_block_has_a_row_per_run_and_group_and_replaces_its_old_self() -> None:
    args = parse_args(["--depths", str(BLOCKS), "--seeds", "0", "1", "--steps", "6000", "--warmup", "300"])
    results = [r for seed in (0, 1) for r in analyze(wave_history(num_blocks=BLOCKS, seed=seed, noise=0.001),
                                                     depth=BLOCKS, seed=seed, groups=("qk", "vo"))]
    block = section("t", "python benchmarks/wave_search.py --tag t", args, results,
                    {f"L{BLOCKS}_s0": 12.0}, "test machine")
    rows = [line for line in block.splitlines() if line.startswith(f"| 0 | {BLOCKS} | 6000 | ")
            or line.startswith(f"| 1 | {BLOCKS} | 6000 | ")]
    assert len(rows) == 4 and "| qk | 12 |" in rows[0] and "| yes |" in rows[0]
    pooled = pooled_correlation([(r.depths, r.arrivals) for r in results if r.group == "qk"])
    later = pooled_correlation([(r.depths[1:], r.arrivals[1:]) for r in results if r.group == "qk"])
    assert later.n == 14 and later.rho > 0.9
    assert (f"| {BLOCKS} | qk | 16 | {pooled.rho:.2f} | {pooled.p:.2g} | yes | 2 of 2 | {later.rho:.2f} | "
            f"{later.p:.2g} |") in block
    assert "warm-up over 300 steps" in block and "Machine: test machine." in block
    doc = replace_block("# Doc\n\nintro\n", "t", "<!-- wave-search:t:start -->old<!-- wave-search:t:end -->")
    new = replace_block(doc + "\n## Next\n", "t", block)
    assert "old" not in new and new.count("wave-search:t:start") == 1 and new.endswith("## Next\n")
