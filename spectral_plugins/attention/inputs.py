"""What the attention bounds need from the live model besides its weights.

- :func:`attention_sites`: each attention (a q and a k matrix of one module), its logit scale c and
  whether rotary position embeddings (RoPE) rotate q and k before the product.
- :func:`trace_inputs`: one forward pass with hooks that finds the LayerNorm/RMSNorm whose output
  *is* the q/k projection's input (checked by identity or equality, then by refitting the norm's
  formula to its captured input and output), and, for a sample batch, records per head the largest
  observed logit and the directional statistics that estimate the typicality gamma.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.model_map import MatrixRef, ModelMap
from .norms import head_slices
from .stats import norm_output_bound

_T5_LIKE = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}


@dataclass(frozen=True)
class AttentionSite:
    """One attention of the model.

    Attributes:
        key: layer id in metric keys (``L03_attn``: the q matrix's key with role ``attn``;
            ``decoder_L03_cross_attn`` for a cross-attention in a model of several stacks).
        q, k: the query and key matrices (k has the key/value head count under GQA).
        module_name: the attention module (the parent of separate projections, or the fused one).
        logit_scale: c in ``S = c q . k``, times ``s^2`` for a RoPE ``attention_scaling`` s.
        logit_scale_source: where c came from (an attribute, a rule, or an assumption).
        rope: whether RoPE rotates q and k (then ``||M_h||`` alone bounds only equal positions).
        num_heads, num_kv_heads: the head counts of q and of k (known: a q matrix without them is
            not a site).
    """

    key: str
    q: MatrixRef
    k: MatrixRef
    module_name: str
    logit_scale: float
    logit_scale_source: str
    rope: bool
    num_heads: int
    num_kv_heads: int

    @property
    def depth(self) -> int | None:
        return self.q.depth

    def has_bias(self, include_bias: bool = True) -> bool:
        """Whether the bias column is folded in (either projection has a bias)."""
        return include_bias and (self.q.bias() is not None or self.k.bias() is not None)

    def slices(self, include_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``([H, d_h, d(+1)], [H_kv, d_h, d(+1)])`` head slices of W_Q and W_K (a zero bias column
        for a projection without bias when the other has one)."""
        out = []
        for ref, num_heads in ((self.q, self.num_heads), (self.k, self.num_kv_heads)):
            weight, bias = ref.weight(), ref.bias()
            if bias is None and self.has_bias(include_bias):
                bias = weight.new_zeros(weight.shape[0])
            out.append(head_slices(weight, num_heads, bias if include_bias else None))
        return out[0], out[1]


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def attention_sites(model: nn.Module, model_map: ModelMap, logit_scale: float | None = None
                    ) -> list[AttentionSite]:
    """Pair every q matrix with the k matrix of the same attention module (same fused module, or
    siblings under one parent). q matrices without known heads or without a k partner are skipped."""
    rotary = [m for m in model.modules() if "rotary" in type(m).__name__.lower()]
    rope_scaling = float(getattr(rotary[0], "attention_scaling", 1.0) or 1.0) if rotary else 1.0
    sites = []
    order = {ref.name: i for i, ref in enumerate(model_map)}
    queries = sorted([(q, "k") for q in model_map.by_role("q")]
                     + [(q, "cross_k") for q in model_map.by_role("cross_q")],
                     key=lambda pair: order[pair[0].name])
    for q, key_role in queries:  # self-attention, then cross-attention (q of this stack, k of the other)
        partners = [k for k in model_map.by_role(key_role) if k.depth == q.depth and k.stack == q.stack and (
            k.module_name == q.module_name or _parent(k.module_name) == _parent(q.module_name))]
        k = partners[0] if partners else None
        if k is None or not q.num_heads or not k.num_heads or not q.head_dim:
            continue
        owner = q.module_name if q.module_name == k.module_name and isinstance(
            model.get_submodule(q.module_name), nn.MultiheadAttention) else _parent(q.module_name)
        if logit_scale is not None:
            scale, source = float(logit_scale), "given"
        else:
            scale, source = _logit_scale(model, owner, q.head_dim, model_map.model_type)
        key = re.sub(r"(^|_)q(?=_|$)", r"\1attn", q.key, count=1)
        sites.append(AttentionSite(key, q, k, owner, scale * rope_scaling**2, source, bool(rotary),
                                   q.num_heads, k.num_heads))
    return sites


