"""The fast lane against float64 SVD: cold on real pretrained weights, warm through real training."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from spectral_plugins import SpectralEngine, map_model
from spectral_plugins.core.fast_lane import FastLane, fast_lane_error
from spectral_plugins.demo.data import VOCAB, encode, stdlib_text
from spectral_plugins.demo.model import CharGPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exact_stable_rank(model_map) -> dict[str, float]:
    """Stable rank of every matrix from a float64 SVD (the reference)."""
    out = {}
    for ref in model_map.matrices:
        singular = torch.linalg.svdvals(ref.weight().double())
        out[ref.key] = float(singular.square().sum() / singular[0] ** 2)
    return out


def relative_errors(measured: dict[str, float], exact: dict[str, float]) -> np.ndarray:
    return np.array([abs(measured[key] - value) / value for key, value in exact.items()])


def test_cold_start_on_pretrained_minilm_matches_float64_svd(minilm_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path)
    model_map = map_model(model)
    measure = FastLane(model_map).measure(step=0)
    errors = relative_errors(measure.values("stable_rank"), exact_stable_rank(model_map))
    assert len(errors) == len(model_map) > 30
    assert errors.max() < 1e-3, errors.max()
    # A Ritz value never exceeds the exact top singular value (up to float32 rounding).
    for ref, sigma in zip(model_map.matrices, measure.spectral_norm):
        assert sigma <= float(torch.linalg.matrix_norm(ref.weight().double(), ord=2)) * (1 + 1e-5)


def test_warm_start_follows_training_at_every_step_within_1e_3():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(VOCAB), block_size=32, n_layer=2, n_head=4, d_model=64)
    model = CharGPT(config)
    ids = encode(stdlib_text(max_chars=20_000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model_map = map_model(model)
    lane = FastLane(model_map)
    products = []
    for step in range(1, 41):
        starts = torch.randint(0, len(ids) - config.block_size - 1, (16,))
        x = torch.stack([ids[s:s + config.block_size] for s in starts])
        y = torch.stack([ids[s + 1:s + config.block_size + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        measure = lane.measure(step)
        errors = relative_errors(measure.values("stable_rank"), exact_stable_rank(model_map))
        assert errors.max() < 1e-3, (step, errors.max())
        assert (measure.residual < lane.tol).all() or (measure.products == lane.max_products).any()
        products.append(measure.products.mean())
    # Warm-started steps need fewer products than the cold first step.
    assert np.mean(products[5:]) < products[0]


def test_a_nan_matrix_is_nan_alone_and_recovers():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    model_map = map_model(model)
    lane = FastLane(model_map)
    with torch.no_grad():
        model[0].weight[3, 4] = math.nan
    measure = lane.measure(1)
    assert math.isnan(measure.stable_rank[0]) and math.isfinite(measure.stable_rank[1])
    with torch.no_grad():
        model[0].weight[3, 4] = 0.5
    again = lane.measure(2)
    errors = relative_errors(again.values("stable_rank"), exact_stable_rank(model_map))
    assert errors.max() < 1e-3


def test_fused_qkv_views_and_the_honesty_check_against_a_full_snapshot(gpt2_model):
    model_map = map_model(gpt2_model)
    measure = FastLane(model_map).measure(3)
    snapshot = SpectralEngine().analyze(model_map, step=3)
    assert set(measure.keys) == {layer.key for layer in snapshot.layers}
    assert fast_lane_error(measure, snapshot) < 1e-3
    assert fast_lane_error(measure, snapshot, "frobenius_norm") < 1e-5
    with pytest.raises(ValueError, match="fast lane measures"):
        measure.values("alpha")


def test_shares_measured_apart_merge_into_the_map_order_and_a_missing_share_is_nan():
    from dataclasses import replace

    from spectral_plugins.core.fast_lane import merge_measures

    torch.manual_seed(0)
    model_map = map_model(CharGPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32)))
    matrices = model_map.matrices
    shares = [replace(model_map, matrices=matrices[0::3]), replace(model_map, matrices=matrices[1::3]),
              replace(model_map, matrices=matrices[2::3]), replace(model_map, matrices=())]  # one rank idle
    measures = [FastLane(share).measure(step=4) for share in shares]
    merged = merge_measures(model_map, measures, step=4)
    assert merged.step == 4 and merged.keys == tuple(ref.key for ref in matrices)
    assert relative_errors(merged.values("stable_rank"), exact_stable_rank(model_map)).max() < 1e-3
    for measure in measures:
        for i, key in enumerate(measure.keys):
            j = merged.keys.index(key)
            assert merged.stable_rank[j] == measure.stable_rank[i]
            assert merged.products[j] == measure.products[i]
    lost = merge_measures(model_map, [measures[0], None, measures[2], measures[3]], step=4)
    missing = {ref.key for ref in matrices[1::3]}
    assert all(math.isnan(v) == (k in missing) for k, v in lost.values("stable_rank").items())


def test_in_place_and_batched_products_agree_also_on_transposed_fused_and_float64_weights(gpt2_model):
    import copy

    model = copy.deepcopy(gpt2_model)  # the fixture is shared: scaled here
    model_map = map_model(model)  # Conv1D weights stored (in, out), q/k/v as strided slices
    in_place, batched = FastLane(model_map, batched=False), FastLane(model_map, batched=True)
    for step in range(3):
        with torch.no_grad():  # a small change between steps, as training makes
            for param in model.parameters():
                param.mul_(1 + 1e-3 * step)
        a, b = in_place.measure(step), batched.measure(step)
        # In place each matrix stops on its own; a batched group stops together, on its slowest.
        assert (a.products <= b.products).all()
        assert step > 0 or (a.products < b.products).any()  # cold, the groups' spread shows
        assert np.allclose(a.stable_rank, b.stable_rank, rtol=1e-4, atol=0)
        assert (a.residual <= in_place.tol).all() and (b.residual <= batched.tol).all()
        frobenius = np.array([float(torch.linalg.matrix_norm(ref.weight().double()))
                              for ref in model_map.matrices])
        assert np.abs(a.frobenius_norm / frobenius - 1).max() < 1e-6
    assert relative_errors(a.values("stable_rank"), exact_stable_rank(model_map)).max() < 1e-3
    # Weights of another dtype than the lane's are converted, not multiplied as they are.
    wide = map_model(copy.deepcopy(gpt2_model).double())
    measure = FastLane(wide, batched=False).measure(0)
    assert relative_errors(measure.values("stable_rank"), exact_stable_rank(wide)).max() < 1e-3


def crossing_model(new_top: float = 1.05, n: int = 64) -> tuple[torch.nn.Module, Any]:
    """One n x n matrix with known singular values: ``1.0`` on top and, from ``t = 5`` on, a new
    direction at ``new_top`` that was 0.3 before (a singular value jumping past the top, as a
    rank-one update does). Returns the model and ``set_weights(t) -> the top singular value``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False))
    u, _ = torch.linalg.qr(torch.randn(n, n))
    v, _ = torch.linalg.qr(torch.randn(n, n))

    def set_weights(t: int) -> float:
        singular = torch.linspace(0.6, 0.1, n)
        singular[0], singular[1] = 1.0, 0.3 if t < 5 else new_top
        with torch.no_grad():
            model[0].weight.copy_(u @ torch.diag(singular) @ v.T)
        return float(singular.max())

    return model, set_weights


