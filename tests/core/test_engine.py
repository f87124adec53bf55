"""The engine against float64 numpy SVD, its own two methods, and WeightWatcher's analyze()."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from spectral_plugins import SpectralEngine, analyze, map_model


def numpy_reference(w: np.ndarray) -> dict[str, float]:
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return {
        "spectral_norm": s[0],
        "frobenius_norm": math.sqrt(np.sum(w.astype(np.float64) ** 2)),
        "stable_rank": np.sum(s**2) / s[0] ** 2,
        "effective_rank": math.exp(-np.sum(p * np.log(p))),
        "lambda_max": s[0] ** 2,
    }


def sample_matrices(seed: int = 0) -> dict[str, torch.Tensor]:
    """Square, both rectangular orientations, rank-deficient, ill-conditioned, and two of one shape."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(90, 90, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    ill = u[:, :60] @ torch.diag(torch.logspace(0, -6, 60, dtype=torch.float64)) @ v.T
    # Exactly rank 5 in float64 (a float32 product would carry ~1e-7 rounding "singular values").
    low_rank = torch.randn(70, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 50, generator=g,
                                                                                 dtype=torch.float64)
    return {
        "square": torch.randn(64, 64, generator=g),
        "tall": torch.randn(120, 40, generator=g),
        "wide": torch.randn(40, 120, generator=g),
        "tall_twin": torch.randn(120, 40, generator=g),
        "low_rank": low_rank,
        "ill_conditioned": ill.float(),
    }


class Bag(nn.Module):
    """Matrices as bare parameters, so the model map sees each as one matrix."""

    def __init__(self, matrices: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, w in matrices.items():
            self.register_parameter(name, nn.Parameter(w.clone()))


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_metrics_match_float64_numpy_svd(method):
    matrices = sample_matrices()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = analyze(Bag(matrices), method=method)
    for name, w in matrices.items():
        layer = snapshot.layer(name)
        reference = numpy_reference(w.double().numpy())
        for metric, expected in reference.items():
            assert layer.metric(metric) == pytest.approx(expected, rel=1e-6), (name, metric)
        assert layer.finite


def test_gram_and_svd_methods_agree_on_alpha_too():
    matrices = sample_matrices(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gram = analyze(Bag(matrices), method="gram")
        svd = analyze(Bag(matrices), method="svd")
    for a, b in zip(gram.layers, svd.layers):
        if a.name == "low_rank":  # 5 non-zero eigenvalues: tail fits are not comparable
            continue
        assert a.alpha == pytest.approx(b.alpha, rel=1e-6), a.name
        assert a.n_tail == b.n_tail


def test_rank_deficient_matrix_reports_the_precision_floor():
    snapshot = analyze(Bag({"low_rank": sample_matrices()["low_rank"]}))
    layer = snapshot.layer("low_rank")
    assert layer.precision_floor > 0
    assert layer.n_below_floor == 50 - 5  # the 45 zero eigenvalues are below the floor
    assert layer.effective_rank < 5.0 + 1e-9


def test_float32_option_is_close_to_float64():
    matrices = {k: v for k, v in sample_matrices().items() if k != "ill_conditioned"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f64 = analyze(Bag(matrices))
        f32 = analyze(Bag(matrices), dtype="float32")
    assert f32.dtype == "float32" and f64.dtype == "float64"
    for a, b in zip(f64.layers, f32.layers):
        assert b.stable_rank == pytest.approx(a.stable_rank, rel=1e-4)
        assert b.spectral_norm == pytest.approx(a.spectral_norm, rel=1e-5)


def test_batched_equal_shapes_equal_one_at_a_time():
    matrices = sample_matrices()
    model_map = map_model(Bag(matrices), include=["tall*"])
    together = SpectralEngine().analyze(model_map)
    alone = SpectralEngine(max_batch_bytes=1).analyze(model_map)  # forces batches of one
    assert together.layers == alone.layers


def test_nan_matrix_is_flagged_and_others_are_unaffected(gpt2_model):
    clean = analyze(gpt2_model)
    with torch.no_grad():
        gpt2_model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    engine = SpectralEngine()
    with pytest.warns(RuntimeWarning, match="NaN/Inf") as record:
        dirty = engine.analyze(gpt2_model)
    assert len([w for w in record if "NaN/Inf" in str(w.message)]) == 1
    bad = dirty.layer("L01_mlp_in")
    assert not bad.finite and math.isnan(bad.alpha) and math.isnan(bad.stable_rank)
    for before, after in zip(clean.layers, dirty.layers):
        if after.key != "L01_mlp_in":
            assert before == after
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same matrix does not warn again
        engine.analyze(gpt2_model)


def test_alpha_agrees_with_weightwatcher_analyze():
    weightwatcher = pytest.importorskip("weightwatcher")
    torch.manual_seed(1)
    # Heavy-tailed weights (as trained layers have) so that the fits are non-trivial.
    layers = [nn.Linear(256, 128), nn.Linear(128, 384), nn.Linear(384, 200)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.distributions.StudentT(3.0).sample(layer.weight.shape) * 0.05)
    model = nn.Sequential(*layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = analyze(model)
        details = weightwatcher.WeightWatcher(model=model).analyze()
    theirs = details["alpha"].to_numpy()
    assert len(theirs) == 3
    for layer, alpha in zip(ours.layers, theirs):
        assert abs(layer.alpha - alpha) <= 0.02, (layer.key, layer.alpha, alpha)


def test_invalid_engine_options_raise():
    with pytest.raises(ValueError, match="method"):
        SpectralEngine(method="qr")
    with pytest.raises(ValueError, match="dtype"):
        SpectralEngine(dtype="float16")


def test_keep_eigenvalues_returns_the_spectrum(gpt2_model):
    snapshot = SpectralEngine(keep_eigenvalues=True).analyze(gpt2_model)
    layer = snapshot.layer("L00_q")
    w = map_model(gpt2_model).get("L00_q").weight().double().numpy()
    expected = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
    np.testing.assert_allclose(layer.eigenvalues, expected, rtol=1e-8, atol=1e-12)
