"""Attention logit bounds and FP8 scale factors per head (Emadi 2026, arXiv 2602.18851).

For head h the logit is ``S_ij = c x~_i^T M_h x~_j`` with ``M_h = W_Q^h^T W_K^h`` (rank <= d_h),
c the model's logit scale (``1/sqrt(d_h)`` in most models) and ``x~ = [x; 1]`` when the projections
have biases (folded in exactly as an extra column). Per head this module reports

- the interaction norm ``||M_h||_2`` (exact, from the thin-QR route of
  :mod:`spectral_plugins.attention.norms`; or by warm-started power iteration),
- the deterministic bound ``B_h = c R_q R_k ||M_h||_2`` with R the largest input norm (from the
  preceding LayerNorm/RMSNorm's weights, else from a sample batch),
- the rank-aware threshold ``t_h = min(B_h, B_h sqrt(2 gamma_h r_h ln(2 n^2 / delta)) / d)``,
  exceeded by ``max_ij |S_ij|`` with probability <= delta under the typicality assumption, and
  the rank-agnostic one (r = d, gamma = 1), with the exponent ratio ``d / (gamma_h r_h)``,
- FP8 scale factors ``448 / bound`` (E4M3) and ``57344 / bound`` (E5M2) for each bound.

Derivations and assumptions: docs/attention.md; formulas: :mod:`spectral_plugins.attention.stats`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.keys import attention_key
from ..core.metrics import MetricSpec
from ..core.model_map import ModelMap, map_model
from . import stats as st
from .inputs import AttentionSite, CallModel, NormInfo, attention_sites, observed_head_stats, trace_inputs
from .norms import interaction_norms_power, interaction_spectrum_qr, numerical_rank

BOUNDS = ("deterministic", "rank_aware", "rank_agnostic")

ATTENTION_METRICS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec("interaction_norm", "max_h ||M_h||_2, M_h = W_Q^h^T W_K^h", "largest head interaction norm"),
    MetricSpec("logit_bound", "max_h B_h, B_h = c R_q R_k ||M_h||_2", "guaranteed bound on |logit|"),
    MetricSpec("logit_bound_rank_aware", "max_h min(B_h, B_h sqrt(2 gamma r ln(2 n^2/delta)) / d)",
               "rank-aware threshold, exceeded with probability <= delta"),
    MetricSpec("logit_bound_rank_agnostic", "max_h min(B_h, B_h sqrt(2 ln(2 n^2/delta) / d))",
               "rank-agnostic threshold (r = d, gamma = 1)"),
    MetricSpec("exponent_ratio", "min_h d / (gamma_h r_h)", "rank-aware over rank-agnostic tail exponent",
               summary="min"),
    MetricSpec("gamma", "max_h gamma_h", "typicality (variance proxy of the directional logit)"),
    *(MetricSpec(f"fp8_{fmt}_scale{suffix}", f"{st.FP8_MAX[fmt]:g} / {bound_name}",
                 f"FP8 {fmt.upper()} logit scale from the {bound}", summary="min")
      for fmt in st.FP8_MAX
      for bound, suffix, bound_name in (
          ("deterministic bound", "", "logit_bound"),
          ("rank-aware threshold", "_rank_aware", "logit_bound_rank_aware"),
          ("rank-agnostic threshold", "_rank_agnostic", "logit_bound_rank_agnostic"))),
    MetricSpec("observed_logit_max", "max_h max_ij |S_ij| over the sample batch", "largest observed |logit|"),
)}


@dataclass(frozen=True)
class HeadBound:
    """Bounds of one query head (logits in the model's own units, after its scale c).

    Attributes:
        layer: the attention's key (``L03_attn``); head / kv_head: query head and its key group.
        interaction_norm: ``||M_h||_2`` (bias-augmented when biases are included).
        q_norm, k_norm: ``||W_Q^h||_2`` and ``||W_K^g||_2`` (NaN with ``method="power"``).
        rank: numerical rank r of M_h (``d_h`` with ``method="power"``, the conservative value).
        gamma: typicality used (estimated from the sample, given, or the default).
        deterministic_bound: B_h; rank_aware_bound / rank_agnostic_bound: thresholds at delta.
        exponent_ratio: ``d / (gamma r)``.
        observed_max: largest ``|S_ij|`` in the sample batch (NaN without one, or under RoPE).
    """

    layer: str
    head: int
    kv_head: int
    interaction_norm: float
    q_norm: float
    k_norm: float
    rank: int
    gamma: float
    deterministic_bound: float
    rank_aware_bound: float
    rank_agnostic_bound: float
    exponent_ratio: float
    observed_max: float = math.nan

    def bound(self, which: str = "deterministic") -> float:
        """One of :data:`BOUNDS`."""
        return float(getattr(self, f"{which}_bound"))

    def fp8_scale(self, fmt: str = "e4m3", which: str = "deterministic") -> float:
        """``FP8 max / bound`` (:func:`spectral_plugins.attention.stats.fp8_scale`)."""
        return st.fp8_scale(self.bound(which), fmt)

    def to_row(self) -> dict[str, Any]:
        """A flat table row: every field plus the six FP8 scales."""
        row = asdict(self)
        for fmt in st.FP8_MAX:
            for which in BOUNDS:
                row[f"fp8_{fmt}_{which}"] = self.fp8_scale(fmt, which)
        return row


@dataclass(frozen=True)
class LayerBound:
    """Bounds of one attention, with its heads.

    Attributes:
        key: ``L03_attn``; depth: block index; q_name / k_name: the matrices' names.
        num_heads, num_kv_heads, head_dim, dim: H, H_kv, d_h and the input width d.
        with_bias: whether biases were folded in (``x~ = [x; 1]``).
        logit_scale, logit_scale_source: c and where it came from.
        rope: rotary embeddings rotate q and k; then ``||W_Q^h|| ||W_K^h||`` replaces ``||M_h||``
            in the bounds (valid for every rotation), and no logits are observed.
        input_norm_q, input_norm_k: the R_q, R_k used (augmented); input_norm_source: "layernorm",
            "rmsnorm", "sample" (largest observed, not guaranteed) or "none".
        norm_module: the preceding norm of the queries (if found).
        sample_input_norm: the largest observed (unaugmented) input norm, NaN without a sample.
        seq_len: n in the thresholds.
        gamma_inflation: the held-out factor kappa of the calibrated gamma
            (:func:`~spectral_plugins.attention.stats.calibrated_gamma`; NaN when gamma was not
            calibrated on a sample).
    """

    key: str
    depth: int | None
    q_name: str
    k_name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dim: int
    with_bias: bool
    logit_scale: float
    logit_scale_source: str
    rope: bool
    input_norm_q: float
    input_norm_k: float
    input_norm_source: str
    norm_module: str | None
    sample_input_norm: float
    seq_len: int
    heads: tuple[HeadBound, ...]
    gamma_inflation: float = math.nan

    def _max(self, name: str) -> float:
        values = [getattr(h, name) for h in self.heads if not math.isnan(getattr(h, name))]
        return max(values) if values else math.nan

    @property
    def interaction_norm(self) -> float:
        return self._max("interaction_norm")

    def bound(self, which: str = "deterministic") -> float:
        """Largest bound of ``which`` (:data:`BOUNDS`) over the heads."""
        return self._max(f"{which}_bound")

    def fp8_scale(self, fmt: str = "e4m3", which: str = "deterministic") -> float:
        """One scale for the whole layer: from the largest bound over its heads."""
        return st.fp8_scale(self.bound(which), fmt)

    @property
    def exponent_ratio(self) -> float:
        return min(h.exponent_ratio for h in self.heads)

    @property
    def gamma(self) -> float:
        return self._max("gamma")

    @property
    def observed_max(self) -> float:
        return self._max("observed_max")


@dataclass(frozen=True)
class AttentionBounds:
    """Result of :func:`attention_bounds`.

    Attributes:
        layers: one :class:`LayerBound` per attention, in model order.
        delta: failure probability of the thresholds; seq_len: n.
        method: "qr" or "power"; gamma_source: "sample", "given" or "default".
        caveats: what the bounds do not cover for this model (one sentence each).
        power_vectors: per layer key, the power-iteration vectors (``method="power"``), to warm-start
            the next call with ``warm_start=this``.
    """

    layers: tuple[LayerBound, ...]
    delta: float
    seq_len: int
    method: str
    gamma_source: str
    caveats: tuple[str, ...] = ()
    power_vectors: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def layer(self, key: str) -> LayerBound:
        for layer in self.layers:
            if layer.key == key:
                return layer
        raise KeyError(f"no attention {key!r}; keys: {[la.key for la in self.layers]}")

    def scalars(self) -> dict[str, float]:
        """``{spectral_attention/<name>/<layer key>: value}`` for every name in
        :data:`ATTENTION_METRICS` (``observed_logit_max`` only with a sample batch)."""
        out: dict[str, float] = {}
        for layer in self.layers:
            values = {"interaction_norm": layer.interaction_norm, "logit_bound": layer.bound(),
                      "logit_bound_rank_aware": layer.bound("rank_aware"),
                      "logit_bound_rank_agnostic": layer.bound("rank_agnostic"),
                      "exponent_ratio": layer.exponent_ratio, "gamma": layer.gamma}
            for fmt in st.FP8_MAX:
                for which in BOUNDS:
                    suffix = "" if which == "deterministic" else f"_{which}"
                    values[f"fp8_{fmt}_scale{suffix}"] = layer.fp8_scale(fmt, which)
            if not math.isnan(layer.observed_max):
                values["observed_logit_max"] = layer.observed_max
            out.update({attention_key(name, layer.key): float(v) for name, v in values.items()})
        return out

    def head_rows(self) -> list[dict[str, Any]]:
        """One flat row per head (:meth:`HeadBound.to_row`) for a per-head table."""
        return [head.to_row() for layer in self.layers for head in layer.heads]


def attention_bounds(
    model: nn.Module,
    sample_batch: Any = None,
    delta: float = 1e-6,
    seq_len: int | None = None,
    *,
    gamma: float | None = None,
    method: str = "qr",
    include_bias: bool = True,
    logit_scale: float | None = None,
    model_map: ModelMap | None = None,
    warm_start: AttentionBounds | None = None,
    dtype: torch.dtype = torch.float64,
    call_model: CallModel | None = None,
) -> AttentionBounds:
    """Per-head interaction norms, logit bounds and FP8 scale factors of every attention of ``model``.

    Args:
        model: a model with q/k projections the model map recognises (Hugging Face or plain).
        sample_batch: one batch or a list of batches, each called the way the model's ``forward``
            accepts it (:func:`~spectral_plugins.attention.inputs.model_call`): a tensor (token ids
            as ``input_ids=`` for a Hugging Face model, else the first positional argument of your
            own ``forward(self, x)``), a dict of keyword arguments (``attention_mask`` marks valid
            tokens), or a tuple of positional arguments. It gives observed logits, the typicality
            gamma per head, and input norms when no preceding norm layer is found. Without it, a
            dummy forward pass (the model's ``dummy_inputs``) finds the norm layers only.
        delta: failure probability of the concentration thresholds, in (0, 1).
        seq_len: n, the sequence length the thresholds cover (n^2 logit pairs per head); default:
            the sample's padded length, else the config's maximum positions, else 2048.
        gamma: typicality for every head, overriding the estimate and the default
            ``min(8, d / r)``.
        method: "qr" (exact, gives the numerical rank) or "power" (implicit power iteration to an
            estimated relative error of 1e-8, warm-started from ``warm_start``, its estimate raised by
            that error so it does not fall below ``||M_h||``; rank taken as d_h).
        include_bias: fold q/k biases in exactly (``x~ = [x; 1]``); False ignores them (then the
            bounds hold for the bias-free part of the logits only).
        logit_scale: the factor c in ``S = c q . k``; default: the attention module's ``scaling``.
        model_map: reuse a map of ``model``; warm_start: a previous result with ``method="power"``.
        dtype: working precision (float64 by default).
        call_model: ``call_model(model, batch)`` runs one batch of ``sample_batch`` (already on the
            model's device), for a forward that takes it in none of the ways above.

    Warns:
        RuntimeWarning: the sample could not be run through the model (why, and how to pass it), the
            sample never reached some attentions, or some bounds are NaN (and why): the same
            reasons are in ``.caveats``.
    """
    if method not in ("qr", "power"):
        raise ValueError(f"method must be 'qr' or 'power', got {method!r}")
    model_map = model_map or map_model(model)
    sites = attention_sites(model, model_map, logit_scale)
    if not sites:
        raise ValueError("no attention with known heads found: the model map has no q/k matrix pairs with "
                         "head counts (set num_attention_heads in the config, or name roles with map_model)")
    caveats: list[str] = []
    spectra = {s.key: _spectrum(s, include_bias, method, warm_start, dtype) for s in sites}
    probe = sample_batch if sample_batch is not None else getattr(model, "dummy_inputs", None)

    def head_stats(site: AttentionSite, x_q: torch.Tensor, x_k: torch.Tensor, mask: torch.Tensor | None):
        norms, ranks, _, _ = spectra[site.key]
        return observed_head_stats(site, x_q, x_k, mask, norms, ranks, include_bias, dtype)

    trace = trace_inputs(model, sites, probe, head_stats if sample_batch is not None else None,
                         call_model if sample_batch is not None else None) if probe is not None else None
    if trace is None or trace.error:
        why = trace.error if trace is not None else "no sample_batch and no dummy_inputs"
        caveats.append(f"could not run the model to find the norm layers before q/k ({why})")
    n = seq_len or _default_seq_len(model, sample_batch)
    layers = tuple(_layer(site, spectra[site.key], trace, sample_batch is not None, include_bias, gamma,
                          n, delta) for site in sites)
    caveats += _caveats(model, layers)
    _warn_unused(model, sites, layers, trace, sample_batch is not None)
    # "sample" only when the sample ran, gave head statistics (RoPE layers get none) and enough
    # sequences to calibrate gamma out of sample (stats.calibrated_gamma).
    sampled = sample_batch is not None and trace is not None and bool(trace.heads)
    calibrated = any(math.isfinite(la.gamma_inflation) for la in layers)
    gamma_source = "given" if gamma is not None else "sample" if calibrated else "default"
    if gamma is None and sampled and not calibrated:
        caveats.append(f"the sample has fewer than {st.MIN_CALIBRATION_SEQUENCES} sequences: too few to "
                       "calibrate gamma out of sample, so the default gamma applies")
    vectors = {k: v[3] for k, v in spectra.items() if v[3] is not None}
    return AttentionBounds(layers, delta, n, method, gamma_source, tuple(caveats), vectors)


def _spectrum(site: AttentionSite, include_bias: bool, method: str, warm: AttentionBounds | None,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], Any]:
    """(interaction norms [H], ranks [H], (q norms, k norms), power vectors or None)."""
    wq, wk = site.slices(include_bias)
    if method == "qr":
        spectrum = interaction_spectrum_qr(wq, wk, dtype)
        eps = torch.finfo(site.q.weight().dtype).eps
        ranks = numerical_rank(spectrum.singular_values, wq.shape[-1], eps)
        return spectrum.norms.cpu(), ranks.cpu(), (spectrum.q_norms.cpu(), spectrum.k_norms.cpu()), None
    v0 = warm.power_vectors.get(site.key) if warm is not None else None
    power = interaction_norms_power(wq, wk, v0=v0, dtype=dtype)
    # Power iteration approaches ||M_h|| from below; lift it by its estimated relative error.
    norms = power.norms * (1.0 + min(power.tolerance, 1.0))
    group = wq.shape[0] // wk.shape[0]
    q_norms = k_norms = torch.full_like(norms, math.nan)
    if site.rope:  # the RoPE bound needs ||W_Q^h|| and ||W_K^g||
        q_norms = torch.linalg.matrix_norm(wq.to(dtype), 2)
        k_norms = torch.linalg.matrix_norm(wk.to(dtype), 2).repeat_interleave(group)
    ranks = torch.full((wq.shape[0],), min(wq.shape[1], wq.shape[2]))
    return norms.cpu(), ranks, (q_norms.cpu(), k_norms.cpu()), power.vectors


def _input_norms(site: AttentionSite, trace: Any, has_sample: bool, include_bias: bool
                 ) -> tuple[float, float, str, NormInfo | None, float]:
    """(R_q, R_k augmented, source, the query-side norm layer, largest sample norm)."""
    found_q = trace.norms.get(site.q.module_name) if trace else None
    found_k = trace.norms.get(site.k.module_name) if trace else None
    seen = [trace.max_input_norm.get(f"{site.key}:{r}", math.nan) for r in "qk"] if trace and has_sample \
        else [math.nan, math.nan]
    if found_q is not None and found_k is not None:
        r_q, r_k, source = found_q.bound, found_k.bound, found_q.kind
    elif has_sample and not math.isnan(seen[0]):
        r_q, r_k, source = seen[0], seen[1], "sample"
    else:
        r_q = r_k = math.nan
        source = "none"
    with_bias = site.has_bias(include_bias)
    return (st.augmented_norm(r_q, with_bias), st.augmented_norm(r_k, with_bias), source, found_q,
            max(seen) if has_sample else math.nan)


def _layer(site: AttentionSite, spectrum: tuple, trace: Any, has_sample: bool, include_bias: bool,
           gamma: float | None, n: int, delta: float) -> LayerBound:
    norms, ranks, (q_norms, k_norms), _ = spectrum
    r_q, r_k, source, norm_info, sample_norm = _input_norms(site, trace, has_sample, include_bias)
    observed = trace.heads.get(site.key) if trace is not None else None
    dim = site.q.shape[1]
    heads_kv = site.num_kv_heads
    group = site.num_heads // heads_kv
    per_sequence = observed.sequence_gamma if observed is not None else None
    calibrated = st.calibrated_gamma(per_sequence) if per_sequence is not None else None
    heads = []
    for h in range(site.num_heads):
        norm_h = float(norms[h])
        bound_norm = float(q_norms[h] * k_norms[h]) if site.rope else norm_h
        bound = st.deterministic_bound(bound_norm, r_q, r_k, site.logit_scale)
        rank = int(ranks[h])
        if gamma is not None:
            gamma_h = float(gamma)
        elif calibrated is not None:
            gamma_h = float(calibrated[0][h])
        else:  # never beyond d / r, where the rank-aware threshold equals the rank-agnostic one
            gamma_h = min(st.DEFAULT_GAMMA, dim / rank) if rank else st.DEFAULT_GAMMA
        heads.append(HeadBound(
            site.key, h, h // group, norm_h, float(q_norms[h]), float(k_norms[h]), rank, gamma_h, bound,
            st.rank_aware_threshold(bound, gamma_h, rank, dim, n, delta),
            st.rank_agnostic_threshold(bound, dim, n, delta), st.exponent_ratio(dim, gamma_h, rank),
            float(observed.max_abs_logit[h]) if observed is not None else math.nan))
    return LayerBound(site.key, site.depth, site.q.name, site.k.name, site.num_heads, heads_kv,
                      site.q.head_dim or 0, dim, site.has_bias(include_bias), site.logit_scale,
                      site.logit_scale_source, site.rope, r_q, r_k, source,
                      norm_info.module_name if norm_info else None, sample_norm, n, tuple(heads),
                      calibrated[1] if calibrated is not None and gamma is None else math.nan)


def _default_seq_len(model: nn.Module, sample: Any) -> int:
    if isinstance(sample, torch.Tensor):
        return int(sample.shape[-1])
    if isinstance(sample, Mapping) and isinstance(sample.get("input_ids"), torch.Tensor):
        return int(sample["input_ids"].shape[-1])
    if isinstance(sample, (list, tuple)) and sample:
        return max(_default_seq_len(model, s) for s in sample)
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _warn_unused(model: nn.Module, sites: list[AttentionSite], layers: tuple[LayerBound, ...], trace: Any,
                 has_sample: bool) -> None:
    """Say (as a RuntimeWarning, not only in ``.caveats``) when a sample batch could not be used and
    when bounds came out NaN."""
    name = type(model).__name__
    nan = [la.key for la in layers if math.isnan(la.bound())]
    if has_sample and trace is not None and trace.error:
        warnings.warn(f"spectral-plugins: attention_bounds could not run {name} on sample_batch "
                      f"({trace.error}); the bounds go without it (default gamma, no observed logits"
                      f"{f', NaN for {nan}' if nan else ''}). Pass the sample as the model's forward takes "
                      "it (a tensor, a dict of keyword arguments, a tuple of positional arguments) or "
                      "call_model=lambda model, batch: model(...)", RuntimeWarning, stacklevel=3)
        return
    if has_sample and trace is not None:
        missed = [s.key for s in sites if f"{s.key}:q" not in trace.max_input_norm]
        if missed:
            warnings.warn(f"spectral-plugins: the sample_batch run through {name} never reached the "
                          f"attention(s) {missed}; their bounds use no sample", RuntimeWarning, stacklevel=3)
    if nan:
        why = "" if has_sample else " and no sample_batch was given"
        warnings.warn(f"spectral-plugins: the attention logit bounds of {nan} are NaN: no norm layer "
                      f"precedes their q/k projections{why} (pass a sample_batch the model runs on)",
                      RuntimeWarning, stacklevel=3)


def _caveats(model: nn.Module, layers: tuple[LayerBound, ...]) -> list[str]:
    notes = []
    if any(la.rope for la in layers):
        notes.append("RoPE rotates q and k: bounds use ||W_Q^h|| ||W_K^h|| (valid for every position offset) "
                     "instead of ||M_h||, and logits are not observed")
    if any(la.input_norm_source == "sample" for la in layers):
        notes.append("no norm layer feeds some q/k projections: their R is the sample's largest input norm, "
                     "so their 'deterministic' bound holds for the sample, not for every input")
    if any(la.input_norm_source == "none" for la in layers):
        notes.append("some attentions have neither a preceding norm layer nor a sample: their bounds are NaN")
    if any(la.logit_scale_source.startswith("assumed") for la in layers):
        notes.append("logit scale not read from the model for some layers; pass logit_scale= if it differs")
    config = getattr(model, "config", None)
    for attr, what in (("attn_logit_softcapping", "logits are soft-capped (tanh) after these bounds"),
                       ("relative_attention_num_buckets", "a relative position bias is added to the logits"),
                       ("alibi", "ALiBi biases are added to the logits")):
        if getattr(config, attr, None):
            notes.append(f"{what}: not included")
    if any(type(m).__name__.lower().startswith(("qknorm",)) or n.endswith(("q_norm", "k_norm"))
           for n, m in model.named_modules()):
        notes.append("q/k are normalised after the projection (QK-norm): the bounds from M_h do not apply")
    return notes