def test_a_warm_start_left_below_a_new_top_is_found_by_the_check_and_restarted():
    from spectral_plugins.core.fast_lane import off_top

    model, set_weights = crossing_model()
    model_map = map_model(model, roles={"0": "mlp_in"})
    lane = FastLane(model_map)
    for t in range(5):  # the warm vector converges onto the top direction; the other one fades out
        set_weights(t)
        assert abs(lane.measure(t).spectral_norm[0] - 1.0) < 1e-3
    top = set_weights(5)
    stuck = lane.measure(5)
    # Its residual is tiny (the warm vector is an eigenvector), so the lane alone cannot tell...
    assert stuck.residual[0] < lane.tol and abs(stuck.spectral_norm[0] - 1.0) < 1e-3 < top - 1.0
    assert abs(lane.measure(5).spectral_norm[0] - 1.0) < 1e-3  # and stays there, step after step
    # ...but a full snapshot of the same weights can, and a random start finds the new top.
    snapshot = SpectralEngine().analyze(model_map, step=5)
    assert off_top(stuck, snapshot, lane.tol) == [model_map.matrices[0].key]
    assert lane.restart(off_top(stuck, snapshot, lane.tol)) == 1
    assert lane.restart(["not-a-key"]) == 0
    again = lane.measure(5)
    assert abs(again.spectral_norm[0] - top) / top < 1e-3
    assert off_top(again, snapshot, lane.tol) == []
