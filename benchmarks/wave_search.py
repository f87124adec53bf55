"""Does the compression front move with depth? A bounded search on the demo model (issue 16.4).

Trains :class:`~spectral_plugins.demo.model.CharGPT` with :func:`benchmarks.reproduce_lifecycle.train_runs`
(same flags, same loop) for every depth and seed, and asks per run and group whether the blocks'
arrival steps (:func:`spectral_plugins.lifecycle.wave.arrival_steps`: the step of each block's peak
compression rate before the reversal) increase with depth: Spearman rho between block depth and
arrival step with its two-sided p-value (``scipy.stats.spearmanr``). A front *moves with depth* when
rho > 0 and p < 0.05. The pooled result per group is the Spearman rho over all (depth, arrival) pairs
of every seed of one depth (the runs share the configuration, so their arrival steps share a scale).

The histories go to ``--out``; the Markdown block (command, configuration, machine, one row per run
and group, the pooled rows) replaces the one between ``<!-- wave-search:TAG:start -->`` and
``<!-- wave-search:TAG:end -->`` in ``--doc`` (appended when absent)::

    nice -n 19 python benchmarks/wave_search.py --tag base --depths 8 --seeds 0 1 2 --steps 600 \\
        --d-model 256 --heads 4 --lr 1e-3 --warmup 90 --dense-every 2 --dense-until 300 --every 10
    python benchmarks/wave_search.py --reanalyze --tag base ...   # same flags: only re-read the histories

Every flag but ``--tag``, ``--groups`` and ``--reanalyze`` is
:mod:`benchmarks.reproduce_lifecycle`'s (``--out`` defaults to ``runs/wave_search/TAG``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.wave_search
    from reproduce_lifecycle import ROOT, batches, fmt, train_runs
    from reproduce_lifecycle import parse_args as reproduce_args
except ImportError:  # pragma: no cover - imported as a package module
    from benchmarks.reproduce_lifecycle import ROOT, batches, fmt, train_runs
    from benchmarks.reproduce_lifecycle import parse_args as reproduce_args

from spectral_plugins.demo.data import encode, stdlib_text
from spectral_plugins.lifecycle.describe import with_error
from spectral_plugins.lifecycle.history import SpectralHistory
from spectral_plugins.lifecycle.signals import wave_trajectory

GROUPS = ("qk", "vo", "mlp", "all")
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class DepthCorrelation:
    """Spearman rho between block depth and arrival step, its two-sided p-value, and the pairs used."""

    rho: float
    p: float
    n: int

    @property
    def moves_with_depth(self) -> bool:
        """Arrivals later in deeper blocks: rho > 0 with p < 0.05."""
        return self.rho > 0 and self.p < SIGNIFICANCE


def depth_correlation(depths: np.ndarray, arrivals: np.ndarray) -> DepthCorrelation:
    """Spearman rho (ties ranked by their mean) over the finite (depth, arrival) pairs; NaN below 3
    pairs or when either side is constant."""
    d = np.asarray(depths, dtype=np.float64).ravel()
    a = np.asarray(arrivals, dtype=np.float64).ravel()
    keep = np.isfinite(d) & np.isfinite(a)
    d, a = d[keep], a[keep]
    n = int(d.size)
    if n < 3 or np.ptp(d) == 0 or np.ptp(a) == 0:
        return DepthCorrelation(math.nan, math.nan, n)
    result = spearmanr(d, a)
    return DepthCorrelation(float(result.statistic), float(result.pvalue), n)


def pooled_correlation(pairs: list[tuple[np.ndarray, np.ndarray]]) -> DepthCorrelation:
    """:func:`depth_correlation` over the (depth, arrival) pairs of several runs put together."""
    if not pairs:
        return DepthCorrelation(math.nan, math.nan, 0)
    return depth_correlation(np.concatenate([np.ravel(d) for d, _ in pairs]),
                             np.concatenate([np.ravel(a) for _, a in pairs]))


@dataclass(frozen=True)
class RunResult:
    """One run's wave in one group."""

    depth: int
    seed: int
    group: str
    depths: np.ndarray
    arrivals: np.ndarray
    speed: float
    speed_stderr: float
    r2: float
    reversal: float
    correlation: DepthCorrelation


def analyze(history: SpectralHistory, depth: int, seed: int,
            groups: tuple[str, ...] = GROUPS) -> list[RunResult]:
    """The wave fit and depth-arrival correlation of each group of one run's history."""
    out = []
    for group in groups:
        w = wave_trajectory(history, group)
        out.append(RunResult(depth, seed, group, w.depths, w.arrivals, w.wave_speed, w.wave_stderr, w.wave_r2,
                             w.reversal.step if w.reversal.reversed else math.nan,
                             depth_correlation(w.depths, w.arrivals)))
    return out


def _arrivals(a: np.ndarray) -> str:
    return "[" + ", ".join("-" if not math.isfinite(v) else f"{v:.0f}" for v in a) + "]"


def _p(p: float) -> str:
    return "-" if not math.isfinite(p) else f"{p:.2g}"


