"""Bounds on attention logits from ``||M_h||_2``: input norms, concentration thresholds, FP8 scales.

Pure functions on numbers and tensors; the derivations and every assumption are in
docs/attention.md. Notation: head h has logits ``S_ij = c x~_i^T M~_h x~_j`` where ``x~ = [x; 1]``
when the projections have biases (``x~ = x`` otherwise), c is the model's logit scale
(``1/sqrt(d_h)`` unless the model folds it elsewhere), d the input width, r the numerical rank of
M_h, and n the sequence length.

- Deterministic: ``|S_ij| <= B = c R_q R_k ||M~_h||_2`` for all inputs with ``||x~_i|| <= R_q`` and
  ``||x~_j|| <= R_k`` (Cauchy-Schwarz and the definition of the operator norm).
- Input norms after a LayerNorm or RMSNorm: ``||g * z + b|| <= ||g||_inf sqrt(d) + ||b||``
  because the normalised vector z has ``||z||^2 = d var / (var + eps) < d`` (LayerNorm) or
  ``d ms / (ms + eps) < d`` (RMSNorm).
- Rank-aware concentration: with the directional logit ``Z_ij = d S_ij / (sqrt(r) c ||x~_i||
  ||x~_j|| ||M~_h||_2)`` sub-Gaussian with variance proxy gamma (typicality),
  ``P(max_{i,j<=n} |S_ij| > t) <= 2 n^2 exp(-d^2 t^2 / (2 gamma r B^2))``, i.e. the tail decays like
  ``exp(-d^2 a^2 / (2 gamma r))`` in ``a = t / B``.
- Rank-agnostic: query directions uniform on the sphere (Levy: ``P(|u . w| > s ||w||) <=
  2 exp(-d s^2 / 2)``) give ``exp(-d a^2 / 2)``: the rank-aware form with r = d and gamma = 1.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
FP8_MAX: dict[str, float] = {"e4m3": E4M3_MAX, "e5m2": E5M2_MAX}

# Typicality used when no sample batch is given (docs/attention.md, "Choosing gamma"): eight times
# the isotropic value 1, and above every per-head value measured on the pretrained MiniLM (<= 5.5).
# The attention module caps it at d / r, where the rank-aware threshold equals the rank-agnostic one.
DEFAULT_GAMMA = 8.0


def norm_output_bound(weight: torch.Tensor | None, bias: torch.Tensor | None, dim: int) -> float:
    """Largest ``||y||`` a LayerNorm or RMSNorm of width ``dim`` can output: ``||g||_inf sqrt(d) + ||b||``.

    LayerNorm ``y = g * (h - mean) / sqrt(var + eps) + b`` and RMSNorm ``y = g * h / sqrt(ms + eps)
    (+ b)`` both apply ``g`` elementwise to a vector z with ``||z|| < sqrt(d)``; then
    ``||y|| <= ||g * z|| + ||b|| <= ||g||_inf ||z|| + ||b||``. The bound is nearly attained (z with
    almost all its norm on the coordinate of the largest |g|), so it cannot be much improved
    without knowing the inputs.

    Args:
        weight: the effective elementwise gain g (``1 + w`` for norms that store an offset, as
            Gemma's); None for a norm without gain (g = 1).
        bias: the additive b, or None.
        dim: the normalised width d.
    """
    gain = 1.0 if weight is None else float(weight.detach().abs().max())
    shift = 0.0 if bias is None else float(bias.detach().double().norm())
    return gain * math.sqrt(dim) + shift


def augmented_norm(norm: float, with_bias: bool) -> float:
    """``||[x; 1]|| = sqrt(||x||^2 + 1)`` when biases are folded into an extra input column."""
    return math.sqrt(norm * norm + 1.0) if with_bias else norm


def deterministic_bound(interaction_norm: float, norm_q: float, norm_k: float, logit_scale: float) -> float:
    """``B = c R_q R_k ||M_h||_2``: ``|S_ij| <= B`` for every input whose (augmented) norms are
    below ``R_q`` (queries) and ``R_k`` (keys)."""
    return logit_scale * norm_q * norm_k * interaction_norm


def rank_aware_threshold(bound: float, gamma: float, rank: int, dim: int, seq_len: int, delta: float
                         ) -> float:
    """Smallest t with ``2 n^2 exp(-d^2 t^2 / (2 gamma r B^2)) <= delta``, capped at B.

    ``t = B sqrt(2 gamma r ln(2 n^2 / delta)) / d``. Under the typicality assumption (the
    directional logits Z_ij are sub-Gaussian with proxy gamma) ``P(max_{i,j<=n} |S_ij| > t) <= delta``
    by a union bound over the n^2 pairs (no independence needed). B itself always holds, hence the cap.
    """
    _check(delta, seq_len)
    t = bound * math.sqrt(2.0 * gamma * rank * math.log(2.0 * seq_len**2 / delta)) / dim
    return min(t, bound)


def rank_agnostic_threshold(bound: float, dim: int, seq_len: int, delta: float) -> float:
    """``t = B sqrt(2 ln(2 n^2 / delta) / d)`` (capped at B): the rank-aware threshold with r = d and
    gamma = 1, which needs only that query directions are uniform on the sphere (Levy's lemma)."""
    return rank_aware_threshold(bound, 1.0, dim, dim, seq_len, delta)


def exponent_ratio(dim: int, gamma: float, rank: int) -> float:
    """``d / (gamma r)``: rank-aware exponent ``d^2 a^2 / (2 gamma r)`` over rank-agnostic ``d a^2 / 2``."""
    return dim / (gamma * rank) if gamma * rank > 0 else math.inf


def directional_logits(logits: torch.Tensor, norms_i: torch.Tensor, norms_j: torch.Tensor,
                       interaction_norm: float, logit_scale: float, rank: int, dim: int) -> torch.Tensor:
    """``Z_ij = d S_ij / (sqrt(r) c ||x~_i|| ||x~_j|| ||M~_h||_2)``; under isotropic inputs its
    conditional variance proxy is ``d ||M x_j||^2 / (r ||M||^2 ||x_j||^2)``, of mean
    ``||M||_F^2 / (r ||M||_2^2) <= 1``.

    Args:
        logits: [..., n_i, n_j] observed S_ij of one head.
        norms_i, norms_j: [..., n_i] and [..., n_j] augmented input norms of queries and keys.
    """
    scale = dim / (math.sqrt(rank) * logit_scale * interaction_norm)
    return logits * scale / (norms_i.unsqueeze(-1) * norms_j.unsqueeze(-2))


def estimate_gamma(max_sq_directional: float, num_pairs: int) -> float:
    """Typicality matched to the sample's extreme: ``gamma^ = max Z_ij^2 / (2 ln(2 m))`` over m pairs.

    Under the assumption with proxy gamma, ``P(max_m |Z| > sqrt(2 gamma ln(2 m / eps))) <= eps``;
    gamma^ is the proxy whose eps = 1 level equals the observed maximum, so thresholds at
    ``delta << 1`` sit ``sqrt(ln(2 n^2 / delta) / ln(2 m))`` above the sample's largest logit
    (for unit norms).
    """
    if num_pairs < 1:
        return math.nan
    return max_sq_directional / (2.0 * math.log(2.0 * num_pairs))


# one sequence to fit and one to check it: the least a held-out split needs (weak, but a check)
MIN_CALIBRATION_SEQUENCES = 2


def calibrated_gamma(sequence_gamma: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """A conservative typicality per head from per-sequence estimates, or None below
    :data:`MIN_CALIBRATION_SEQUENCES` sequences.

    ``sequence_gamma`` [S, H] holds, per sequence s, ``max Z^2 / (2 ln(2 m_s))`` (the proxy whose
    eps = 1 level matches that sequence's extreme). A held-out split measures how far the largest
    value of one half underestimates the other: the even sequences fit ``g_fit[h] = max_s``, the odd
    ones check it, and ``kappa = max(1, max_{s odd, h} g[s, h] / g_fit[h])`` (pooled over the heads, so
    one factor per attention). Then ``gamma_h = max(1, kappa * max_s g[s, h])``: never below the
    paper's typical 1, and above every sequence seen by the out-of-sample factor kappa.

    Returns:
        (gamma [H], kappa).
    """
    g = sequence_gamma.double()
    if g.ndim != 2 or g.shape[0] < MIN_CALIBRATION_SEQUENCES:
        return None
    fit = g[0::2].amax(0)
    with torch.no_grad():
        ratio = torch.where(fit > 0, g[1::2] / fit.clamp_min(torch.finfo(g.dtype).tiny), torch.inf)
    kappa = max(1.0, float(ratio.max()))
    return torch.clamp(kappa * g.amax(0), min=1.0), kappa


def fp8_scale(bound: float, fmt: str = "e4m3") -> float:
    """Scale s with ``s * |S| <= FP8 max`` whenever ``|S| <= bound``: ``s = max / bound``
    (E4M3 max 448, E5M2 max 57344); multiply the logits by s before the cast, divide after."""
    if fmt not in FP8_MAX:
        raise ValueError(f"unknown FP8 format {fmt!r}; choose from {sorted(FP8_MAX)}")
    if math.isnan(bound):
        return math.nan
    return FP8_MAX[fmt] / bound if bound > 0 else math.inf


def _check(delta: float, seq_len: int) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
