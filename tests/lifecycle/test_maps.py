"""Lifecycle maps: one panel per role group, one row per stack in a model of several stacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spectral_plugins import SpectralEngine
from spectral_plugins.lifecycle.maps import lifecycle_map
from spectral_plugins.lifecycle.signals import SpectralLifecycle

pytest.importorskip("matplotlib")


def two_stack_lifecycle() -> SpectralLifecycle:
    """Snapshots of a small encoder-decoder (2 encoder, 3 decoder blocks), weights shrunk in between."""
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 2, 3, 32, batch_first=True)
    engine, lifecycle = SpectralEngine(), SpectralLifecycle()
    for step in (0, 10, 20):
        lifecycle.update(engine.analyze(model, step=step))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(0.9).add_(0.01 * torch.randn_like(parameter))
    return lifecycle


def test_a_two_stack_model_gets_a_row_of_panels_per_stack() -> None:
    lifecycle = two_stack_lifecycle()
    history = lifecycle.history
    assert history.stacks == ("encoder", "decoder")
    stable = lifecycle_map(history, "stable_rank")
    assert [(p.stack, p.group) for p in stable.panels] == [
        ("encoder", "qk"), ("encoder", "vo"), ("encoder", "mlp"),
        ("decoder", "qk"), ("decoder", "vo"), ("decoder", "mlp")]
    assert [p.label for p in stable.panels[:1] + stable.panels[3:4]] == ["encoder qk", "decoder qk"]
    for panel in stable.panels:  # each panel is its own stack's profile (independent read of the history)
        expected = history.profile("stable_rank", panel.group, normalise=True, stack=panel.stack)
        np.testing.assert_array_equal(panel.depths, expected.depths)
        np.testing.assert_array_equal(panel.values, expected.values)
    assert [len(p.depths) for p in stable.panels] == [2, 2, 2, 3, 3, 3]
    assert stable.grid == (2, 3)
    image = stable.to_rgb()  # 100 dpi: 3.4 in per row, 3.6 in per column + 1.2 in for the colour bar
    assert image.shape == (680, 1200, 3)
    assert stable.to_rgb() is image  # drawn once, however many publishers ask
    assert lifecycle_map(history, "stable_rank", groups=("qk",)).grid == (2, 1)


def test_a_single_stack_model_keeps_one_row_without_stack_names() -> None:
    from spectral_plugins.demo.model import CharGPT, GPTConfig

    torch.manual_seed(0)
    model = CharGPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32))
    lifecycle = SpectralLifecycle()
    lifecycle.update(SpectralEngine().analyze(model, step=0))
    stable = lifecycle_map(lifecycle.history, "stable_rank")
    assert [p.label for p in stable.panels] == ["qk", "vo", "mlp"] and stable.grid == (1, 3)
    assert all(p.stack is None for p in stable.panels)