def _logit_scale(model: nn.Module, owner: str, head_dim: int, model_type: str | None) -> tuple[float, str]:
    """c from the nearest ``scaling`` attribute on the path to the projection (Hugging Face
    attention modules store ``head_dim**-0.5``, or the folded/overridden value there), else rules."""
    parts = owner.split(".") if owner else []
    for end in range(len(parts), max(len(parts) - 3, -1), -1):
        module = model.get_submodule(".".join(parts[:end])) if end else model
        value = getattr(module, "scaling", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value), f"{'.'.join(parts[:end]) or type(model).__name__}.scaling"
        if isinstance(module, nn.MultiheadAttention):
            return head_dim**-0.5, "nn.MultiheadAttention: 1/sqrt(d_h)"
    if (model_type or "").lower() in _T5_LIKE:
        return 1.0, "T5 family: no runtime scale (folded into the query initialisation)"
    return head_dim**-0.5, "assumed 1/sqrt(d_h): no scaling attribute found"


@dataclass(frozen=True)
class NormInfo:
    """The normalisation layer whose output is a projection's input.

    Attributes:
        module_name: its path.
        kind: "layernorm" (mean removed) or "rmsnorm".
        dim: normalised width d.
        bound: ``||g||_inf sqrt(d) + ||b||`` (:func:`norm_output_bound`), g the effective gain.
    """

    module_name: str
    kind: str
    dim: int
    bound: float


@dataclass
class HeadSample:
    """Per-head statistics of one attention over a sample (arrays of length H).

    ``sequence_gamma`` [S, H]: per sequence s of the sample, ``max Z_ij^2 / (2 ln(2 m_s))`` over its
    m_s valid pairs, the typicality matched to that sequence's extreme
    (:func:`~spectral_plugins.attention.stats.calibrated_gamma` turns these into a conservative gamma).
    """

    max_abs_logit: torch.Tensor
    max_sq_directional: torch.Tensor
    num_pairs: int = 0
    sequence_gamma: torch.Tensor | None = None


@dataclass
class TraceResult:
    """What one traced forward pass found, per attention key and per projection module."""

    norms: dict[str, NormInfo | None] = field(default_factory=dict)
    max_input_norm: dict[str, float] = field(default_factory=dict)
    heads: dict[str, HeadSample] = field(default_factory=dict)
    error: str | None = None
    norms_done: bool = False


