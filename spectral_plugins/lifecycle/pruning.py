"""Remove transformer blocks by identity skip and measure what spectral pruning advice is worth.

A skipped block returns its input hidden states unchanged (``h -> h`` instead of ``h -> h + f(h)``):
its ``forward`` is replaced on the instance, and restored afterwards, so the model object is never
rebuilt and no weights are touched. Works on any ``nn.ModuleList`` / ``nn.Sequential`` of blocks
whose forward takes the hidden states first (positionally or as ``hidden_states``) and returns them
(a tensor, or a tuple / list whose first element is the tensor), which covers Hugging Face GPT-2,
Llama-style decoders (transformers 5) and plain PyTorch transformers.

:func:`evaluate_pruning` compares removal strategies at equal budget ``n`` (``L(S)`` is the loss
with the blocks of S skipped, ``L_0`` without):

- spectral: the first n blocks of :func:`~spectral_plugins.lifecycle.importance.advise_pruning`;
- last-N: the n deepest blocks;
- random: ``n_random`` uniform n-subsets (their mean loss);
- oracle: the n blocks whose single removal hurts least (a yardstick, needs every single removal);

and reports ``ratio_vs_last = (L(last) - L_0) / (L(spectral) - L_0)`` (> 1: the spectral choice
costs less loss than removing the last n) and the Spearman rho between importance ``I_b`` and the
measured single-removal loss increase ``L({b}) - L_0`` (> 0: higher importance, larger damage).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from ..core.keys import lifecycle_key
from ..core.snapshot import Snapshot
from .history import SpectralHistory
from .importance import (
    BlockImportance,
    PruningAdvice,
    advise_pruning,
    importance_from_history,
    importance_from_snapshot,
    judge_advice,
)

# ``eval_fn(model)`` returns the loss, or one loss per evaluation batch (then every loss difference
# gets a paired standard error over the batches).
EvalFn = Callable[[nn.Module], "float | Sequence[float]"]


def find_blocks(model: nn.Module,
                blocks_path: str | None = None) -> tuple[str, nn.ModuleList | nn.Sequential]:
    """The container of repeated blocks: ``blocks_path`` if given, else the model map's, else the
    ``ModuleList`` / ``Sequential`` of at least two same-class children holding the most parameters."""
    if blocks_path is None:
        from ..core.model_map import map_model

        with contextlib.suppress(ValueError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # only the container is wanted, not role diagnostics
            blocks_path = map_model(model).blocks_path
    if blocks_path is not None:
        container = model.get_submodule(blocks_path)
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            return blocks_path, container
    best: tuple[int, str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2 and \
                len({type(child) for child in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError("no nn.ModuleList / nn.Sequential of repeated blocks found; pass blocks_path=")
    return best[1], best[2]


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("cannot skip a block whose forward gets no hidden-states tensor")


def _identity_forward(block: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
    """A forward returning its input hidden states, shaped like ``original``'s output (learned on the
    first call, which runs ``original`` once to see whether it returns a tensor or a tuple/list)."""
    layout: list[tuple[type[Any], int]] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = _hidden_states(args, kwargs)
        if not layout:
            out = original(*args, **kwargs)
            first = out if isinstance(out, torch.Tensor) else \
                out[0] if isinstance(out, (tuple, list)) and len(out) else None
            if not isinstance(first, torch.Tensor):
                raise TypeError(f"cannot skip {type(block).__name__}: it returns {type(out).__name__}, "
                                "not a tensor or a tuple starting with one")
            if first.shape != hidden.shape:
                raise ValueError(f"cannot skip {type(block).__name__}: it maps {tuple(hidden.shape)} to "
                                 f"{tuple(first.shape)}")
            layout.append((type(out), 1 if isinstance(out, torch.Tensor) else len(out)))
        kind, length = layout[0]
        if issubclass(kind, torch.Tensor):
            return hidden
        return kind([hidden, *([None] * (length - 1))])

    return forward


@contextlib.contextmanager
def skip_blocks(model: nn.Module, indices: Iterable[int], blocks_path: str | None = None) -> Iterator[None]:
    """Within the ``with`` body the blocks ``indices`` of the model pass hidden states through unchanged."""
    _, blocks = find_blocks(model, blocks_path)
    patched: list[tuple[nn.Module, bool, Any]] = []
    try:
        for index in sorted(set(int(i) for i in indices)):
            block = blocks[index]
            had_own = "forward" in block.__dict__
            previous = block.__dict__.get("forward")
            block.forward = _identity_forward(block, block.forward)
            patched.append((block, had_own, previous))
        yield
    finally:
        for block, had_own, previous in reversed(patched):
            if had_own:
                block.forward = previous
            else:
                del block.forward


@dataclass(frozen=True)
class PruningEvaluation:
    """Measured losses of block-removal strategies (see the module docs).

    Attributes:
        n_remove: blocks removed per strategy. num_blocks: blocks in the model.
        baseline_loss: ``L_0``.
        spectral_blocks / spectral_loss: the advisor's choice and its loss.
        last_blocks / last_loss: the n deepest blocks.
        random_losses: one loss per random subset; random_loss: their mean.
        oracle_blocks / oracle_loss: the n blocks with the smallest single-removal loss.
        single_losses: (B,) ``L({b})`` per block b (NaN if not measured).
        importance: the scores the advice came from.
        spearman_rho / spearman_p: rank correlation of ``I_b`` with ``L({b}) - L_0`` and its p-value.
        single_stderr: (B,) paired standard error of ``L({b}) - L_0`` over the evaluation batches
            (NaN when ``eval_fn`` returns one number).
        spectral_vs_last_stderr: paired standard error of ``L(last) - L(spectral)``.
        advice: the advisor's output judged against the measured costs
            (:func:`~spectral_plugins.lifecycle.importance.judge_advice`; unjudged without single
            removals).
    """

    n_remove: int
    num_blocks: int
    baseline_loss: float
    spectral_blocks: tuple[int, ...]
    spectral_loss: float
    last_blocks: tuple[int, ...]
    last_loss: float
    random_losses: tuple[float, ...]
    random_loss: float
    oracle_blocks: tuple[int, ...]
    oracle_loss: float
    single_losses: tuple[float, ...]
    importance: BlockImportance
    spearman_rho: float
    spearman_p: float
    single_stderr: tuple[float, ...] = ()
    spectral_vs_last_stderr: float = math.nan
    advice: PruningAdvice | None = None

    @property
    def ratio_vs_last(self) -> float:
        """``(L(last) - L_0) / (L(spectral) - L_0)``; > 1 when the spectral choice hurts less. When the
        spectral removal does not raise the loss: inf if Last-N does, NaN if neither does."""
        return _increase_ratio(self.last_loss, self.spectral_loss, self.baseline_loss)

    @property
    def ratio_vs_random(self) -> float:
        """``(mean L(random) - L_0) / (L(spectral) - L_0)``."""
        return _increase_ratio(self.random_loss, self.spectral_loss, self.baseline_loss)

    def scalars(self) -> dict[str, float]:
        """``spectral_lifecycle/prune_*`` figures for publishers (finite values only)."""
        values = {
            lifecycle_key("prune_baseline_loss"): self.baseline_loss,
            lifecycle_key("prune_loss", "spectral"): self.spectral_loss,
            lifecycle_key("prune_loss", "last"): self.last_loss,
            lifecycle_key("prune_loss", "random"): self.random_loss,
            lifecycle_key("prune_loss", "oracle"): self.oracle_loss,
            lifecycle_key("prune_ratio_vs_last"): self.ratio_vs_last,
            lifecycle_key("prune_ratio_vs_random"): self.ratio_vs_random,
            lifecycle_key("importance_spearman"): self.spearman_rho,
        }
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def _increase_ratio(other: float, spectral: float, baseline: float) -> float:
    numerator, denominator = other - baseline, spectral - baseline
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else math.nan


def removal_loss(model: nn.Module, eval_fn: EvalFn, indices: Iterable[int],
                 blocks_path: str | None = None) -> float:
    """``eval_fn(model)`` with the blocks ``indices`` skipped (no gradients; per-batch losses averaged)."""
    return float(np.mean(_batch_losses(model, eval_fn, indices, blocks_path)))


def _batch_losses(model: nn.Module, eval_fn: EvalFn, indices: Iterable[int],
                  blocks_path: str | None = None) -> np.ndarray:
    with skip_blocks(model, indices, blocks_path), torch.no_grad():
        return np.atleast_1d(np.asarray(eval_fn(model), dtype=np.float64))


def _paired_stderr(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of ``mean(a - b)`` over paired batches (NaN with one batch)."""
    if a.size < 2 or a.size != b.size:
        return math.nan
    return float(np.std(a - b, ddof=1) / math.sqrt(a.size))


