"""The fast lane: spectral norm, Frobenius norm and stable rank of every matrix, cheap enough for
every step.

Stable rank ``||W||_F^2 / sigma_max^2`` needs no spectrum: ``||W||_F^2`` is one pass over ``W``, and
``sigma_max^2`` is the top eigenvalue of ``A = W W^T`` (rows = the smaller side). A matrix that
changed a little since the last step has nearly the same top singular vector, so a few Lanczos steps
started from the previous Ritz vector find ``sigma_max^2`` again. Each Lanczos step costs one product
``A x = W (W^T x)``, about ``4 m n`` floating-point operations, against ``~6 m n`` per token of
training.

How it runs:

- Matrices of equal shape form a group, iterated together: one ``(batch, k)`` block of Lanczos
  vectors and batched bookkeeping. On an accelerator (``batched=True``, the default there) the
  group's weights are copied into one reused buffer (a fused copy, no allocation after the first
  step, in the weights' own memory layout) and multiplied with batched products. On CPU
  (``batched=False``, the default there) each matrix is multiplied where it lies, a view of the
  parameter: the products are bound by memory bandwidth, so a copy would cost about as much as one
  product and batching gains nothing.
- A round is ``q`` Lanczos steps with full re-orthogonalisation (``q`` is small), a Rayleigh-Ritz
  step on the ``q x q`` tridiagonal matrix, and a restart from the top Ritz vector. The Ritz value
  never exceeds ``lambda_max`` and never decreases over restarts.
- Convergence is checked once per round for the whole model (one host synchronisation per round,
  not per matrix): the Lanczos residual ``r = beta_q |y_q|`` of the top Ritz pair bounds the distance
  from the Ritz value to an eigenvalue of ``A``; rounds continue, with ``q`` doubled, while some
  group's ``r / theta`` exceeds ``tol``, up to ``max_products`` products per matrix. ``r / theta``
  over-states the error of the value (in practice by 10x to 1000x: the value converges faster than the
  vector), so the default ``tol`` of 3e-3 keeps stable rank well within 1e-3 of a float64 SVD on the
  trained and training models we measured (tests/core/test_fast_lane.py).
- The relative residual of each matrix is reported with its value, and a full snapshot can be
  compared with the fast values (:func:`fast_lane_error`), so a user sees how honest the lane is.

A warm start needs one round of ``q_min`` steps on a trained model; a cold start (the first step,
random initialisation without a spectral gap) needs several. A matrix containing NaN/Inf gets NaN
values and a fresh start vector next time; the others are unaffected.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .model_map import MatrixRef, ModelMap
from .snapshot import LayerSpectrum, Snapshot

FAST_METRICS: tuple[str, ...] = ("stable_rank", "spectral_norm", "frobenius_norm")


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
        products: products ``W W^T x`` spent per matrix this step (the same within a shape group).
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
        q_min: Lanczos steps of the first round of a step (doubled each further round, up to q_max).
        q_max: most Lanczos steps of one round (longer rounds overshoot on a warm start).
        max_products: most products ``W W^T x`` per matrix and step.
        dtype: floating type of the iteration (float32: the residual floor ~1e-6 is far below tol).
        seed: seed of the random start vectors.
        batched: copy each group of equal-shape matrices into one buffer and multiply it with batched
            products (fewer kernel launches), instead of multiplying every weight in place. Default
            (None): batched on accelerators, in place on CPU (where the copy costs about one product).
    """

    def __init__(
        self,
        model_map: ModelMap,
        tol: float = 3e-3,
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
            batched = self.batched if self.batched is not None else torch.device(device).type != "cpu"
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

    def _random_vectors(self, count: int, k: int, device: str | torch.device) -> torch.Tensor:
        vectors = torch.randn((count, k), generator=self._generator, dtype=self.dtype)
        unit: torch.Tensor = vectors / vectors.norm(dim=-1, keepdim=True)
        return unit.to(device)

    @torch.no_grad()
    def measure(self, step: int) -> FastMeasure:
        """The fast metrics of every matrix now (the weights' current values)."""
        started = time.perf_counter()
        operands = [self._operands(group) for group in self._groups]
        frobenius_sq = [_frobenius_sq(stack) for stack in operands]
        theta, residual, products = self._top_eigenvalues(operands)
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

    def _top_eigenvalues(self, operands: list[torch.Tensor | list[torch.Tensor]]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        """Rounds of restarted Lanczos on every group until all residuals are below ``tol``."""
        for group in self._groups:  # a NaN or zero vector (NaN matrix last time) starts afresh
            bad = ~torch.isfinite(group.vectors).all(dim=-1) | (group.vectors.norm(dim=-1) == 0)
            if bool(bad.any()):
                group.vectors[bad] = self._random_vectors(int(bad.sum()), group.vectors.shape[-1],
                                                          group.vectors.device)
        active = list(range(len(self._groups)))
        theta: list[torch.Tensor] = [torch.zeros(0)] * len(self._groups)
        residual: list[torch.Tensor] = [torch.zeros(0)] * len(self._groups)
        spent = [0] * len(self._groups)
        q = self.q_min
        while active:
            for g in active:
                steps = min(q, self.max_products - spent[g], self._groups[g].k)
                theta[g], residual[g] = _lanczos_round(self._groups[g], operands[g], steps)
                spent[g] += steps
            # One host synchronisation per round for the whole model.
            worst = torch.stack([torch.nan_to_num(residual[g], nan=0.0).max().cpu() for g in active]).tolist()
            active = [g for g, r in zip(active, worst)
                      if r > self.tol and spent[g] < min(self.max_products, self._groups[g].k)]
            q = min(2 * q, self.q_max)
        return theta, residual, spent


def _frobenius_sq(operands: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """``||S||_F^2`` of every matrix of a group in one pass without a temporary: the squared norms
    of the rows (``S``'s last dimension is the one contiguous in memory, so this is the fast order),
    then their (pairwise) sum. A single float32 norm over a whole matrix would accumulate ~1e-3
    relative error on a 50k x 768 embedding; sums over rows stay within ~1e-5 even 50k long."""
    if isinstance(operands, torch.Tensor):
        rows: torch.Tensor = torch.linalg.vector_norm(operands, dim=-1)
        return rows.square().sum(-1)
    return torch.stack([torch.linalg.vector_norm(s, dim=-1).square().sum() for s in operands])


def _gram_product(operands: torch.Tensor | list[torch.Tensor], rows_small: bool, v: torch.Tensor
                  ) -> torch.Tensor:
    """``S S^T v`` (``rows_small``) or ``S^T S v`` for every matrix ``S`` of a group and its
    vector (a row of ``v``): batched products on a buffer, else one pair of products per matrix."""
    if isinstance(operands, torch.Tensor):
        flipped = operands.transpose(1, 2)
        first, second = (flipped, operands) if rows_small else (operands, flipped)
        return torch.bmm(second, torch.bmm(first, v.unsqueeze(-1))).squeeze(-1)
    if rows_small:
        return torch.stack([torch.mv(s, torch.mv(s.t(), x)) for s, x in zip(operands, v)])
    return torch.stack([torch.mv(s.t(), torch.mv(s, x)) for s, x in zip(operands, v)])


def _lanczos_round(group: _Group, operands: torch.Tensor | list[torch.Tensor], steps: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` Lanczos steps on ``A = S S^T`` (or ``S^T S``) for every matrix ``S`` of the group,
    from its stored vector; stores the top Ritz vector and returns (top Ritz value, relative
    residual)."""
    batch, k = group.vectors.shape
    dtype, device = group.vectors.dtype, group.vectors.device
    basis = torch.zeros((batch, steps + 1, k), dtype=dtype, device=device)
    alpha = torch.zeros((batch, steps), dtype=dtype, device=device)
    beta = torch.zeros((batch, steps), dtype=dtype, device=device)
    basis[:, 0] = group.vectors
    for j in range(steps):
        v = basis[:, j]
        w = _gram_product(operands, group.rows_small, v)
        alpha[:, j] = (w * v).sum(-1)
        previous = basis[:, : j + 1]
        for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough"); q is small
            w = w - torch.einsum("bj,bjk->bk", torch.einsum("bjk,bk->bj", previous, w), previous)
        beta[:, j] = w.norm(dim=-1)
        basis[:, j + 1] = w / beta[:, j : j + 1].clamp_min(torch.finfo(dtype).tiny)
    # A NaN/Inf matrix poisons only its own coefficients; zeroed here so that the batched eigensolver
    # still runs for the others (its value is reported as NaN from its norm, its vector restarts).
    alpha, beta = torch.nan_to_num(alpha, 0.0, 0.0, 0.0), torch.nan_to_num(beta, 0.0, 0.0, 0.0)
    tridiagonal = (torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1)
                   + torch.diag_embed(beta[:, :-1], -1))
    values, vectors = torch.linalg.eigh(tridiagonal)
    top, weights = values[:, -1], vectors[:, :, -1]
    ritz = torch.einsum("bj,bjk->bk", weights, basis[:, :steps])
    group.vectors = ritz / ritz.norm(dim=-1, keepdim=True)
    residual = beta[:, -1] * weights[:, -1].abs() / top.abs().clamp_min(torch.finfo(dtype).tiny)
    return top.clamp_min(0), residual


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


def fast_lane_error(measure: FastMeasure, snapshot: Snapshot, metric: str = "stable_rank") -> float:
    """Largest relative difference between the fast lane's ``metric`` and a full snapshot's over the
    matrices both have finite values for (NaN when none): the lane's honesty check."""
    fast = measure.values(metric)
    errors = [abs(fast[layer.key] - exact) / abs(exact) for layer in snapshot.layers
              if layer.key in fast and math.isfinite(exact := layer.metric(metric))
              and math.isfinite(fast[layer.key]) and exact != 0]
    return max(errors) if errors else math.nan
