"""Layer importance and pruning advice over seeds and depths, with paired statistics (issue 16.2).

Follows the rule pre-registered in docs/reproduction.md ("Pre-registered: the importance default and
the pruning advice"): ``CharGPT`` at depths L x seeds, each run removes ``max(1, L // 4)`` blocks chosen
by every importance method, by Last-N and at random; the validation loss is kept per batch, so each
loss difference has a paired standard error, and the advisor's reliability is judged from the
single-block removal costs (``importance.judge_advice``). Across the runs: per method, the loss
increase against ``alpha`` and against Last-N (Wilcoxon signed-rank, one-sided), and Spearman rho.

    python benchmarks/importance_seeds.py                              # 3 seeds x L = 4, 6, 8, 400 steps
    python benchmarks/importance_seeds.py --depths 4 --seeds 0 --steps 60   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.importance_seeds
    from reproduce_lifecycle import ROOT, batches, train
except ImportError:  # pragma: no cover - imported as a package module
    from benchmarks.reproduce_lifecycle import ROOT, batches, train

from spectral_plugins.demo.data import encode, stdlib_text
from spectral_plugins.lifecycle.importance import IMPORTANCE_METHODS, importance_from_history
from spectral_plugins.lifecycle.pruning import evaluate_pruning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--dense-every", type=int, default=5)
    p.add_argument("--dense-until", type=int, default=100)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "runs" / "importance_seeds.json"))
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    ids = encode(stdlib_text())
    split = int(0.9 * ids.numel())
    records = []
    for seed in args.seeds:
        val_iter = batches(ids[split:], args.block_size, 32, seed + 1)
        val = [next(val_iter) for _ in range(args.eval_batches)]
        for depth in args.depths:
            args.seed = seed
            started = time.perf_counter()
            trained = train(depth, args, ids[:split], val)
            model = trained.model

            def per_batch(m: torch.nn.Module, val: list = val) -> list[float]:
                return [m(x, y)[1].item() for x, y in val]

            n_remove = max(1, depth // 4)
            record = {"seed": seed, "depth": depth, "n_remove": n_remove, "train_s": trained.seconds}
            for method in IMPORTANCE_METHODS:
                importance = importance_from_history(trained.lifecycle.history, method)
                r = evaluate_pruning(model, per_batch, n_remove, importance=importance, n_random=10,
                                     seed=seed)
                record[method] = {"dL": r.spectral_loss - r.baseline_loss, "blocks": list(r.spectral_blocks),
                                  "rho": r.spearman_rho, "reliable": r.advice.reliable,
                                  "reason": r.advice.reason, "tie_set": list(r.advice.tie_set)}
                record.update({"baseline": r.baseline_loss, "dL_last": r.last_loss - r.baseline_loss,
                               "dL_random": r.random_loss - r.baseline_loss,
                               "dL_oracle": r.oracle_loss - r.baseline_loss,
                               "single_dL": [v - r.baseline_loss for v in r.single_losses],
                               "single_se": list(r.single_stderr)})
            record["seconds"] = time.perf_counter() - started
            costs = ", ".join(f"{m} {record[m]['dL']:.4f}" for m in IMPORTANCE_METHODS)
            print(f"seed {seed} L={depth}: {costs}"
                  + f", last {record['dL_last']:.4f}, reliable {record['alpha']['reliable']}", flush=True)
            records.append(record)
    return records


def wilcoxon_less(a: np.ndarray, b: np.ndarray) -> float:
    """One-sided p of ``a < b`` (paired Wilcoxon signed-rank; NaN when every pair is equal)."""
    if np.allclose(a, b):
        return math.nan
    return float(stats.wilcoxon(a, b, alternative="less").pvalue)


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _nanmedian(values: np.ndarray) -> float:
    return float(np.median(_finite(values))) if _finite(values).size else math.nan


def _nanmin(values: np.ndarray) -> float:
    return float(np.min(_finite(values))) if _finite(values).size else math.nan


def _nanmax(values: np.ndarray) -> float:
    return float(np.max(_finite(values))) if _finite(values).size else math.nan


def summary(records: list[dict]) -> str:
    lines = ["| method | median dL | dL < alpha's (runs) | Wilcoxon p (dL < alpha) | dL < Last-N (runs) | "
             "Wilcoxon p (dL < Last-N) | median dL(Last-N) / dL | Spearman rho median (range) | "
             "advice judged reliable (runs) |", "|---" * 9 + "|"]
    alpha = np.array([r["alpha"]["dL"] for r in records])
    last = np.array([r["dL_last"] for r in records])
    for method in IMPORTANCE_METHODS:
        d = np.array([r[method]["dL"] for r in records])
        rho = np.array([r[method]["rho"] for r in records], dtype=float)
        ratio = np.where(d > 0, last / np.where(d > 0, d, 1.0), np.nan)
        lines.append(
            f"| {method} | {np.median(d):.4f} | {int((d < alpha).sum())} / {len(d)} | "
            f"{'-' if method == 'alpha' else _fmt(wilcoxon_less(d, alpha), 3)} | "
            f"{int((d < last).sum())} / {len(d)} | {_fmt(wilcoxon_less(d, last), 3)} | "
            f"{_fmt(_nanmedian(ratio))} | "
            f"{_fmt(_nanmedian(rho))} ({_fmt(_nanmin(rho))} to {_fmt(_nanmax(rho))}) | "
            f"{sum(bool(r[method]['reliable']) for r in records)} / {len(records)} |")
    for name, key in (("Last-N", "dL_last"), ("random (mean of 10)", "dL_random"), ("oracle", "dL_oracle")):
        d = np.array([r[key] for r in records])
        lines.append(f"| {name} | {np.median(d):.4f} | {int((d < alpha).sum())} / {len(d)} | "
                     "- | - | - | - | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    records = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    print(summary(records))
    for r in records:
        ties = r["alpha"]["tie_set"]
        print(f"seed {r['seed']} L={r['depth']}: L0 {r['baseline']:.4f}; single-block dL "
              + ", ".join(f"{b}: {v:.4f}±{s:.4f}"
                          for b, (v, s) in enumerate(zip(r["single_dL"], r["single_se"])))
              + f"; tie set {ties}")
    print(f"total {time.perf_counter() - started:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