def evaluate_pruning(model: nn.Module, eval_fn: EvalFn, n_remove: int, *,
                     importance: BlockImportance | None = None, snapshot: Snapshot | None = None,
                     history: SpectralHistory | None = None, method: str | None = None,
                     blocks_path: str | None = None,
                     n_random: int = 5, seed: int = 0, protect: Sequence[int] = (),
                     single_removal: bool = True) -> PruningEvaluation:
    """Skip ``n_remove`` blocks chosen by the spectral advisor, by Last-N and at random, and measure.

    Args:
        model: the model (left as it was found: every skip is undone).
        eval_fn: ``eval_fn(model) -> loss`` (lower is better), e.g. mean cross-entropy on held-out data,
            or one loss per evaluation batch (then costs get paired standard errors and the advice is
            judged reliable or not, :func:`~spectral_plugins.lifecycle.importance.judge_advice`).
        n_remove: blocks to remove per strategy.
        importance: block scores; else from ``history`` (settled alphas), else from ``snapshot``, else
            from a fresh :func:`spectral_plugins.core.engine.analyze` of the model.
        method: importance method for ``history`` / ``snapshot`` (default "alpha", the paper's;
            see :mod:`spectral_plugins.lifecycle.importance`).
        blocks_path: module path of the blocks container (found automatically otherwise).
        n_random: random subsets to average. seed: their generator's seed.
        protect: blocks the advisor must not choose (the other strategies ignore it).
        single_removal: also measure each block alone (needed for Spearman rho and the oracle).
    """
    _, blocks = find_blocks(model, blocks_path)
    num_blocks = len(blocks)
    if not 0 < n_remove < num_blocks:
        raise ValueError(f"n_remove={n_remove} must be between 1 and {num_blocks - 1}")
    if importance is None:
        if history is not None:
            importance = importance_from_history(history, method or "alpha")
        else:
            if snapshot is None:
                from ..core.engine import analyze

                snapshot = analyze(model)
            importance = importance_from_snapshot(snapshot, method or "alpha")

    def losses(indices: Iterable[int]) -> np.ndarray:
        return _batch_losses(model, eval_fn, indices, blocks_path)

    def loss(indices: Iterable[int]) -> float:
        return float(np.mean(losses(indices)))

    base = losses(())
    baseline = float(np.mean(base))
    advice = advise_pruning(importance, n_remove, protect)
    spectral = advice.remove
    last = tuple(range(num_blocks - n_remove, num_blocks))
    rng = np.random.default_rng(seed)
    subsets = [tuple(sorted(int(i) for i in rng.choice(num_blocks, n_remove, replace=False)))
               for _ in range(n_random)]
    random_losses = tuple(loss(s) for s in subsets)
    single_batches = [losses((b,)) for b in range(num_blocks)] if single_removal else []
    singles = tuple(float(np.mean(x)) for x in single_batches) if single_removal else (math.nan,) * num_blocks
    single_se = tuple(_paired_stderr(x, base) for x in single_batches) if single_removal else \
        (math.nan,) * num_blocks
    oracle = tuple(sorted(int(i) for i in np.argsort(singles, kind="stable")[:n_remove])) \
        if single_removal else ()
    rho, p = _spearman(importance, np.asarray(singles) - baseline)
    if single_removal:
        advice = judge_advice(advice, np.asarray(singles) - baseline, single_se)
    spectral_batches, last_batches = losses(spectral), losses(last)
    return PruningEvaluation(
        n_remove=n_remove, num_blocks=num_blocks, baseline_loss=baseline,
        spectral_blocks=tuple(sorted(spectral)), spectral_loss=float(np.mean(spectral_batches)),
        last_blocks=last, last_loss=float(np.mean(last_batches)), random_losses=random_losses,
        random_loss=float(np.mean(random_losses)) if random_losses else math.nan,
        oracle_blocks=oracle, oracle_loss=loss(oracle) if oracle else math.nan,
        single_losses=singles, importance=importance, spearman_rho=rho, spearman_p=p,
        single_stderr=single_se, spectral_vs_last_stderr=_paired_stderr(last_batches, spectral_batches),
        advice=advice)


def _spearman(importance: BlockImportance, increases: np.ndarray) -> tuple[float, float]:
    """Spearman rho of ``I_b`` against the single-removal increase, over blocks where both are finite."""
    scores = np.array([importance.score(b) if b in importance.depths else math.nan
                       for b in range(increases.size)])
    keep = np.isfinite(scores) & np.isfinite(increases)
    if keep.sum() < 3 or np.ptp(scores[keep]) == 0 or np.ptp(increases[keep]) == 0:
        return math.nan, math.nan
    result = stats.spearmanr(scores[keep], increases[keep])
    return float(result.statistic), float(result.pvalue)
