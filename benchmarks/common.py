"""What the benchmarks share: the models they time, the machine line, and docs/performance.md sections."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"

# Llama-shaped configurations: (hidden, intermediate, layers, heads, key/value heads, vocabulary)
LLAMA_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "30M": (384, 1024, 6, 6, 6, 32000),
    "125M": (768, 2048, 12, 12, 12, 32000),
    "350M": (1024, 2816, 24, 16, 8, 32000),
    "1B": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
}


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)


class _MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)


class _Layer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.self_attn = _Attention(hidden, heads, kv_heads)
        self.mlp = _MLP(hidden, intermediate)


class LlamaShaped(nn.Module):
    """The weight matrices of a Llama model (names as in Hugging Face), no forward: all a snapshot reads."""

    def __init__(self, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 vocab: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([_Layer(hidden, intermediate, heads, kv_heads) for _ in range(layers)])
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


def llama_shaped(name: str, seed: int = 0) -> LlamaShaped:
    """A Llama-shaped model of config ``name`` with N(0, 0.02) weights (built on meta, then filled)."""
    with torch.device("meta"):
        model = LlamaShaped(*LLAMA_CONFIGS[name])
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return model


def machine(device: torch.device | None = None) -> str:
    """One line naming the machine a table was measured on."""
    gpu = f", {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}{gpu}"


def write_section(path: Path, name: str, body: str, title: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->``, or append it
    under a ``## title`` heading."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Performance\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator) -> None:
    """One optimizer step of a ``(logits, loss) = model(x, y)`` model on the next batch."""
    x, y = next(batches)
    _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
