"""Training-thread cost per snapshot with the publishers' outboxes, against publishing inline.

Four modes train their own copy of the same model on the same batches, side by side in one run:
snapshots synchronous or in the background (``background=True``), and the publisher fed from its
outbox by a worker thread (what the tracker does) or called inline on the training thread after each
snapshot (what it did before the outboxes; emulated here by publishing each new ``tracker.last_report``
right after the ``tracker.step`` call that produced it). The publisher is a real
:class:`~spectral_plugins.tensorboard.TensorBoardPublisher` with its default heatmaps (two PNG images
per snapshot) writing to a temporary directory. The modes take turns in windows of ``--window`` steps,
``--rounds`` times, the order reversed every other round. Measured: the seconds the training thread
spends inside the monitor (``tracker.step``, the window's closing ``tracker.flush(timeout=0)``, and
the inline publishing) per snapshot, and its ratio to the synchronous-inline mode.

Run: ``python benchmarks/bench_delivery.py [--every 5] [--window 10] [--rounds 4] [--write]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spectral_plugins import SpectralTracker, map_model
from spectral_plugins.runtime.publishing import Publisher, StepReport
from spectral_plugins.tensorboard import TensorBoardPublisher

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.bench_delivery
    from bench_overhead import demo_setup
    from common import DOC, machine, train_step, write_section
except ImportError:  # pragma: no cover
    from benchmarks.bench_overhead import demo_setup
    from benchmarks.common import DOC, machine, train_step, write_section

MODES = {  # name: (background, outbox)
    "synchronous, inline publishing": (False, False),
    "synchronous, outbox": (False, True),
    "background, inline publishing": (True, False),
    "background, outbox": (True, True),
}


@dataclass
class Run:
    """One mode: its model, optimizer, tracker, the inline publisher (None with the outbox) and timings."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tracker: SpectralTracker
    inline: Publisher | None
    step: int = 0
    seconds: list[float] = field(default_factory=list)  # per window, on the training thread
    published: list[int] = field(default_factory=list)  # snapshots per window
    _last: StepReport | None = None

    def monitor(self, call: str, *args: object) -> float:
        """Call the tracker (and publish a new report inline when this mode does); the seconds taken."""
        started = time.perf_counter()
        getattr(self.tracker, call)(*args)
        report = self.tracker.last_report
        if self.inline is not None and report is not None and report is not self._last:
            if self._last is None:
                self.inline.publish_config(self.tracker.config())
            self.inline.publish_step(report)
        self._last = report
        return time.perf_counter() - started


def train_window(run: Run, batches: Iterator, steps: int) -> None:
    seconds, before = 0.0, run.tracker.stats.snapshots
    for _ in range(steps):
        train_step(run.model, run.optimizer, batches)
        run.step += 1
        seconds += run.monitor("step", run.step)
    seconds += run.monitor("flush", 0.0)  # the snapshot in flight; never waits for the outbox
    run.seconds.append(seconds)
    run.published.append(run.tracker.stats.snapshots - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=5, help="snapshot period in steps")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=4, help="windows per mode (order reversed each round)")
    parser.add_argument("--write", action="store_true", help="store the table in docs/performance.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")
    base, make_batches = demo_setup(device, 32)
    with tempfile.TemporaryDirectory(prefix="bench_delivery_") as root:
        runs = []
        for index, (name, (background, outbox)) in enumerate(MODES.items()):
            model = copy.deepcopy(base)
            publisher = TensorBoardPublisher(Path(root) / str(index))
            tracker = SpectralTracker(model, every_n_steps=args.every, background=background,
                                      publishers=[publisher] if outbox else [])
            runs.append(Run(name, model, torch.optim.AdamW(model.parameters(), lr=3e-4), tracker,
                            None if outbox else publisher))
        streams = {run.name: make_batches() for run in runs}
        for run in runs:  # warm-up, ending half a period out of phase
            train_window(run, streams[run.name], args.every + args.every // 2)
            run.seconds.clear()
            run.published.clear()
        for round_index in range(args.rounds):
            for run in runs if round_index % 2 == 0 else runs[::-1]:
                train_window(run, streams[run.name], args.window)
        for run in runs:
            run.tracker.finish()
            if run.inline is not None:
                run.inline.close()
    per_snapshot = {run.name: [1e3 * s / max(1, n) for s, n in zip(run.seconds, run.published)]
                    for run in runs}
    reference = per_snapshot[runs[0].name]
    rows = []
    for run in runs:
        ratios = [ms / ref for ms, ref in zip(per_snapshot[run.name], reference)]
        delivery = run.tracker.stats.publishers
        lost = delivery[0].lost if delivery else 0
        rows.append(f"| {run.name} | {statistics.median(per_snapshot[run.name]):.1f} | "
                    f"{statistics.median(ratios):.3f} | {min(ratios):.3f}..{max(ratios):.3f} | "
                    f"{sum(run.published)} | {run.tracker.stats.skipped} | {lost} |")
    n_params = sum(p.numel() for p in base.parameters())
    lines = [
        f"Model `demo` ({n_params / 1e6:.1f}M parameters, {len(map_model(base))} matrices), batch 32, "
        f"snapshot every {args.every} steps, a TensorBoardPublisher with its two default heatmaps; "
        f"{args.rounds} rounds of one {args.window}-step window per mode (order reversed each round); "
        f"ms per snapshot: median over rounds of the training thread's time in the monitor divided by "
        f"the snapshots published in the window; ratio: to that round's synchronous-inline window; "
        f"{machine(device)}, {torch.get_num_threads()} torch threads.",
        "",
        "| mode | ms on the training thread per snapshot | ratio | ratio, min..max | snapshots | "
        "skipped | lost |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Command: `python benchmarks/bench_delivery.py --every {args.every} --window {args.window} "
        f"--rounds {args.rounds} --write`",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(DOC, "bench_delivery_demo_cpu", table,
                      "Training-thread cost per snapshot: outbox vs inline publishing (bench_delivery.py)")
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
