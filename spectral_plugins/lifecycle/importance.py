"""Block importance from spectra and the pruning advice built on it (Liu 2026, phenomenon 4).

Heavy-tailed self-regularisation reads a smaller power-law exponent alpha as a more strongly
correlated, better-trained matrix. The importance of block b, from the alphas ``alpha_m`` of its
matrices m (roles q, k, v, o, mlp_* by default; NaN alphas are skipped):

- ``method="alpha"``: ``I_b = -mean_{m in b} alpha_m`` (lower alpha, more important; the paper's
  reading and the default, kept by the rule pre-registered in ``docs/reproduction.md``);
- ``method="alpha_reversed"``: ``I_b = +mean_{m in b} alpha_m`` (the opposite reading, for comparison:
  which sign predicts removal damage on a given model is an empirical question);
- ``method="alpha_drop"``: ``I_b = mean_{m in b} (alpha_m(first snapshot) - alpha_m(now))``, how much
  training has lowered the block's alphas (needs a history). It was the default after one seed;
  over 3 seeds x 3 depths it did not beat ``alpha`` (``docs/reproduction.md``).

The advisor removes blocks in increasing order of ``I_b`` (ties: the later block first). Spectra
alone cannot say whether that advice is worth following; with measured single-block removal costs
and their standard errors (:func:`judge_advice`), the advice is marked unreliable when the costs of
more than n candidate blocks are within noise of the cheapest (the "tie set"): then no ranking of
them, spectral or other, is supported by the measurement. These are pure functions of numbers;
:mod:`spectral_plugins.lifecycle.pruning` does the model surgery and measurement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike

from ..core.snapshot import Snapshot
from .depth_profile import settled_profile
from .history import BLOCK_ROLES, SpectralHistory

IMPORTANCE_METHODS = ("alpha", "alpha_reversed", "alpha_drop")


@dataclass(frozen=True, eq=False)  # holds arrays: compare the fields you need
class BlockImportance:
    """Importance score per block (formulas in the module docs).

    Attributes:
        depths: (B,) block indices, increasing.
        scores: (B,) importance ``I_b`` (higher = more important; NaN when no alpha was finite).
        method: one of :data:`IMPORTANCE_METHODS`.
    """

    depths: np.ndarray
    scores: np.ndarray
    method: str

    def score(self, depth: int) -> float:
        """``I_b`` of block ``depth``."""
        return float(self.scores[int(np.flatnonzero(self.depths == depth)[0])])

    def removal_order(self, protect: Iterable[int] = ()) -> tuple[int, ...]:
        """Blocks from least to most important; NaN scores last, ``protect``-ed blocks left out."""
        keep = set(protect)
        scored = [(s if math.isfinite(s) else math.inf, -int(d)) for d, s in zip(self.depths, self.scores)
                  if int(d) not in keep]
        return tuple(-d for _, d in sorted(scored))


@dataclass(frozen=True)
class PruningAdvice:
    """Which blocks to remove first.

    Attributes:
        order: every candidate block, least important first.
        remove: the first ``n_remove`` of ``order``.
        importance: the scores the order came from.
        reliable: None while no removal was measured; False when the measured removal costs of more
            than ``n_remove`` candidates are within noise of the cheapest (:func:`judge_advice`).
        reason: why the advice is unreliable or unverified ("" when reliable).
        tie_set: the candidates whose measured cost is within noise of the cheapest.
    """

    order: tuple[int, ...]
    remove: tuple[int, ...]
    importance: BlockImportance
    reliable: bool | None = None
    reason: str = "not verified: no block removal was measured; see evaluate_pruning"
    tie_set: tuple[int, ...] = ()

    def text(self) -> str:
        """The advice in words: the order, or "no reliable advice" and why."""
        if self.reliable is False:
            return f"no reliable advice ({self.reason})"
        order = ", ".join(str(d) for d in self.order)
        return f"{order} ({self.reason})" if self.reason else order


def block_importance(depths: Sequence[int | None], roles: Sequence[str], alphas: ArrayLike,
                     reference: ArrayLike | None = None, method: str = "alpha",
                     use_roles: Sequence[str] = BLOCK_ROLES) -> BlockImportance:
    """Importance per block from per-matrix alphas (``reference``: first alphas, for ``alpha_drop``)."""
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"unknown importance method {method!r}; choose from {IMPORTANCE_METHODS}")
    if method == "alpha_drop" and reference is None:
        raise ValueError("method='alpha_drop' needs first-snapshot alphas (pass a history)")
    alphas_arr = np.asarray(alphas, dtype=np.float64)
    if method == "alpha_drop":
        values = np.asarray(reference, dtype=np.float64) - alphas_arr
    else:
        values = -alphas_arr if method == "alpha" else alphas_arr
    per_block: dict[int, list[float]] = {}
    for depth, role, value in zip(depths, roles, values):
        if depth is None or role not in use_roles:
            continue
        bucket = per_block.setdefault(int(depth), [])
        if math.isfinite(value):
            bucket.append(float(value))
    ordered = sorted(per_block)
    scores = np.array([float(np.mean(per_block[d])) if per_block[d] else math.nan for d in ordered])
    return BlockImportance(np.asarray(ordered, dtype=np.int64), scores, method)


def importance_from_snapshot(snapshot: Snapshot, method: str = "alpha",
                             use_roles: Sequence[str] = BLOCK_ROLES) -> BlockImportance:
    """Importance from one snapshot (``alpha`` or ``alpha_reversed``; ``alpha_drop`` needs a history)."""
    layers = snapshot.layers
    return block_importance([x.depth for x in layers], [x.role for x in layers], [x.alpha for x in layers],
                            method=method, use_roles=use_roles)


def importance_from_history(history: SpectralHistory, method: str = "alpha", tail_fraction: float = 0.1,
                            use_roles: Sequence[str] = BLOCK_ROLES,
                            stack: str | None = None) -> BlockImportance:
    """Importance from a history's settled alphas (mean over the last ``tail_fraction`` of snapshots),
    over the blocks of one stack (None: the first or only one)."""
    infos = history.matrices
    chosen = history.stacks[0] if stack is None else stack
    alphas = settled_profile(history.values("alpha"), tail_fraction)
    depths = [i.depth if i.stack == chosen else None for i in infos]
    return block_importance(depths, [i.role for i in infos], alphas,
                            reference=history.reference("alpha"), method=method, use_roles=use_roles)


def advise_pruning(importance: BlockImportance, n_remove: int = 1,
                   protect: Iterable[int] = ()) -> PruningAdvice:
    """Rank blocks for removal and pick the first ``n_remove`` of them."""
    order = importance.removal_order(protect)
    if not 0 <= n_remove <= len(order):
        raise ValueError(f"n_remove={n_remove} but only {len(order)} blocks can be removed")
    return PruningAdvice(order, order[:n_remove], importance)


def tie_set(increases: ArrayLike, stderrs: ArrayLike, candidates: Iterable[int],
            z: float = 2.0) -> tuple[int, ...]:
    """Candidate blocks whose removal cost is within ``z`` combined standard errors of the cheapest:
    ``dL_b - dL_min <= z sqrt(se_b^2 + se_min^2)`` (``increases[b]``, ``stderrs[b]`` per block)."""
    inc = np.asarray(increases, dtype=np.float64)
    se = np.nan_to_num(np.asarray(stderrs, dtype=np.float64), nan=0.0)
    pool = [int(b) for b in candidates if math.isfinite(inc[int(b)])]
    if not pool:
        return ()
    cheapest = min(pool, key=lambda b: inc[b])
    return tuple(sorted(b for b in pool
                        if inc[b] - inc[cheapest] <= z * math.hypot(se[b], se[cheapest])))


def judge_advice(advice: PruningAdvice, increases: ArrayLike, stderrs: ArrayLike,
                 z: float = 2.0) -> PruningAdvice:
    """``advice`` marked reliable or not from measured single-block removal costs (module docs):
    unreliable when the tie set (:func:`tie_set`) holds more than ``len(advice.remove)`` blocks."""
    n = max(1, len(advice.remove))
    ties = tie_set(increases, stderrs, advice.order, z)
    if len(ties) > n:
        inc = np.asarray(increases, dtype=np.float64)[list(ties)]
        noise = float(np.nanmax(np.asarray(stderrs, dtype=np.float64)[list(ties)]))
        reason = (f"removing any {n} of blocks {list(ties)} costs the same within noise: loss increases "
                  f"{inc.min():.4f} to {inc.max():.4f}, standard errors up to {noise:.4f}")
        return replace(advice, reliable=False, reason=reason, tie_set=ties)
    return replace(advice, reliable=True, reason="", tie_set=ties)