def section(tag: str, command: str, args: argparse.Namespace, results: list[RunResult],
            seconds: dict[str, float], machine: str) -> str:
    """The Markdown block of one search configuration (between its markers)."""
    warmup = max(1, args.warmup or args.steps // 20)
    lines = [
        f"<!-- wave-search:{tag}:start -->",
        f"### Configuration `{tag}`",
        "",
        "    " + command,
        "",
        f"`CharGPT`, d_model {args.d_model}, {args.heads} heads, context {args.block_size}, "
        f"batch {args.batch}, AdamW lr {args.lr} (linear warm-up over {warmup} steps, weight decay 0.1, "
        f"clip 1.0), {args.steps} steps, depths {', '.join(map(str, args.depths))}, "
        f"seeds {', '.join(map(str, args.seeds))}, "
        f"snapshot every {args.dense_every} steps up to step {args.dense_until}, then every {args.every}. "
        f"Machine: {machine}.",
        "",
        "| seed | L | steps | group | train s | wave speed (blocks/1k) | R² | Spearman rho | p | moves | "
        "reversal | arrivals (block 0..L-1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.correlation
        trained = seconds.get(f"L{r.depth}_s{r.seed}", math.nan)
        lines.append(
            f"| {r.seed} | {r.depth} | {args.steps} | {r.group} | {fmt(trained, 0)} | "
            f"{with_error(r.speed, r.speed_stderr)} | {fmt(r.r2, 2)} | {fmt(c.rho, 2)} | {_p(c.p)} | "
            f"{'yes' if c.moves_with_depth else 'no'} | {fmt(r.reversal, 0)} | {_arrivals(r.arrivals)} |")
    lines += ["", "Pooled over seeds (Spearman rho over all (depth, arrival) pairs of the seeds; the last "
              "two columns without the first block, to see whether it alone makes the correlation):", "",
              "| L | group | pairs | rho | p | moves | seeds that move | rho without block 0 | p |",
              "|---|---|---|---|---|---|---|---|---|"]
    for depth in sorted({r.depth for r in results}):
        for group in dict.fromkeys(r.group for r in results):
            rows = [r for r in results if r.depth == depth and r.group == group]
            pooled = pooled_correlation([(r.depths, r.arrivals) for r in rows])
            later = pooled_correlation([(r.depths[1:], r.arrivals[1:]) for r in rows])
            moving = sum(r.correlation.moves_with_depth for r in rows)
            lines.append(f"| {depth} | {group} | {pooled.n} | {fmt(pooled.rho, 2)} | {_p(pooled.p)} | "
                         f"{'yes' if pooled.moves_with_depth else 'no'} | {moving} of {len(rows)} | "
                         f"{fmt(later.rho, 2)} | {_p(later.p)} |")
    lines += ["", f"<!-- wave-search:{tag}:end -->"]
    return "\n".join(lines)


def replace_block(text: str, tag: str, block: str) -> str:
    """``text`` with its ``tag`` block replaced by ``block`` (``block`` appended when there is none)."""
    start, end = f"<!-- wave-search:{tag}:start -->", f"<!-- wave-search:{tag}:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def machine_line(threads: int) -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores (load average {load} at the end), nice "
            f"{os.nice(0) if hasattr(os, 'nice') else '?'}, torch {torch.__version__}, {threads} thread(s), "
            f"Python {sys.version.split()[0]}")


def main(argv: list[str] | None = None) -> int:
    given = list(argv if argv is not None else sys.argv[1:])
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--tag", default="search")
    own.add_argument("--groups", nargs="+", default=list(GROUPS))
    own.add_argument("--reanalyze", action="store_true", help="re-read the histories in --out; train nothing")
    ours, rest = own.parse_known_args(given)
    if "--out" not in rest:
        rest += ["--out", str(ROOT / "runs" / "wave_search" / ours.tag)]
    args = reproduce_args(rest)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing = out / "seconds.json"
    seconds: dict[str, float] = json.loads(timing.read_text()) if timing.exists() else {}
    if not ours.reanalyze:
        ids = encode(stdlib_text())
        split = int(0.9 * ids.numel())
        val_iter = batches(ids[split:], args.block_size, 32, 1)
        val = [next(val_iter) for _ in range(8)]
        for depth, seed, run in train_runs(args, ids[:split], val, out):
            seconds[f"L{depth}_s{seed}"] = run.seconds
            timing.write_text(json.dumps(seconds, indent=1))
            print(f"  {run.seconds:.0f} s, val loss {run.val_loss:.3f}", flush=True)
        (out / "machine.txt").write_text(machine_line(args.threads))
    results = [r for depth in sorted(args.depths) for seed in args.seeds
               for r in analyze(SpectralHistory.from_json(out / f"history_L{depth}_s{seed}.json"),
                                depth, seed, tuple(ours.groups))]
    shown = [a for a in given if a != "--reanalyze"]
    block = section(ours.tag, " ".join(["python benchmarks/wave_search.py", *shown]), args, results, seconds,
                    (out / "machine.txt").read_text())
    print(block)
    doc = Path(args.doc)
    doc.write_text(replace_block(doc.read_text() if doc.exists() else "", ours.tag, block))
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
