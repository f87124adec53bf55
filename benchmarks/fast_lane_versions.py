"""Two versions of the fast lane side by side in one training loop: this checkout's and the one at a
git revision.

After every optimizer step both lanes measure the same weights, one after the other, so their times
are read on the same machine state; at the steps listed in ``--check`` a float64 SVD of every matrix
gives the reference stable rank. Reported per version: the median time of a measurement and the mean
products ``W W^T x`` per matrix over the steps after the third, and the largest relative
stable-rank error at the checked steps.

The older version is read with ``git show REV:spectral_plugins/core/fast_lane.py`` and loaded as a
module of its own (its relative imports pointed at this checkout's core), so it must have the same
``FastLane(model_map, ...).measure(step)`` interface.

Run: ``python benchmarks/fast_lane_versions.py --previous 38d0610 [--model gpt2-small|demo]
[--steps 16] [--check 5 15] [--gpt2-batch 4] [--gpt2-seq 256]``
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from spectral_plugins import map_model
from spectral_plugins.core.fast_lane import FastLane

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.fast_lane_versions
    from bench_fast_lane import demo_model, exact_stable_ranks, gpt2_small
except ImportError:  # pragma: no cover
    from benchmarks.bench_fast_lane import demo_model, exact_stable_ranks, gpt2_small

ROOT = Path(__file__).resolve().parents[1]


def load_previous(revision: str) -> ModuleType:
    """The fast-lane module of ``revision``, importable next to this checkout's."""
    source = subprocess.run(["git", "show", f"{revision}:spectral_plugins/core/fast_lane.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    source = source.replace("from .", "from spectral_plugins.core.")
    path = Path(tempfile.mkdtemp()) / "fast_lane_previous.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fast_lane_previous", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--previous", required=True, help="git revision of the other version")
    parser.add_argument("--model", default="gpt2-small", choices=("demo", "gpt2-small"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--check", type=int, nargs="+", default=[5, 15], help="steps checked against SVD")
    parser.add_argument("--gpt2-batch", type=int, default=4)
    parser.add_argument("--gpt2-seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    if args.model == "demo":
        model, loss, tokens = demo_model(device)
    else:
        model, loss_at, tokens = gpt2_small(device, args.gpt2_batch, args.gpt2_seq)
        loss = loss_at(args.gpt2_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model_map = map_model(model)
    previous = load_previous(args.previous)
    lanes = {args.previous: previous.FastLane(model_map), "this checkout": FastLane(model_map)}
    seconds: dict[str, list[float]] = {name: [] for name in lanes}
    products: dict[str, list[float]] = {name: [] for name in lanes}
    errors: dict[str, list[float]] = {name: [] for name in lanes}
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()
        exact = exact_stable_ranks(model_map) if step in args.check else None
        for name, lane in lanes.items():
            started = time.perf_counter()
            measure = lane.measure(step)
            elapsed = time.perf_counter() - started
            if step >= 3:
                seconds[name].append(elapsed)
                products[name].append(float(measure.products.mean()))
            if exact is not None:
                errors[name].append(float(np.max(np.abs(measure.stable_rank - exact) / exact)))
    print(f"{args.model}, {tokens} tokens per step, {args.steps} steps, "
          f"torch threads {torch.get_num_threads()}")
    print("| version | lane ms (median) | products/matrix | max stable-rank error vs float64 SVD |")
    print("|---|---|---|---|")
    for name in lanes:
        print(f"| {name} | {1e3 * statistics.median(seconds[name]):.1f} "
              f"| {statistics.mean(products[name]):.1f} | {max(errors[name], default=float('nan')):.1e} |")


if __name__ == "__main__":
    main()
