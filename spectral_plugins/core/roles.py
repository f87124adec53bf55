"""How a weight's place in the module tree names its role: the naming conventions we recognise.

Rules look at the module path (``transformer.h.3.attn.c_attn``) only, so they work the same on a
live ``nn.Module`` and on a bare state dict. Add an architecture by adding names here.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES: tuple[str, ...] = (
    "q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o", "mlp_in", "mlp_gate", "mlp_out",
    "router", "embed", "pos_embed", "lm_head", "other",
)
# Cross-attention (a decoder attending to an encoder): q from this stack, k and v from the other.
CROSS_ROLES: tuple[str, ...] = ("cross_q", "cross_k", "cross_v", "cross_o")

# Path parts that mark an attention or an MLP sub-module.
_ATTENTION_PARTS = {
    "attn", "attention", "self_attn", "self_attention", "selfattention", "encdecattention",
    "crossattention", "cross_attn", "mha", "mixer", "encoder_attn", "multihead_attn", "cross_attention",
}
# Path parts that mark a cross-attention (T5, BERT decoder, BART, nn.TransformerDecoderLayer, ...).
_CROSS_PARTS = {"encdecattention", "crossattention", "cross_attn", "cross_attention", "encoder_attn",
                "multihead_attn"}
_MLP_PARTS = {"mlp", "ffn", "feed_forward", "feedforward", "densereludense", "intermediate", "ff"}

_QUERY = {"q_proj", "query", "wq", "q", "q_lin", "to_q", "q_attn"}
_KEY = {"k_proj", "key", "wk", "k", "k_lin", "to_k"}
_VALUE = {"v_proj", "value", "wv", "v", "v_lin", "to_v"}
_ATTN_OUT = {"o_proj", "out_proj", "out_lin", "to_out", "wo", "o", "c_proj", "dense", "proj", "out"}
_MLP_IN = {"up_proj", "c_fc", "fc1", "dense_h_to_4h", "fc_in", "lin1", "linear1", "wi", "w3", "wi_1", "w_in"}
_MLP_GATE = {"gate_proj", "w1", "wi_0", "gate"}
_MLP_OUT = {"down_proj", "fc2", "dense_4h_to_h", "fc_out", "lin2", "linear2", "w2", "wo", "c_proj", "w_out"}
_EMBED = {"wte", "embed_tokens", "word_embeddings", "embed_in", "tok_embeddings", "token_type_embeddings",
          "tok_emb", "token_embedding", "embedding", "embeddings", "shared"}
# A user's ``self.pos = nn.Embedding(...)`` is a position embedding too, so that every architecture
# keys it ``pos_embed`` (never ``embed_pos``, the key of a second token-like embedding).
_POS_EMBED = {"wpe", "position_embeddings", "embed_positions", "pos_emb", "pos_embedding",
              "position_embedding", "relative_attention_bias", "pos", "pos_embed", "wpos",
              "positional_embedding"}
_LM_HEAD = {"lm_head", "embed_out", "output", "head", "decoder", "unembed"}

# Fused q/k/v projections: stacked [q; k; v] along the output dimension ...
FUSED_STACKED = {"c_attn", "qkv", "wqkv", "qkv_proj", "in_proj"}
# ... or interleaved per head: output viewed as (heads, 3, head_dim) (GPT-NeoX / Pythia).
FUSED_INTERLEAVED = {"query_key_value"}


@dataclass(frozen=True)
class RoleGuess:
    """The role a path suggests; ``fused`` is "stacked" / "interleaved" for a fused q/k/v matrix
    (then ``role`` is "q" or "cross_q" and the split names the other two alike)."""

    role: str
    fused: str | None = None


def looks_like_embedding(module_path: str) -> bool:
    """Whether a state-dict path names an embedding table (no module type to look at)."""
    leaf = module_path.rsplit(".", 1)[-1].lower()
    return leaf in _EMBED or leaf in _POS_EMBED


def guess_role(module_path: str, param_name: str, kind: str, depth: int | None) -> RoleGuess:
    """Role of the weight ``param_name`` of the module at ``module_path``.

    Args:
        module_path: dotted path of the owning module ("" for the root).
        param_name: the parameter's own name ("weight", "in_proj_weight", ...).
        kind: "embedding", "linear", "conv1d" or "param" (a bare 2-D parameter).
        depth: block index, or None outside the repeated blocks.
    """
    guess = _guess_role(module_path, param_name, kind, depth)
    if guess.role in ("q", "k", "v", "o") and any(p.lower() in _CROSS_PARTS for p in module_path.split(".")):
        return RoleGuess(f"cross_{guess.role}", guess.fused)
    return guess


def _guess_role(module_path: str, param_name: str, kind: str, depth: int | None) -> RoleGuess:
    parts = [p.lower() for p in module_path.split(".") if p]
    leaf = parts[-1] if parts else ""
    if param_name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        return RoleGuess(param_name[0])
    if param_name == "in_proj_weight":
        return RoleGuess("q", fused="stacked")
    in_attention = any(p in _ATTENTION_PARTS for p in parts)
    in_mlp = any(p in _MLP_PARTS for p in parts)
    if kind == "embedding":
        return RoleGuess("pos_embed" if leaf in _POS_EMBED else "embed")
    if leaf in FUSED_INTERLEAVED:
        return RoleGuess("q", fused="interleaved")
    if leaf in FUSED_STACKED and not in_mlp:
        return RoleGuess("q", fused="stacked")
    if leaf in _QUERY and not in_mlp:
        return RoleGuess("q")
    if leaf in _KEY and not in_mlp:
        return RoleGuess("k")
    if leaf in _VALUE and not in_mlp:
        return RoleGuess("v")
    parent = parts[-2] if len(parts) > 1 else ""
    unambiguous_out = leaf in {"o_proj", "out_proj"}  # e.g. a bare nn.MultiheadAttention
    attention_out = in_attention and (leaf in _ATTN_OUT or parent in {"to_out", "output"})
    if not in_mlp and (unambiguous_out or attention_out):
        return RoleGuess("o")
    if leaf == "dense" and parent == "intermediate":  # BERT
        return RoleGuess("mlp_in")
    if leaf == "dense" and parent == "output" and depth is not None:  # BERT block output
        return RoleGuess("mlp_out")
    if depth is not None or in_mlp:
        for names, role in ((_MLP_GATE, "mlp_gate"), (_MLP_IN, "mlp_in"), (_MLP_OUT, "mlp_out")):
            if leaf in names and (in_mlp or leaf not in {"wo", "c_proj", "gate"}):
                return RoleGuess(role)
    if depth is None and leaf in _LM_HEAD:
        return RoleGuess("lm_head")
    return RoleGuess("other")