def _fit_norm(name: str, module: nn.Module, h: torch.Tensor, y: torch.Tensor) -> NormInfo | None:
    """Refit ``y = g * z + b`` with z the LayerNorm or RMSNorm of h and g = w or 1 + w (Gemma)."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    if h.shape != y.shape or (weight is not None and weight.shape != h.shape[-1:]):
        return None
    eps = next((float(getattr(module, a)) for a in ("eps", "variance_epsilon", "epsilon")
                if isinstance(getattr(module, a, None), (int, float))), 1e-5)
    rtol = max(1e-3, 4 * torch.finfo(y.dtype).eps)  # bf16/fp16 outputs are rounded
    h = h.detach().float()
    y = y.detach().float()
    centred = h - h.mean(-1, keepdim=True)
    candidates = {"layernorm": centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps),
                  "rmsnorm": h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)}
    gains = [None] if weight is None else [weight.detach().float(), 1.0 + weight.detach().float()]
    for kind, z in candidates.items():
        for gain in gains:
            fit = z if gain is None else z * gain
            fit = fit if bias is None else fit + bias.detach().float()
            if torch.allclose(fit, y, rtol=rtol, atol=rtol * float(y.abs().max()) + 1e-6):
                return NormInfo(name, kind, h.shape[-1], norm_output_bound(gain, bias, h.shape[-1]))
    return None


def _first_input(module: nn.Module, args: tuple, kwargs: dict, which: int) -> torch.Tensor | None:
    """The projection's input: ``args[0]`` (or ``args[which]`` for ``nn.MultiheadAttention``'s
    query/key), or a tensor keyword argument."""
    names = ("query", "key")[which:which + 1] if isinstance(module, nn.MultiheadAttention) else ()
    names += ("hidden_states", "input", "x")
    if isinstance(module, nn.MultiheadAttention) and len(args) > which:
        value = args[which]
    else:
        value = args[0] if args else next((kwargs[n] for n in names if n in kwargs), None)
    if isinstance(module, nn.MultiheadAttention) and isinstance(value, torch.Tensor) and value.ndim == 3 \
            and not module.batch_first:
        value = value.transpose(0, 1)
    return value if isinstance(value, torch.Tensor) else None


# Calls the model on one batch of a sample, for a forward that takes neither a tensor, keyword
# arguments nor positional arguments the way :func:`model_call` tries them.
CallModel = Callable[[nn.Module, Any], Any]


def _as_batches(sample: Any) -> list[Any]:
    """A sample as a list of batches: a tensor, a dict or a tuple is one batch, a list holds several."""
    if isinstance(sample, (torch.Tensor, Mapping, tuple)):
        return [sample]
    if isinstance(sample, Iterable):
        return list(sample)
    raise TypeError(f"sample_batch must be a tensor, a dict of keyword arguments, a tuple of positional "
                    f"arguments, or a list of those, got {type(sample).__name__}")


def model_call(model: nn.Module, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` that call ``model`` on one batch the way its ``forward`` accepts it.

    A tensor goes in as ``input_ids=`` when ``forward`` takes that keyword (Hugging Face text
    models), else as the first positional argument (``forward(self, x)``); a dict as keyword
    arguments, else as one positional argument; a tuple as positional arguments.

    Raises:
        TypeError: ``forward``'s signature takes the batch in none of these ways.
    """
    if isinstance(batch, Mapping):
        candidates = [((), dict(batch)), ((batch,), {})]
    elif isinstance(batch, tuple):
        candidates = [(batch, {})]
    else:
        candidates = [((), {"input_ids": batch}), ((batch,), {})]
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a signature (C extension): try the first way
        return candidates[0]
    for args, kwargs in candidates:
        try:
            signature.bind(*args, **kwargs)
        except TypeError:
            continue
        return args, kwargs
    what = f"a dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else \
        f"a tuple of {len(batch)}" if isinstance(batch, tuple) else f"a {type(batch).__name__}"
    raise TypeError(f"{type(model).__name__}.forward({', '.join(signature.parameters)}) cannot take {what}")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def trace_inputs(
    model: nn.Module,
    sites: list[AttentionSite],
    sample: Any,
    head_stats: Callable[[AttentionSite, torch.Tensor, torch.Tensor, torch.Tensor | None], HeadSample] | None,
    call_model: CallModel | None = None,
) -> TraceResult:
    """Run ``sample`` (a tensor, a dict of keyword arguments, a tuple of positional arguments, or a
    list of those batches) through ``model`` with hooks, each batch called as :func:`model_call`
    says, or by ``call_model(model, batch)`` when given (batches moved to the model's device first).

    Finds each q/k projection's preceding norm and the largest input norm seen; when
    ``head_stats`` is given it is called once per site and batch with (site, x_q, x_k, valid mask)
    and its :class:`HeadSample` results are merged (maxima, summed pair counts).
    """
    result = TraceResult()
    norm_outputs: dict[int, tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = {}
    last_norm: list[int] = []
    pending: dict[str, dict[str, torch.Tensor]] = {}
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []

    def norm_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor) \
                    and not result.norms_done:
                norm_outputs[id(output)] = (name, module, args[0], output)
                last_norm[:] = [id(output)]
        return hook

    def projection_hook(site: AttentionSite, role: str, which: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_input(module, args, kwargs, which)
            if x is None:
                return
            ref = site.q if role == "q" else site.k
            if not result.norms_done:
                found = norm_outputs.get(id(x))
                if found is None or found[3] is not x:  # not the same object: the latest norm, if equal
                    found = norm_outputs.get(last_norm[0]) if last_norm else None
                    found = found if found is not None and found[3].shape == x.shape \
                        and torch.equal(found[3], x) else None
                result.norms[ref.module_name] = None if found is None else _fit_norm(*found)
            tag = f"{site.key}:{role}"
            result.max_input_norm[tag] = max(result.max_input_norm.get(tag, 0.0),
                                             _max_valid_norm(x, mask_holder["mask"]))
            if head_stats is not None and not site.rope:
                pending.setdefault(site.key, {})[role] = x.detach()
                if len(pending[site.key]) == 2:
                    both = pending.pop(site.key)
                    stats = head_stats(site, both["q"], both["k"], mask_holder["mask"])
                    _merge(result.heads, site.key, stats)
        return hook

    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            handles.append(module.register_forward_hook(norm_hook(name)))
    for site in sites:
        for role, ref in (("q", site.q), ("k", site.k)):
            module = model.get_submodule(ref.module_name)
            which = 1 if role == "k" and isinstance(module, nn.MultiheadAttention) else 0
            hook = projection_hook(site, role, which)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in _as_batches(sample):
                batch = _to_device(batch, device)
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                mask_holder["mask"] = mask.bool() if isinstance(mask, torch.Tensor) else None
                if call_model is not None:
                    call_model(model, batch)
                else:
                    args, kwargs = model_call(model, batch)
                    model(*args, **kwargs)
                result.norms_done = True  # norms are found on the first batch; free its activations
                norm_outputs.clear()
    except Exception as exc:  # a model we cannot call with these inputs: bounds fall back, say why
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return result


def _max_valid_norm(x: torch.Tensor, mask: torch.Tensor | None) -> float:
    norms = x.detach().double().norm(dim=-1)
    if mask is not None and mask.shape == norms.shape:
        norms = norms[mask]
    return float(norms.max()) if norms.numel() else 0.0


def _merge(store: dict[str, HeadSample], key: str, new: HeadSample) -> None:
    old = store.get(key)
    if old is None:
        store[key] = new
        return
    per_sequence = [g for g in (old.sequence_gamma, new.sequence_gamma) if g is not None]
    store[key] = HeadSample(torch.maximum(old.max_abs_logit, new.max_abs_logit),
                           torch.maximum(old.max_sq_directional, new.max_sq_directional),
                           old.num_pairs + new.num_pairs, torch.cat(per_sequence) if per_sequence else None)


def observed_head_stats(site: AttentionSite, x_q: torch.Tensor, x_k: torch.Tensor, mask: torch.Tensor | None,
                        interaction_norms: torch.Tensor, ranks: torch.Tensor, include_bias: bool,
                        dtype: torch.dtype = torch.float64) -> HeadSample:
    """Per head, over the valid (unmasked) query/key pairs of each sequence: the largest
    ``|S_ij| = |c q_i . k_j|`` and the largest squared directional logit Z_ij^2
    (:func:`spectral_plugins.attention.stats.directional_logits`). q and k are recomputed from the
    captured inputs and the same head slices the bounds use; keys are grouped, not repeated."""
    wq, wk = (w.to(dtype) for w in site.slices(include_bias))
    heads, head_dim, width = wq.shape
    heads_kv = wk.shape[0]
    dim = site.q.shape[1]
    scale = torch.tensor([dim / math.sqrt(max(int(r), 1)) for r in ranks], dtype=dtype, device=wq.device)
    scale = scale / (site.logit_scale * interaction_norms.to(device=wq.device, dtype=dtype))
    max_abs = torch.zeros(heads, dtype=dtype, device=wq.device)
    max_sq = torch.zeros(heads, dtype=dtype, device=wq.device)
    pairs = 0
    per_sequence = []
    for b in range(x_q.shape[0]):
        xi, xj = x_q[b].to(dtype), x_k[b].to(dtype)
        if mask is not None and mask.shape[:2] == x_q.shape[:2] == x_k.shape[:2]:
            xi, xj = xi[mask[b]], xj[mask[b]]
        if include_bias and width == xi.shape[-1] + 1:
            xi = torch.cat([xi, xi.new_ones(xi.shape[0], 1)], -1)
            xj = torch.cat([xj, xj.new_ones(xj.shape[0], 1)], -1)
        q = torch.einsum("hkd,id->hik", wq, xi).reshape(heads_kv, heads // heads_kv, -1, head_dim)
        k = torch.einsum("gkd,jd->gjk", wk, xj)
        logits = torch.einsum("grik,gjk->grij", q, k).reshape(heads, xi.shape[0], xj.shape[0])
        logits = site.logit_scale * logits
        z = logits * scale[:, None, None] / (xi.norm(dim=-1)[:, None] * xj.norm(dim=-1)[None, :])
        max_abs = torch.maximum(max_abs, logits.abs().amax(dim=(1, 2)))
        sq = z.pow(2).amax(dim=(1, 2))
        max_sq = torch.maximum(max_sq, sq)
        m = xi.shape[0] * xj.shape[0]
        pairs += m
        if m:
            per_sequence.append(sq / (2.0 * math.log(2.0 * m)))
    sequence_gamma = torch.stack(per_sequence).cpu() if per_sequence else None
    return HeadSample(max_abs.cpu(), max_sq.cpu(), pairs, sequence_gamma)
