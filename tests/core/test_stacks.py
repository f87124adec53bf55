"""Models of several stacks of blocks (encoder/decoder, text/vision towers): stacks, depths within each,
cross-attention roles, per-stack keys, and the lifecycle, heatmaps and attention bounds per stack."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from spectral_plugins import analyze, attention_bounds, map_model, map_state_dict
from spectral_plugins.core.heatmap import heatmaps
from spectral_plugins.core.stacks import block_layout
from spectral_plugins.lifecycle.history import SpectralHistory, parse_key
from spectral_plugins.lifecycle.signals import LifecycleConfig, lifecycle_state, summarize
from tests.synthetic import wave_history

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SELF_MLP = ["q", "k", "v", "o", "mlp_in", "mlp_out"]
CROSS = ["q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o", "mlp_in", "mlp_out"]


def block_roles(model_map, stack, depth=0) -> list[str]:
    return [m.role for m in model_map.by_depth(depth, stack) if m.role != "pos_embed"]


def tutorial_model() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.Sequential(nn.Embedding(64, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Linear(32, 64))


def test_sequential_tutorial_depth_comes_from_the_inner_block_list_not_the_sequential_index():
    model_map = map_model(tutorial_model())
    assert [(s.name, s.blocks_path, s.num_blocks) for s in model_map.stacks] == [(None, "1.layers", 2)]
    blocks = [f"L0{d}_{r}" for d in (0, 1) for r in SELF_MLP]
    assert [m.key for m in model_map] == ["embed", *blocks, "lm_head"]
    assert model_map.get("lm_head").name == "2.weight"


def test_torch_transformer_has_an_encoder_and_a_decoder_stack_with_cross_attention():
    model = nn.Transformer(32, 4, 2, 3, 64, batch_first=True)
    model_map = map_model(model)
    assert [(s.name, s.blocks_path, s.num_blocks) for s in model_map.stacks] == [
        ("encoder", "encoder.layers", 2), ("decoder", "decoder.layers", 3)]
    assert model_map.num_blocks == 5
    assert block_roles(model_map, "encoder", 1) == SELF_MLP
    assert block_roles(model_map, "decoder", 2) == CROSS
    cross_k = model_map.get("decoder_L02_cross_k")
    assert cross_k.name == "decoder.layers.2.multihead_attn.in_proj_weight[k]"
    attn = model.decoder.layers[2].multihead_attn  # the view computes the cross-attention's keys
    memory = torch.randn(5, 32)
    expected = memory @ attn.in_proj_weight[32:64].T + attn.in_proj_bias[32:64]
    torch.testing.assert_close(memory @ cross_k.weight().T + cross_k.bias(), expected)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_hugging_face_encoder_decoder_every_block_matrix_has_stack_depth_and_role(kind):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    if kind == "t5":
        model = T5ForConditionalGeneration(T5Config(num_layers=2, num_decoder_layers=3, d_model=32, d_kv=8,
                                                    num_heads=4, d_ff=64, vocab_size=64))
    else:
        model = BartForConditionalGeneration(BartConfig(
            encoder_layers=2, decoder_layers=3, d_model=32, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
            max_position_embeddings=64))
    model_map = map_model(model)
    assert [(s.name, s.num_blocks) for s in model_map.stacks] == [("encoder", 2), ("decoder", 3)]
    for ref in model_map:
        if ".layers." in ref.name or ".block." in ref.name:
            assert ref.stack in ("encoder", "decoder") and ref.depth is not None and ref.role != "other", ref
            assert ref.key.startswith(f"{ref.stack}_L0{ref.depth}_")
    for depth in range(3):
        assert block_roles(model_map, "decoder", depth) == CROSS
    assert block_roles(model_map, "encoder", 1) == SELF_MLP
    assert model_map.get("embed").stack is None  # the shared token embedding belongs to no stack
    assert len({m.key for m in model_map}) == len(model_map)
    # A state dict maps to the same stacks, depths, roles and keys as the live model.
    from_state = map_state_dict(model.state_dict(), config=model.config.to_dict())
    assert [(m.key, m.stack, m.depth, m.role) for m in from_state if m.depth is not None] == \
        [(m.key, m.stack, m.depth, m.role) for m in model_map if m.depth is not None]


def test_clip_text_and_vision_towers_are_stacks_and_own_their_embeddings():
    from transformers import CLIPConfig, CLIPModel

    text = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                  image_size=16, patch_size=8)
    model_map = map_model(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)))
    assert [(s.name, s.root, s.num_blocks) for s in model_map.stacks] == [
        ("text", "text_model", 2), ("vision", "vision_model", 3)]
    assert block_roles(model_map, "vision", 2) == SELF_MLP
    assert {m.key: m.stack for m in model_map if m.depth is None and m.stack} == {
        "text_embed": "text", "text_pos_embed": "text", "vision_pos_embed": "vision"}
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", m.key) for m in model_map)


def test_block_lists_are_found_by_repetition_and_experts_or_heads_are_not_blocks():
    shape = (8, 8)
    layout = block_layout([("stages.0.blocks.0.attn.q", shape), ("stages.0.blocks.1.attn.q", shape),
                           ("stages.1.blocks.0.attn.q", (16, 16)), ("stages.1.blocks.1.attn.q", (16, 16)),
                           ("stages.1.blocks.1.moe.experts.3.w1", shape), ("net.blk.0.sa.heads.2.key", shape),
                           ("net.blk.1.sa.heads.2.key", shape)])
    assert [(s.name, s.num_blocks) for s in layout.stacks] == [("stages_0", 2), ("stages_1", 2),
                                                               ("net_blk", 2)]
    assert layout.place("stages.1.blocks.1.moe.experts.3.w1") == ("stages_1", 1)
    assert layout.place("net.blk.1.sa.heads.2.key") == ("net_blk", 1)


def test_keys_parse_back_into_stack_depth_and_role():
    assert parse_key("decoder_L03_cross_k") == ("decoder", 3, "cross_k")
    assert parse_key("image_tower_L10_mlp_in_fc") == ("image_tower", 10, "mlp_in")
    assert parse_key("L03_q") == (None, 3, "q")
    assert parse_key("vision_pos_embed") == ("vision", None, "pos_embed")
    assert parse_key("other_text_projection") == (None, None, "other")


def two_stack_history(encoder: SpectralHistory, decoder: SpectralHistory) -> SpectralHistory:
    """One history holding two single-stack histories as the stacks ``encoder`` and ``decoder``."""
    merged = SpectralHistory(max_steps=4096)
    columns = [(f"{stack}_{info.key}", history, j)
               for stack, history in (("encoder", encoder), ("decoder", decoder))
               for j, info in enumerate(history.matrices)]
    values = {m: np.column_stack([h.values(m)[:, j] for _, h, j in columns]) for m in merged.metrics}
    for t, step in enumerate(encoder.steps):
        merged.append_values(int(step), {key: [values[m][t, c] for m in merged.metrics]
                                         for c, (key, _, _) in enumerate(columns)})
    return merged


def test_lifecycle_per_stack_equals_each_stack_analysed_alone():
    config = LifecycleConfig(fit_timescales=False)
    encoder = wave_history(num_blocks=6, speed=2.0, last=6000, interval=50)
    decoder = wave_history(num_blocks=4, speed=1.0, t0=1000.0, last=6000, interval=50)
    merged = two_stack_history(encoder, decoder)
    assert merged.stacks == ("encoder", "decoder") and merged.num_blocks == 10
    summary, alone = summarize(merged, config), {"encoder": summarize(encoder, config),
                                                   "decoder": summarize(decoder, config)}
    for stack, single in alone.items():
        for group in config.groups:
            mine, theirs = summary.group(group, stack), single.group(group)
            assert mine.label == f"{stack}_{group}" and mine.num_blocks == theirs.num_blocks
            assert mine.wave_speed == pytest.approx(theirs.wave_speed, nan_ok=True)
            assert mine.reversal_step == pytest.approx(theirs.reversal_step, nan_ok=True)
            np.testing.assert_allclose(mine.settled_alpha, theirs.settled_alpha)
    assert alone["encoder"].group("qk").wave_speed == pytest.approx(2.0, rel=0.02)
    assert alone["decoder"].group("qk").wave_speed == pytest.approx(1.0, rel=0.02)
    state, scalars = lifecycle_state(merged, config), summary.scalars()
    assert state.scalars()["spectral_lifecycle/wave_front_depth/decoder_qk"] == pytest.approx(
        lifecycle_state(decoder, config).group("qk").front_depth)
    assert scalars["spectral_lifecycle/wave_speed/encoder_qk"] == pytest.approx(2.0, rel=0.02)
    assert "spectral_lifecycle/qk_vo_asymmetry/decoder" in state.scalars()
    assert {k for k in scalars if "prune_rank" in k} == {
        *(f"spectral_lifecycle/prune_rank/encoder_L{d:02d}" for d in range(6)),
        *(f"spectral_lifecycle/prune_rank/decoder_L{d:02d}" for d in range(4))}
    # Read back from tracker scalars, the stacks are recovered from the keys.
    tags = {f"spectral_stable_rank/{info.key}": list(zip(merged.steps, merged.values("stable_rank")[:, j]))
            for j, info in enumerate(merged.matrices)}
    tags |= {f"spectral_alpha/{info.key}": list(zip(merged.steps, merged.values("alpha")[:, j]))
             for j, info in enumerate(merged.matrices)}
    back = SpectralHistory.from_scalars(tags)
    assert set(back.stacks) == {"encoder", "decoder"}
    assert summarize(back, config).group("qk", "encoder").wave_speed == pytest.approx(
        summary.group("qk", "encoder").wave_speed)


def test_heatmap_rows_and_attention_sites_per_stack():
    model = nn.Transformer(16, 2, 2, 1, 32, batch_first=True)
    snapshot = analyze(model)
    grid = heatmaps(snapshot, ["stable_rank"])[0]
    assert grid.row_labels == ("encoder 0", "encoder 1", "decoder 0")
    assert grid.roles[:8] == ("q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o")
    cell = snapshot.layer("decoder_L00_cross_k").stable_rank
    assert grid.values[2, grid.roles.index("cross_k")] == pytest.approx(cell)
    assert np.isnan(grid.values[0, grid.roles.index("cross_k")])  # the encoder has no cross-attention
    bounds = attention_bounds(model)
    assert [b.key for b in bounds.layers] == ["encoder_L00_attn", "encoder_L01_attn", "decoder_L00_attn",
                                              "decoder_L00_cross_attn"]
    cross = next(b for b in bounds.layers if b.key == "decoder_L00_cross_attn")
    assert cross.q_name.startswith("decoder.layers.0.multihead_attn")


def test_the_run_report_shows_every_stack(tmp_path):
    from spectral_plugins.runs.report import render_report

    encoder = wave_history(num_blocks=4, speed=2.0, last=3000, interval=100)
    decoder = wave_history(num_blocks=3, speed=1.0, t0=1000.0, last=3000, interval=100)
    files = render_report(two_stack_history(encoder, decoder), tmp_path)
    page = files.html.read_text()
    for label in ("encoder_qk", "decoder_qk", "encoder_all", "decoder_all"):
        assert f"<td>{label}</td>" in page
    assert "Blocks in removal order (least important first, by alpha): encoder " in page
    assert "; decoder " in page
    assert files.png.stat().st_size > 10_000


def test_tensorboard_layout_has_one_chart_per_stack_and_role_group_matching_exactly_its_keys():
    import re as regex

    from spectral_plugins.adapters.tensorboard import custom_scalars_layout
    from spectral_plugins.lifecycle.history import ROLE_GROUPS

    snapshot = analyze(nn.Transformer(16, 2, 2, 1, 32, batch_first=True))
    charts = custom_scalars_layout(snapshot, ["alpha"])["spectral_alpha"]
    tags = [f"spectral_alpha/{layer.key}" for layer in snapshot]
    for name, (_, (pattern,)) in charts.items():
        stack, group = name.removeprefix("alpha · ").split(" ")
        roles = ROLE_GROUPS.get(group) or [r for r in ROLE_GROUPS["all"] if r.startswith("cross_")]
        matched = [t for t in tags if regex.match(pattern, t)]  # TensorBoard matches from the start
        assert matched == [f"spectral_alpha/{layer.key}" for layer in snapshot
                           if layer.stack == stack and layer.role in roles], name
    assert "alpha · decoder cross" in charts and "alpha · encoder cross" not in charts
