"""The model map: every weight matrix of a model, with its stack, depth, role and attention heads."""

from __future__ import annotations

import fnmatch
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

import torch
from torch import nn

from .experts import expert_drafts, expert_index, mark_routers
from .keys import layer_key, sanitize
from .roles import ROLES, RoleGuess, guess_role
from .sources import (
    Heads,
    Namespace,
    WeightSource,
    config_heads,
    module_heads,
    skip_reason,
    sources_from_module,
    sources_from_state_dict,
)
from .stacks import Stack, block_layout

__all__ = ["MatrixRef", "ModelMap", "map_model", "map_state_dict", "skip_reason"]

_Patterns: TypeAlias = "list[str] | tuple[str, ...] | str | None"  # include / exclude glob pattern(s)


@dataclass(frozen=True, eq=False)
class MatrixRef:
    """One weight matrix of a model, found by :func:`map_model`.

    Attributes:
        name: unique, stable name: the parameter path, with ``[q]``/``[k]``/``[v]`` for a slice
            of a fused projection.
        key: short layer id used in metric keys (``L03_q``, ``embed``; ``encoder_L03_q`` in a model of
            several stacks), unique within the map.
        module_name: path of the module that owns the parameter.
        depth: index of the repeated block holding it within its stack, or None (embeddings, head).
        role: one of :data:`spectral_plugins.core.roles.ROLES`.
        shape: (out, in) as the model applies the matrix (HF Conv1D stores it transposed).
        num_heads: attention heads in this matrix (key/value heads for k/v under grouped-query
            attention), where known.
        head_dim: width of one head, where known; rows ``h*head_dim:(h+1)*head_dim`` are head h.
        tied_names: other parameter paths sharing this tensor (a tied lm_head).
        stack: the stack of blocks it belongs to (``encoder``, ``decoder``, ``text``, ``vision``), or
            None in a single-stack model and for matrices outside every stack (a shared embedding).
        expert: the expert of a mixture-of-experts layer this matrix belongs to, else None; an
            expert matrix's key ends in ``_e<index>`` (``L03_mlp_in_e7``).
    """

    name: str
    key: str
    module_name: str
    depth: int | None
    role: str
    shape: tuple[int, int]
    num_heads: int | None = None
    head_dim: int | None = None
    tied_names: tuple[str, ...] = ()
    stack: str | None = None
    expert: int | None = None
    # Always given by the map; the None default only lets it follow the defaulted public fields.
    _tensor: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    _bias: torch.Tensor | None = field(default=None, repr=False)
    _transposed: bool = field(default=False, repr=False)
    _rows: slice | torch.Tensor | None = field(default=None, repr=False)
    _slot: int | None = field(default=None, repr=False)  # index along a 3-D expert tensor's first axis

    def weight(self) -> torch.Tensor:
        """The matrix as (out, in), detached: a view of the parameter, also for a stacked fused
        slice and one expert of a 3-D expert tensor; a gathered copy only for per-head interleaved
        layouts (GPT-NeoX), whose rows are not evenly strided."""
        tensor = self._tensor.detach()
        tensor = tensor if self._slot is None else tensor[self._slot]
        return self._select(tensor.t() if self._transposed else tensor)

    def bias(self) -> torch.Tensor | None:
        """The bias entries belonging to this matrix's rows, or None."""
        return None if self._bias is None else self._select(self._bias.detach())

    @property
    def device(self) -> torch.device:
        return self._tensor.device

    @property
    def source(self) -> torch.Tensor:
        """The parameter (or state-dict tensor) this matrix views, undetached; a fused projection's
        q/k/v and tied weights share one source."""
        return self._tensor

    def with_source(self, tensor: torch.Tensor) -> MatrixRef:
        """This reference viewing ``tensor`` (shaped like :attr:`source`, e.g. a copy of it) instead:
        :meth:`weight` applies the same transpose and row selection to it. The bias is dropped."""
        if tuple(tensor.shape) != tuple(self._tensor.shape):
            raise ValueError(f"{self.name}: cannot view a {tuple(tensor.shape)} tensor as its source "
                             f"{tuple(self._tensor.shape)}")
        return replace(self, _tensor=tensor, _bias=None)

    def _select(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            return tensor
        if isinstance(self._rows, slice):
            return tensor[self._rows]
        return tensor.index_select(0, self._rows.to(tensor.device))


@dataclass(frozen=True)
class ModelMap:
    """Every analysed matrix of one model, in model order.

    Attributes:
        matrices: the :class:`MatrixRef` of each matrix.
        model_type: the Hugging Face ``config.model_type`` or the model's class name.
        blocks_path: module path of the container of repeated blocks (``transformer.h``), if any
            (the first stack's in a model of several).
        num_blocks: how many blocks the model holds (over every stack).
        stacks: the stacks of blocks in model order (one, named None, in a single-stack model).
    """

    matrices: tuple[MatrixRef, ...]
    model_type: str | None = None
    blocks_path: str | None = None
    num_blocks: int = 0
    stacks: tuple[Stack, ...] = ()

    def __iter__(self) -> Iterator[MatrixRef]:
        return iter(self.matrices)

    def __len__(self) -> int:
        return len(self.matrices)

    def by_role(self, role: str) -> tuple[MatrixRef, ...]:
        return tuple(m for m in self.matrices if m.role == role)

    def by_depth(self, depth: int, stack: str | None = None) -> tuple[MatrixRef, ...]:
        """The matrices of block ``depth`` (of ``stack`` only, when given)."""
        return tuple(m for m in self.matrices if m.depth == depth and (stack is None or m.stack == stack))

    def by_stack(self, stack: str | None) -> tuple[MatrixRef, ...]:
        """The matrices of one stack (None: those outside every named stack)."""
        return tuple(m for m in self.matrices if m.stack == stack)

    def get(self, key_or_name: str) -> MatrixRef:
        for ref in self.matrices:
            if key_or_name in (ref.key, ref.name):
                return ref
        raise KeyError(f"no matrix {key_or_name!r}; keys: {[m.key for m in self.matrices]}")


def map_model(
    model: nn.Module,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
    roles: Mapping[str, str] | None = None,
) -> ModelMap:
    """Find every weight matrix of ``model`` and name its depth, role and heads.

    Args:
        model: any ``torch.nn.Module`` (Hugging Face, ``nn.Transformer*``, your own).
        include: glob pattern(s) on matrix names or keys; only matches are kept.
        exclude: glob pattern(s) on matrix names or keys to drop.
        roles: ``{glob on module path or matrix name: role}`` overriding the recognised role.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no 2-D weight is left, or a ``roles`` pattern names no matrix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"map_model expects a torch.nn.Module, got {type(model).__name__}. For a checkpoint file "
            "use spectral_plugins.map_state_dict(torch.load(path, weights_only=True)) or the command "
            "`spectral-plugins analyze PATH`."
        )
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    heads = config_heads(config)
    return _build_map(sources_from_module(model), model_type, heads, include, exclude, roles,
                      module_heads=lambda path: module_heads(model, path, heads))


def map_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
    roles: Mapping[str, str] | None = None,
) -> ModelMap:
    """Like :func:`map_model` for a bare state dict; ``config`` (e.g. a parsed ``config.json``)
    supplies head counts and the model type, which decides how fused projections are laid out."""
    config = dict(config or {})
    # GPT-2 checkpoints without a config.json are still recognisable by their Conv1D names.
    gpt2_names = any(k.endswith("attn.c_attn.weight") for k in state_dict)
    model_type = config.get("model_type") or ("gpt2" if gpt2_names else None)
    sources = sources_from_state_dict(state_dict, model_type)
    heads = config_heads(Namespace(config))
    return _build_map(sources, model_type, heads, include, exclude, roles, module_heads=lambda path: heads)


def _build_map(sources: list[WeightSource], model_type: str | None, heads: Heads, include: _Patterns,
               exclude: _Patterns, roles: Mapping[str, str] | None,
               module_heads: Callable[[str], Heads]) -> ModelMap:
    if not sources:
        raise ValueError(
            "the model has no 2-D weight matrices to analyse (spectral-plugins reads nn.Linear, "
            "nn.Embedding, HF Conv1D, attention in-projections and other 2-D parameters). Pass the "
            "model itself, not a wrapper that hides its parameters, and make sure it is built."
        )
    layout = block_layout([(s.module_path, tuple(s.tensor.shape)) for s in sources])
    stack_rank = {stack.name: i for i, stack in enumerate(layout.stacks)}
    drafts: list[dict[str, Any]] = []
    for source in sources:
        stack, depth = layout.place(source.module_path)
        guess = guess_role(source.module_path, source.param_name, source.kind, depth)
        found_heads = module_heads(source.module_path)
        if source.kind.startswith("experts"):
            transposed = {"experts_t": True, "experts_n": False}.get(source.kind)
            split = [dict(d, module_name=source.module_path, depth=depth, tied_names=source.aliases,
                          _tensor=source.tensor, _bias=None)
                     for d in expert_drafts(source.path, source.param_name, tuple(source.tensor.shape),
                                            found_heads.hidden, transposed)]
        else:
            split = [dict(d, expert=expert_index(source.module_path))
                     for d in _split(source, depth, guess, found_heads)]
        drafts.extend(dict(d, stack=stack) for d in split)
    mark_routers(drafts)
    _name_output_head(drafts)
    _apply_role_overrides(drafts, roles)
    _assign_keys(drafts)
    drafts.sort(key=lambda d: _canonical_order(d, stack_rank))
    matrices = tuple(MatrixRef(**d) for d in _select(drafts, include, exclude))
    _warn_unclassified(matrices)
    num_blocks = len({(m.stack, m.depth) for m in matrices if m.depth is not None})
    blocks_path = layout.stacks[0].blocks_path if layout.stacks else None
    return ModelMap(matrices, model_type, blocks_path, num_blocks, layout.stacks)


def _split(source: WeightSource, depth: int | None, guess: RoleGuess, heads: Heads) -> list[dict[str, Any]]:
    """One draft MatrixRef, or three for a fused q/k/v projection (views where possible)."""
    rows_total, cols = (source.tensor.shape[1], source.tensor.shape[0]) if source.kind == "conv1d" \
        else tuple(source.tensor.shape)
    base = dict(module_name=source.module_path, depth=depth, tied_names=source.aliases,
                _tensor=source.tensor, _bias=source.bias, _transposed=source.kind == "conv1d")
    role = guess.role  # a tied lm_head keeps the embedding's role; its path is in tied_names
    prefix = "cross_" if role.startswith("cross_") else ""
    if guess.fused is None:
        plain = role.removeprefix(prefix)
        num = heads.num_kv_heads if plain in ("k", "v") else heads.num_heads
        head_dim = heads.head_dim if plain in ("q", "k", "v") else None
        num = num if plain in ("q", "k", "v") else None
        return [dict(base, name=source.path, role=role, shape=(rows_total, cols), num_heads=num,
                     head_dim=head_dim)]
    head_dim, num_q, num_kv = heads.head_dim, heads.num_heads, heads.num_kv_heads
    parts: list[tuple[str, slice | torch.Tensor, int | None]]  # (role, rows, heads) per slice
    if guess.fused == "interleaved" and num_q and rows_total % (3 * num_q) == 0:
        head_dim = rows_total // (3 * num_q)
        grid = torch.arange(rows_total).view(num_q, 3, head_dim)
        parts = [(r, grid[:, i].reshape(-1), num_q) for i, r in enumerate("qkv")]
    elif guess.fused == "stacked":
        if num_q and num_kv and head_dim and (num_q + 2 * num_kv) * head_dim == rows_total:
            q_rows, kv_rows = num_q * head_dim, num_kv * head_dim
        elif rows_total % 3 == 0:
            q_rows = kv_rows = rows_total // 3
            num_q = num_kv = num_q if num_q and q_rows % num_q == 0 else None
            head_dim = q_rows // num_q if num_q else None
        else:
            return [dict(base, name=source.path, role="other", shape=(rows_total, cols))]
        bounds = [(0, q_rows), (q_rows, q_rows + kv_rows), (q_rows + kv_rows, rows_total)]
        parts = [(r, slice(a, b), num_q if r == "q" else num_kv) for r, (a, b) in zip("qkv", bounds)]
    else:
        return [dict(base, name=source.path, role="other", shape=(rows_total, cols))]
    drafts = []
    for role_name, rows, num in parts:
        n_rows = (rows.stop - rows.start) if isinstance(rows, slice) else rows.numel()
        drafts.append(dict(base, name=f"{source.path}[{role_name}]", role=prefix + role_name,
                           shape=(n_rows, cols), num_heads=num, head_dim=head_dim, _rows=rows))
    return drafts


def _canonical_order(draft: dict[str, Any], stack_rank: Mapping[str | None, int]) -> tuple[int, ...]:
    """Shared embeddings first, then each stack (its own embeddings, its blocks by depth and role
    q, k, v, o, cross, mlp...), then the rest (a stable sort keeps model order inside each group)."""
    role_rank = ROLES.index(draft["role"])
    embedding = draft["role"] in ("embed", "pos_embed")
    if draft["stack"] is None and draft["depth"] is None:
        return (0 if embedding else 2, 0, 0, 0, role_rank)
    within = 1 if draft["depth"] is not None else (0 if embedding else 2)
    return (1, stack_rank.get(draft["stack"], 0), within, draft["depth"] or 0, role_rank)


def _name_output_head(drafts: list[dict[str, Any]]) -> None:
    """An unnamed linear outside the blocks shaped like the token embedding (vocab x width) is the
    output head (``nn.Sequential(embedding, encoder, nn.Linear)``): role lm_head, if it is the only one."""
    shapes = {d["shape"] for d in drafts if d["role"] == "embed"}
    heads = [d for d in drafts if d["role"] == "other" and d["depth"] is None and d["shape"] in shapes]
    if len(heads) == 1:
        heads[0]["role"] = "lm_head"


def _apply_role_overrides(drafts: list[dict[str, Any]], roles: Mapping[str, str] | None) -> None:
    for pattern, role in (roles or {}).items():
        if role not in ROLES:
            raise ValueError(f"roles={{{pattern!r}: {role!r}}}: unknown role; choose from {list(ROLES)}")
        hits = [d for d in drafts if fnmatch.fnmatchcase(d["module_name"], pattern)
                or fnmatch.fnmatchcase(d["name"], pattern)]
        if not hits:
            raise ValueError(
                f"roles pattern {pattern!r} matches no module; it is a glob on module paths or matrix "
                f"names such as {[d['name'] for d in drafts[:4]]}"
            )
        for d in hits:
            d["role"] = role
            d["_overridden"] = True


def _assign_keys(drafts: list[dict[str, Any]]) -> None:
    """``L03_q`` style keys; where two matrices would share one, add the module's own name."""
    depth_digits = max(2, len(str(max([d["depth"] for d in drafts if d["depth"] is not None], default=0))))
    expert_digits = len(str(max([d["expert"] for d in drafts if d["expert"] is not None], default=0)))
    bases = [layer_key(d["depth"], d["role"], depth_digits, d["stack"])
             + ("" if d["expert"] is None else f"_e{d['expert']:0{expert_digits}d}") for d in drafts]
    counts = Counter(bases)
    for d, base in zip(drafts, bases):
        d.pop("_overridden", None)
        if counts[base] == 1:
            d["key"] = base
            continue
        leaf = d["module_name"].rsplit(".", 1)[-1] if d["module_name"] else d["name"]
        d["key"] = f"{base}_{sanitize(leaf + ('_' + d['name'][-2] if d['name'].endswith(']') else ''))}"
    seen: Counter[str] = Counter(d["key"] for d in drafts)
    for d in drafts:  # still ambiguous (same leaf name twice): fall back to the full path
        if seen[d["key"]] > 1:
            d["key"] = f"{layer_key(d['depth'], d['role'], depth_digits, d['stack'])}_{sanitize(d['name'])}"


def _patterns(patterns: _Patterns) -> list[str] | None:
    return None if patterns is None else [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(draft: dict[str, Any], pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(draft[f], pattern) for f in ("name", "key", "module_name"))


def _select(drafts: list[dict[str, Any]], include: _Patterns, exclude: _Patterns) -> list[dict[str, Any]]:
    """The drafts ``include`` keeps and ``exclude`` does not drop.

    Raises a ValueError naming the option when nothing is left (an include pattern that matches no
    matrix is a typo more often than not), and warns once naming include patterns that match nothing
    while others do."""
    include, exclude = _patterns(include), _patterns(exclude)
    examples = [d["name"] for d in drafts[:4]] + [d["key"] for d in drafts[:2]]
    kept = drafts
    if include is not None:
        kept = [d for d in drafts if any(_matches(d, p) for p in include)]
        idle = [p for p in include if not any(_matches(d, p) for d in drafts)]
        if not kept:
            raise ValueError(f"include={include!r} matched none of the {len(drafts)} weight matrices; it is "
                             f"a glob on matrix names, module paths or keys such as {examples}")
        if idle:
            warnings.warn(f"spectral-plugins: include pattern(s) {idle} matched no weight matrix (the others "
                          f"matched {len(kept)}); names look like {examples}", UserWarning, stacklevel=4)
    if exclude is not None:
        left = [d for d in kept if not any(_matches(d, p) for p in exclude)]
        if not left:
            raise ValueError(f"exclude={exclude!r} dropped all {len(kept)} weight matrices"
                             f"{'' if include is None else f' that include={include!r} kept'}; "
                             f"they are named like {examples}")
        kept = left
    return kept


def _warn_unclassified(matrices: tuple[MatrixRef, ...]) -> None:
    """One notice per mapping naming the matrices that fell to role ``other`` (inside the blocks or
    outside them, such as a pooler) and how to set their role."""
    unknown = [m.name for m in matrices if m.role == "other"]
    if not unknown:
        return
    example = unknown[0].removesuffix(".weight")
    warnings.warn(
        f"spectral-plugins: {len(unknown)} of {len(matrices)} matrices have no recognised role and are "
        f"analysed as role 'other' ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}). "
        f"Set a role with roles={{'{example}': 'mlp_in'}} (a glob on the module path; roles: "
        "q, k, v, o, mlp_in, mlp_gate, mlp_out, embed, pos_embed, lm_head), or leave it out with "
        f"exclude=['{example}*'].",
        stacklevel=4,
    )
