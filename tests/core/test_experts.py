"""Mixtures of experts: one matrix per expert (views of 3-D tensors, or per-expert nn.Linear lists),
the router role, and the per-layer aggregate over experts that is published by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spectral_plugins import SpectralTracker, analyze, map_model, map_state_dict
from spectral_plugins.lifecycle.history import parse_key
from tests.publishers import RecordingPublisher

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXPERTS = 4


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                                            num_local_experts=EXPERTS, num_experts_per_tok=2))


def shares_storage(view: torch.Tensor, parameter: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == parameter.untyped_storage().data_ptr()


def test_mixtral_3d_experts_become_one_view_per_expert_that_computes_the_expert():
    model = tiny_mixtral()
    model_map = map_model(model)
    layer = model.model.layers[1].mlp
    assert model_map.get("L01_router").name == "model.layers.1.mlp.gate.weight"
    x = torch.randn(5, 32)
    for e in range(EXPERTS):
        gate, up, down = (model_map.get(f"L01_{role}_e{e}") for role in ("mlp_gate", "mlp_in", "mlp_out"))
        assert (gate.expert, gate.stack, gate.depth) == (e, None, 1)
        assert gate.shape == up.shape == (48, 32) and down.shape == (32, 48)
        for ref in (gate, up, down):
            assert shares_storage(ref.weight(), ref.source)  # views, not copies
            # A background snapshot's copy of the 3-D source is read the same way.
            torch.testing.assert_close(ref.with_source(ref.source.detach().clone()).weight(), ref.weight())
        want_gate, want_up = nn.functional.linear(x, layer.experts.gate_up_proj[e]).chunk(2, dim=-1)
        torch.testing.assert_close(x @ gate.weight().T, want_gate)
        torch.testing.assert_close(x @ up.weight().T, want_up)
        hidden = torch.randn(5, 48)
        torch.testing.assert_close(hidden @ down.weight().T,
                                   nn.functional.linear(hidden, layer.experts.down_proj[e]))
    per_layer = [m for m in model_map if m.depth == 0 and m.expert is not None]
    assert len(per_layer) == 3 * EXPERTS
    assert sum(m.shape[0] * m.shape[1] for m in per_layer) == \
        layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel()  # every weight present
    assert len({m.key for m in model_map}) == len(model_map)
    # The same map from a state dict and its config.
    from_state = map_state_dict(model.state_dict(), config=model.config.to_dict())
    assert [(m.key, m.role, m.shape) for m in from_state] == [(m.key, m.role, m.shape) for m in model_map]


def test_expert_spectra_match_float64_svd_and_are_published_as_mean_min_max():
    model = tiny_mixtral()
    snapshot = analyze(model)
    experts = [layer for layer in snapshot if layer.depth == 0 and layer.role == "mlp_out"]
    assert [layer.expert for layer in experts] == list(range(EXPERTS))
    for layer in experts:
        s = torch.linalg.svdvals(model.model.layers[0].mlp.experts.down_proj[layer.expert].detach().double())
        assert layer.stable_rank == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-9)
    scalars = snapshot.scalars(["stable_rank"])
    values = np.array([layer.stable_rank for layer in experts])
    assert scalars["spectral_stable_rank/L00_mlp_out_experts_mean"] == pytest.approx(values.mean())
    assert scalars["spectral_stable_rank/L00_mlp_out_experts_min"] == pytest.approx(values.min())
    assert scalars["spectral_stable_rank/L00_mlp_out_experts_max"] == pytest.approx(values.max())
    assert not any("_e0" in key for key in scalars)
    every = snapshot.scalars(["stable_rank"], per_expert=True)
    assert every["spectral_stable_rank/L00_mlp_out_e2"] == pytest.approx(values[2])
    assert set(scalars) < set(every)
    assert parse_key("L00_mlp_out_experts_mean") == (None, 0, "mlp_out")
    assert parse_key("L00_mlp_out_experts_max") == (None, 0, "other")
    assert parse_key("decoder_L01_mlp_in_e3") == ("decoder", 1, "mlp_in")


def test_tracker_publishes_the_aggregate_by_default_and_every_expert_on_request():
    model = tiny_mixtral()
    published = {}
    for per_expert in (False, True):
        recorder = RecordingPublisher()
        tracker = SpectralTracker(model, every_n_steps=1, publishers=[recorder], metrics=["alpha"],
                                  heatmap=False, history=False, per_expert=per_expert)
        tracker.step(1)
        tracker.finish()
        published[per_expert] = set(recorder.reports[0].scalars())
    assert "spectral_alpha/L01_mlp_gate_experts_mean" in published[False]
    assert "spectral_alpha/L01_mlp_gate_e3" not in published[False]
    assert "spectral_alpha/L01_mlp_gate_e3" in published[True]


class TransposedExperts(nn.Module):
    """Experts stored [experts, in, out] (as some implementations do), flagged by ``is_transposed``."""

    def __init__(self) -> None:
        super().__init__()
        self.is_transposed = True
        self.gate_up_proj = nn.Parameter(torch.randn(3, 16, 2 * 24))
        self.down_proj = nn.Parameter(torch.randn(3, 24, 16))


def test_transposed_expert_tensors_and_per_expert_linear_lists():
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Module() for _ in range(2))
    for block in model.layers:
        block.attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16), "k_proj": nn.Linear(16, 16)})
        block.mlp = nn.Module()
        block.mlp.router = nn.Linear(16, 3)
        block.mlp.experts = TransposedExperts()
    model_map = map_model(model)
    up = model_map.get("L01_mlp_in_e2")
    assert up.shape == (24, 16)
    torch.testing.assert_close(up.weight(), model.layers[1].mlp.experts.gate_up_proj[2][:, 24:].T)
    assert model_map.get("L01_mlp_out_e0").shape == (16, 24)
    assert model_map.get("L00_router").role == "router"
    # Per-expert nn.Linear lists (Switch Transformers' experts.expert_N.wi / wo, two stacks).
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    switch = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(
        num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=64,
        num_experts=EXPERTS, encoder_sparse_step=1, decoder_sparse_step=1))
    switch_map = map_model(switch)
    wo = switch_map.get("decoder_L01_mlp_out_e3")
    assert wo.name == "decoder.block.1.layer.2.mlp.experts.expert_3.wo.weight" and wo.expert == 3
    assert switch_map.get("encoder_L00_router").name == "encoder.block.0.layer.1.mlp.router.classifier.weight"
    assert len([m for m in switch_map if m.expert is not None]) == 2 * 2 * 2 * EXPERTS


def test_a_checkpoint_lists_no_expert_tensor_as_skipped():
    from spectral_plugins.core.checkpoints import skipped_tensors

    state = tiny_mixtral().state_dict()
    assert skipped_tensors(state).convolution == ()
    state["conv.weight"] = torch.randn(4, 3, 2, 2)  # a real convolution is still reported
    assert [name for name, _ in skipped_tensors(state).convolution] == ["conv.weight"]
