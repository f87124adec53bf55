"""Interaction norms of attention heads, ``||M_h||_2`` with ``M_h = W_Q^h^T W_K^h``, never forming M_h.

Notation (docs/attention.md): the projection of head h maps an input x (width d) to
``q = W_Q^h x`` and ``k = W_K^h x`` (``W^h`` is d_h x d: rows ``h*d_h:(h+1)*d_h`` of the
projection as the model applies it, out x in). The logit is ``S_ij = c * q_i . k_j =
c * x_i^T M_h x_j`` with ``M_h = W_Q^h^T W_K^h`` (d x d, rank <= d_h) and c the model's logit
scale (``1/sqrt(d_h)`` in most models).

Three routes, all batched over heads (leading dimension) on the weights' device:

- :func:`interaction_spectrum_qr` (exact): thin QR ``W_Q^h^T = Q_q R_q``, ``W_K^h^T = Q_k R_k``
  gives ``M_h = Q_q (R_q R_k^T) Q_k^T`` with orthonormal ``Q``, so the nonzero singular values of
  M_h are those of the d_h x d_h matrix ``R_q R_k^T``; cost O(d d_h^2) per head instead of O(d^3).
- :func:`interaction_norms_power` (the paper's route): power iteration on ``M_h^T M_h`` applied as
  ``W_K^T (W_Q (W_Q^T (W_K v)))``, four d x d_h products per step; warm-startable.
- :func:`interaction_norms_explicit`: the reference, forming M_h (for tests and benchmarks only).

Grouped-query attention: ``wk`` holds ``H_kv`` heads and query head h uses key head
``h // (H / H_kv)`` (Hugging Face ``repeat_kv`` order). Every route indexes the small per-group
factors or reshapes the query batch as (H_kv, H / H_kv, ...) instead of repeating W_K.

Biases: :func:`head_slices` appends the bias as an extra input column, ``W~ = [W, b]``, so that
``q = W~ [x; 1]`` exactly; M~ is then (d+1) x (d+1) and everything here applies unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_DTYPE = torch.float64


def head_slices(weight: torch.Tensor, num_heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head slices of a projection, ``[H, d_h, d]``, or ``[H, d_h, d + 1]`` with the bias column.

    Args:
        weight: the projection as applied (out x in), rows ``h*d_h:(h+1)*d_h`` being head h.
        num_heads: heads in this projection (key/value heads for a grouped-query W_K).
        bias: the projection's bias (out,), appended as the last column ``[W^h, b^h]`` so that
            ``W^h x + b^h = [W^h, b^h] [x; 1]``.

    Returns:
        A view when there is no bias, otherwise a new tensor.
    """
    out_features, in_features = weight.shape
    if out_features % num_heads:
        raise ValueError(f"{out_features} rows do not split into {num_heads} heads")
    heads = weight.reshape(num_heads, out_features // num_heads, in_features)
    if bias is None:
        return heads
    return torch.cat([heads, bias.reshape(num_heads, -1, 1).to(heads.dtype)], dim=-1)


def _group_size(wq: torch.Tensor, wk: torch.Tensor) -> int:
    if wq.ndim != 3 or wk.ndim != 3 or wq.shape[1:] != wk.shape[1:]:
        raise ValueError(f"wq {tuple(wq.shape)} and wk {tuple(wk.shape)} must be [H, d_h, d] alike")
    if wq.shape[0] % wk.shape[0]:
        raise ValueError(f"{wq.shape[0]} query heads do not split into {wk.shape[0]} key/value groups")
    return wq.shape[0] // wk.shape[0]


@dataclass(frozen=True)
class InteractionSpectrum:
    """Singular values of every head's M_h, from the QR route.

    Attributes:
        singular_values: [H, d_h] descending; the nonzero singular values of M_h (M_h has at most
            d_h of them). ``singular_values[:, 0]`` is ``||M_h||_2``.
        q_norms: [H] ``||W_Q^h||_2`` (= ``||R_q||_2``).
        k_norms: [H] ``||W_K^g(h)||_2`` of the key group each query head reads.
    """

    singular_values: torch.Tensor
    q_norms: torch.Tensor
    k_norms: torch.Tensor

    @property
    def norms(self) -> torch.Tensor:
        """[H] ``||M_h||_2``."""
        return self.singular_values[:, 0]


def _r_factor(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """R of the thin QR of each ``W^h^T`` ([H, d, d_h]): [H, min(d, d_h), d_h]."""
    return torch.linalg.qr(w.to(dtype).transpose(-1, -2), mode="r").R


def interaction_spectrum_qr(wq: torch.Tensor, wk: torch.Tensor, dtype: torch.dtype = DEFAULT_DTYPE
                            ) -> InteractionSpectrum:
    """Exact singular values of ``M_h = W_Q^h^T W_K^g(h)`` from ``R_q R_k^T`` (d_h x d_h).

    ``W_Q^h^T = Q_q R_q`` and ``W_K^g^T = Q_k R_k`` (thin QR, Q with orthonormal columns) give
    ``M_h = Q_q R_q R_k^T Q_k^T``, hence ``sigma(M_h) = sigma(R_q R_k^T)`` (plus zeros).

    Args:
        wq: [H, d_h, d] query head slices (see :func:`head_slices`).
        wk: [H_kv, d_h, d] key head slices; ``H % H_kv == 0``, query head h reads group
            ``h // (H / H_kv)``.
        dtype: working precision (float64 by default: the QR is cheap, O(H d d_h^2)).
    """
    group = _group_size(wq, wk)
    r_q = _r_factor(wq, dtype)  # [H, k, d_h]
    r_k = _r_factor(wk, dtype)  # [H_kv, k, d_h]
    heads_kv, k_rows, head_dim = r_k.shape
    # Group the query heads as (H_kv, group, ...) and broadcast each key factor over its group.
    small = r_q.reshape(heads_kv, group, k_rows, head_dim) @ r_k.transpose(-1, -2).unsqueeze(1)
    singular_values = torch.linalg.svdvals(small.reshape(-1, k_rows, k_rows))
    q_norms = torch.linalg.svdvals(r_q)[:, 0]
    k_norms = torch.linalg.svdvals(r_k)[:, 0].repeat_interleave(group)
    return InteractionSpectrum(singular_values, q_norms, k_norms)


@dataclass(frozen=True)
class PowerIterationResult:
    """Outcome of :func:`interaction_norms_power`.

    Attributes:
        norms: [H] estimates of ``||M_h||_2``; each is a lower bound (``sqrt(||M^T M v||)`` for a
            unit v never exceeds ``||M||_2``) and increases to it.
        vectors: [H, d] the final right singular vector estimates; pass them back as ``v0`` at the
            next snapshot to warm-start.
        iterations: steps taken (the same for every head: all heads run until the slowest has
            converged).
        tolerance: the estimated relative error reached, ``max_h e_h`` (see
            :func:`interaction_norms_power`); ``inf`` while the changes are not yet shrinking.
        change: the largest relative change of the estimate in the last step.
        converged: whether ``tolerance <= tol`` was reached within ``max_iter``.
    """

    norms: torch.Tensor
    vectors: torch.Tensor
    iterations: int
    tolerance: float
    change: float
    converged: bool


def interaction_norms_power(
    wq: torch.Tensor,
    wk: torch.Tensor,
    v0: torch.Tensor | None = None,
    tol: float = 1e-8,
    max_iter: int = 10000,
    dtype: torch.dtype = DEFAULT_DTYPE,
    seed: int = 0,
) -> PowerIterationResult:
    """``||M_h||_2`` by implicit power iteration on ``A_h = M_h^T M_h`` (the paper's route).

    One step, four batched d_h x d products and never a d x d one: ``a = W_K v`` ([H, d_h]),
    ``y = W_Q^T a = M v``, ``b = W_Q y``, ``z = W_K^T b = A v``; the estimate is ``s = sqrt(||z||)``
    and ``v <- z / ||z||``.

    Stopping: the relative change ``c_k = |s(k) - s(k-1)| / s(k)`` shrinks geometrically, with a
    ratio q tending to ``(s_2 / s_1)^2``, so the remaining error is about the tail sum
    ``e = c_k q / (1 - q)``. A small change alone would stop far too early when ``s_2 ~ s_1`` (the
    error is then ~``c_k / (1 - q)``, hundreds of times c_k for the random-init matrices of
    benchmarks/bench_attention.py), so it stops when ``e <= tol`` and ``c_k <= tol`` for every head,
    with q the largest of the last three change ratios (so at least five steps).

    Args:
        wq, wk: as in :func:`interaction_spectrum_qr`.
        v0: [H, d] starting vectors (e.g. the previous snapshot's ``vectors``); random otherwise.
        tol: estimated relative error at which to stop.
        max_iter: most steps.
        dtype: working precision.
        seed: seed of the random start (runs are reproducible).
    """
    group = _group_size(wq, wk)
    wq = wq.to(dtype)
    wk = wk.to(dtype)
    heads, _, dim = wq.shape
    heads_kv, head_dim, _ = wk.shape
    tiny, eps = torch.finfo(dtype).tiny, torch.finfo(dtype).eps
    if v0 is None:
        generator = torch.Generator().manual_seed(seed)
        v = torch.randn(heads, dim, generator=generator, dtype=dtype).to(wq.device)
    else:
        v = v0.to(device=wq.device, dtype=dtype).clone()
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(tiny)
    estimate = torch.zeros(heads, dtype=dtype, device=wq.device)
    previous = torch.full_like(estimate, math.inf)
    ratios = torch.ones(3, heads, dtype=dtype, device=wq.device)
    error = change = math.inf
    steps = 0
    while steps < max_iter:
        steps += 1
        # Query heads grouped by key head, (H_kv, H / H_kv, ...), so W_K is never repeated.
        a = torch.bmm(v.reshape(heads_kv, group, dim), wk.transpose(1, 2))  # [H_kv, G, d_h]
        y = torch.bmm(a.reshape(heads, 1, head_dim), wq)  # M v: [H, 1, d]
        b = torch.bmm(wq, y.transpose(1, 2))  # [H, d_h, 1]
        z = torch.bmm(b.reshape(heads_kv, group, head_dim), wk).reshape(heads, dim)  # M^T M v
        z_norm = z.norm(dim=-1).clamp_min(tiny)
        new = z_norm.sqrt()
        changes = (new - estimate).abs() / new
        # The first two changes (from the zero estimate, then from the start vector) say nothing
        # about the rate: q counts only ratios from step 3 on, so at least five steps are taken.
        ratio = (changes / previous).nan_to_num(0.0, 0.0, 0.0) if steps >= 3 else torch.ones_like(changes)
        ratios = torch.cat([ratios[1:], ratio.unsqueeze(0)])
        q = ratios.amax(0)
        tail = torch.where(q < 1, changes * q / (1 - q).clamp_min(tiny), torch.full_like(q, math.inf))
        tail = torch.where(changes <= 16 * eps, torch.zeros_like(tail), tail)  # at rounding level: done
        error, change = float(tail.max()), float(changes.max())
        estimate, previous = new, changes
        v = z / z_norm.unsqueeze(-1)
        if error <= tol and change <= tol:
            break
    return PowerIterationResult(estimate, v, steps, error, change, error <= tol and change <= tol)


def interaction_norms_explicit(wq: torch.Tensor, wk: torch.Tensor, dtype: torch.dtype = DEFAULT_DTYPE
                               ) -> torch.Tensor:
    """Reference ``||M_h||_2`` forming each d x d product ``W_Q^h^T W_K^g(h)`` (O(d^3) per head).

    Keys are expanded explicitly here (``repeat_interleave``), the independent check of the
    grouped routes.
    """
    group = _group_size(wq, wk)
    wk_full = wk.to(dtype).repeat_interleave(group, dim=0)
    products = wq.to(dtype).transpose(-1, -2) @ wk_full
    return torch.linalg.matrix_norm(products, ord=2)


def numerical_rank(singular_values: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """Numerical rank per row of descending singular values: ``#{s_i > s_1 * size * eps}``.

    The tolerance is NumPy's ``matrix_rank`` default (``size`` = the larger dimension of M_h, d or
    d + 1; ``eps`` = machine epsilon of the weights' storage dtype).
    """
    threshold = singular_values[..., :1] * (size * eps)
    return (singular_values > threshold).sum(dim=-1)
