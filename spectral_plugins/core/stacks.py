"""Stacks of repeated blocks: where the blocks of a model are, and what each stack is called.

A model has one stack of repeated blocks (GPT-2's ``transformer.h``) or several (an encoder and a
decoder, a text and a vision tower, the stages of a hierarchical model). A *block list* is a
container whose integer-indexed children repeat one structure: the same parameter paths and shapes
below each index (T5's ``block.N`` is one; the heterogeneous sub-layers ``block.N.layer.M`` are not;
``nn.Sequential(embedding, encoder, head)`` is not). A matrix's depth is its index in the
*innermost* block list on its path, renumbered 0..n-1, never an outer container's index. Expert
lists (``experts.N``) and head lists (``heads.N``) are not blocks. Everything here works from
module paths and shapes alone, so a live model and a bare state dict map the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .keys import sanitize

# Containers whose children are named as blocks even when there is only one of them.
# (Not ``layer``: T5 names the heterogeneous sub-layers of a block so.)
_BLOCK_LIST_NAMES = {"layers", "h", "block", "blocks", "resblocks"}
# Integer-indexed containers that are never block lists: experts of a mixture, heads of an attention.
NOT_BLOCK_LISTS = {"experts", "local_experts", "heads"}
# Suffixes dropped from a stack's distinguishing path part (``text_model`` -> ``text``).
_NAME_SUFFIXES = ("_model", "_tower", "_transformer", "_encoder")
_SIMILAR = 0.5  # Jaccard overlap of two indices' (path, shape) sets that makes them repeats


@dataclass(frozen=True)
class Stack:
    """One stack of repeated blocks.

    Attributes:
        name: short name used in keys (``encoder``, ``decoder``, ``text``, ``vision``); None when
            the model has a single stack (then keys carry no stack prefix).
        blocks_path: module path of its block list (``model.encoder.layers``).
        root: module path the stack owns (``model.encoder``): matrices below it outside the blocks
            (a tower's own embeddings) belong to the stack too.
        num_blocks: how many blocks the list holds.
    """

    name: str | None
    blocks_path: str
    root: str
    num_blocks: int


@dataclass(frozen=True)
class BlockLayout:
    """The stacks of a model and, per module path, its stack and depth."""

    stacks: tuple[Stack, ...]
    located: dict[str, tuple[str | None, int]]  # module path -> (stack name, depth)

    def place(self, module_path: str) -> tuple[str | None, int | None]:
        """(stack, depth) of a module: its block's, or for a matrix outside every block the stack
        whose root holds it (depth None)."""
        if module_path in self.located:
            return self.located[module_path]
        for stack in self.stacks:
            if stack.name is not None and stack.root and _under(module_path, stack.root):
                return stack.name, None
        return None, None


def block_layout(paths: Sequence[tuple[str, tuple[int, ...]]]) -> BlockLayout:
    """The stacks and per-module (stack, depth) of a model given as ``(module path, shape)`` of each
    matrix, in model order."""
    candidates = _indexed_containers(paths)
    repeated = {c for c, members in candidates.items() if _is_block_list(c, members)}
    chosen: dict[str, tuple[str, int]] = {}
    for path, _ in paths:
        found = _innermost(path, repeated)
        if found is not None:
            chosen[path] = found
    if not chosen:  # nothing repeats: the index in the container holding most matrices (an MLP)
        first = {path: _first_index(path) for path, _ in paths}
        counts = Counter(found[0] for found in first.values() if found is not None)
        if not counts:
            return BlockLayout((), {})
        container = counts.most_common(1)[0][0]
        chosen = {p: f for p, f in first.items() if f is not None and f[0] == container}
    containers = list(dict.fromkeys(container for container, _ in chosen.values()))
    names, roots = _stack_names(containers)
    stacks, located = [], {}
    for container, name, root in zip(containers, names, roots):
        indices = sorted({index for c, index in chosen.values() if c == container})
        rank = {index: depth for depth, index in enumerate(indices)}
        stacks.append(Stack(name, container, root, len(indices)))
        located.update({p: (name, rank[i]) for p, (c, i) in chosen.items() if c == container})
    return BlockLayout(tuple(stacks), located)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def _indexed_containers(paths: Sequence[tuple[str, tuple[int, ...]]]
                        ) -> dict[str, dict[int, set[tuple[str, tuple[int, ...]]]]]:
    """container -> index -> {(path below the index, shape)} for every integer part of every path."""
    found: dict[str, dict[int, set[tuple[str, tuple[int, ...]]]]] = {}
    for path, shape in paths:
        parts = path.split(".") if path else []
        for i, part in enumerate(parts):
            if part.isdigit() and (i == 0 or parts[i - 1].lower() not in NOT_BLOCK_LISTS):
                below = ".".join(parts[i + 1:])
                found.setdefault(".".join(parts[:i]), {}).setdefault(int(part), set()).add((below, shape))
    return found


def _is_block_list(container: str, members: dict[int, set[tuple[str, tuple[int, ...]]]]) -> bool:
    leaf = container.rsplit(".", 1)[-1].lower()
    if leaf in NOT_BLOCK_LISTS:
        return False
    if leaf in _BLOCK_LIST_NAMES:
        return True
    indices = sorted(members)
    for a, b in zip(indices, indices[1:]):
        union = members[a] | members[b]
        if union and len(members[a] & members[b]) / len(union) >= _SIMILAR:
            return True
    return False


def _innermost(path: str, repeated: set[str]) -> tuple[str, int] | None:
    parts = path.split(".") if path else []
    for i in range(len(parts) - 1, -1, -1):
        container = ".".join(parts[:i])
        if parts[i].isdigit() and container in repeated:
            return container, int(parts[i])
    return None


def _first_index(path: str) -> tuple[str, int] | None:
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def _stack_names(containers: list[str]) -> tuple[list[str | None], list[str]]:
    """Short names from the path parts that tell the containers apart (``model.encoder.layers`` /
    ``model.decoder.layers`` -> ``encoder`` / ``decoder``), and each stack's root path."""
    if len(containers) == 1:
        return [None], [""]
    split = [c.split(".") if c else [] for c in containers]
    prefix = 0
    while all(len(s) > prefix for s in split) and len({s[prefix] for s in split}) == 1:
        prefix += 1
    suffix = 0
    while all(len(s) > prefix + suffix for s in split) and len({s[-1 - suffix] for s in split}) == 1:
        suffix += 1
    names, roots = [], []
    for i, s in enumerate(split):
        middle = s[prefix:len(s) - suffix]
        if middle and middle[-1].lower() in _BLOCK_LIST_NAMES and len(middle) > 1:
            middle = middle[:-1]  # "stages.0.blocks" vs "head.blocks": the list's own name tells nothing
        name = sanitize("_".join(middle)).lower()
        for ending in _NAME_SUFFIXES:
            if name.endswith(ending) and len(name) > len(ending):
                name = name[: -len(ending)]
        if not name:
            name = f"stack{i}"
        elif name[0].isdigit():
            name = f"{sanitize(s[prefix - 1]) if prefix else 'stack'}{name}"
        names.append(name)
        roots.append(".".join(s[:prefix + len(middle)]) if middle else containers[i])
    taken = Counter(names)
    names = [n if taken[n] == 1 else f"{n}{i}" for i, n in enumerate(names)]
    return list(names), roots
