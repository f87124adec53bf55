"""The architectures the model map is tested on, and what it finds in each: writes docs/architectures.md.

Every model is built from a config with tiny sizes and random weights (nothing is downloaded), mapped
with :func:`spectral_plugins.map_model`, and summarised in one table row; :func:`problems` lists what
would break the map's promises (a block matrix without stack, depth or role; two matrices sharing a
key; an unsafe key; an expert weight missing). tests/core/test_architectures.py checks every row.

    python scripts/architecture_table.py            # rewrite docs/architectures.md
    python scripts/architecture_table.py --check    # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spectral_plugins import map_model
from spectral_plugins.core.model_map import ModelMap

DOC = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_]+$")


class UnknownNet(nn.Module):
    """An architecture nobody told the map about: towers of unnamed linears and a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8))
                                    for _ in range(3))
        self.scale = nn.Parameter(torch.randn(8, 5))


class LegacyMoeBlock(nn.Module):
    """Mixtral's block as implementations before transformers 5 wrote it: one nn.Linear triple per
    expert (``block_sparse_moe.experts.N.w1/w2/w3``) and a linear router ``block_sparse_moe.gate``."""

    def __init__(self, width: int = 32, hidden: int = 48, experts: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict({n: nn.Linear(width, width, bias=False)
                                        for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.num_heads = heads
        self.block_sparse_moe = nn.Module()
        self.block_sparse_moe.gate = nn.Linear(width, experts, bias=False)
        self.block_sparse_moe.experts = nn.ModuleList(
            nn.ModuleDict({"w1": nn.Linear(width, hidden, bias=False),
                           "w2": nn.Linear(hidden, width, bias=False),
                           "w3": nn.Linear(width, hidden, bias=False)}) for _ in range(experts))


class LegacyMoe(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(64, 32)
        self.layers = nn.ModuleList(LegacyMoeBlock() for _ in range(layers))
        self.lm_head = nn.Linear(32, 64, bias=False)


def _hf(config_name: str, model_name: str, **config) -> nn.Module:
    import transformers

    return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))


def _clip() -> nn.Module:
    text = dict(_SMALL, num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    vision = {**_SMALL, "num_hidden_layers": 2, "image_size": 16, "patch_size": 8}
    del vision["vocab_size"]
    return _hf("CLIPConfig", "CLIPModel", text_config=text, vision_config=vision, projection_dim=16)


_SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=64)
_T5 = dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=64)

# name -> (what it exercises, builder)
ARCHITECTURES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "GPT-2": ("fused Conv1D c_attn, tied lm_head",
              lambda: _hf("GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                          n_positions=16, bos_token_id=0, eos_token_id=0)),
    "GPT-NeoX": ("per-head interleaved query_key_value",
                 lambda: _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", num_hidden_layers=2, **_SMALL)),
    "Llama (GQA)": ("grouped-query attention, gated MLP",
                    lambda: _hf("LlamaConfig", "LlamaForCausalLM", num_hidden_layers=2, num_key_value_heads=2,
                                **_SMALL)),
    "BERT": ("encoder only, post-norm",
             lambda: _hf("BertConfig", "BertModel", num_hidden_layers=2, **_SMALL)),
    "T5": ("encoder + decoder, cross-attention, relative position bias",
           lambda: _hf("T5Config", "T5ForConditionalGeneration", **_T5)),
    "BART": ("encoder + decoder, cross-attention, learned positions",
             lambda: _hf("BartConfig", "BartForConditionalGeneration", encoder_layers=2, decoder_layers=2,
                         d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, vocab_size=64, max_position_embeddings=64)),
    "ViT": ("vision encoder, classifier head",
            lambda: _hf("ViTConfig", "ViTForImageClassification", num_hidden_layers=2, hidden_size=32,
                        num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8,
                        num_labels=3)),
    "CLIP": ("text and vision towers", _clip),
    "Mixtral": ("mixture of experts as 3-D tensors (transformers 5), GQA",
                lambda: _hf("MixtralConfig", "MixtralForCausalLM", num_hidden_layers=2, num_key_value_heads=2,
                            num_local_experts=4, num_experts_per_tok=2, **_SMALL)),
    "Switch Transformers": ("encoder + decoder, one nn.Linear pair per expert",
                            lambda: _hf("SwitchTransformersConfig",
                                        "SwitchTransformersForConditionalGeneration", num_experts=4,
                                        encoder_sparse_step=1, decoder_sparse_step=1, **_T5)),
    "Legacy MoE (nn.Linear experts)": ("Mixtral naming before transformers 5: experts.N.w1/w2/w3",
                                       LegacyMoe),
    "nn.Transformer": ("PyTorch encoder + decoder, fused in_proj_weight",
                       lambda: nn.Transformer(32, 4, 2, 2, 64, batch_first=True)),
    "nn.Sequential tutorial": ("Embedding, TransformerEncoder, Linear in a Sequential",
                               lambda: nn.Sequential(nn.Embedding(64, 32), nn.TransformerEncoder(
                                   nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                   enable_nested_tensor=False), nn.Linear(32, 64))),
    "unknown architecture": ("no recognised names: every matrix role 'other', one warning", UnknownNet),
}
KNOWN_ROLES_EXPECTED = {name for name in ARCHITECTURES if name != "unknown architecture"}


def build(name: str) -> nn.Module:
    """The tiny random-weight model of one row (seeded, so rows are reproducible)."""
    torch.manual_seed(0)
    return ARCHITECTURES[name][1]()


def quiet_map(model: nn.Module) -> ModelMap:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return map_model(model)


@dataclass(frozen=True)
class Row:
    """What the map finds in one architecture."""

    name: str
    exercises: str
    stacks: str
    matrices: int
    in_blocks: int
    block_roles: str
    experts: str
    outside: str
    example_keys: str


def describe(name: str, model_map: ModelMap | None = None) -> Row:
    """The table row of architecture ``name``."""
    model_map = model_map or quiet_map(build(name))
    stacks = ", ".join(f"{s.name or '(single)'}: {s.num_blocks} x {s.blocks_path}" for s in model_map.stacks)
    in_blocks = [m for m in model_map if m.depth is not None]
    roles: list[str] = []
    for stack in model_map.stacks:
        first = [m.role for m in in_blocks if m.stack == stack.name and m.depth == 0 and m.expert is None]
        experts = sorted({m.role for m in in_blocks if m.stack == stack.name and m.depth == 0
                          and m.expert is not None})
        shown = " ".join(dict.fromkeys(first + [f"{r}[e]" for r in experts]))
        roles.append(f"{stack.name}: {shown}" if stack.name else shown)
    expert_refs = [m for m in model_map if m.expert is not None]
    experts = (f"{len({m.expert for m in expert_refs})} per layer, {len(expert_refs)} matrices"
               if expert_refs else "-")
    outside = " ".join(f"{m.key}" for m in model_map if m.depth is None) or "-"
    keys = [m.key for m in in_blocks]
    cross = [m.key for m in in_blocks if m.role.startswith("cross")][:1]
    expert = [m.key for m in in_blocks if m.expert is not None][:1]
    examples = ", ".join(dict.fromkeys([*keys[:1], *cross, *expert, *keys[-1:]])) or "-"
    return Row(name, ARCHITECTURES[name][0], stacks or "-", len(model_map), len(in_blocks), "; ".join(roles),
               experts, outside, examples)


def problems(name: str, model: nn.Module, model_map: ModelMap) -> list[str]:
    """Every broken promise of the map on this model (empty when all hold)."""
    found = []
    several = len(model_map.stacks) > 1
    keys = [m.key for m in model_map]
    if len(set(keys)) != len(keys):
        found.append(f"duplicate keys {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    found += [f"unsafe key {k!r}" for k in keys if not _SAFE_KEY.match(k)]
    block_lists = {s.blocks_path for s in model_map.stacks}
    for path, param in model.named_parameters():
        if param.ndim < 2 or not any(path.startswith(b + ".") for b in block_lists):
            continue
        refs = [m for m in model_map if m.name.split("[")[0] == path]
        if not refs:
            found.append(f"block matrix {path} not mapped")
        for m in refs:
            if m.depth is None or (several and m.stack is None):
                found.append(f"{m.name}: stack {m.stack!r}, depth {m.depth!r}")
            if name in KNOWN_ROLES_EXPECTED and m.role == "other":
                found.append(f"{m.name}: role 'other'")
        if param.ndim == 3:  # a tensor of experts: every expert's whole matrix is mapped
            covered = sum(m.shape[0] * m.shape[1] for m in refs)
            if covered != param.numel() or len({m.expert for m in refs}) != param.shape[0]:
                found.append(f"{path}: experts cover {covered} of {param.numel()} weights")
    return found


def markdown(rows: list[Row]) -> str:
    header = ("| architecture | exercises | stacks (blocks x block list) | matrices | in blocks "
              "| roles in block 0 | experts | outside the blocks | keys (first, cross, expert, last) |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        cells = (r.name, r.exercises, r.stacks, str(r.matrices), str(r.in_blocks), r.block_roles, r.experts,
                 r.outside, r.example_keys)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def document(rows: list[Row]) -> str:
    return f"""# Architectures the model map is tested on

Produced by `python scripts/architecture_table.py` (do not edit by hand); tests/core/test_architectures.py
checks one row per architecture: every matrix of a transformer block has a stack (where there are
several), a depth within it and a role; no two matrices share a key; every key uses only
`[A-Za-z0-9_]`; every expert weight is present. Models are built from configs with tiny sizes and
random weights (transformers {_transformers_version()}, torch {torch.__version__.split('+')[0]}).

Roles: `q k v o` self-attention, `cross_q cross_k cross_v cross_o` cross-attention (q from this
stack, k and v from the other one's output), `mlp_in mlp_gate mlp_out`, `router` (the gate of a
mixture of experts), `embed pos_embed lm_head`, `other`. `[e]` marks one matrix per expert
(keys `..._e0`, `..._e1`...). A model of several stacks prefixes every key of a stack with its
name (`decoder_L01_cross_k`); a single-stack model's keys have no prefix (`L01_q`).

{markdown(rows)}

{panels("BART")}
"""


def panels(name: str) -> str:
    """What a two-stack model's panels look like: the keys and labels it actually publishes."""
    from spectral_plugins import analyze, attention_bounds
    from spectral_plugins.adapters.tensorboard import custom_scalars_layout
    from spectral_plugins.core.heatmap import heatmaps
    from spectral_plugins.lifecycle.signals import SpectralLifecycle

    model = build(name)
    model_map = quiet_map(model)
    snapshot = analyze(model_map, step=0)
    lifecycle = SpectralLifecycle()
    lifecycle.update(snapshot)
    state = lifecycle.update(snapshot.with_step(25))
    groups = sorted({key.rsplit("/", 1)[1] for key in state.scalars() if key.count("/") == 2})
    charts = list(custom_scalars_layout(snapshot, ["alpha"])["spectral_alpha"])
    rows = heatmaps(snapshot, ["alpha"])[0].row_labels
    sites = [layer.key for layer in attention_bounds(model).layers]
    return f"""## A two-stack model's panels ({name})

- Per-matrix sections (`spectral_alpha/...`): one line per matrix, keyed with its stack
  (`{snapshot.layers[1].key}`, ..., `{model_map.by_role("cross_k")[0].key}`); the TensorBoard layout
  draws one chart per stack and role: {", ".join(f"`{c}`" for c in charts)}.
- Depth x role heatmap: one row per stack and block ({", ".join(f"`{r}`" for r in rows)}), the
  cross-attention roles as extra columns (empty in the encoder's rows).
- Lifecycle (`spectral_lifecycle/<signal>/<stack>_<group>`): every signal once per stack and role
  group, so the wave-front chart has the lines {", ".join(f"`{g}`" for g in groups)}; the Q/K vs
  V/O index is {" and ".join(f"`qk_vo_asymmetry/{s.name}`" for s in model_map.stacks)}.
- Attention bounds (`spectral_attention/<quantity>/<site>`): one site per self-attention and one per
  cross-attention: {", ".join(f"`{k}`" for k in sites)}.
"""


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/architectures.md is out of date")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in ARCHITECTURES:
        model = build(name)
        model_map = quiet_map(model)
        broken = problems(name, model, model_map)
        if broken:
            print(f"{name}: {broken}", file=sys.stderr)
            return 1
        rows.append(describe(name, model_map))
    text = document(rows)
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date: run python scripts/architecture_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC} ({len(rows)} architectures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
