"""Cost of the fast lane per training step, as a fraction of the step, measured side by side.

One model trains; after every optimizer step the fast lane measures every matrix
(:class:`~spectral_plugins.core.fast_lane.FastLane`, warm-started). Both are timed in the same loop,
so the ratio ``lane / step`` is read on the same machine state. The first ``--warmup`` steps (each
with its lane measurement) are not timed, so that the table reports the steady state rather than
the cold start of a randomly initialised model; the cold first measurement is reported apart, with
its ratio to that first step. Reported per model: median step time and median lane time over the
timed steps, the median of the per-step ratios, the cold first measurement, the mean products
``W W^T x`` per matrix in the timed steps (and in the cold one), and the largest relative
stable-rank error against a float64 SVD at the last step.

Models: ``demo`` (the demo's character GPT, 4 blocks, d_model 128, batch 32 x 64 characters) and
``gpt2-small`` (a randomly initialised GPT-2 small, batch ``--gpt2-batch`` x ``--gpt2-seq`` random
tokens). The fraction depends on the tokens per step: it falls as the batch grows, since training
scales with tokens and the lane does not.

With ``--gpt2-large-batch B`` GPT-2 small trains on after its timed steps for ``--large-steps`` more
at ``B`` sequences per step, timed as a second row: the lane's cost depends on the weights, not on
the batch, so that row needs no warm-up of its own.

Run: ``python benchmarks/bench_fast_lane.py [--models demo gpt2-small] [--warmup N] [--steps N]
[--gpt2-large-batch B] [--write]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spectral_plugins import map_model
from spectral_plugins.core.fast_lane import FastLane
from spectral_plugins.core.model_map import ModelMap

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.bench_fast_lane
    from common import DOC, machine, write_section
except ImportError:  # pragma: no cover
    from benchmarks.common import DOC, machine, write_section


@dataclass(frozen=True)
class Row:
    model: str
    tokens: int
    step_s: float
    lane_s: float
    ratio: float  # median of the per-step ratios lane / step
    cold_s: float
    cold_ratio: float  # the cold first measurement over its own (first) training step
    cold_products: float
    products: float
    max_error: float

    def cells(self) -> list[str]:
        return [self.model, str(self.tokens), f"{self.step_s * 1e3:.1f}", f"{self.lane_s * 1e3:.2f}",
                f"{100 * self.ratio:.2f}%", f"{self.products:.1f}", f"{self.cold_s * 1e3:.1f}",
                f"{100 * self.cold_ratio:.1f}%", f"{self.cold_products:.1f}", f"{self.max_error:.1e}"]


def demo_model(device: torch.device) -> tuple[nn.Module, Callable[[], torch.Tensor], int]:
    from spectral_plugins.demo.data import VOCAB, encode, stdlib_text
    from spectral_plugins.demo.model import CharGPT, GPTConfig

    config = GPTConfig(vocab_size=len(VOCAB), block_size=64, n_layer=4, n_head=4, d_model=128)
    model = CharGPT(config).to(device)
    ids = encode(stdlib_text(max_chars=200_000))

    def loss() -> torch.Tensor:
        starts = torch.randint(0, len(ids) - 65, (32,))
        x = torch.stack([ids[s:s + 64] for s in starts]).to(device)
        y = torch.stack([ids[s + 1:s + 65] for s in starts]).to(device)
        return model(x, y)[1]

    return model, loss, 32 * 64


def gpt2_small(device: torch.device, batch: int, seq: int
               ) -> tuple[nn.Module, Callable[[int], Callable[[], torch.Tensor]], int]:
    """GPT-2 small and a maker of its loss at a given batch (the tokens per step of a timed phase)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config()).to(device)

    def loss_at(rows: int) -> Callable[[], torch.Tensor]:
        def loss() -> torch.Tensor:
            ids = torch.randint(0, model.config.vocab_size, (rows, seq), device=device)
            return model(input_ids=ids, labels=ids).loss
        return loss

    return model, loss_at, batch * seq


def exact_stable_ranks(model_map: ModelMap) -> np.ndarray:
    """Stable rank of every matrix from a float64 SVD (the reference), in map order."""
    out = []
    for ref in model_map.matrices:
        singular = torch.linalg.svdvals(ref.weight().double().cpu())
        out.append(float(singular.square().sum() / singular[0] ** 2))
    return np.array(out)


