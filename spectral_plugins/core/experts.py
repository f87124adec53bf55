"""Mixtures of experts: one matrix per expert, and the router.

Two layouts are recognised:

- 3-D expert tensors (transformers 5: ``mlp.experts.gate_up_proj`` [experts, 2 x intermediate, hidden],
  ``mlp.experts.down_proj`` [experts, hidden, intermediate]): every expert becomes its own matrix, a
  view ``tensor[e]`` of the parameter, and a fused ``gate_up_proj`` splits into its gate (first half
  of the rows, as ``chunk(2)`` in the forward pass) and up halves, also views;
- a list of per-expert modules (``block_sparse_moe.experts.3.w1``, ``mlp.experts.expert_3.wi``):
  each module's matrix gets the expert index from its path.

The router (``mlp.gate`` next to ``mlp.experts``, ``mlp.router.classifier``) gets the role "router".
"""

from __future__ import annotations

import re
from typing import Any

from .stacks import NOT_BLOCK_LISTS

EXPERT_LISTS = NOT_BLOCK_LISTS - {"heads"}
_EXPERT_PART = re.compile(r"^(?:expert_?)?(\d+)$")
_ROUTER_PARTS = {"gate", "router"}
# Role of a 3-D expert tensor's slices by parameter name (gate_up_proj is split in two).
_TENSOR_ROLES = {"up_proj": "mlp_in", "w3": "mlp_in", "wi": "mlp_in", "w_in": "mlp_in",
                 "gate_proj": "mlp_gate", "w1": "mlp_gate",
                 "down_proj": "mlp_out", "w2": "mlp_out", "wo": "mlp_out", "w_out": "mlp_out"}
_INPUT_SIDE = {"mlp_in", "mlp_gate"}  # their input width is the model's hidden size


def is_expert_tensor(module_path: str, class_name: str = "") -> bool:
    """Whether a 3-D parameter of this module holds one matrix per expert along its first axis."""
    leaf = module_path.rsplit(".", 1)[-1].lower()
    return leaf in EXPERT_LISTS or "experts" in class_name.lower()


def expert_index(module_path: str) -> int | None:
    """The expert a module of a per-expert list belongs to (``...experts.3.w1`` -> 3), else None."""
    parts = module_path.split(".")
    for previous, part in zip(parts, parts[1:]):
        match = _EXPERT_PART.match(part)
        if previous.lower() in EXPERT_LISTS and match:
            return int(match.group(1))
    return None


def expert_drafts(path: str, param_name: str, shape: tuple[int, ...], hidden: int | None,
                  transposed: bool | None) -> list[dict[str, Any]]:
    """The per-expert draft matrices of a 3-D expert tensor ``[experts, a, b]``.

    Args:
        path: the parameter's path (matrix names are ``path[e3]``, ``path[e3:gate]``).
        param_name: its name, which says the role (``gate_up_proj``, ``down_proj``, ``w1``...).
        shape: its shape.
        hidden: the model's hidden size, which tells ``[experts, out, in]`` (the ``nn.Linear`` and
            transformers 5 Mixtral layout) from ``[experts, in, out]`` when ``transposed`` is None.
        transposed: the module says its tensors are ``[experts, in, out]`` (``is_transposed``).
    """
    fused = param_name == "gate_up_proj"
    role = "mlp_gate" if fused else _TENSOR_ROLES.get(param_name, "other")
    if transposed is None:
        transposed = _looks_transposed(shape, hidden, role)
    rows, cols = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
    if fused and rows % 2:
        fused, role = False, "other"
    drafts = []
    for e in range(shape[0]):
        base = dict(expert=e, _slot=e, _transposed=transposed, num_heads=None, head_dim=None)
        if fused:
            half = rows // 2
            drafts.append(dict(base, name=f"{path}[e{e}:gate]", role="mlp_gate", shape=(half, cols),
                               _rows=slice(0, half)))
            drafts.append(dict(base, name=f"{path}[e{e}:up]", role="mlp_in", shape=(half, cols),
                               _rows=slice(half, rows)))
        else:
            drafts.append(dict(base, name=f"{path}[e{e}]", role=role, shape=(rows, cols), _rows=None))
    return drafts


def _looks_transposed(shape: tuple[int, ...], hidden: int | None, role: str) -> bool:
    if hidden is None or shape[1] == shape[2]:
        return False
    if role in _INPUT_SIDE:
        return shape[2] != hidden and shape[1] == hidden
    if role == "mlp_out":
        return shape[1] != hidden and shape[2] == hidden
    return False


def mark_routers(drafts: list[dict[str, Any]]) -> None:
    """Role "router" for the gate of a mixture: a matrix outside the experts, under the module that
    holds them, named ``gate`` or ``router`` (``mlp.gate``, ``mlp.router.classifier``)."""
    owners = set()
    for d in drafts:
        if d.get("expert") is not None:
            parts = d["module_name"].split(".")
            marks = [i for i, p in enumerate(parts) if p.lower() in EXPERT_LISTS]
            owners.add(".".join(parts[:marks[-1] if marks else len(parts) - 1]))
    for d in drafts:
        if d.get("expert") is not None:
            continue
        for owner in owners:
            if not d["module_name"].startswith(owner + "."):
                continue
            below = [p.lower() for p in d["module_name"][len(owner) + 1:].split(".")]
            if below[0] not in EXPERT_LISTS and _ROUTER_PARTS & set(below):
                d["role"] = "router"
