"""The fast lane: spectral norm, Frobenius norm and stable rank of every matrix, cheap enough for
every step.

Stable rank ``||W||_F^2 / sigma_max^2`` needs no spectrum: ``||W||_F^2`` is one pass over ``W``, and
``sigma_max^2`` is the top eigenvalue of ``A = W W^T`` (rows = the smaller side). A matrix that
changed a little since the last step has nearly the same top singular vector, so a few Lanczos steps
started from the previous Ritz vector find ``sigma_max^2`` again. Each Lanczos step costs one product
``A x = W (W^T x)``, about ``4 m n`` floating-point operations, against ``~6 m n`` per token of
training.

How it runs:

- Matrices of equal shape form a group. On an accelerator (``batched=True``, the default there),
  and on CPU for matrices under :data:`SMALL_MATRIX` elements, the group's weights are copied into
  one reused buffer (a fused copy, no allocation after the first step, in the weights' own memory
  layout) and iterated together: batched products, batched bookkeeping. Larger matrices on CPU
  (``batched=False``) are iterated one by one where they lie (views of the parameters): the products
  are bound by memory bandwidth, so a copy would cost about as much as one product; a matrix's
  Frobenius norm and all its products come one after the other, so that the products after the
  first pass read it from the cache where it fits; the tiny bookkeeping runs in NumPy.
- Lanczos with full re-orthogonalisation runs from the stored vector and restarts from the top
  Ritz vector every ``q_max`` steps. The Ritz value never exceeds ``lambda_max`` and never
  decreases.
- Convergence is checked on the top Ritz pair: its Lanczos residual ``r = beta_j |y_j|`` bounds the
  distance from the Ritz value to an eigenvalue of ``A``; a matrix is done when ``r / theta <=
  tol`` (or after ``max_products`` products). On CPU a check costs no wait, so it comes after every
  product from the ``q_min``-th on and each matrix stops on its own. On accelerators a check is a
  host synchronisation, so it comes every ``q_min`` products per shape group, and the group stops
  together. Checking often matters: rounds of doubling length, as before, overshot a warm start
  (on GPT-2 small 9.2 products per matrix against 2.7 with a check after every product, both at
  ``tol`` 3e-3; docs/performance.md).
  ``r / theta`` over-states the error of the value (the value converges faster than the vector),
  and the default ``tol`` of 1e-3 kept stable rank within 1e-3 of a float64 SVD at every step on the
  trained and training models we measured (tests/core/test_fast_lane.py), except in the first few
  steps from a random initialisation, whose top singular values have no gap to find (up to ~7e-3
  on GPT-2 small; the previous scheme erred as much).
- A warm start can stay on an eigenvector that is no longer the top one: when a singular value
  rises past the top, the old top vector is still an eigenvector, its residual is small, and the
  check cannot tell. A full snapshot can: at every full snapshot the tracker finds the matrices
  whose fast value is below the exact one (:func:`off_top`) and restarts them from a random vector
  (:meth:`FastLane.restart`), which has a component along every direction. (At ``tol`` 3e-3 with a
  check after every product this happened on GPT-2 small within 10 steps, 6.5e-2 off.)
- The relative residual of each matrix is reported with its value, and a full snapshot can be
  compared with the fast values (:func:`fast_lane_error`), so a user sees how honest the lane is.

A warm start needs one or two products on a trained model; a cold start (the first step, random
initialisation without a spectral gap) needs many. A matrix containing NaN/Inf gets NaN
values and a fresh start vector next time; the others are unaffected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .model_map import MatrixRef, ModelMap
from .snapshot import LayerSpectrum, Snapshot

FAST_METRICS: tuple[str, ...] = ("stable_rank", "spectral_norm", "frobenius_norm")
SMALL_MATRIX = 1 << 18  # elements (1 MiB in float32): below it, CPU groups are batched as well


@dataclass(frozen=True, eq=False)  # holds arrays
class FastMeasure:
    """The fast lane's metrics of every mapped matrix at one step (map order).

    Attributes:
        step: the training step measured.
        keys: layer keys (``L03_q``), one per matrix.
        spectral_norm: ``sigma_max`` estimate (a Ritz value: never above the exact one).
        frobenius_norm: ``||W||_F``.
        stable_rank: ``||W||_F^2 / sigma_max^2``.
        residual: relative Lanczos residual ``r / theta`` of each estimate of ``sigma_max^2``: an
            eigenvalue of ``W W^T`` lies within ``residual * sigma_max^2`` of it.
        products: products ``W W^T x`` spent per matrix this step (batched: the same within a shape
            group).
        seconds: wall time of the measurement.
    """

    step: int
    keys: tuple[str, ...]
    spectral_norm: np.ndarray
    frobenius_norm: np.ndarray
    stable_rank: np.ndarray
    residual: np.ndarray
    products: np.ndarray
    seconds: float

    def values(self, metric: str) -> dict[str, float]:
        """``{layer key: value}`` of one of :data:`FAST_METRICS`."""
        if metric not in FAST_METRICS:
            raise ValueError(f"the fast lane measures {FAST_METRICS}, not {metric!r}")
        return dict(zip(self.keys, getattr(self, metric).tolist()))

    def to_snapshot(self, model_map: ModelMap) -> Snapshot:
        """A :class:`Snapshot` of the measured matrices (``model_map``'s, in its order) holding the
        fast metrics and NaN for every metric of the full spectrum, so that code reading snapshots
        (keys, expert aggregates, histories) reads the fast lane the same way."""
        nan = math.nan
        layers = tuple(
            LayerSpectrum(name=ref.name, key=ref.key, module_name=ref.module_name, depth=ref.depth,
                          role=ref.role, shape=ref.shape, stack=ref.stack, expert=ref.expert,
                          spectral_norm=float(self.spectral_norm[i]),
                          frobenius_norm=float(self.frobenius_norm[i]),
                          stable_rank=float(self.stable_rank[i]), effective_rank=nan, alpha=nan,
                          alpha_weighted=nan, xmin=nan, ks_distance=nan, n_tail=0, sigma_alpha=nan,
                          lambda_max=float(self.spectral_norm[i]) ** 2,
                          finite=bool(math.isfinite(self.frobenius_norm[i])))
            for i, ref in enumerate(model_map.matrices))
        return Snapshot(step=self.step, layers=layers, method="fast_lane", dtype="float32",
                        seconds=self.seconds)


@dataclass
class _Group:
    """Matrices of one shape on one device: the warm-start vectors and, when batched, a reused
    buffer. Each matrix enters as its operand ``S`` (the weight, transposed when ``transpose``, so
    that a copy reads it in memory order); the iteration is on ``S S^T`` when ``S`` has no more rows
    than columns (``rows_small``), else on ``S^T S``: vectors of the smaller side, length ``k``."""

    refs: tuple[MatrixRef, ...]
    transpose: bool
    rows_small: bool
    buffer: torch.Tensor | None  # (batch, p, r) when batched, else None (products in place)
    vectors: torch.Tensor  # (batch, k) unit Ritz vectors of the last step

    @property
    def k(self) -> int:
        return int(self.vectors.shape[-1])


class FastLane:
    """Measures :data:`FAST_METRICS` of every matrix of a model map at any step, warm-started.

    Args:
        model_map: the matrices to follow (live views of the weights).
        tol: stop when every matrix's relative residual is below this (see :class:`FastMeasure`).
        q_min: products before the first convergence check of a step; batched, also the products
            between two checks (in place, every product after the first check is checked).
        q_max: Lanczos steps before a restart from the top Ritz vector.
        max_products: most products ``W W^T x`` per matrix and step.
        dtype: floating type of the iteration (float32: the residual floor ~1e-6 is far below tol).
        seed: seed of the random start vectors.
        batched: copy each group of equal-shape matrices into one buffer and iterate it with batched
            products (fewer kernel launches), instead of iterating every weight in place on its own.
            Default (None): batched on accelerators and for matrices under :data:`SMALL_MATRIX`
            elements, in place otherwise on CPU (where the copy costs about one product).
    """

    def __init__(
        self,
        model_map: ModelMap,
        tol: float = 1e-3,
        q_min: int = 2,
        q_max: int = 8,
        max_products: int = 32,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        batched: bool | None = None,
    ) -> None:
        if not 0 < tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        if q_min < 1 or max_products < q_min:
            raise ValueError(f"need 1 <= q_min <= max_products, got q_min={q_min}, "
                             f"max_products={max_products}")
        self.model_map = model_map
        self.tol, self.q_min, self.q_max, self.max_products = tol, q_min, max(q_min, q_max), max_products
        self.dtype, self.batched = dtype, batched
        self._generator = torch.Generator().manual_seed(seed)
        self._groups = self._build_groups(model_map)
        self._order = {ref.name: i for i, ref in enumerate(model_map.matrices)}

    def _build_groups(self, model_map: ModelMap) -> list[_Group]:
        members: dict[tuple[tuple[int, int], str], list[MatrixRef]] = {}
        for ref in model_map.matrices:
            members.setdefault((ref.shape, str(ref.device)), []).append(ref)
        groups = []
        for ((rows, cols), device), refs in members.items():
            layout = refs[0].weight()
            # Read in memory order: a weight stored transposed (Conv1D, a fused slice) enters as W^T.
            transpose = layout.stride(1) != 1 and layout.stride(0) == 1
            p, r = (cols, rows) if transpose else (rows, cols)
            batched = self.batched
            if batched is None:  # small matrices: the copy is cheap and batching saves per-call overhead
                batched = torch.device(device).type != "cpu" or rows * cols < SMALL_MATRIX
            buffer = torch.empty((len(refs), p, r), dtype=self.dtype, device=device) if batched else None
            groups.append(_Group(tuple(refs), transpose, p <= r, buffer,
                                 self._random_vectors(len(refs), min(p, r), device)))
        return groups

    def _operands(self, group: _Group) -> torch.Tensor | list[torch.Tensor]:
        """The group's matrices now: its buffer refilled (batched), or views of the weights."""
        weights = [ref.weight() for ref in group.refs]
        operands = [w.t() if group.transpose else w for w in weights]
        if group.buffer is not None:
            torch._foreach_copy_(list(group.buffer.unbind(0)), operands)
            return group.buffer
        return [s if s.dtype == self.dtype else s.to(self.dtype) for s in operands]

    def restart(self, keys: Iterable[str]) -> int:
        """Forget the warm start of the matrices with these layer keys (others are ignored): their
        next measurement starts from a fresh random vector. A warm start can stay on an eigenvector
        that is no longer the top one (two singular values crossed; its residual is small, so the
        check cannot tell), and a random start has a component along every direction. Returns how
        many matrices were restarted."""
        wanted, count = set(keys), 0
        for group in self._groups:
            for row, ref in enumerate(group.refs):
                if ref.key in wanted:
                    group.vectors[row] = self._random_vectors(1, group.k, group.vectors.device)[0]
                    count += 1
        return count

    def _random_vectors(self, count: int, k: int, device: str | torch.device) -> torch.Tensor:
        vectors = torch.randn((count, k), generator=self._generator, dtype=self.dtype)
        unit: torch.Tensor = vectors / vectors.norm(dim=-1, keepdim=True)
        return unit.to(device)

    @torch.no_grad()
    def measure(self, step: int) -> FastMeasure:
        """The fast metrics of every matrix now (the weights' current values)."""
        started = time.perf_counter()
        operands = [self._operands(group) for group in self._groups]
        frobenius_sq, theta, residual, products = self._top_eigenvalues(operands)
        count = len(self._order)
        out = {name: np.full(count, math.nan) for name in ("fro", "theta", "residual", "products")}
        for group, fro, top, res, spent in zip(self._groups, frobenius_sq, theta, residual, products):
            index = [self._order[ref.name] for ref in group.refs]
            out["fro"][index] = fro.double().cpu().numpy()
            out["theta"][index] = top.double().cpu().numpy()
            out["residual"][index] = res.double().cpu().numpy()
            out["products"][index] = spent
        fro_sq, lambda_max = out["fro"], out["theta"]
        finite = np.isfinite(fro_sq) & np.isfinite(lambda_max)
        with np.errstate(divide="ignore", invalid="ignore"):
            stable_rank = np.where(finite & (lambda_max > 0), fro_sq / lambda_max, math.nan)
        return FastMeasure(
            step=int(step), keys=tuple(ref.key for ref in self.model_map.matrices),
            spectral_norm=np.where(finite, np.sqrt(np.clip(lambda_max, 0, None)), math.nan),
            frobenius_norm=np.where(np.isfinite(fro_sq), np.sqrt(fro_sq), math.nan),
            stable_rank=stable_rank, residual=np.where(finite, out["residual"], math.nan),
            products=out["products"], seconds=time.perf_counter() - started,
        )

    def _top_eigenvalues(self, operands: list[torch.Tensor | list[torch.Tensor]]) -> tuple[
            list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[np.ndarray]]:
        """Per group: ``||S||_F^2``, the top Ritz value, its relative residual and the products spent
        by every matrix (see :func:`_lanczos_in_place` and :func:`_lanczos_batched`)."""
        frobenius, theta, residual, spent = [], [], [], []
        for group, stack in zip(self._groups, operands):
            # A NaN or zero vector (a NaN matrix last time) starts afresh.
            bad = ~torch.isfinite(group.vectors).all(dim=-1) | (group.vectors.norm(dim=-1) == 0)
            if bool(bad.any()):
                group.vectors[bad] = self._random_vectors(int(bad.sum()), group.vectors.shape[-1],
                                                          group.vectors.device)
            limit = min(self.max_products, group.k)
            if isinstance(stack, torch.Tensor):
                fro = _frobenius_sq(stack)
                top, res, products = _lanczos_batched(group, stack, self.tol, self.q_min, self.q_max, limit)
            else:
                results = [_lanczos_in_place(s, group.rows_small, group.vectors[i], self.tol, self.q_min,
                                             self.q_max, limit) for i, s in enumerate(stack)]
                fro, top, res, vectors = (torch.stack(column) for column in list(zip(*results))[:4])
                group.vectors = vectors
                products = np.array([result[4] for result in results], dtype=np.int64)
            frobenius.append(fro)
            theta.append(top)
            residual.append(res)
            spent.append(products)
        return frobenius, theta, residual, spent


def _frobenius_sq(stack: torch.Tensor) -> torch.Tensor:
    """``||S||_F^2`` of every matrix of a batched buffer in one pass without a temporary: the squared
    norms of the rows (``S``'s last dimension is the one contiguous in memory, so this is the fast
    order), then their (pairwise) sum. A single float32 norm over a whole matrix would accumulate
    ~1e-3 relative error on a 50k x 768 embedding; sums over rows stay within ~1e-5 even 50k long."""
    rows: torch.Tensor = torch.linalg.vector_norm(stack, dim=-1)
    return rows.square().sum(-1)


def _gram_product(stack: torch.Tensor, rows_small: bool, v: torch.Tensor) -> torch.Tensor:
    """``S S^T v`` (``rows_small``) or ``S^T S v`` for every matrix ``S`` of a batched buffer and its
    vector (a row of ``v``)."""
    flipped = stack.transpose(1, 2)
    first, second = (flipped, stack) if rows_small else (stack, flipped)
    return torch.bmm(second, torch.bmm(first, v.unsqueeze(-1))).squeeze(-1)


def _lanczos_batched(group: _Group, stack: torch.Tensor, tol: float, first_check: int, restart: int,
                     limit: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Lanczos on ``A = S S^T`` (or ``S^T S``) for every matrix ``S`` of a batched buffer at once,
    from the stored vectors, with full re-orthogonalisation, restarted from the top Ritz vectors every
    ``restart`` steps. The top Ritz pairs are checked (one host synchronisation) after
    ``first_check`` products and every ``first_check`` products after that; the group stops when every
    relative residual is at most ``tol`` or after ``limit`` products. Stores the top Ritz vectors
    and returns (top Ritz value, relative residual, products spent) per matrix."""
    batch, k = group.vectors.shape
    dtype, device = group.vectors.dtype, group.vectors.device
    tiny = torch.finfo(dtype).tiny
    used = 0
    while True:
        steps = min(restart, limit - used)
        basis = torch.zeros((batch, steps + 1, k), dtype=dtype, device=device)
        alpha = torch.zeros((batch, steps), dtype=dtype, device=device)
        beta = torch.zeros((batch, steps), dtype=dtype, device=device)
        basis[:, 0] = group.vectors
        for j in range(steps):
            v = basis[:, j]
            w = _gram_product(stack, group.rows_small, v)
            alpha[:, j] = (w * v).sum(-1)
            previous = basis[:, : j + 1]
            for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough"); j is small
                coefficients = torch.bmm(previous, w.unsqueeze(-1))  # bmm: a cheaper call than einsum
                w = w - torch.bmm(coefficients.transpose(1, 2), previous).squeeze(1)
            beta[:, j] = w.norm(dim=-1)
            basis[:, j + 1] = w / beta[:, j : j + 1].clamp_min(tiny)
            used += 1
            if j + 1 < steps and (used < first_check or (used - first_check) % first_check):
                continue
            top, residual, group.vectors = _top_ritz(alpha[:, : j + 1], beta[:, : j + 1],
                                                     basis[:, : j + 1], tiny)
            if used >= limit or bool((residual <= tol).all()):
                return top.clamp_min(0), residual, np.full(batch, used, dtype=np.int64)
            if j + 1 == steps:
                break  # restart from the Ritz vectors


def _lanczos_in_place(s: torch.Tensor, rows_small: bool, start: torch.Tensor, tol: float, first_check: int,
                      restart: int, limit: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``||S||_F^2`` and Lanczos on ``A = S S^T`` (or ``S^T S``) for one matrix ``S`` on CPU, all its
    products one after the other (after the first pass over ``S``, the Frobenius norm, the products
    read it from the cache where it fits) and the small bookkeeping in NumPy (a batched eigensolver
    call costs more than the products of a small matrix). Full re-orthogonalisation, a restart from
    the top Ritz vector every ``restart`` steps, a check after every product from the
    ``first_check``-th on: done when the relative residual is at most ``tol`` or after ``limit``
    products. Returns (``||S||_F^2``, top Ritz value, relative residual, unit Ritz vector, products
    spent); all NaN, with the products spent, for a matrix holding NaN or Inf."""
    frobenius = torch.linalg.vector_norm(s, dim=-1).square().sum()  # by rows, as _frobenius_sq
    vector, used = start, 0
    while True:
        steps = min(restart, limit - used)
        basis = torch.empty((steps + 1, start.shape[0]), dtype=start.dtype, device=start.device)
        basis[0] = vector
        alpha, beta = np.zeros(steps), np.zeros(steps)
        for j in range(steps):
            v = basis[j]
            w = torch.mv(s, torch.mv(s.t(), v)) if rows_small else torch.mv(s.t(), torch.mv(s, v))
            alpha[j] = float(torch.dot(w, v))
            previous = basis[: j + 1]
            for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough"); j is small
                w = w - torch.mv(previous.t(), torch.mv(previous, w))
            beta[j] = float(w.norm())
            used += 1
            if not (math.isfinite(alpha[j]) and math.isfinite(beta[j])):
                nan = torch.tensor(math.nan, dtype=start.dtype)
                return torch.full_like(frobenius, math.nan), nan, nan, torch.full_like(start, math.nan), used
            basis[j + 1] = w / max(beta[j], float(torch.finfo(start.dtype).tiny))
            if j + 1 < steps and used < first_check:
                continue
            tridiagonal = np.diag(alpha[: j + 1]) + np.diag(beta[:j], 1) + np.diag(beta[:j], -1)
            values, vectors = np.linalg.eigh(tridiagonal)
            top, weights = values[-1], vectors[:, -1]
            residual = beta[j] * abs(weights[-1]) / max(abs(top), 1e-300)
            if used >= limit or residual <= tol or j + 1 == steps:
                ritz = torch.mv(basis[: j + 1].t(), torch.from_numpy(weights).to(start.dtype))
                vector = ritz / ritz.norm()
            if used >= limit or residual <= tol:
                return (frobenius, torch.tensor(max(top, 0.0), dtype=start.dtype),
                        torch.tensor(residual, dtype=start.dtype), vector, used)
            if j + 1 == steps:
                break  # restart from the Ritz vector


def _top_ritz(alpha: torch.Tensor, beta: torch.Tensor, basis: torch.Tensor, tiny: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top Ritz value, its relative residual ``beta_j |y_j| / theta`` and its unit Ritz vector, from
    ``j`` Lanczos steps (coefficients ``alpha``, ``beta`` and the first ``j`` basis vectors)."""
    # A NaN/Inf matrix poisons only its own coefficients; zeroed here so that the batched eigensolver
    # still runs for the others (its value is reported as NaN from its norm, its vector restarts).
    alpha, beta = torch.nan_to_num(alpha, 0.0, 0.0, 0.0), torch.nan_to_num(beta, 0.0, 0.0, 0.0)
    tridiagonal = (torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1)
                   + torch.diag_embed(beta[:, :-1], -1))
    values, vectors = torch.linalg.eigh(tridiagonal)
    top, weights = values[:, -1], vectors[:, :, -1]
    ritz = torch.bmm(weights.unsqueeze(1), basis).squeeze(1)
    residual = beta[:, -1] * weights[:, -1].abs() / top.abs().clamp_min(tiny)
    return top, residual, ritz / ritz.norm(dim=-1, keepdim=True)


def merge_measures(model_map: ModelMap, measures: list[FastMeasure | None], step: int) -> FastMeasure:
    """One :class:`FastMeasure` of every matrix of ``model_map`` (in its order) from measures of
    disjoint shares of it (as ranks measure them); a matrix no measure holds (a share whose rank
    failed, given as None) gets NaN values. ``seconds`` is the slowest share's."""
    found = {key: (m, i) for m in measures if m is not None for i, key in enumerate(m.keys)}
    keys = tuple(ref.key for ref in model_map.matrices)

    def column(name: str) -> np.ndarray:
        return np.array([float(getattr(found[k][0], name)[found[k][1]]) if k in found else math.nan
                         for k in keys])

    return FastMeasure(step=int(step), keys=keys, spectral_norm=column("spectral_norm"),
                       frobenius_norm=column("frobenius_norm"), stable_rank=column("stable_rank"),
                       residual=column("residual"), products=column("products"),
                       seconds=max((m.seconds for m in measures if m is not None), default=0.0))


def off_top(measure: FastMeasure, snapshot: Snapshot, tol: float) -> list[str]:
    """Keys of the matrices whose fast ``sigma_max^2`` is more than ``tol`` (relative) below the exact
    one of a full snapshot of the same weights: the lane followed an eigenvector that is no longer
    the top one (see :meth:`FastLane.restart`)."""
    fast = measure.values("spectral_norm")
    return [layer.key for layer in snapshot.layers
            if layer.key in fast and math.isfinite(exact := layer.spectral_norm) and exact > 0
            and math.isfinite(fast[layer.key]) and 1 - (fast[layer.key] / exact) ** 2 > tol]


def fast_lane_error(measure: FastMeasure, snapshot: Snapshot, metric: str = "stable_rank") -> float:
    """Largest relative difference between the fast lane's ``metric`` and a full snapshot's over the
    matrices both have finite values for (NaN when none): the lane's honesty check."""
    fast = measure.values(metric)
    errors = [abs(fast[layer.key] - exact) / abs(exact) for layer in snapshot.layers
              if layer.key in fast and math.isfinite(exact := layer.metric(metric))
              and math.isfinite(fast[layer.key]) and exact != 0]
    return max(errors) if errors else math.nan
