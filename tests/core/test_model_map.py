"""The model map on real architectures built from configs (random weights) and on real MiniLM."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from spectral_plugins import ROLES, analyze, map_model
from tests.conftest import tiny_gpt2

BLOCK_ROLES_MHA = ["q", "k", "v", "o", "mlp_in", "mlp_out"]


def roles_by_depth(model_map) -> dict[int, list[str]]:
    result: dict[int, list[str]] = {}
    for ref in model_map:
        if ref.depth is not None:
            result.setdefault(ref.depth, []).append(ref.role)
    return result


def shares_storage(view: torch.Tensor, parameter: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == parameter.untyped_storage().data_ptr()


def test_gpt2_fused_c_attn_is_split_into_views_that_compute_q_k_v():
    model = tiny_gpt2(n_layer=2, n_embd=32, n_head=4)
    model_map = map_model(model)
    assert model_map.blocks_path == "transformer.h" and model_map.num_blocks == 2
    assert roles_by_depth(model_map) == {0: BLOCK_ROLES_MHA, 1: BLOCK_ROLES_MHA}
    attn = model.transformer.h[1].attn
    x = torch.randn(5, 32)
    fused = attn.c_attn(x)
    for i, role in enumerate("qkv"):
        ref = model_map.get(f"L01_{role}")
        assert ref.shape == (32, 32) and ref.num_heads == 4 and ref.head_dim == 8
        assert shares_storage(ref.weight(), attn.c_attn.weight)  # a view, not a copy
        torch.testing.assert_close(x @ ref.weight().T + ref.bias(), fused[:, 32 * i:32 * (i + 1)])
    # Tied embedding / lm_head: analysed once, as the embedding.
    embeds = model_map.by_role("embed")
    assert len(embeds) == 1 and embeds[0].tied_names == ("lm_head.weight",)
    assert not model_map.by_role("lm_head")
    assert model_map.get("pos_embed").role == "pos_embed"


def test_gpt_neox_interleaved_query_key_value_matches_the_models_own_split():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           vocab_size=64)
    model = GPTNeoXForCausalLM(config)
    model_map = map_model(model)
    assert roles_by_depth(model_map)[1] == BLOCK_ROLES_MHA
    layer = model.gpt_neox.layers[0].attention.query_key_value
    x = torch.randn(3, 32)
    per_head = layer(x).view(3, 4, 3 * 8)  # NeoX: (heads, [q|k|v] of head_dim each)
    for i, role in enumerate("qkv"):
        ref = model_map.get(f"L00_{role}")
        expected = per_head[:, :, 8 * i:8 * (i + 1)].reshape(3, 32)
        torch.testing.assert_close(x @ ref.weight().T + ref.bias(), expected)
    assert model_map.get("lm_head").role == "lm_head"


def test_llama_grouped_query_attention_and_gated_mlp():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=64)
    model_map = map_model(LlamaForCausalLM(config))
    assert roles_by_depth(model_map)[0] == ["q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out"]
    q, k, v = (model_map.get(f"L01_{r}") for r in "qkv")
    assert (q.num_heads, k.num_heads, v.num_heads) == (8, 2, 2)
    assert q.head_dim == k.head_dim == 8
    assert k.shape == (16, 64)


def test_bert_roles():
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        vocab_size=64)
    model_map = map_model(BertModel(config))
    assert roles_by_depth(model_map) == {0: BLOCK_ROLES_MHA, 1: BLOCK_ROLES_MHA}
    assert model_map.get("L00_o").module_name == "encoder.layer.0.attention.output.dense"
    assert model_map.get("L00_mlp_out").module_name == "encoder.layer.0.output.dense"
    assert {r.role for r in model_map if r.depth is None} == {"embed", "pos_embed", "other"}


def test_torch_transformer_encoder_in_proj_weight():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64), num_layers=2,
                                    enable_nested_tensor=False)
    model_map = map_model(encoder)
    assert roles_by_depth(model_map) == {0: BLOCK_ROLES_MHA, 1: BLOCK_ROLES_MHA}
    q = model_map.get("L00_q")
    assert q.name == "layers.0.self_attn.in_proj_weight[q]" and q.num_heads == 4 and q.head_dim == 8
    assert shares_storage(q.weight(), encoder.layers[0].self_attn.in_proj_weight)


def test_multihead_attention_with_separate_projections():
    attention = nn.MultiheadAttention(32, 4, kdim=16, vdim=24)
    model_map = map_model(attention)
    assert [r.role for r in model_map] == ["q", "k", "v", "o"]
    assert model_map.get("k").shape == (32, 16)


def test_plain_mlp_gets_depths_and_one_warning():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    with pytest.warns(UserWarning, match="no recognised role") as record:
        model_map = map_model(mlp)
    assert len(record) == 1
    assert [(r.depth, r.role, r.shape) for r in model_map] == [(0, "other", (20, 10)), (1, "other", (20, 20)),
                                                               (2, "other", (3, 20))]


class UnknownNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cells = nn.ModuleList([nn.ModuleDict({"mix": nn.Linear(8, 8), "squash": nn.Linear(8, 4)})
                                    for _ in range(3)])
        self.readout = nn.Parameter(torch.randn(4, 6))


def test_unknown_architecture_maps_every_matrix_as_other_with_one_warning():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model_map = map_model(UnknownNet())
    assert len([w for w in record if "no recognised role" in str(w.message)]) == 1
    assert len(model_map) == 7 and {r.role for r in model_map} == {"other"}
    assert sorted({r.depth for r in model_map}, key=str) == [0, 1, 2, None]
    assert len({r.key for r in model_map}) == 7  # keys stay unique


def test_role_overrides_include_and_exclude():
    model_map = map_model(UnknownNet(), roles={"cells.*.mix": "q", "cells.*.squash": "mlp_in"})
    assert [r.role for r in model_map if r.depth == 0] == ["q", "mlp_in"]
    only_q = map_model(UnknownNet(), roles={"cells.*.mix": "q"}, include=["*_q"])
    assert len(only_q) == 3
    without = map_model(tiny_gpt2(), exclude=["*wte*", "*wpe*"])
    assert all(r.depth is not None for r in without)


def test_names_and_keys_are_stable_across_builds():
    first, second = map_model(tiny_gpt2()), map_model(tiny_gpt2())
    assert [(r.name, r.key) for r in first] == [(r.name, r.key) for r in second]
    assert len({r.name for r in first}) == len(first)


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        map_model({"weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="no 2-D weight"):
        map_model(nn.LayerNorm(8))
    with pytest.raises(ValueError, match="matches no module"):
        map_model(tiny_gpt2(), roles={"encoder.nothing.*": "q"})
    with pytest.raises(ValueError, match="unknown role"):
        map_model(tiny_gpt2(), roles={"transformer.h.0.mlp.c_fc": "mlp_middle"})
    with pytest.raises(ValueError, match=r"include=\['nothing\*'\] matched none of the"):
        map_model(tiny_gpt2(), include=["nothing*"])
    with pytest.raises(ValueError, match=r"exclude=\['\*'\] dropped all"):
        map_model(tiny_gpt2(), exclude="*")
    with pytest.warns(UserWarning, match=r"include pattern\(s\) \['typo\*'\] matched no weight matrix"):
        kept = map_model(tiny_gpt2(), include=["*attn*", "typo*"])
    assert len(kept) and all("attn" in m.name for m in kept)


def test_pretrained_minilm_maps_to_six_blocks_with_plausible_metrics(minilm_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path)
    model_map = map_model(model)
    assert model_map.num_blocks == 6
    assert roles_by_depth(model_map) == {d: BLOCK_ROLES_MHA for d in range(6)}
    assert model_map.get("L00_q").num_heads == 12 and model_map.get("L00_q").head_dim == 32
    snapshot = analyze(model_map)
    for layer in snapshot.layers:
        if layer.depth is None:
            continue
        assert layer.finite
        assert 1.5 < layer.alpha < 12, layer
        # Trained weights: stable rank far below the full rank min(m, n).
        assert layer.stable_rank < 0.25 * min(layer.shape), layer
        assert 1 <= layer.effective_rank <= min(layer.shape)
    assert set(ROLES) >= {layer.role for layer in snapshot.layers}


def test_a_user_position_embedding_is_pos_embed_and_other_matrices_are_named_once() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(10, 8)
            self.pos = nn.Embedding(4, 8)
            self.pooler = nn.Sequential()
            self.pooler.dense = nn.Linear(8, 8)

    with pytest.warns(UserWarning, match=r"\(pooler\.dense\.weight\)\. Set a role with "
                                          r"roles=\{'pooler\.dense': 'mlp_in'\}") as caught:
        model_map = map_model(Encoder())
    assert len(caught) == 1
    assert [(ref.key, ref.role) for ref in model_map] == [
        ("embed", "embed"), ("pos_embed", "pos_embed"), ("other", "other")]
