"""Training overhead of spectral snapshots: steps/s with no monitor, a synchronous and a background one.

Every mode trains its own copy of the same model on the same batches, with the monitor users run:
a :class:`~spectral_plugins.runtime.tracker.SpectralTracker` (no publishers, lifecycle history on, default
settings, so one torch thread per snapshot on CPU). The modes take turns in windows of ``--window``
steps, ``--rounds`` times, the order reversed every other round (A B C, C B A, ...), so a machine
that speeds up or slows down over the run (a shared VM's does) hits every mode alike. Each round gives
every mode a ratio of its window to that round's ``none`` window; the table shows the median of those
ratios and their spread. A snapshot is due every ``--every`` steps (the paper's 25); windows start
half a period out of phase, so each holds the same number of snapshots and the last one has time to
finish inside it; each window ends with ``tracker.flush()`` (waiting for a snapshot in flight),
inside the timing.

Modes: ``none``; ``synchronous`` (spectra computed in ``tracker.step``); ``background``
(``background=True``: weights copied at the step boundary, spectra on a worker thread); ``none-again``
(a second unmonitored copy, last: how far two identical modes differ on this machine, the noise floor
any overhead is read against).

Models: ``demo`` (default): the demo's character-level GPT (4 blocks, d_model 128) on the standard
library's sources; ``gpt2-small``: a randomly initialised GPT-2 small on random tokens (for a GPU).

Run: ``python benchmarks/bench_overhead.py [--model demo|gpt2-small] [--device cpu|cuda] [--write]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from spectral_plugins import SpectralTracker, map_model

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.bench_overhead
    from common import DOC, machine, train_step, write_section
except ImportError:  # pragma: no cover
    from benchmarks.common import DOC, machine, train_step, write_section

MODES: dict[str, dict[str, object] | None] = {
    "none": None,
    "synchronous": {"background": False},
    "background": {"background": True},
    "none-again": None,  # a second unmonitored copy: its ratio to ``none`` is the noise floor
}


@dataclass
class Run:
    """One mode: its model, optimizer, tracker and window timings."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tracker: SpectralTracker | None
    windows: list[float] = field(default_factory=list)
    step: int = 0
    monitor_seconds: float = 0.0  # time spent inside tracker.step / flush on the training thread


def demo_setup(device: torch.device, batch_size: int) -> tuple[nn.Module, Callable[[], Iterator]]:
    from spectral_plugins.demo.data import VOCAB, encode, stdlib_text
    from spectral_plugins.demo.model import CharGPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(VOCAB))
    ids = encode(stdlib_text(1_000_000))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        while True:
            starts = torch.randint(0, ids.numel() - config.block_size - 1, (batch_size,), generator=generator)
            chunk = torch.stack([ids[s:s + config.block_size + 1] for s in starts.tolist()]).to(device)
            yield chunk[:, :-1], chunk[:, 1:]

    return CharGPT(config).to(device), batches


def gpt2_setup(device: torch.device, batch_size: int) -> tuple[nn.Module, Callable[[], Iterator]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to(device)

    class Wrapped(nn.Module):  # (logits, loss) like the demo model
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.inner(input_ids=x, labels=x)
            return out.logits, out.loss

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        while True:
            x = torch.randint(0, 50257, (batch_size, 256), generator=generator).to(device)
            yield x, x

    return Wrapped(), batches


def train_window(run: Run, batches: Iterator, steps: int, device: torch.device) -> None:
    """``steps`` optimizer steps, each followed by ``tracker.step``, then ``tracker.flush()``; timed."""
    start = time.perf_counter()
    for _ in range(steps):
        train_step(run.model, run.optimizer, batches)
        run.step += 1
        if run.tracker is not None:
            entered = time.perf_counter()
            run.tracker.step(run.step)
            run.monitor_seconds += time.perf_counter() - entered
    if run.tracker is not None:
        entered = time.perf_counter()
        run.tracker.flush()
        run.monitor_seconds += time.perf_counter() - entered
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    run.windows.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "gpt2-small"), default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (demo), 8 (gpt2-small)")
    parser.add_argument("--every", type=int, default=25, help="snapshot period in steps")
    parser.add_argument("--window", type=int, default=50, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=8, help="windows per mode (order reversed each round)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="store the table in docs/performance.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = demo_setup if args.model == "demo" else gpt2_setup
    batch_size = args.batch_size or (32 if args.model == "demo" else 8)
    base, make_batches = setup(device, batch_size)

    runs = []
    for name in args.modes:
        model = copy.deepcopy(base)
        options = MODES[name]
        tracker = None if options is None else SpectralTracker(
            model, every_n_steps=args.every, heatmap=False, **options)  # type: ignore[arg-type]
        runs.append(Run(name, model, torch.optim.AdamW(model.parameters(), lr=3e-4), tracker))
    streams = {run.name: make_batches() for run in runs}
    for run in runs:  # warm-up (allocator, kernels, snapshot buffers), ending half a period out of phase
        train_window(run, streams[run.name], args.every + args.every // 2, device)
        run.windows.clear()
        run.monitor_seconds = 0.0
    for round_index in range(args.rounds):
        for run in runs if round_index % 2 == 0 else runs[::-1]:
            train_window(run, streams[run.name], args.window, device)

    baseline = runs[0].windows if runs[0].name == "none" else [float("nan")] * args.rounds
    snapshots_per_window = args.window / args.every
    rows = []
    for run in runs:
        ratios = [window / base for window, base in zip(run.windows, baseline)]
        ratio = statistics.median(ratios)
        snapshots = args.rounds * snapshots_per_window
        on_path_ms = 1e3 * run.monitor_seconds / snapshots if run.tracker else float("nan")
        stats = run.tracker.snapshotter.stats if run.tracker and run.tracker.snapshotter else None
        worker_s = stats.compute_seconds / stats.completed if stats and stats.completed else float("nan")
        rows.append(f"| {run.name} | {args.window / statistics.median(run.windows):.2f} | {ratio:.3f} | "
                    f"{100 * (ratio - 1):+.1f}% | {min(ratios):.3f}..{max(ratios):.3f} | {on_path_ms:.1f} | "
                    f"{worker_s:.3f} | {stats.skipped if stats else 0} |")
        if run.tracker is not None:
            run.tracker.close()
    where = f"{machine(device)}, {torch.get_num_threads()} torch threads, device {device}"
    n_params = sum(p.numel() for p in base.parameters())
    lines = [
        f"Model `{args.model}` ({n_params / 1e6:.1f}M parameters, {len(map_model(base))} matrices), batch "
        f"{batch_size}, snapshot every {args.every} steps; {args.rounds} rounds of one {args.window}-step "
        f"window per mode (order reversed each round); time / none: median over rounds of the window's "
        f"ratio to that round's `none` window; {where}.",
        "",
        "| mode | steps/s | time / none | overhead | time / none, min..max | "
        "ms on the training thread per snapshot | s per snapshot on the worker | skipped |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Command: `python benchmarks/bench_overhead.py --model {args.model} --device {device.type} "
        f"--window {args.window} --rounds {args.rounds}"
        + (" --modes " + " ".join(f"'{m}'" if " " in m else m for m in args.modes)
           if args.modes != list(MODES) else "")
        + (f" --threads {args.threads}" if args.threads else "") + " --write`",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        name = f"bench_overhead_{args.model}_{device.type}"
        title = f"Training overhead, {args.model} on {device.type} (bench_overhead.py)"
        write_section(DOC, name, table, title)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
