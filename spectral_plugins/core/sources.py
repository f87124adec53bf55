"""Where the model map finds matrices: a live module's parameters or a bare state dict's tensors,
and the attention head counts that the config or a module declares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .experts import is_expert_tensor
from .roles import looks_like_embedding


@dataclass(frozen=True)
class WeightSource:
    """One 2-D parameter (or 3-D tensor of experts) as found in the model or state dict, before roles
    are assigned."""

    module_path: str
    param_name: str
    tensor: torch.Tensor
    kind: str  # "embedding" | "linear" | "conv1d" | "param" | "experts" (| "experts_t" / "experts_n")
    bias: torch.Tensor | None = None
    aliases: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"{self.module_path}.{self.param_name}" if self.module_path else self.param_name


@dataclass(frozen=True)
class Heads:
    """Attention head counts and widths (from the config or the nearest module declaring them)."""

    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    hidden: int | None = None


def skip_reason(tensor: torch.Tensor, path: str = "") -> str | None:
    """Why ``tensor`` (at parameter path ``path``) is not analysed, or None when it is: a
    floating-point 2-D tensor with both sides >= 2, or a 3-D tensor of experts (``...experts.down_proj``,
    one matrix per expert). The reasons: "not floating point" (integer, bool or complex: token ids,
    masks, counters), "convolution" (3-D or more), "vector" (1 x n or n x 1), "1-D" (biases, norm
    scales, scalars)."""
    if not tensor.is_floating_point():  # complex tensors too: spectra here are of real matrices
        return "not floating point"
    if tensor.ndim == 3 and is_expert_tensor(path.rpartition(".")[0]) and min(tensor.shape[1:]) >= 2:
        return None
    if tensor.ndim > 2:
        return "convolution"
    if tensor.ndim < 2:
        return "1-D"
    return "vector" if min(tensor.shape) < 2 else None


class Namespace:
    """A parsed config.json as an object with attributes, like a Hugging Face config."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)


def _replace_aliases(source: WeightSource, alias: str) -> WeightSource:
    return WeightSource(source.module_path, source.param_name, source.tensor, source.kind, source.bias,
                        source.aliases + (alias,))


def sources_from_module(model: nn.Module) -> list[WeightSource]:
    """Every 2-D parameter of a live model (a tied one once, its other paths as aliases) and every
    3-D tensor of experts, with the module kind that says how to read it."""
    aliases: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(path)
    sources = []
    for path, param in model.named_parameters():
        module_path, _, param_name = path.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        class_name = type(module).__name__
        if param.is_floating_point() and param.ndim == 3 and is_expert_tensor(module_path, class_name) \
                and min(param.shape[1:]) >= 2:
            # [experts, out, in], or [experts, in, out] where the module says so (is_transposed)
            flag = getattr(module, "is_transposed", None)
            kind = "experts" if not isinstance(flag, bool) else ("experts_t" if flag else "experts_n")
            sources.append(WeightSource(module_path, param_name, param, kind))
            continue
        if skip_reason(param) is not None:
            continue
        if isinstance(module, nn.Embedding):
            kind = "embedding"
        elif class_name == "Conv1D" and param_name == "weight":  # HF GPT-2: weight is (in, out)
            kind = "conv1d"
        elif isinstance(module, nn.Linear) or param_name == "weight":
            kind = "linear"
        else:
            kind = "param"
        bias_name = "in_proj_bias" if param_name == "in_proj_weight" else "bias"
        bias = getattr(module, bias_name, None) if param_name in ("weight", "in_proj_weight") else None
        bias = bias if isinstance(bias, torch.Tensor) else None
        others = tuple(a for a in aliases[id(param)] if a != path)
        sources.append(WeightSource(module_path, param_name, param, kind, bias, others))
    return sources


def config_heads(config: Any) -> Heads:
    if config is None:
        return Heads()
    num_heads = _first_int(config, ("num_attention_heads", "n_head", "num_heads", "n_heads"))
    num_kv = _first_int(config, ("num_key_value_heads", "num_kv_heads", "n_kv_heads")) or num_heads
    hidden = _first_int(config, ("hidden_size", "n_embd", "d_model", "dim"))
    head_dim = _first_int(config, ("head_dim", "d_kv"))
    if head_dim is None and num_heads and hidden:
        head_dim = hidden // num_heads
    return Heads(num_heads, num_kv, head_dim, hidden)


def module_heads(model: nn.Module, module_path: str, default: Heads) -> Heads:
    """Head counts from the nearest module on the path that declares them (e.g. an
    ``nn.MultiheadAttention`` or a custom attention with ``num_heads``), else the config's."""
    parts = module_path.split(".") if module_path else []
    for end in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:end])) if end else model
        num_heads = _first_int(module, ("num_heads", "n_head", "n_heads", "num_attention_heads"))
        if num_heads:
            num_kv = _first_int(module, ("num_key_value_heads", "num_kv_heads", "n_kv_heads")) or num_heads
            head_dim = _first_int(module, ("head_dim", "head_size"))
            return Heads(num_heads, num_kv, head_dim or default.head_dim, default.hidden)
    return default


def _first_int(obj: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def sources_from_state_dict(state_dict: Mapping[str, torch.Tensor],
                            model_type: str | None) -> list[WeightSource]:
    """The matrices of a bare state dict (tied tensors once, with their other paths as aliases)."""
    sources: list[WeightSource] = []
    seen: dict[tuple[object, ...], int] = {}
    for path, tensor in state_dict.items():
        module_path, _, param_name = path.rpartition(".")
        if not isinstance(tensor, torch.Tensor) or skip_reason(tensor, path) is not None:
            continue
        if tensor.ndim == 3:  # a tensor of experts
            sources.append(WeightSource(module_path, param_name, tensor, "experts"))
            continue
        # Tied weights come back from torch.load as distinct tensors over one storage.
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tensor.stride())
        if identity in seen:
            sources[seen[identity]] = _replace_aliases(sources[seen[identity]], path)
            continue
        kind = "embedding" if looks_like_embedding(module_path) else "linear"
        if model_type == "gpt2" and module_path.rsplit(".", 1)[-1] in {"c_attn", "c_fc", "c_proj"}:
            kind = "conv1d"
        bias = state_dict.get(f"{module_path}.bias") if param_name == "weight" else None
        seen[identity] = len(sources)
        sources.append(WeightSource(module_path, param_name, tensor, kind, bias))
    return sources
