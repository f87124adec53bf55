"""The CUDA paths of the core, against float64 references on the CPU (skipped without a GPU; run by
benchmarks/gpu_check.sh on the device)."""

from __future__ import annotations

import math

import pytest
import torch

from spectral_plugins import SpectralEngine, map_model
from spectral_plugins.core.fast_lane import FastLane

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def minilm(path: str, device: str) -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).to(device)


def test_batched_gpu_eigensolve_matches_float64_cpu(minilm_path):
    """Equal-shape matrices go through one batched eigvalsh on CUDA; norms and stable rank agree with
    the float64 CPU engine to float32 accuracy, alpha within 0.02."""
    gpu = SpectralEngine().analyze(map_model(minilm(minilm_path, "cuda")))
    cpu = SpectralEngine().analyze(map_model(minilm(minilm_path, "cpu")))
    assert gpu.device.startswith("cuda") and gpu.dtype == "float32" and cpu.dtype == "float64"
    for a, b in zip(gpu.layers, cpu.layers):
        assert a.key == b.key
        assert math.isclose(a.spectral_norm, b.spectral_norm, rel_tol=1e-5)
        assert math.isclose(a.stable_rank, b.stable_rank, rel_tol=1e-4)
        assert abs(a.alpha - b.alpha) <= 0.02, (a.key, a.alpha, b.alpha)


def test_tf32_guard_keeps_float32_gram_exact_and_restores_the_flag(minilm_path):
    model_map = map_model(minilm(minilm_path, "cuda"))
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = SpectralEngine(dtype="float32").analyze(model_map)
        torch.backends.cuda.matmul.allow_tf32 = True
        guarded = SpectralEngine(dtype="float32").analyze(model_map)
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored after the product
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    for a, b in zip(exact.layers, guarded.layers):
        assert a.stable_rank == b.stable_rank and a.spectral_norm == b.spectral_norm
        assert a.alpha == b.alpha or (math.isnan(a.alpha) and math.isnan(b.alpha))


def test_float32_alpha_on_gpu_against_float64(minilm_path):
    """Issue 17's accuracy target for the GPU default: |d alpha| <= 0.02 against float64."""
    model_map = map_model(minilm(minilm_path, "cuda"))
    single = SpectralEngine(dtype="float32").analyze(model_map)
    double = SpectralEngine(dtype="float64").analyze(model_map)
    worst = max(abs(a.alpha - b.alpha) for a, b in zip(single.layers, double.layers)
                if math.isfinite(a.alpha) and math.isfinite(b.alpha))
    assert worst <= 0.02, worst


def test_fast_lane_on_gpu_matches_float64_svd(minilm_path):
    model_map = map_model(minilm(minilm_path, "cuda"))
    measure = FastLane(model_map).measure(0)
    for ref, value in zip(model_map.matrices, measure.stable_rank):
        singular = torch.linalg.svdvals(ref.weight().double().cpu())
        exact = float(singular.square().sum() / singular[0] ** 2)
        assert abs(value - exact) / exact < 1e-3, ref.key