def measure(name: str, model: nn.Module, loss: Callable[[], torch.Tensor], tokens: int, steps: int,
            device: torch.device, warmup: int = 0,
            later: tuple[tuple[Callable[[], torch.Tensor], int, int], ...] = ()) -> list[Row]:
    """One row for the timed steps after the warm-up and one per ``later`` phase ``(loss, tokens,
    steps)``: the same model and lane trained on, timed at another batch. The lane's cost depends on
    the weights, not on the batch, so a large batch needs no warm-up of its own."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model_map = map_model(model)
    lane = FastLane(model_map)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    phases = [(loss, tokens, 1 + warmup + steps), *later]
    timed: list[tuple[list[float], list[float], list[float]]] = []
    cold = cold_ratio = cold_products = 0.0
    for phase, (phase_loss, _, phase_steps) in enumerate(phases):
        step_times: list[float] = []
        lane_times: list[float] = []
        products: list[float] = []
        for step in range(phase_steps):
            sync()
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            phase_loss().backward()
            optimizer.step()
            sync()
            trained = time.perf_counter()
            result = lane.measure(step)
            sync()
            done = time.perf_counter()
            if phase == 0 and step == 0:
                cold, cold_ratio = done - trained, (done - trained) / (trained - started)
                cold_products = float(result.products.mean())
            elif phase > 0 or step > warmup:
                step_times.append(trained - started)
                lane_times.append(done - trained)
                products.append(float(result.products.mean()))
        timed.append((step_times, lane_times, products))
    error = max(abs(f - e) / e for f, e in zip(result.stable_rank, exact_stable_ranks(model_map)))
    rows = []
    for (_, phase_tokens, _), (step_times, lane_times, products) in zip(phases, timed):
        ratios = [lane_s / step_s for lane_s, step_s in zip(lane_times, step_times)]
        rows.append(Row(name, phase_tokens, statistics.median(step_times), statistics.median(lane_times),
                        statistics.median(ratios), cold, cold_ratio, cold_products,
                        statistics.mean(products), error))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo", "gpt2-small"], choices=("demo", "gpt2-small"))
    parser.add_argument("--warmup", type=int, default=30,
                        help="untimed steps, each with its lane measurement, after the cold one")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (after the warm-up)")
    parser.add_argument("--gpt2-batch", type=int, default=4)
    parser.add_argument("--gpt2-seq", type=int, default=256)
    parser.add_argument("--gpt2-large-batch", type=int, default=0,
                        help="then time --large-steps more GPT-2 steps at this batch (0: none)")
    parser.add_argument("--large-steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="store the table in docs/performance.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        if name == "demo":
            rows += measure(name, *demo_model(device), steps=args.steps, device=device, warmup=args.warmup)
            continue
        model, loss_at, tokens = gpt2_small(device, args.gpt2_batch, args.gpt2_seq)
        later = ((loss_at(args.gpt2_large_batch), args.gpt2_large_batch * args.gpt2_seq, args.large_steps),
                 ) if args.gpt2_large_batch else ()
        rows += measure(name, model, loss_at(args.gpt2_batch), tokens, steps=args.steps, device=device,
                        warmup=args.warmup, later=later)
    header = ["model", "tokens/step", "train step ms", "fast lane ms", "lane / step", "products/matrix",
              "cold first ms", "cold lane / step", "cold products/matrix",
              "max stable-rank error vs float64 SVD"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    command = " ".join(["python benchmarks/bench_fast_lane.py", *sys.argv[1:]])
    body = (f"Measured on {machine(device)}, device {device}, torch threads {torch.get_num_threads()}: per "
            f"model one cold step, {args.warmup} untimed warm-up steps, then {args.steps} timed steps "
            + (f"and, for GPT-2 small, {args.large_steps} more at {args.gpt2_large_batch * args.gpt2_seq} "
               "tokens per step " if args.gpt2_large_batch else "")
            + "(medians; products per matrix: mean over the timed steps; the error is at the last step). "
            f"Command: `{command}`\n\n"
            + "\n".join(lines))
    print(body)
    if args.write:
        write_section(DOC, "fast-lane", body, "Fast lane: stable rank at every step")


if __name__ == "__main__":
    main()
